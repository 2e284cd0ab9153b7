//! A dead engine thread (issue 13, item 8): a panic outside the per-job wrappers takes the engine
//! down; the supervisor reports it (`/ping` 503 with the reason, `/metrics`), requests get 503 at
//! once instead of hanging, and the engine restarts itself and serves again.
//!
//! The panic is injected through the scripted engine's fault trigger
//! ([`tollgate::engine::scripted::PANIC_TRIGGER`]); the supervisor that catches it is the same
//! code that runs the llama.cpp engine thread.

mod common;

use std::time::{Duration, Instant};

use common::{code, TestApp};
use serde_json::{json, Value};
use tollgate::engine::scripted::PANIC_TRIGGER;

/// The back-off before the restart: long enough that the test sees the engine down, short
/// enough to keep the test quick.
const BACKOFF_MS: u64 = 3_000;

async fn metrics(app: &TestApp) -> String {
    let resp = app.http.get(app.url("/metrics")).send().await.expect("get");
    assert_eq!(resp.status().as_u16(), 200);
    resp.text().await.expect("body")
}

fn metric_line<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    text.lines()
        .find(|l| l.starts_with(&format!("{name}{{model=\"smollm2\"}}")))
        .and_then(|l| l.rsplit(' ').next())
}

#[tokio::test]
async fn a_panicking_engine_thread_is_reported_refused_with_503_and_restarted() {
    let app = TestApp::spawn_scripted(|s| {
        s["engine"]["restart"] = json!({"max_attempts": 3, "backoff_ms": BACKOFF_MS});
    })
    .await;
    let key = app.key_with_calls(None).await;
    let admin = app.admin_key().await;
    let (status, ok) = app.post_api(&key, json!({"text": "hello there"})).await;
    assert_eq!(
        (status, ok["message"].clone()),
        (200, json!("echo: hello there"))
    );

    // The fault: the engine thread panics with this job in flight. The job fails with a
    // clear error (refunded), and fast.
    let asked = Instant::now();
    let (status, failed) = app
        .post_api(&key, json!({"text": format!("please {PANIC_TRIGGER} now")}))
        .await;
    assert!(
        asked.elapsed() < Duration::from_millis(BACKOFF_MS),
        "the job in flight hung"
    );
    assert_eq!(status, 500, "{failed}");
    let message = failed["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("panicked"), "{failed}");

    // Down, with the reason, on the public /ping (503) and in the admin details.
    let (status, ping) = app.get(None, "/ping").await;
    assert_eq!(status, 503, "{ping}");
    assert_eq!(ping["ready"], false, "{ping}");
    let reason = ping["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("panicked") && reason.contains("restarting"),
        "{ping}"
    );
    // llama.cpp server's (and vLLM's) probe says the same.
    let (status, health) = app.get(None, "/health").await;
    assert_eq!(
        (status, code(&health)),
        (503, "model_unavailable"),
        "{health}"
    );
    assert!(
        health["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("panicked")),
        "{health}"
    );
    let (status, details) = app.get(Some(&admin), "/ping").await;
    assert_eq!(status, 503, "{details}");
    assert_eq!(details["worker"]["engine"]["ready"], false, "{details}");
    assert!(
        details["worker"]["engine"]["reason"].is_string(),
        "{details}"
    );
    assert_eq!(
        metric_line(&metrics(&app).await, "tollgate_engine_ready"),
        Some("0")
    );

    // A request meanwhile: 503 with the reason at once, nothing charged.
    let used = app.calls_used(&key).await;
    let asked = Instant::now();
    let (status, refused) = app.post_api(&key, json!({"text": "are you there"})).await;
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "the request waited"
    );
    assert_eq!(
        (status, code(&refused)),
        (503, "model_unavailable"),
        "{refused}"
    );
    let message = refused["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("panicked"), "{refused}");
    assert_eq!(app.calls_used(&key).await, used, "a refused call is free");

    // The supervisor restarts it: ready again, the restart counted, and it serves.
    let ping = wait_until_ready(&app).await;
    assert!(ping.get("reason").is_none(), "{ping}");
    assert_eq!(
        app.get(None, "/health").await,
        (200, json!({"status": "ok"}))
    );
    let (_, details) = app.get(Some(&admin), "/ping").await;
    let engine = &details["worker"]["engine"];
    assert_eq!(engine["restarts"], 1, "{details}");
    assert_eq!(engine["loads"], 2, "loaded again: {details}");
    let text = metrics(&app).await;
    assert_eq!(metric_line(&text, "tollgate_engine_ready"), Some("1"));
    assert_eq!(
        metric_line(&text, "tollgate_engine_restarts_total"),
        Some("1")
    );
    let (status, ok) = app.post_api(&key, json!({"text": "back again"})).await;
    assert_eq!(
        (status, ok["message"].clone()),
        (200, json!("echo: back again"))
    );
}

/// Polls the public `/ping` until it answers 200 and ready (bounded: the back-off and 30 s).
async fn wait_until_ready(app: &TestApp) -> Value {
    let until = Instant::now() + Duration::from_millis(BACKOFF_MS) + Duration::from_secs(30);
    loop {
        let (status, ping) = app.get(None, "/ping").await;
        if status == 200 && ping["ready"] == true {
            return ping;
        }
        assert!(Instant::now() < until, "never came back: {status} {ping}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
