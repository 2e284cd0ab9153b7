//! Each seed's documented example requests, sent as its clients send them, with only the base
//! URL changed: seed 001's curl bodies and seed 004's Python `requests` code carry no
//! `Authorization` header, so their base URL carries the key (`/k/<key>`); seed 003's Python
//! client sends its bearer header as before. (Seed 002's examples are in tests/accounts.rs,
//! seed 000's routes in tests/lora.rs and tests/embeddings.rs.)

mod common;

use common::{code, TestApp};
use serde_json::json;

#[tokio::test]
async fn seed_001_curl_examples_work_with_the_key_in_the_base_url() {
    // The seed's bodies ask for 1000 tokens; this server clamps tokens_limit to its
    // max_tokens_limit (documented), kept small here so the test stays quick on a busy machine.
    let app = TestApp::spawn_with(|s| s["api"]["max_tokens_limit"] = json!(24)).await;
    let key = app.key_with_calls(Some(5)).await;
    let base = format!("{}/k/{}", app.base, key.secret);
    let generate = json!({
      "job_id": "12345",
      "meta": {
        "temperature": 0.5,
        "tokens_limit": 1000,
        "stop_words": ["stop"],
        "model": "gpt-model"
      },
      "content": "What is AI?"
    });
    let send = |path: &str, body: &serde_json::Value| {
        app.http
            .post(format!("{base}{path}"))
            .header("Content-Type", "application/json")
            .body(body.to_string())
            .send()
    };
    let (status, first) = common::read(send("/generate", &generate).await.expect("send")).await;
    assert_eq!(status, 200, "{first}");
    assert!(first["content"].is_string(), "{first}");
    // The same job_id again: the first answer, not a second generation or charge.
    let (status, again) = common::read(send("/generate", &generate).await.expect("send")).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["content"], first["content"]);
    assert_eq!(app.calls_used(&key).await, 1);

    // Verbatim: the seed's second example reuses "12345" for another request (a new job).
    let chat = json!({
      "job_id": "12345",
      "meta": {
        "temperature": 0.5,
        "tokens_limit": 1000,
        "stop_words": ["stop"],
        "model": "gpt-model"
      },
      "messages": [
        {"role": "user", "content": "What is AI?"},
        {"role": "assistant", "content": "Artificial Intelligence is..."}
      ]
    });
    let (status, body) = common::read(send("/chat_completion", &chat).await.expect("send")).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["content"].is_string(), "{body}");
    assert_eq!(app.calls_used(&key).await, 2);

    // A wrong key in the URL is a 401 like a wrong header, and spends nothing.
    let resp = app
        .http
        .post(format!("{}/k/tg_00000000_nope/generate", app.base))
        .json(&generate)
        .send()
        .await
        .expect("send");
    let (status, body) = common::read(resp).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(code(&body), "invalid_api_key");
    assert_eq!(app.calls_used(&key).await, 2);
}

#[tokio::test]
async fn the_key_in_the_base_url_wins_over_the_sdks_placeholder_header() {
    // Seed 002's OpenAI-SDK clients are built with `api_key="EMPTY"`; the key rides in their
    // base URL (`http://host/k/<key>/v1`).
    let app = TestApp::spawn_scripted(|_| {}).await;
    let key = app.key_with_calls(Some(3)).await;
    let resp = app
        .http
        .post(format!("{}/k/{}/v1/chat/completions", app.base, key.secret))
        .bearer_auth("EMPTY")
        .json(&json!({"model": "smollm2", "messages": [{"role": "user", "content": "Hello"}]}))
        .send()
        .await
        .expect("send");
    let (status, body) = common::read(resp).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(app.calls_used(&key).await, 1);
}

#[tokio::test]
async fn seed_003_and_seed_004_python_examples_run_unchanged_but_for_the_url() {
    let python = common::python();
    let app = TestApp::spawn().await;
    let client = app.key_with_calls(Some(3)).await;
    let admin = app.admin_key().await;
    let args = [
        "tests/python/seed_examples.py",
        &app.base,
        &client.secret,
        &admin.secret,
        "SmolLM2-135M-Instruct.Q4_1.gguf",
    ];
    common::run_checks(python, &args, "seed examples", "seed examples passed").await;
    assert_eq!(app.calls_used(&client).await, 1, "seed 003's one call");
    assert_eq!(app.calls_used(&admin).await, 1, "seed 004's one inference");
}
