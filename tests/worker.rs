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
        prompt: Prompt::chat(vec![ChatMessage::new("user", "Name a colour.")]),
        params: common::greedy(4),
        adapter: None,
    }
}

/// Charges the key and records a queued job, as the API does before pushing.
async fn queued_job(app: &TestApp, key: &TestKey) -> GenerationJob {
    api_keys::charge(&app.ctx.db, key.id, &api_keys::hash_secret(&key.secret))
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

#[tokio::test]
async fn a_job_running_on_a_live_worker_is_never_run_by_another_until_that_worker_is_gone() {
    use sea_orm::{ActiveModelTrait, ActiveValue::Set, IntoActiveModel};
    use tollgate::models::{_entities::workers as worker_rows, jobs, workers};

    let app = TestApp::spawn_scripted(|_| {}).await;
    let key = app.key_with_calls(Some(3)).await;
    let job = queued_job(&app, &key).await;
    let db = &app.ctx.db;
    let bound = std::time::Duration::from_secs(15);
    // Worker A took the job and heartbeats.
    let claimed = jobs::mark_running(db, &job.job_id, "worker-a", bound)
        .await
        .expect("db");
    assert!(claimed.is_some());
    // Worker A heartbeats while a late delivery reaches worker B: B does not run it, charges
    // nothing, and gives up after twice its bound; the job stays A's.
    let beat = workers::Heartbeat {
        id: "worker-a".into(),
        host: "h".into(),
        pid: 1,
        device: "cpu".into(),
        models: vec!["smollm2".into()],
        adapters: vec![],
        engine: tollgate::engine::EngineStatus::default(),
        current_job: Some(job.job_id.clone()),
        jobs_served: 0,
        tokens_per_second: None,
        started_at: tollgate::models::now(),
    };
    workers::heartbeat(db, &beat).await.expect("heartbeat");
    let beating = {
        let db = db.clone();
        tokio::spawn(async move {
            loop {
                workers::heartbeat(&db, &beat).await.expect("heartbeat");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        })
    };
    let worker = common::worker_on(&app, Arc::new(FailingEngine), JobEvents::default())
        .with_orphan_after(std::time::Duration::from_secs(1));
    let outcome = worker.run_one(job.clone()).await.expect("run");
    beating.abort();
    assert!(matches!(outcome, Outcome::AlreadySettled), "{outcome:?}");
    let row = app.jobs_of(&key).await.remove(0);
    assert_eq!(
        (row.status.as_str(), row.worker.as_deref(), row.attempts),
        ("running", Some("worker-a"), 1)
    );
    // A stops heartbeating past the bound: B takes the job over.
    let mut stale = worker_rows::Entity::find_by_id("worker-a".to_string())
        .one(db)
        .await
        .expect("db")
        .expect("row")
        .into_active_model();
    stale.heartbeat_at = Set(tollgate::models::now() - chrono::Duration::minutes(5));
    stale.update(db).await.expect("age the heartbeat");
    let outcome = worker.run_one(job).await.expect("run");
    let Outcome::Failed(record) = outcome else {
        panic!("the orphaned job should have been taken over, got {outcome:?}");
    };
    assert_eq!(
        (record.attempts, record.worker.as_deref()),
        (2, Some("test-worker"))
    );
}

/// An engine call that never ends; it records when it is dropped (the worker gave it up).
struct Hanging(Arc<std::sync::atomic::AtomicBool>);

struct DroppedFlag(Arc<std::sync::atomic::AtomicBool>);

impl Drop for DroppedFlag {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[async_trait::async_trait]
impl tollgate::engine::Algorithm for Hanging {
    async fn run(
        &self,
        _: GenerationRequest,
    ) -> Result<tollgate::engine::Generation, tollgate::engine::EngineError> {
        let _flag = DroppedFlag(self.0.clone());
        std::future::pending().await
    }
    fn status(&self) -> tollgate::engine::EngineStatus {
        tollgate::engine::EngineStatus::default()
    }
}

#[tokio::test]
async fn a_running_job_cancelled_by_its_client_is_stopped_and_refunded() {
    use tollgate::models::{_entities::jobs as job_rows, jobs};

    let app = TestApp::spawn_scripted(|_| {}).await;
    let key = app.key_with_calls(Some(3)).await;
    let job = queued_job(&app, &key).await;
    let id = job.job_id.clone();
    let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let events = JobEvents::default();
    let waiter = events.subscribe(&id);
    let worker = common::worker_on(&app, Arc::new(Hanging(dropped.clone())), events.clone());
    let run = tokio::spawn(async move { worker.run_one(job).await });
    loop {
        let record = job_rows::Entity::find_by_id(id.clone())
            .one(&app.ctx.db)
            .await
            .expect("db")
            .expect("recorded");
        if record.status == "running" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let cancelled = jobs::cancel(&app.ctx.db, &id, key.id)
        .await
        .expect("db")
        .expect("cancelled while running");
    assert!(cancelled.is_cancelled() && cancelled.refunded);
    assert!(
        jobs::cancel(&app.ctx.db, &id, key.id)
            .await
            .expect("db")
            .is_none(),
        "settled once"
    );
    assert_eq!(app.calls_used(&key).await, 0, "refunded");
    events.publish(&cancelled);
    assert!(waiter.await.expect("notified").is_cancelled());
    // The worker sees the record change and gives the engine call up (without it, never).
    let outcome = tokio::time::timeout(std::time::Duration::from_secs(30), run)
        .await
        .expect("the worker stopped the cancelled job")
        .expect("task")
        .expect("run");
    assert!(matches!(outcome, Outcome::AlreadySettled), "{outcome:?}");
    assert!(
        dropped.load(std::sync::atomic::Ordering::SeqCst),
        "engine call dropped"
    );
    let record = jobs::Model::find_any(&app.ctx.db, &id)
        .await
        .expect("db")
        .expect("kept");
    assert!(record.is_cancelled(), "the cancel stands: {record:?}");
    assert_eq!(app.calls_used(&key).await, 0);
}
