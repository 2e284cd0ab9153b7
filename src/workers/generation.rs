//! The worker: takes one queued job (a generation or an embedding), runs it on the engine,
//! settles the record.

use std::sync::Arc;

use sea_orm::DatabaseConnection;

use crate::{
    engine::{Algorithm, EngineError},
    models::{
        jobs::{self, JobOutput},
        ModelError,
    },
    notify::JobEvents,
    queue::{GenerationJob, JobHandler, Work},
};

/// How one delivery ended.
#[derive(Debug)]
pub enum Outcome {
    Done(jobs::Model),
    Failed(jobs::Model),
    /// The job was already settled (a duplicate delivery): nothing was run or charged.
    AlreadySettled,
}

pub struct GenerationWorker {
    db: DatabaseConnection,
    algorithm: Arc<dyn Algorithm>,
    events: JobEvents,
    name: String,
}

impl GenerationWorker {
    #[must_use]
    pub fn new(
        db: DatabaseConnection,
        algorithm: Arc<dyn Algorithm>,
        events: JobEvents,
        name: String,
    ) -> Self {
        Self {
            db,
            algorithm,
            events,
            name,
        }
    }

    /// Runs one job to its final state and notifies whoever waits for it.
    ///
    /// # Errors
    /// Database errors; the queue then retries the delivery.
    #[tracing::instrument(skip(self, job), fields(job_id = %job.job_id, worker = %self.name))]
    pub async fn run_one(&self, job: GenerationJob) -> Result<Outcome, ModelError> {
        let Some(_running) = jobs::mark_running(&self.db, &job.job_id, &self.name).await? else {
            tracing::info!("job already settled; skipping duplicate delivery");
            if let Some(record) = jobs::Model::find_any(&self.db, &job.job_id).await? {
                self.events.publish(&record);
            }
            return Ok(Outcome::AlreadySettled);
        };
        let started = std::time::Instant::now();
        let result = match job.work {
            Work::Generate(request) => self.generate(&job.job_id, request).await,
            Work::Embed(request) => self.algorithm.embed(request).await.and_then(|e| {
                JobOutput::embeddings(&e).map_err(|e| EngineError::Embedding(e.to_string()))
            }),
        };
        let outcome = match result {
            Ok(output) => {
                tracing::info!(
                    prompt_tokens = output.prompt_tokens,
                    generated_tokens = output.generated_tokens,
                    ms = started.elapsed().as_millis() as u64,
                    "job done"
                );
                match jobs::complete(&self.db, &job.job_id, &output).await? {
                    Some(record) => Outcome::Done(record),
                    None => Outcome::AlreadySettled,
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "job failed; refunding its call");
                match jobs::fail(&self.db, &job.job_id, &e.to_string()).await? {
                    Some(record) => Outcome::Failed(record),
                    None => Outcome::AlreadySettled,
                }
            }
        };
        if let Outcome::Done(record) | Outcome::Failed(record) = &outcome {
            self.events.publish(record);
        }
        Ok(outcome)
    }
}

impl GenerationWorker {
    /// Runs a generation, forwarding its text deltas to the job's stream subscribers.
    async fn generate(
        &self,
        job_id: &str,
        request: crate::engine::GenerationRequest,
    ) -> Result<JobOutput, EngineError> {
        let (sink, mut deltas) = tokio::sync::mpsc::unbounded_channel::<String>();
        let events = self.events.clone();
        let stream_id = job_id.to_string();
        let forward = tokio::spawn(async move {
            while let Some(delta) = deltas.recv().await {
                events.publish_delta(&stream_id, delta);
            }
        });
        let result = self.algorithm.run_streaming(request, sink).await;
        // The sink is gone with the engine call; let the last deltas out before the final record.
        let _ = forward.await;
        result.map(|g| JobOutput::from(&g))
    }
}

#[async_trait::async_trait]
impl JobHandler for GenerationWorker {
    async fn handle(&self, job: GenerationJob) -> Result<(), String> {
        self.run_one(job)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}
