//! The same guarantees with state in PostgreSQL (the production database).

mod common;

use chrono::{Duration, Utc};
use common::{code, TestApp};
use serde_json::json;
use tollgate::models::api_keys::KeyParams;

#[tokio::test]
async fn on_postgres_fifty_concurrent_requests_on_twenty_calls_admit_exactly_twenty() {
    let app = TestApp::spawn_on_postgres().await;
    let key = app.key_with_calls(Some(20)).await;
    let (ok, limited) = common::concurrent_calls(&app, &key, 50).await;
    assert_eq!((ok, limited), (20, 30));
    assert_eq!(app.calls_used(&key).await, 20);
    assert_eq!(app.job_count().await, 20);

    let (status, usage) = app.get(Some(&key), "/api/usage").await;
    assert_eq!(status, 200, "{usage}");
    assert_eq!(usage["days"][0]["requests"], 20, "{usage}");
    let (status, words) = app.get(Some(&key), "/usage/").await;
    assert_eq!(status, 200, "{words}");
    assert_eq!(
        words[0]["total_words"], 40,
        "20 requests of two words each: {words}"
    );
}

#[tokio::test]
async fn on_postgres_a_hot_keys_concurrent_admissions_share_commits_and_are_counted_exactly() {
    let app = TestApp::spawn_on_postgres().await;
    common::hot_key_bursts_share_commits_exactly(&app).await;
}

#[tokio::test]
async fn on_postgres_many_keys_concurrent_admissions_share_commits_each_refused_on_its_own_and_counted_exactly(
) {
    let app = TestApp::spawn_on_postgres().await;
    common::many_keys_bursts_share_commits_exactly(&app).await;
}

#[tokio::test]
async fn on_postgres_a_batch_charge_is_all_or_none_per_key_and_concurrent_batches_do_not_deadlock()
{
    let app = TestApp::spawn_on_postgres().await;
    common::charge_many_is_all_or_none_per_key_and_concurrent_batches_do_not_deadlock(&app).await;
}

#[tokio::test]
async fn on_postgres_concurrent_admissions_of_two_keys_at_their_users_budget_edge_admit_exactly_what_fits(
) {
    let app = TestApp::spawn_on_postgres().await;
    common::two_keys_at_their_users_budget_edge_admit_exactly_what_fits(&app).await;
}

#[tokio::test]
async fn on_postgres_date_windows_are_enforced() {
    let app = TestApp::spawn_on_postgres().await;
    let expired = app
        .issue_key(KeyParams {
            email: "e@example.com".into(),
            valid_until: Some((Utc::now() - Duration::minutes(1)).fixed_offset()),
            ..Default::default()
        })
        .await;
    let (status, body) = app.post_api(&expired, json!({"text": "hi"})).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(code(&body), "key_expired");
    assert_eq!(app.calls_used(&expired).await, 0);
    assert_eq!(app.job_count().await, 0);
}
