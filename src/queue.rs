//! The durable job queue. Every apalis import of Tollgate lives in this module.
//!
//! Embedded mode keeps the queue in a SQLite file. Producers (HTTP handlers) push a
//! [`GenerationJob`]; the worker consumes with concurrency 1 so the single engine thread is
//! never asked to interleave requests it cannot batch. SQLite's update hook wakes the worker
//! the moment a job is inserted by this process; a short poll interval is the fallback for jobs
//! inserted by other processes and for re-enqueued orphans.

use std::{sync::Arc, time::Duration};

use apalis::prelude::{
    BackendExt, BoxDynError, Data, Strategy, TaskBuilder, TaskSink, WorkerBuilder, WorkerBuilderExt,
};
use apalis_sqlite::{callback::HookCallbackListener, Config, SqlitePool, SqliteStorage};
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, Mutex};

use crate::{
    engine::{EmbeddingRequest, GenerationRequest},
    settings::QueueSettings,
};

/// What a job asks the worker to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Work {
    Generate(GenerationRequest),
    Embed(EmbeddingRequest),
}

impl From<GenerationRequest> for Work {
    fn from(r: GenerationRequest) -> Self {
        Self::Generate(r)
    }
}

impl From<EmbeddingRequest> for Work {
    fn from(r: EmbeddingRequest) -> Self {
        Self::Embed(r)
    }
}

impl Work {
    /// The base model whose worker runs this job (its queue is `tollgate.generate.<base>`).
    #[must_use]
    pub fn base_model(&self) -> &str {
        match self {
            Self::Generate(r) => &r.model,
            Self::Embed(r) => &r.model,
        }
    }

    /// Tokens the job may generate (reserved against generation budgets); embeddings none.
    #[must_use]
    pub fn max_new_tokens(&self) -> u32 {
        match self {
            Self::Generate(r) => r.params.max_tokens,
            Self::Embed(_) => 0,
        }
    }

    /// The model as the job record shows it (`base` or `base:adapter`).
    #[must_use]
    pub fn display_model(&self) -> String {
        match self {
            Self::Generate(r) => r.display_model(),
            Self::Embed(r) => r.model.clone(),
        }
    }

    /// The request as stored in the job record.
    ///
    /// # Errors
    /// When serialisation fails (it does not for these types).
    pub fn to_json(&self) -> Result<String, serde_json::Error> {
        match self {
            Self::Generate(r) => serde_json::to_string(r),
            Self::Embed(r) => serde_json::to_string(r),
        }
    }
}

/// The payload of one queued job: everything a worker needs, already validated.
///
/// On the wire it is `{job_id, api_key_id, kind, request}`; `kind` (`generate` | `embed`) is
/// absent in jobs queued before embeddings existed and then means `generate`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "WireJob", into = "WireJob")]
pub struct GenerationJob {
    pub job_id: String,
    pub api_key_id: i32,
    pub work: Work,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum JobKind {
    #[default]
    Generate,
    Embed,
}

#[derive(Serialize, Deserialize)]
struct WireJob {
    job_id: String,
    api_key_id: i32,
    #[serde(default)]
    kind: JobKind,
    request: serde_json::Value,
}

impl TryFrom<WireJob> for GenerationJob {
    type Error = serde_json::Error;

