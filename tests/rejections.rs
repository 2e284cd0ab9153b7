//! Every rejection: right status and code, and nothing spent, nothing queued.

mod common;

use chrono::{Duration, Utc};
use common::{code, TestApp, TestKey};
use reqwest::Method;
use serde_json::{json, Value};
use tollgate::models::api_keys::{ActiveModel as KeyActive, KeyParams};

/// Sends a raw request and asserts the status, the error code, and that neither the key's
/// counter nor the job table moved.
async fn assert_rejected(
    app: &TestApp,
    key: &TestKey,
    req: reqwest::RequestBuilder,
    status: u16,
    expected_code: &str,
) -> Value {
    let calls_before = app.calls_used(key).await;
    let jobs_before = app.job_count().await;
    let (got, body) = common::read(req.send().await.expect("request")).await;
    assert_eq!(got, status, "{body}");
    assert_eq!(code(&body), expected_code, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
    assert!(body["error"]["type"].is_string());
    assert_eq!(
        app.calls_used(key).await,
        calls_before,
        "quota spent by a rejected call"
    );
    assert_eq!(
        app.job_count().await,
        jobs_before,
        "job queued by a rejected call"
    );
    body
}

fn post(app: &TestApp, key: &TestKey) -> reqwest::RequestBuilder {
    app.request(Method::POST, Some(key), "/api/")
}

/// [`assert_rejected`] for `POST /api/` with `key` and the JSON `body`.
async fn assert_body_rejected(
    app: &TestApp,
    key: &TestKey,
    body: Value,
    status: u16,
    expected_code: &str,
) -> Value {
    assert_rejected(app, key, post(app, key).json(&body), status, expected_code).await
}

#[tokio::test]
async fn auth_failures_are_401() {
    let app = TestApp::spawn_scripted(|_| {}).await;
    let key = app.key_with_calls(Some(5)).await;
    let body = json!({"text": "hi"});
    assert_rejected(
        &app,
        &key,
        app.request(Method::POST, None, "/api/").json(&body),
        401,
        "missing_api_key",
    )
    .await;
    assert_rejected(
        &app,
        &key,
        app.request(Method::POST, None, "/api/")
            .bearer_auth("tg_00000000_nope")
            .json(&body),
        401,
        "invalid_api_key",
    )
    .await;
    assert_rejected(
        &app,
        &key,
        app.request(Method::POST, None, "/api/")
            .header("Authorization", format!("Basic {}", key.secret))
            .json(&body),
        401,
        "invalid_authorization",
    )
    .await;
    // The error body in OpenAI's shape, and the message again as `detail` (where FastAPI and
    // Django REST framework clients read it).
    let resp = app
        .request(Method::POST, None, "/api/")
        .json(&body)
        .send()
        .await
        .expect("send");
    let reply: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(reply["detail"], reply["error"]["message"], "{reply}");
    assert!(
        reply["error"]["param"].is_null() && reply["error"].get("param").is_some(),
        "{reply}"
    );
    // Django REST framework's `Token` scheme (djangollmapi's clients) is a key too, and so is a
    // real form body (`requests.post(url, data={"text": …})`): each spends one call.
    for (scheme, form) in [("Token", false), ("Bearer", true)] {
        let request = app
            .request(Method::POST, None, "/api/")
            .header("Authorization", format!("{scheme} {}", key.secret));
        let request = if form {
            request.form(&[("text", "hi")])
        } else {
            request.json(&body)
        };
        let resp = request.send().await.expect("send");
        assert_eq!(resp.status().as_u16(), 200, "{scheme} form={form}");
    }
    assert_eq!(app.calls_used(&key).await, 2);
    KeyActive::revoke(&app.ctx.db, &key.prefix)
        .await
        .expect("revoke");
    assert_body_rejected(&app, &key, body, 401, "key_revoked").await;
}

#[tokio::test]
async fn keys_outside_their_date_window_are_403() {
    let app = TestApp::spawn_scripted(|_| {}).await;
    let future = app
        .issue_key(KeyParams {
            email: "f@example.com".into(),
            valid_from: Some((Utc::now() + Duration::days(2)).fixed_offset()),
            ..Default::default()
        })
        .await;
    let past = app
        .issue_key(KeyParams {
            email: "p@example.com".into(),
            valid_until: Some((Utc::now() - Duration::days(2)).fixed_offset()),
            ..Default::default()
        })
        .await;
    let body = json!({"text": "hi"});
    assert_body_rejected(&app, &future, body.clone(), 403, "key_not_yet_valid").await;
    assert_body_rejected(&app, &past, body, 403, "key_expired").await;
}

#[tokio::test]
async fn a_used_up_quota_is_429() {
    let app = TestApp::spawn_scripted(|_| {}).await;
    let key = app.key_with_calls(Some(1)).await;
    let (status, _) = app
        .post_api(&key, json!({"text": "hi", "max_tokens": 1}))
        .await;
    assert_eq!(status, 200);
    let body =
        assert_body_rejected(&app, &key, json!({"text": "again"}), 429, "quota_exceeded").await;
    assert_eq!(body["error"]["type"], "insufficient_quota");
    let zero = app.key_with_calls(Some(0)).await;
    assert_body_rejected(&app, &zero, json!({"text": "hi"}), 429, "quota_exceeded").await;
}

#[tokio::test]
async fn malformed_bodies_are_400_or_422_and_cost_nothing() {
    let app = TestApp::spawn_scripted(|_| {}).await;
    let key = app.key_with_calls(Some(5)).await;
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (
            post(&app, &key)
                .header("Content-Type", "application/json")
                .body("{\"text\": "),
            400,
            "invalid_json",
        ),
        (
            post(&app, &key)
                .header("Content-Type", "application/json")
                .body(""),
            400,
            "empty_body",
        ),
        (
            post(&app, &key)
                .header("Content-Type", "application/xml")
                .body("<text>hi</text>"),
            400,
            "unsupported_content_type",
        ),
        (
            post(&app, &key)
                .header("Content-Type", "multipart/form-data; boundary=x")
                .body("--x--"),
            400,
            "unsupported_content_type",
        ),
        (post(&app, &key).json(&json!(["text"])), 422, "invalid_body"),
        (post(&app, &key).json(&json!({})), 422, "invalid_body"),
        (
            post(&app, &key).json(&json!({"text": 42})),
            422,
            "invalid_body",
        ),
        (
            post(&app, &key).json(&json!({"text": null})),
            422,
            "invalid_body",
        ),
        (
            post(&app, &key).json(&json!({"text": "   "})),
            422,
            "empty_prompt",
        ),
        (
            post(&app, &key).json(&json!({"text": "a\u{0}b"})),
            422,
            "invalid_prompt",
        ),
        (
            post(&app, &key).json(&json!({"text": "hi", "temperature": 3})),
            422,
            "invalid_temperature",
        ),
        (
            post(&app, &key).json(&json!({"text": "hi", "temperature": "hot"})),
            422,
            "invalid_body",
        ),
        (
            post(&app, &key).json(&json!({"text": "hi", "max_tokens": 0})),
            422,
            "invalid_max_tokens",
        ),
        (
            post(&app, &key).json(&json!({"text": "hi", "max_tokens": 1_000_000})),
            422,
            "invalid_max_tokens",
        ),
        (
            post(&app, &key).json(&json!({"text": "hi", "top_p": 0})),
            422,
            "invalid_top_p",
        ),
        (
            post(&app, &key).json(&json!({"text": "hi", "seed": -5})),
            422,
            "invalid_seed",
        ),
        (
            post(&app, &key)
                .json(&json!({"text": "hi", "stop": ["a","b","c","d","e","f","g","h","i"]})),
            422,
            "invalid_stop",
        ),
    ];
    for (req, status, expected) in cases {
        assert_rejected(&app, &key, req, status, expected).await;
    }
}

