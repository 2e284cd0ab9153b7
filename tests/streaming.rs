//! `GET /api/jobs/{id}/events`: tokens as they are generated, then the final record.

mod common;

use common::{TestApp, TestKey};
use reqwest::Method;
use serde_json::{json, Value};

/// Parses an SSE body into (event, data) pairs.
fn events(body: &str) -> Vec<(String, Value)> {
    body.split("\n\n")
        .filter_map(|block| {
            let mut event = None;
            let mut data = String::new();
            for line in block.lines() {
                if let Some(e) = line.strip_prefix("event:") {
                    event = Some(e.trim().to_string());
                } else if let Some(d) = line.strip_prefix("data:") {
                    data.push_str(d.strip_prefix(' ').unwrap_or(d));
                }
            }
            Some((event?, serde_json::from_str(&data).ok()?))
        })
        .collect()
}

async fn read_events(app: &TestApp, key: &TestKey, job_id: &str) -> Vec<(String, Value)> {
    let resp = app
        .request(
            Method::GET,
            Some(key),
            &format!("/api/jobs/{job_id}/events"),
        )
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status().as_u16(), 200);
    assert!(
        common::header(&resp, "content-type").is_some_and(|v| v.starts_with("text/event-stream"))
    );
    events(&resp.text().await.expect("body"))
}

#[tokio::test]
async fn a_job_streams_its_tokens_then_its_result_and_a_reconnect_gets_the_result() {
    let app = TestApp::spawn().await;
    let key = app.key_with_calls(Some(3)).await;
    let request = json!({"text": "Write a long story about a dragon and a knight.",
                         "max_tokens": 160, "temperature": 0});
    let (status, body) = app.post(Some(&key), "/api/jobs", request).await;
    assert_eq!(status, 202, "{body}");
    let job_id = body["job_id"].as_str().expect("job id").to_string();

    let live = read_events(&app, &key, &job_id).await;
    let (last_event, last) = live.last().expect("at least the done event");
    assert_eq!(last_event, "done", "{live:?}");
    assert_eq!(last["status"], "done", "{last}");
    let tokens: Vec<&str> = live
        .iter()
        .filter(|(e, _)| e == "token")
        .filter_map(|(_, d)| d["text"].as_str())
        .collect();
    assert!(tokens.len() >= 2, "no incremental tokens: {live:?}");
    assert_eq!(tokens.concat(), last["message"].as_str().expect("message"));

    // Reconnecting after the job settled: the final result at once.
    let again = read_events(&app, &key, &job_id).await;
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!(again[0].0, "done");
    assert_eq!(again[0].1["message"], last["message"]);

    // Another key's job is not visible.
    let other = app.key_with_calls(None).await;
    let (status, _) = app
        .get(Some(&other), &format!("/api/jobs/{job_id}/events"))
        .await;
    assert_eq!(status, 404);
}

/// Resident memory of this process (the test server runs in it), in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Growth allowed over 2,000 reads of a settled job's events: 8 MiB, about 4 KiB a read. A
/// read used to leave a 1,024-slot channel behind, about 50 KiB each (~100 MiB in all).
const EVENTS_RSS_BOUND_KIB: u64 = 8 * 1024;

#[tokio::test]
async fn reading_a_finished_jobs_events_again_and_again_leaves_nothing_behind() {
    let app = TestApp::spawn_scripted(|_| {}).await;
    let key = app.key_with_calls(None).await;
    let (status, body) = app.post_api(&key, json!({"text": "Hello there"})).await;
    assert_eq!(status, 200, "{body}");
    let job_id = body["job_id"].as_str().expect("job id").to_string();
    // Warm-up: connection pools, allocator arenas and caches reach their working size.
    for _ in 0..200 {
        let events = read_events(&app, &key, &job_id).await;
        assert_eq!(events.last().map(|e| e.0.as_str()), Some("done"));
    }
    let before = rss_kib();
    for _ in 0..2000 {
        let events = read_events(&app, &key, &job_id).await;
        assert_eq!(events.last().map(|e| e.0.as_str()), Some("done"));
    }
    let grown = rss_kib().saturating_sub(before);
    println!("RSS grew {grown} KiB over 2,000 reads of a settled job's events");
    assert!(before > 0, "VmRSS must be readable");
    assert!(
        grown < EVENTS_RSS_BOUND_KIB,
        "RSS grew {grown} KiB over 2,000 reads (bound {EVENTS_RSS_BOUND_KIB} KiB)"
    );
    let services = tollgate::services::Services::from_ctx(&app.ctx).expect("services");
    assert_eq!(
        (services.events.streaming(), services.events.waiting()),
        (0, 0),
        "every channel opened for a settled job is gone"
    );
}