    fn try_from(w: WireJob) -> Result<Self, Self::Error> {
        let work = match w.kind {
            JobKind::Generate => Work::Generate(serde_json::from_value(w.request)?),
            JobKind::Embed => Work::Embed(serde_json::from_value(w.request)?),
        };
        Ok(Self {
            job_id: w.job_id,
            api_key_id: w.api_key_id,
            work,
        })
    }
}

impl From<GenerationJob> for WireJob {
    fn from(j: GenerationJob) -> Self {
        let (kind, request) = match j.work {
            Work::Generate(r) => (JobKind::Generate, serde_json::to_value(r)),
            Work::Embed(r) => (JobKind::Embed, serde_json::to_value(r)),
        };
        Self {
            job_id: j.job_id,
            api_key_id: j.api_key_id,
            kind,
            // These types always serialise; Null would fail loudly on the worker, not here.
            request: request.unwrap_or(serde_json::Value::Null),
        }
    }
}

/// What the worker does with a job; implemented by [`crate::workers::generation`].
#[async_trait::async_trait]
pub trait JobHandler: Send + Sync + 'static {
    /// Handles one delivery. An `Err` asks the queue to retry the delivery later.
    async fn handle(&self, job: GenerationJob) -> Result<(), String>;
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("queue storage: {0}")]
    Storage(String),
}

/// Producer side of the queue, cheap to clone.
#[derive(Clone)]
pub struct JobQueue {
    storage: SqliteStorage<GenerationJob>,
    pool: SqlitePool,
    config: Config,
    max_attempts: usize,
    listener: Arc<Mutex<Option<HookCallbackListener>>>,
}

impl std::fmt::Debug for JobQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobQueue")
            .field("queue", &self.config.queue)
            .finish_non_exhaustive()
    }
}

/// Name of the queue of one model: a worker consumes only the models it holds.
#[must_use]
pub fn queue_name(model: &str) -> String {
    format!("tollgate.generate.{model}")
}

impl JobQueue {
    /// Opens (and migrates) the queue storage for `model`.
    ///
    /// # Errors
    /// When the storage cannot be opened or migrated.
    pub async fn connect(settings: &QueueSettings, model: &str) -> Result<Self, QueueError> {
        let url = settings.url.as_str();
        if !url.starts_with("sqlite:") {
            return Err(QueueError::Storage(format!(
                "unsupported queue url {url:?}: this build supports sqlite:// queues"
            )));
        }
        let (pool, listener) = SqliteStorage::connect_with_callback(url)
            .map_err(|e| QueueError::Storage(e.to_string()))?;
        SqliteStorage::setup(&pool)
            .await
            .map_err(|e| QueueError::Storage(e.to_string()))?;
        let config = Config::default()
            .queue(queue_name(model))
            // One job per fetch: a worker only takes what it is about to run, so several
            // workers on one queue share the load instead of one hoarding a batch.
            .batch_size(1)
            .heartbeat_interval(Duration::from_secs(5));
        let storage = SqliteStorage::new(&pool).with_config(config.clone());
        Ok(Self {
            storage,
            pool,
            config,
            max_attempts: settings.max_attempts.max(1) as usize,
            listener: Arc::new(Mutex::new(Some(listener))),
        })
    }

    /// Queues a job durably; returns once it is stored.
    ///
    /// # Errors
    /// When the storage rejects the write.
    pub async fn push(&self, job: GenerationJob) -> Result<(), QueueError> {
        let task = TaskBuilder::new(job)
            .max_attempts(self.max_attempts)
            .build();
        let mut storage = self.storage.clone();
        storage
            .push_task(task)
            .await
            .map_err(|e| QueueError::Storage(e.to_string()))
    }

    /// Jobs waiting in this queue (not yet taken by a worker).
    ///
    /// # Errors
    /// On storage errors.
    pub async fn depth(&self) -> Result<i64, QueueError> {
        sqlx_count(&self.pool, self.config.queue.as_ref()).await
    }

