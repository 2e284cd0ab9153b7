//! The worker's step (`run_one`) on a real database: settling, refunds, duplicate deliveries.

mod common;

use std::sync::Arc;

use common::{FailingEngine, TestApp, TestKey};
use sea_orm::{EntityTrait, PaginatorTrait};
use tollgate::{
    engine::{ChatMessage, GenerationRequest, Prompt},
    models::{_entities::usage_records, api_keys},
    notify::JobEvents,
    queue::GenerationJob,
    services::Services,
    workers::generation::Outcome,
};

fn request() -> GenerationRequest {
    GenerationRequest {
        model: "smollm2".into(),
        prompt: Prompt::Chat {
            messages: vec![ChatMessage {
                role: "user".into(),
                content: "Name a colour.".into(),
            }],
        },
        params: common::greedy(4),
        adapter: None,
    }
}

/// Charges the key and records a queued job, as the API does before pushing.
async fn queued_job(app: &TestApp, key: &TestKey) -> GenerationJob {
    api_keys::charge(&app.ctx.db, key.id)
        .await
        .expect("db")
        .expect("charged");
    common::queued_job(app, key.id, 0, Default::default(), request()).await
}

#[tokio::test]
async fn a_failed_generation_refunds_its_call_exactly_once() {
    let app = TestApp::spawn().await;
    let key = app.key_with_calls(Some(3)).await;
    let job = queued_job(&app, &key).await;
    assert_eq!(app.calls_used(&key).await, 1);

    let events = JobEvents::default();
    let waiter = events.subscribe(&job.job_id);
    let worker = common::worker_on(&app, Arc::new(FailingEngine), events.clone());
    let outcome = worker.run_one(job.clone()).await.expect("run");
    let Outcome::Failed(record) = outcome else {
        panic!("expected a failed job, got {outcome:?}");
    };
    assert_eq!(record.status, "failed");
    assert!(record.refunded);
    assert!(record
        .error
        .as_deref()
        .unwrap_or("")
        .contains("simulated device failure"));
    assert_eq!(app.calls_used(&key).await, 0, "call not refunded");
    let notified = waiter.await.expect("waiter notified");
    assert_eq!(notified.status, "failed");

    // The queue delivers the same job again (e.g. after a crash): no second refund.
    let again = worker.run_one(job).await.expect("run");
    assert!(matches!(again, Outcome::AlreadySettled), "{again:?}");
    assert_eq!(app.calls_used(&key).await, 0);
}

#[tokio::test]
async fn a_duplicate_delivery_of_a_done_job_is_not_generated_or_counted_twice() {
    let app = TestApp::spawn().await;
    let key = app.key_with_calls(Some(3)).await;
    let job = queued_job(&app, &key).await;
    let services = Services::from_ctx(&app.ctx).expect("services");
    let engine = services.models.engine().cloned().expect("embedded engine");
    let worker = common::worker_on(&app, engine.clone(), JobEvents::default());
    let served_before = engine.status().jobs_served;

    let first = worker.run_one(job.clone()).await.expect("run");
    let Outcome::Done(record) = first else {
        panic!("expected done, got {first:?}");
    };
    assert!(record.generated_tokens > 0);
    assert!(record.result.as_deref().is_some_and(|t| !t.is_empty()));

    let second = worker.run_one(job).await.expect("run");
    assert!(matches!(second, Outcome::AlreadySettled), "{second:?}");
    assert_eq!(
        engine.status().jobs_served,
        served_before + 1,
        "generated twice"
    );
    assert_eq!(app.calls_used(&key).await, 1);
    let usage_rows = usage_records::Entity::find()
        .count(&app.ctx.db)
        .await
        .expect("db");
    assert_eq!(usage_rows, 1);
}
