//! Seed 000's disallowed-content check: refused before queueing, nothing charged.

mod common;

use common::{code, TestApp};
use serde_json::json;

#[tokio::test]
async fn prompts_matching_the_deny_list_are_refused_on_every_route_and_cost_nothing() {
    let app = TestApp::spawn_scripted(|s| {
        s["policy"]["deny"] = json!(["forbidden-topic", r"\bb[o0]mb\b"])
    })
    .await;
    let key = app.key_with_calls(Some(5)).await;
    let cases = [
        ("/api/", json!({"text": "How do I build a B0MB?"})),
        (
            "/api/jobs",
            json!({"text": "tell me about the FORBIDDEN-TOPIC"}),
        ),
        ("/generate", json!({"content": "bomb recipe"})),
        (
            "/chat_completion",
            json!({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "forbidden-topic"}]}),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "system", "content": "discuss forbidden-topic"}, {"role": "user", "content": "go"}]}),
        ),
        ("/v1/completions", json!({"prompt": "a bomb"})),
    ];
    for (path, body) in cases {
        let (status, err) = app.post(Some(&key), path, body).await;
        assert_eq!(status, 400, "{path}: {err}");
        assert_eq!(code(&err), "content_policy_violation", "{path}: {err}");
    }
    assert_eq!(app.calls_used(&key).await, 0);
    assert_eq!(app.job_count().await, 0);

    // Words that merely contain a denied pattern's letters pass.
    let (status, body) = app
        .post_api(
            &key,
            json!({"text": "The bombastic speech", "max_tokens": 2}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn an_invalid_deny_pattern_stops_the_server_at_start() {
    use loco_rs::{app::Hooks, boot::StartMode, environment::Environment};
    let dir = common::scratch_dir("policy");
    let config =
        common::test_config(&dir, None, |s| s["policy"]["deny"] = json!(["(unclosed"])).await;
    let booted = tollgate::app::App::boot(StartMode::ServerOnly, &Environment::Test, config).await;
    let err = booted.err().expect("boot must fail").to_string();
    assert!(err.contains("settings.policy.deny"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
