//! The worker's step (`run_one`) on a real database: settling, refunds, duplicate deliveries.

mod common;

use std::sync::Arc;

use async_trait::async_trait;
use common::TestApp;
use sea_orm::{EntityTrait, PaginatorTrait};
use tollgate::{
    engine::{
        Algorithm, ChatMessage, EngineError, EngineStatus, Generation, GenerationRequest, Prompt,
        SamplingParams,
    },
    models::{_entities::usage_records, api_keys, jobs},
    notify::JobEvents,
    queue::{GenerationJob, Work},
    services::Services,
    workers::generation::{GenerationWorker, Outcome},
};

/// Narrow stand-in: an engine that always fails, to exercise the refund path.
struct FailingEngine;

#[async_trait]
impl Algorithm for FailingEngine {
    async fn run(&self, _: GenerationRequest) -> Result<Generation, EngineError> {
        Err(EngineError::Decode("simulated device failure".into()))
    }
    fn status(&self) -> EngineStatus {
        EngineStatus::default()
    }
}

fn request() -> GenerationRequest {
    GenerationRequest {
        model: "smollm2".into(),
        prompt: Prompt::Chat {
            messages: vec![ChatMessage {
                role: "user".into(),
                content: "Name a colour.".into(),
            }],
        },
        params: SamplingParams {
            max_tokens: 4,
            temperature: 0.0,
            top_p: 1.0,
            seed: None,
            stop: vec![],
        },
        adapter: None,
    }
}

/// Charges the key and records a queued job, as the API does before pushing.
async fn queued_job(app: &TestApp, key: &common::TestKey) -> GenerationJob {
    api_keys::charge(&app.ctx.db, key.id)
        .await
        .expect("db")
        .expect("charged");
    let id = uuid::Uuid::new_v4().to_string();
    jobs::ActiveModel::create_queued(
        &app.ctx.db,
        jobs::NewJob {
            id: id.clone(),
            api_key_id: key.id,
            endpoint: "/api/".into(),
            model: "smollm2".into(),
            request_json: "{}".into(),
            prompt_tokens: 0,
            client_ref: None,
            reservation: Default::default(),
        },
    )
    .await
    .expect("job");
    GenerationJob {
        job_id: id,
        api_key_id: key.id,
        work: Work::Generate(request()),
        request_id: None,
        priority: 0,
    }
}

#[tokio::test]
async fn a_failed_generation_refunds_its_call_exactly_once() {
    let app = TestApp::spawn().await;
    let key = app.key_with_calls(Some(3)).await;
    let job = queued_job(&app, &key).await;
    assert_eq!(app.calls_used(&key).await, 1);

    let events = JobEvents::default();
    let waiter = events.subscribe(&job.job_id);
    let worker = GenerationWorker::new(
        app.ctx.db.clone(),
        Arc::new(FailingEngine),
        events.clone(),
        "test-worker".into(),
    );
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
    let engine = services.engine.clone().expect("embedded engine");
    let worker = GenerationWorker::new(
        app.ctx.db.clone(),
        engine.clone(),
        JobEvents::default(),
        "test-worker".into(),
    );
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