#[tokio::test]
async fn a_body_over_the_limit_is_413() {
    let app = TestApp::spawn_scripted(|_| {}).await;
    let key = app.key_with_calls(Some(5)).await;
    let big = "a".repeat(1024 * 1024 + 10);
    let body =
        assert_body_rejected(&app, &key, json!({"text": big}), 413, "payload_too_large").await;
    assert!(body["error"]["message"]
        .as_str()
        .unwrap_or("")
        .contains("1048576"));
}

#[tokio::test]
async fn a_prompt_longer_than_the_context_is_400_naming_the_limit() {
    let app = TestApp::spawn_scripted(|s| s["engine"]["context_size"] = json!(256)).await;
    let key = app.key_with_calls(Some(5)).await;
    let long = "tollgate counts tokens. ".repeat(200);
    let body = assert_body_rejected(
        &app,
        &key,
        json!({"text": long}),
        400,
        "context_length_exceeded",
    )
    .await;
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("256"),
        "{body}"
    );
    // Just under the limit still works.
    let (status, ok) = app
        .post_api(&key, json!({"text": "short", "max_tokens": 2}))
        .await;
    assert_eq!(status, 200, "{ok}");
}

#[tokio::test]
async fn key_problems_are_reported_before_body_problems() {
    let app = TestApp::spawn_scripted(|_| {}).await;
    let expired = app
        .issue_key(KeyParams {
            email: "e@example.com".into(),
            valid_until: Some((Utc::now() - Duration::hours(1)).fixed_offset()),
            ..Default::default()
        })
        .await;
    assert_body_rejected(&app, &expired, json!({}), 403, "key_expired").await;
}

/// The routes that spend a call may reuse a key's identity read moments ago
/// (`settings.api.key_cache_ms`). A change made by another process (here: written straight to
/// the table, bypassing this process's edit count) must still stop the key at once: the charge
/// checks the secret's hash and the standing again, and nothing is spent.
#[tokio::test]
async fn a_key_changed_elsewhere_while_its_identity_is_cached_is_refused_and_charged_nothing() {
    use sea_orm::{sea_query::Expr, ColumnTrait, EntityTrait, QueryFilter};
    use tollgate::models::api_keys::{Column, Entity};

    let app = TestApp::spawn_scripted(|s| {
        s["api"]["key_cache_ms"] = json!(60_000);
    })
    .await;
    let body = json!({"text": "hi"});
    let (revoked, rotated) = (
        app.key_with_calls(Some(5)).await,
        app.key_with_calls(Some(5)).await,
    );
    for key in [&revoked, &rotated] {
        let (status, answer) =
            common::read(post(&app, key).json(&body).send().await.expect("request")).await;
        assert_eq!(status, 200, "{answer}");
    }
    Entity::update_many()
        .col_expr(Column::RevokedAt, Expr::value(Utc::now().fixed_offset()))
        .filter(Column::Id.eq(revoked.id))
        .exec(&app.ctx.db)
        .await
        .expect("revoke elsewhere");
    Entity::update_many()
        .col_expr(Column::SecretHash, Expr::value("0".repeat(64)))
        .filter(Column::Id.eq(rotated.id))
        .exec(&app.ctx.db)
        .await
        .expect("rotate elsewhere");
    assert_body_rejected(&app, &revoked, body.clone(), 401, "key_revoked").await;
    assert_body_rejected(&app, &rotated, body, 401, "invalid_api_key").await;
    assert_eq!(app.calls_used(&revoked).await, 1);
    assert_eq!(app.calls_used(&rotated).await, 1);
}
