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
    /// The job was already settled, or runs on another live worker (a late or duplicate
    /// delivery): nothing was run or charged. Or it was settled elsewhere while it ran
    /// (cancelled by its client, failed by the reaper): its generation was stopped.
    AlreadySettled,
}

/// How often a worker reads the record of each job it runs, to stop one settled elsewhere.
const WATCH_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

pub struct GenerationWorker {
    db: DatabaseConnection,
    algorithm: Arc<dyn Algorithm>,
    events: JobEvents,
    name: String,
    /// Deliveries a job gets before it is failed; a worker killed mid-job costs one.
    max_attempts: i32,
    /// How long a worker's heartbeat may be missing before its running job may be taken over.
    orphan_after: std::time::Duration,
    stats: Arc<WorkerStats>,
}

/// What this worker is doing, for its heartbeat.
#[derive(Debug, Default)]
pub struct WorkerStats {
    inner: std::sync::Mutex<StatsInner>,
}

#[derive(Debug, Default, Clone)]
pub struct StatsInner {
    pub current_job: Option<String>,
    pub jobs_served: u64,
    pub tokens_per_second: Option<f64>,
}

impl WorkerStats {
    #[must_use]
    pub fn snapshot(&self) -> StatsInner {
        self.inner.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn started(&self, job_id: &str) {
        if let Ok(mut s) = self.inner.lock() {
            s.current_job = Some(job_id.to_string());
        }
    }

    fn finished(&self, tokens_per_second: Option<f64>) {
        if let Ok(mut s) = self.inner.lock() {
            s.current_job = None;
            s.jobs_served += 1;
            if tokens_per_second.is_some() {
                s.tokens_per_second = tokens_per_second;
            }
        }
    }
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
            max_attempts: 3,
            orphan_after: std::time::Duration::from_secs(15),
            stats: Arc::default(),
        }
    }

    /// Deliveries a job gets before it is failed (`settings.queue.max_attempts`).
    #[must_use]
    pub fn with_max_attempts(mut self, max_attempts: u32) -> Self {
        self.max_attempts = i32::try_from(max_attempts.max(1)).unwrap_or(i32::MAX);
        self
    }

    /// How long a worker may miss heartbeats before a job it runs may be taken over
    /// (`settings.queue`'s heartbeat bound).
    #[must_use]
    pub fn with_orphan_after(mut self, orphan_after: std::time::Duration) -> Self {
        self.orphan_after = orphan_after;
        self
    }

    /// Jobs to take from the queue at once: those the engine runs together, plus a few to
    /// choose among fairly.
    #[must_use]
    pub fn concurrency(&self, lookahead: u32) -> usize {
        self.algorithm.parallel() + lookahead as usize
    }

    /// What the worker is doing now (read by its heartbeat).
    #[must_use]
    pub fn stats(&self) -> Arc<WorkerStats> {
        self.stats.clone()
    }

    /// Runs one job to its final state and notifies whoever waits for it.
    ///
    /// # Errors
    /// Database errors; the queue then retries the delivery.
    #[tracing::instrument(skip(self, job), fields(job_id = %job.job_id, request_id = job.request_id.as_deref().unwrap_or("-"), worker = %self.name))]
    pub async fn run_one(&self, job: GenerationJob) -> Result<Outcome, ModelError> {
        let Some(running) = self.claim(&job.job_id).await? else {
            return Ok(Outcome::AlreadySettled);
        };
        if running.attempts > self.max_attempts {
            // Every earlier delivery ended with its worker gone mid-job (killed, host lost):
            // stop handing it out, and say so.
            let reason = format!(
                "the job was started {} times and its worker stopped before finishing each time",
                running.attempts - 1
            );
            tracing::warn!(attempts = running.attempts, "giving up on the job");
            let outcome = match jobs::fail(&self.db, &job.job_id, &reason).await? {
                Some(record) => {
                    self.events.publish(&record);
                    Outcome::Failed(record)
                }
                None => Outcome::AlreadySettled,
            };
            return Ok(outcome);
        }
        if running.attempts > 1 {
            tracing::info!(
                attempt = running.attempts,
                "running a job again after its worker stopped"
            );
        }
        self.stats.started(&job.job_id);
        let started = std::time::Instant::now();
        let input_words = job.work.input_words();
        let lane = crate::engine::Lane::new(i64::from(job.api_key_id), job.priority);
        let work = async {
            match job.work {
                Work::Generate(request) => self.generate(&job.job_id, *request, lane).await,
                Work::Embed(request) => {
                    self.algorithm
                        .embed_in_lane(request, lane)
                        .await
                        .and_then(|e| {
                            JobOutput::embeddings(&e)
                                .map_err(|e| EngineError::Embedding(e.to_string()))
                        })
                }
            }
        };
        // A job settled elsewhere while it runs (cancelled by its client, failed by the
        // reaper, taken over) is stopped: dropping the engine call frees its sequence.
        let result = tokio::select! {
            result = work => result,
            () = self.until_not_running(&job.job_id) => {
                tracing::info!("job settled elsewhere while running; stopped its generation");
                self.stats.finished(None);
                return Ok(Outcome::AlreadySettled);
            }
        }
        .map(|output| JobOutput {
            input_words,
            ..output
        });
        let elapsed = started.elapsed().as_secs_f64();
        let tokens_per_second = match &result {
            Ok(o) if o.generated_tokens > 0 && elapsed > 0.0 => {
                Some(o.generated_tokens as f64 / elapsed)
            }
            _ => None,
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
        self.stats.finished(tokens_per_second);
        if let Outcome::Done(record) | Outcome::Failed(record) = &outcome {
            self.events.publish(record);
        }
        Ok(outcome)
    }
}

