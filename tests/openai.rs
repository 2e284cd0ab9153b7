//! OpenAI-compatible routes (non-streaming) against the real model.

mod common;

use common::{code, TestApp};
use serde_json::{json, Value};

async fn post(app: &TestApp, key: &common::TestKey, path: &str, body: Value) -> (u16, Value) {
    let resp = app
        .http
        .post(app.url(path))
        .bearer_auth(&key.secret)
        .json(&body)
        .send()
        .await
        .expect("request");
    common::read(resp).await
}

#[tokio::test]
async fn chat_completions_answer_in_openai_shape_and_count_one_call() {
    let app = TestApp::spawn().await;
    let key = app.key_with_calls(Some(3)).await;
    let (status, body) = post(
        &app,
        &key,
        "/v1/chat/completions",
        json!({
            "model": "smollm2",
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}
            ],
            "max_tokens": 12,
            "temperature": 0
        }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert!(body["id"]
        .as_str()
        .is_some_and(|id| id.starts_with("chatcmpl-")));
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    let content = body["choices"][0]["message"]["content"]
        .as_str()
        .expect("content");
    assert!(!content.trim().is_empty());
    let usage = &body["usage"];
    assert_eq!(
        usage["total_tokens"].as_i64(),
        Some(
            usage["prompt_tokens"].as_i64().unwrap_or(0)
                + usage["completion_tokens"].as_i64().unwrap_or(0)
        )
    );
    assert_eq!(app.calls_used(&key).await, 1);
}

#[tokio::test]
async fn completions_continue_raw_text() {
    let app = TestApp::spawn().await;
    let key = app.key_with_calls(None).await;
    let (status, body) = post(
        &app,
        &key,
        "/v1/completions",
        json!({"model": "smollm2", "prompt": "One, two, three,", "max_tokens": 6, "temperature": 0}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "text_completion");
    assert!(body["choices"][0]["text"]
        .as_str()
        .is_some_and(|t| !t.is_empty()));
    assert_eq!(body["usage"]["completion_tokens"], 6);
    assert_eq!(body["choices"][0]["finish_reason"], "length");
}

#[tokio::test]
async fn models_lists_the_served_model_and_unknown_models_are_404() {
    let app = TestApp::spawn().await;
    let key = app.key_with_calls(Some(2)).await;
    let (status, body) = app.get(Some(&key), "/v1/models").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "list");
    assert_eq!(body["data"][0]["id"], "smollm2");
    let (status, _) = app.get(None, "/v1/models").await;
    assert_eq!(status, 401);

    let (status, body) = post(
        &app,
        &key,
        "/v1/chat/completions",
        json!({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(code(&body), "model_not_found");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap_or("")
        .contains("smollm2"));
    assert_eq!(app.calls_used(&key).await, 0);
    assert_eq!(app.job_count().await, 0);
}

#[tokio::test]
async fn invalid_openai_requests_spend_nothing() {
    let app = TestApp::spawn().await;
    let key = app.key_with_calls(Some(2)).await;
    let cases = [
        (json!({"messages": []}), 422, "invalid_messages"),
        (
            json!({"messages": [{"role": "wizard", "content": "hi"}]}),
            422,
            "invalid_role",
        ),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
            422,
            "unsupported_content",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "n": 2}),
            400,
            "invalid_n",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "temperature": 9}),
            422,
            "invalid_temperature",
        ),
        (json!({"model": "smollm2"}), 422, "invalid_body"),
    ];
    for (body, status, expected) in cases {
        let (got, resp) = post(&app, &key, "/v1/chat/completions", body).await;
        assert_eq!(got, status, "{resp}");
        assert_eq!(code(&resp), expected, "{resp}");
    }
    assert_eq!(app.calls_used(&key).await, 0);
    assert_eq!(app.job_count().await, 0);
}
