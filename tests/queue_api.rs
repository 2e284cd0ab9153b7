//! Seed 001's `/generate` and `/chat_completion`, including `job_id` idempotency.

mod common;

use common::{code, TestApp};
use serde_json::json;

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
    let (status, body) = app.post(Some(&key), "/generate", &generate).await;
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
    let (status, body) = app.post(Some(&key), "/chat_completion", &chat).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["content"].is_string(), "{body}");

    // The seed's default tokens_limit (8096) is clamped, not refused.
    let (status, body) = app
        .post(
            Some(&key),
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
    let (s1, first) = app.post(Some(&key), "/generate", &body).await;
    let (s2, second) = app.post(Some(&key), "/generate", &body).await;
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
    let (status, _) = app.post(Some(&other), "/generate", &body).await;
    assert_eq!(status, 200);
    assert_eq!(app.calls_used(&other).await, 1);
    assert_eq!(app.job_count().await, 2);
}

#[tokio::test]
async fn concurrent_repeats_of_one_job_id_generate_and_charge_once() {
    let app = TestApp::spawn().await;
    let key = app.key_with_calls(Some(10)).await;
    let body = json!({"job_id": "burst", "meta": {"temperature": 1.0, "tokens_limit": 16}, "content": "Tell a joke."});
    let repeats = (0..6).map(|_| (&key, "/generate", body.clone()));
    let mut contents = Vec::new();
    for (status, body) in app.post_at_once(repeats).await {
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
        let (got, resp) = app.post(Some(&key), path, &body).await;
        assert_eq!(got, status, "{path}: {resp}");
        assert_eq!(code(&resp), expected, "{path}: {resp}");
    }
    assert_eq!(app.calls_used(&key).await, 0);
    assert_eq!(app.job_count().await, 0);
}