impl GenerationWorker {
    /// Claims the job, or `None` when it is settled or stays with another live worker.
    ///
    /// A delivery can arrive while the job's last worker still counts as live (the queue
    /// hands a job back on its own clock, a heartbeat may land a moment later): the claim is
    /// retried until that worker's heartbeat is past the bound, for at most twice the bound.
    async fn claim(&self, job_id: &str) -> Result<Option<jobs::Model>, ModelError> {
        let give_up = std::time::Instant::now() + self.orphan_after * 2;
        loop {
            if let Some(running) =
                jobs::mark_running(&self.db, job_id, &self.name, self.orphan_after).await?
            {
                return Ok(Some(running));
            }
            let record = jobs::Model::find_any(&self.db, job_id).await?;
            let finished = record.as_ref().is_none_or(jobs::Model::is_finished);
            if finished || std::time::Instant::now() >= give_up {
                tracing::info!(
                    finished,
                    "job settled or running on a live worker; skipping this delivery"
                );
                if let Some(record) = record.filter(jobs::Model::is_finished) {
                    self.events.publish(&record);
                }
                return Ok(None);
            }
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
    }

    /// Returns once the job's record says this worker no longer runs it, read every
    /// [`WATCH_EVERY`] (one primary-key read per running job: the record is what every API
    /// instance changes, so a cancel reaches workers in any process). A failed read keeps
    /// the job running.
    async fn until_not_running(&self, job_id: &str) {
        loop {
            tokio::time::sleep(WATCH_EVERY).await;
            if let Ok(false) = jobs::runs_on(&self.db, job_id, &self.name).await {
                return;
            }
        }
    }

    /// Runs a generation, forwarding its text deltas to the job's stream subscribers.
    async fn generate(
        &self,
        job_id: &str,
        request: crate::engine::GenerationRequest,
        lane: crate::engine::Lane,
    ) -> Result<JobOutput, EngineError> {
        let (sink, mut deltas) = tokio::sync::mpsc::unbounded_channel::<String>();
        let events = self.events.clone();
        let stream_id = job_id.to_string();
        let forward = tokio::spawn(async move {
            while let Some(delta) = deltas.recv().await {
                events.publish_delta(&stream_id, delta);
            }
        });
        let result = self.algorithm.run_in_lane(request, sink, lane).await;
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
