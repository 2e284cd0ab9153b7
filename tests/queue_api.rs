//! Seed 001's `/generate` and `/chat_completion`, including `job_id` idempotency.

mod common;

use common::{code, TestApp};
use serde_json::{json, Value};

async fn post(app: &TestApp, key: &common::TestKey, path: &str, body: &Value) -> (u16, Value) {
    let resp = app
        .http
        .post(app.url(path))
        .bearer_auth(&key.secret)
        .json(body)
        .send()
        .await
        .expect("request");
    common::read(resp).await
}

#[tokio::test]
async fn the_seeds_documented_examples_get_content() {
    // A small server maximum keeps the seed's large token limits quick to serve.
    let app = TestApp::spawn_with(|s| s["api"]["max_tokens_limit"] = json!(32)).await;
    let key = app.key_with_calls(None).await;
    // Verbatim from seed 001 (its placeholder model name included).
    let generate = json!({
      "job_id": "12345",
      "meta": {"temperature": 0.5, "tokens_limit": 1000, "stop_words": ["stop"], "model": "gpt-model"},
      "content": "What is AI?"
    });
    let (status, body) = post(&app, &key, "/generate", &generate).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["content"]
            .as_str()
            .is_some_and(|c| !c.trim().is_empty()),
        "{body}"
    );

    let chat = json!({
      "job_id": "12346",
      "meta": {"temperature": 0.5, "tokens_limit": 1000, "stop_words": ["stop"], "model": "gpt-model"},
      "messages": [
        {"role": "user", "content": "What is AI?"},
        {"role": "assistant", "content": "Artificial Intelligence is..."}
      ]
    });
    let (status, body) = post(&app, &key, "/chat_completion", &chat).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["content"].is_string(), "{body}");

    // The seed's default tokens_limit (8096) is clamped, not refused.
    let (status, body) = post(
        &app,
        &key,
        "/generate",
        &json!({"meta": {"tokens_limit": 8096}, "content": "Hi"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn a_repeated_job_id_returns_the_first_result_without_a_second_charge() {
    let app = TestApp::spawn().await;
    let key = app.key_with_calls(Some(10)).await;
    let body = json!({"job_id": "order-42", "meta": {"temperature": 0.9, "tokens_limit": 24}, "content": "Write a haiku."});
    let (s1, first) = post(&app, &key, "/generate", &body).await;
    let (s2, second) = post(&app, &key, "/generate", &body).await;
    assert_eq!((s1, s2), (200, 200), "{first} {second}");
    assert_eq!(
        first["content"], second["content"],
        "a repeat generated again"
    );
    assert_eq!(first["job_id"], "order-42");
    assert_eq!(app.calls_used(&key).await, 1);
    assert_eq!(app.job_count().await, 1);

    // The same id from another key is that key's own job.
    let other = app.key_with_calls(Some(10)).await;
    let (status, _) = post(&app, &other, "/generate", &body).await;
    assert_eq!(status, 200);
    assert_eq!(app.calls_used(&other).await, 1);
    assert_eq!(app.job_count().await, 2);
}

#[tokio::test]
async fn concurrent_repeats_of_one_job_id_generate_and_charge_once() {
    let app = TestApp::spawn().await;
    let key = app.key_with_calls(Some(10)).await;
    let body = json!({"job_id": "burst", "meta": {"temperature": 1.0, "tokens_limit": 16}, "content": "Tell a joke."});
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let http = app.http.clone();
        let url = app.url("/generate");
        let secret = key.secret.clone();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let resp = http
                .post(url)
                .bearer_auth(secret)
                .json(&body)
                .send()
                .await
                .expect("request");
            common::read(resp).await
        }));
    }
    let mut contents = Vec::new();
    for t in tasks {
        let (status, body) = t.await.expect("task");
        assert_eq!(status, 200, "{body}");
        contents.push(body["content"].clone());
    }
    assert!(contents.windows(2).all(|w| w[0] == w[1]), "{contents:?}");
    assert_eq!(app.calls_used(&key).await, 1);
    assert_eq!(app.job_count().await, 1);
}

#[tokio::test]
async fn invalid_seed001_requests_spend_nothing() {
    let app = TestApp::spawn().await;
    let key = app.key_with_calls(Some(3)).await;
    let cases = [
        ("/generate", json!({"meta": {}}), 422, "invalid_body"),
        ("/generate", json!({"content": ""}), 422, "empty_prompt"),
        (
            "/generate",
            json!({"job_id": "", "content": "hi"}),
            422,
            "invalid_job_id",
        ),
        (
            "/generate",
            json!({"content": "hi", "meta": {"tokens_limit": 0}}),
            422,
            "invalid_tokens_limit",
        ),
        (
            "/generate",
            json!({"content": "hi", "meta": {"temperature": 7}}),
            422,
            "invalid_temperature",
        ),
        (
            "/chat_completion",
            json!({"messages": []}),
            422,
            "invalid_messages",
        ),
    ];
    for (path, body, status, expected) in cases {
        let (got, resp) = post(&app, &key, path, &body).await;
        assert_eq!(got, status, "{path}: {resp}");
        assert_eq!(code(&resp), expected, "{path}: {resp}");
    }
    assert_eq!(app.calls_used(&key).await, 0);
    assert_eq!(app.job_count().await, 0);
}
