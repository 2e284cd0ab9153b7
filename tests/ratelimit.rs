//! Per-key request-rate limits: 429 with `Retry-After`, nothing spent, keys independent.

mod common;

use common::{code, TestApp};
use serde_json::json;
use tollgate::models::api_keys::KeyParams;

#[tokio::test]
async fn a_key_over_its_rate_gets_429_with_retry_after_and_spends_nothing() {
    let app = TestApp::spawn_scripted(|_| {}).await;
    // One request a minute after a burst of two: the third in a row must wait ~a minute.
    let key = app
        .issue_key(KeyParams {
            email: "slow@example.com".into(),
            rate_limit_per_minute: Some(1),
            rate_limit_burst: Some(2),
            ..Default::default()
        })
        .await;
    let other = app.key_with_calls(None).await;
    let body = json!({"text": "hi", "max_tokens": 2, "temperature": 0});
    for _ in 0..2 {
        let (status, resp) = app.post_api(&key, body.clone()).await;
        assert_eq!(status, 200, "{resp}");
    }
    let resp = app
        .request(reqwest::Method::POST, Some(&key), "/api/")
        .json(&body)
        .send()
        .await
        .expect("request");
    let retry_after = common::retry_after(&resp);
    let (status, resp) = common::read(resp).await;
    assert_eq!(status, 429, "{resp}");
    assert_eq!(code(&resp), "rate_limited");
    assert!(
        retry_after.is_some_and(|s| (1..=60).contains(&s)),
        "Retry-After {retry_after:?}"
    );
    // The OpenAI route shares the limit and answers in OpenAI's shape.
    let chat = json!({"messages": [{"role": "user", "content": "hi"}]});
    let (status, resp) = app.post(Some(&key), "/v1/chat/completions", chat).await;
    assert_eq!(status, 429, "{resp}");
    assert_eq!(resp["error"]["type"], "rate_limit_error");
    assert_eq!(app.calls_used(&key).await, 2);
    assert_eq!(app.job_count().await, 2);

    // Another key is not affected.
    let (status, resp) = app.post_api(&other, body).await;
    assert_eq!(status, 200, "{resp}");
}

#[tokio::test]
async fn the_configured_default_applies_to_keys_without_their_own_limit() {
    let app = TestApp::spawn_scripted(|cfg| {
        cfg["api"]["rate_limit"] = json!({"per_minute": 1, "burst": 1});
    })
    .await;
    let key = app.key_with_calls(None).await;
    let body = json!({"text": "hi", "max_tokens": 2, "temperature": 0});
    let (status, resp) = app.post_api(&key, body.clone()).await;
    assert_eq!(status, 200, "{resp}");
    let (status, resp) = app.post_api(&key, body).await;
    assert_eq!(status, 429, "{resp}");
    assert_eq!(code(&resp), "rate_limited");
    assert_eq!(app.calls_used(&key).await, 1);
}