    /// Starts a worker consuming this queue with concurrency 1. It runs until the returned
    /// handle is shut down (or dropped).
    pub async fn spawn_worker(&self, name: &str, handler: Arc<dyn JobHandler>) -> WorkerHandle {
        let listener = self.listener.lock().await.take();
        let mut strategy = Strategy::new().interval(Duration::from_millis(250));
        if let Some(listener) = listener {
            strategy = Strategy::new()
                .stream(listener)
                .interval(Duration::from_millis(250));
        }
        let backend = SqliteStorage::<GenerationJob>::new(&self.pool)
            .with_config(self.config.clone())
            .poll_with_strategy(strategy);
        let worker = WorkerBuilder::new(name.to_string())
            .backend(backend)
            .data(HandlerData(handler))
            .concurrency(1)
            .build(handle_task);
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let join = tokio::spawn(async move {
            let signal = async move {
                let _ = stop_rx.await;
                Ok::<(), std::io::Error>(())
            };
            if let Err(e) = worker.run_until(signal).await {
                tracing::error!(error = %e, "queue worker stopped with an error");
            }
        });
        WorkerHandle {
            stop: Some(stop_tx),
            join: Some(join),
        }
    }
}

async fn sqlx_count(pool: &SqlitePool, queue: &str) -> Result<i64, QueueError> {
    use sqlx::Row;
    let row = sqlx::query(
        "SELECT COUNT(*) AS n FROM Jobs WHERE job_type = ?1 AND status IN ('Pending', 'Queued')",
    )
    .bind(queue)
    .fetch_one(pool)
    .await
    .map_err(|e| QueueError::Storage(e.to_string()))?;
    row.try_get::<i64, _>("n")
        .map_err(|e| QueueError::Storage(e.to_string()))
}

/// A named type for the handler injected into apalis (a bare `Arc<dyn …>` trips its
/// higher-ranked handler bounds).
#[derive(Clone)]
struct HandlerData(Arc<dyn JobHandler>);

async fn handle_task(job: GenerationJob, handler: Data<HandlerData>) -> Result<(), BoxDynError> {
    let HandlerData(inner) = &*handler;
    inner.handle(job).await.map_err(BoxDynError::from)
}

/// Stops a running queue worker.
#[derive(Debug)]
pub struct WorkerHandle {
    stop: Option<oneshot::Sender<()>>,
    join: Option<tokio::task::JoinHandle<()>>,
}

impl WorkerHandle {
    /// Asks the worker to stop taking jobs and waits for it to finish the current one.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(join) = self.join.take() {
            let _ = join.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Prompt, SamplingParams};

    #[test]
    fn jobs_queued_before_kinds_and_heads_still_deserialize() {
        let old = serde_json::json!({
            "job_id": "j1",
            "api_key_id": 7,
            "request": {
                "model": "smollm2",
                "prompt": {"kind": "raw", "text": "Hi"},
                "params": {"max_tokens": 4, "temperature": 0.0, "top_p": 1.0, "seed": null, "stop": []}
            }
        });
        let job: GenerationJob = serde_json::from_value(old).expect("old payload");
        let Work::Generate(request) = &job.work else {
            panic!("an old job is a generation: {job:?}");
        };
        assert_eq!(request.adapter, None);
        assert_eq!(request.prompt, Prompt::Raw { text: "Hi".into() });
    }

    #[test]
    fn both_kinds_round_trip() {
        let generate = GenerationJob {
            job_id: "g".into(),
            api_key_id: 1,
            work: Work::Generate(GenerationRequest {
                model: "m".into(),
                prompt: Prompt::Raw { text: "x".into() },
                params: SamplingParams {
                    max_tokens: 1,
                    temperature: 0.0,
                    top_p: 1.0,
                    seed: None,
                    stop: vec![],
                },
                adapter: Some(crate::engine::AdapterChoice {
                    name: "a".into(),
                    path: "/x/a.gguf".into(),
                    scale: 0.5,
                }),
            }),
        };
        let embed = GenerationJob {
            job_id: "e".into(),
            api_key_id: 1,
            work: Work::Embed(EmbeddingRequest {
                model: "m".into(),
                inputs: vec!["a".into(), "b".into()],
            }),
        };
        for job in [generate, embed] {
            let text = serde_json::to_string(&job).expect("serialise");
            let back: GenerationJob = serde_json::from_str(&text).expect("deserialise");
            assert_eq!(back, job, "{text}");
        }
    }
}
