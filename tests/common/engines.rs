//! The worker's own step (`run_one`) without the HTTP API: a stand-in engine, a worker on any
//! engine, and a job recorded as the API records it before pushing it to the queue.

use std::sync::Arc;

use async_trait::async_trait;
use tollgate::{
    engine::{Algorithm, EngineError, EngineStatus, Generation, GenerationRequest, SamplingParams},
    models::{budgets::Reservation, jobs},
    notify::JobEvents,
    queue::{GenerationJob, Work},
    workers::generation::GenerationWorker,
};

use super::TestApp;

/// Narrow stand-in for a device that fails every job: exercises the refund and release paths.
pub struct FailingEngine;

#[async_trait]
impl Algorithm for FailingEngine {
    async fn run(&self, _: GenerationRequest) -> Result<Generation, EngineError> {
        Err(EngineError::Decode("simulated device failure".into()))
    }
    fn status(&self) -> EngineStatus {
        EngineStatus::default()
    }
}

/// A worker named `test-worker` running jobs of the test's database on `engine`.
pub fn worker_on(app: &TestApp, engine: Arc<dyn Algorithm>, events: JobEvents) -> GenerationWorker {
    GenerationWorker::new(app.ctx.db.clone(), engine, events, "test-worker".into())
}

/// Greedy sampling of at most `max_tokens`, no stop strings.
pub fn greedy(max_tokens: u32) -> SamplingParams {
    SamplingParams {
        max_tokens,
        temperature: 0.0,
        top_p: 1.0,
        seed: None,
        stop: vec![],
        controls: Default::default(),
    }
}

/// Records a queued `/api/` job of `api_key_id` on `smollm2` holding `reservation`, as the API
/// does before pushing it; returns its delivery, the queue's message for `request`.
pub async fn queued_job(
    app: &TestApp,
    api_key_id: i32,
    prompt_tokens: i32,
    reservation: Reservation,
    request: GenerationRequest,
) -> GenerationJob {
    let id = uuid::Uuid::new_v4().to_string();
    jobs::ActiveModel::create_queued(
        &app.ctx.db,
        jobs::NewJob {
            id: id.clone(),
            api_key_id,
            endpoint: "/api/".into(),
            model: "smollm2".into(),
            request_json: "{}".into(),
            prompt_tokens,
            client_ref: None,
            reservation,
            echo: None,
        },
    )
    .await
    .expect("job");
    GenerationJob {
        job_id: id,
        api_key_id,
        work: Work::from(request),
        request_id: None,
        priority: 0,
    }
}
