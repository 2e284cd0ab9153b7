//! The durable job queue. Every apalis import of Tollgate lives in this module.
//!
//! Embedded mode keeps the queue in a SQLite file; production keeps it in Redis
//! (`apalis-redis`), shared by any number of API instances and worker processes. Producers (HTTP
//! handlers) push a [`GenerationJob`]; a worker takes as many jobs at once as its engine decodes
//! together (plus a few to choose among fairly), never more. Pushes wake workers at once
//! (SQLite's update hook; Redis's `…:available` channel); a short poll is the fallback. A worker
//! that stops heartbeating for `missed_heartbeats × heartbeat_seconds` has its job handed back to
//! the queue by a live worker, so a killed worker loses nothing.

use std::{sync::Arc, time::Duration};

use apalis::prelude::{
    BackendExt, BoxDynError, Data, Strategy, TaskBuilder, TaskSink, WorkerBuilder, WorkerBuilderExt,
};
use apalis_core::backend::Vacuum;
use apalis_redis::{ConnectionManager, RedisStorage};
use apalis_sqlite::{callback::HookCallbackListener, SqlitePool, SqliteStorage};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Mutex};

use crate::{
    engine::{EmbeddingRequest, GenerationRequest},
    settings::QueueSettings,
};

/// What a job asks the worker to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Work {
    /// Boxed: a generation request is several times larger than an embedding's.
    Generate(Box<GenerationRequest>),
    Embed(EmbeddingRequest),
}

impl From<GenerationRequest> for Work {
    fn from(r: GenerationRequest) -> Self {
        Self::Generate(Box::new(r))
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

    /// Words of the text the client sent (every prompt text, or every input to embed).
    #[must_use]
    pub fn input_words(&self) -> usize {
        match self {
            Self::Generate(r) => r.prompt.texts().map(crate::engine::text::count_words).sum(),
            Self::Embed(r) => r
                .inputs
                .iter()
                .map(|t| crate::engine::text::count_words(t))
                .sum(),
        }
    }

    /// Tokens the job may generate (reserved against generation budgets): `max_tokens` for
    /// each of its `n` choices; embeddings none.
    #[must_use]
    pub fn max_new_tokens(&self) -> u32 {
        match self {
            Self::Generate(r) => r
                .params
                .max_tokens
                .saturating_mul(u32::from(r.params.controls.n.unwrap_or(1).max(1))),
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
    /// The HTTP request that queued it (`x-request-id`), logged by the worker with the job id.
    pub request_id: Option<String>,
    /// Its key's scheduling priority when it was queued (0 = normal).
    pub priority: i32,
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    request_id: Option<String>,
    #[serde(default, skip_serializing_if = "is_zero")]
    priority: i32,
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_zero(n: &i32) -> bool {
    *n == 0
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
            request_id: w.request_id,
            priority: w.priority,
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
            request_id: j.request_id,
            priority: j.priority,
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
    #[error("queue storage did not answer within {0:?}")]
    Timeout(Duration),
}

/// Where the jobs live. (Boxing the larger variant would save a few hundred bytes in the one
/// `JobQueue` per model; not worth the indirection.)
#[derive(Clone)]
#[allow(clippy::large_enum_variant)]
enum Store {
    Sqlite {
        storage: SqliteStorage<GenerationJob>,
        pool: SqlitePool,
        config: apalis_sqlite::Config,
        listener: Arc<Mutex<Option<HookCallbackListener>>>,
    },
    Redis {
        storage: RedisStorage<GenerationJob>,
        client: apalis_redis::Client,
        conn: ConnectionManager,
        config: apalis_redis::Config,
    },
}

/// Producer side of the queue of one model, cheap to clone; also starts its workers.
#[derive(Clone)]
pub struct JobQueue {
    store: Store,
    name: String,
    max_attempts: usize,
    /// Bound on every Redis round trip of a request (fail fast with 503 when Redis is down).
    timeout: Duration,
    heartbeat: Duration,
}

impl std::fmt::Debug for JobQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobQueue")
            .field("queue", &self.name)
            .finish_non_exhaustive()
    }
}

/// A worker removes finished tasks from the queue storage every this many heartbeats (a
/// minute by default).
const VACUUM_EVERY_BEATS: u32 = 12;

/// Name of the queue of one model: a worker consumes only the models it holds.
#[must_use]
pub fn queue_name(settings: &QueueSettings, model: &str) -> String {
    format!("{}.generate.{model}", settings.prefix)
}

/// A Redis connection that reconnects by itself and gives up on a command quickly.
///
/// # Errors
/// When the URL is invalid or Redis cannot be reached now.
pub async fn redis_connect(
    url: &str,
    timeout: Duration,
) -> Result<(apalis_redis::Client, ConnectionManager), QueueError> {
    let client = apalis_redis::Client::open(url).map_err(|e| QueueError::Storage(e.to_string()))?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(500));
    let conn = tokio::time::timeout(
        timeout * 3,
        client.get_connection_manager_with_config(config),
    )
    .await
    .map_err(|_| QueueError::Timeout(timeout * 3))?
    .map_err(|e| QueueError::Storage(e.to_string()))?;
    Ok((client, conn))
}

/// How long a write to the embedded (SQLite) queue may wait for the file: the embedded
/// database's `busy_timeout` ([`crate::sqlite`]). Under a burst of admissions on a slow disk a
/// push can wait past Redis's one-second budget without anything being wrong; refusing it
/// (503, job failed, call refunded) would turn a busy moment into lost requests.
const SQLITE_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

impl JobQueue {
    /// Opens (and, for SQLite, migrates) the queue storage for `model`.
    ///
    /// # Errors
    /// When the storage cannot be opened or migrated.
    pub async fn connect(settings: &QueueSettings, model: &str) -> Result<Self, QueueError> {
        let url = settings.url.as_str();
        let name = queue_name(settings, model);
        let heartbeat = Duration::from_secs(settings.heartbeat_seconds.max(1));
        let missed = settings.missed_heartbeats.max(1) as usize;
        let redis_timeout = Duration::from_millis(settings.redis_timeout_ms.max(50));
        // Redis down must fail fast; the embedded queue is a local file, busy under a burst
        // of writes rather than down, and is waited for as long as the embedded database is.
        let timeout = if settings.is_redis() {
            redis_timeout
        } else {
            SQLITE_WRITE_TIMEOUT
        };
        let store = if settings.is_redis() {
            let (client, conn) = redis_connect(url, timeout).await?;
            let config = apalis_redis::Config::default()
                .queue(&name)
                // One job per fetch: a worker only takes what it is about to run, so several
                // workers on one queue share the load instead of one hoarding a batch.
                .batch_size(1)
                .heartbeat_interval(heartbeat)
                .missed_heartbeats(missed);
            let storage = RedisStorage::new(conn.clone()).with_config(config.clone());
            Store::Redis {
                storage,
                client,
                conn,
                config,
            }
        } else if url.starts_with("sqlite:") {
            let (pool, listener) = SqliteStorage::connect_with_callback(url)
                .map_err(|e| QueueError::Storage(e.to_string()))?;
            SqliteStorage::setup(&pool)
                .await
                .map_err(|e| QueueError::Storage(e.to_string()))?;
            let config = apalis_sqlite::Config::default()
                .queue(&name)
                .batch_size(1)
                .heartbeat_interval(heartbeat)
                .missed_heartbeats(missed);
            let storage = SqliteStorage::new(&pool).with_config(config.clone());
            Store::Sqlite {
                storage,
                pool,
                config,
                listener: Arc::new(Mutex::new(Some(listener))),
            }
        } else {
            return Err(QueueError::Storage(format!(
                "unsupported queue url {url:?}: use sqlite://… (embedded) or redis://… (production)"
            )));
        };
        Ok(Self {
            store,
            name,
            max_attempts: settings.max_attempts.max(1) as usize,
            timeout,
            heartbeat,
        })
    }

    /// The queue's name (`<prefix>.generate.<model>`).
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the storage answers now; Redis gets one bounded round trip. Requests ask this
    /// before charging anything, so an outage costs clients nothing but a fast 503.
    ///
    /// # Errors
    /// When Redis is unreachable or slow.
    pub async fn ping(&self) -> Result<(), QueueError> {
        match &self.store {
            Store::Sqlite { .. } => Ok(()),
            Store::Redis { conn, .. } => {
                let ping = || {
                    let mut conn = conn.clone();
                    self.bounded(async move {
                        redis::cmd("PING")
                            .query_async::<String>(&mut conn)
                            .await
                            .map(|_| ())
                    })
                };
                // After a Redis restart the first command on the old connection fails and makes
                // the manager reconnect: one retry tells a restart from an outage.
                match ping().await {
                    Ok(()) => Ok(()),
                    Err(_) => ping().await,
                }
            }
        }
    }

    async fn bounded<T, E: std::fmt::Display>(
        &self,
        f: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, QueueError> {
        tokio::time::timeout(self.timeout, f)
            .await
            .map_err(|_| QueueError::Timeout(self.timeout))?
            .map_err(|e| QueueError::Storage(e.to_string()))
    }

    /// Queues a job durably; returns once it is stored.
    ///
    /// # Errors
    /// When the storage rejects the write or does not answer in time.
    pub async fn push(&self, job: GenerationJob) -> Result<(), QueueError> {
        let task = TaskBuilder::new(job)
            .max_attempts(self.max_attempts)
            .build();
        match &self.store {
            Store::Sqlite { storage, .. } => {
                let mut storage = storage.clone();
                self.bounded(async move { storage.push_task(task).await })
                    .await
            }
            Store::Redis {
                storage,
                conn,
                config,
                ..
            } => {
                let mut storage = storage.clone();
                self.bounded(async move { storage.push_task(task).await })
                    .await?;
                // apalis-redis files a task that has a run time (every built task has one) in
                // its scheduled set and announces nothing; workers would see it only at their
                // next poll. Wake them now on the channel they listen to.
                let mut conn = conn.clone();
                let channel = wake_channel(config);
                self.bounded(async move {
                    redis::cmd("PUBLISH")
                        .arg(channel)
                        .arg("1")
                        .query_async::<i64>(&mut conn)
                        .await
                })
                .await
                .map(|_| ())
            }
        }
    }

    /// Jobs waiting in this queue (not yet taken by a worker).
    ///
    /// # Errors
    /// On storage errors.
    pub async fn depth(&self) -> Result<i64, QueueError> {
        match &self.store {
            Store::Sqlite { pool, config, .. } => sqlx_count(pool, config.queue.as_ref()).await,
            Store::Redis { conn, config, .. } => {
                // Pushed jobs wait in the scheduled set until a worker's fetch promotes them to
                // the active list: both are waiting.
                let mut conn = conn.clone();
                let (list, scheduled) = (config.active_jobs_list(), config.scheduled_jobs_set());
                self.bounded(async move {
                    redis::pipe()
                        .cmd("LLEN")
                        .arg(list)
                        .cmd("ZCARD")
                        .arg(scheduled)
                        .query_async::<(i64, i64)>(&mut conn)
                        .await
                        .map(|(active, scheduled)| active + scheduled)
                })
                .await
            }
        }
    }

    /// Deletes finished tasks from the queue storage (their payloads hold prompts; the `jobs`
    /// table keeps the record). Returns how many were removed.
    ///
    /// # Errors
    /// On storage errors.
    pub async fn vacuum(&self) -> Result<usize, QueueError> {
        match &self.store {
            Store::Sqlite { storage, .. } => {
                let mut storage = storage.clone();
                self.bounded(async move { storage.vacuum().await }).await
            }
            Store::Redis {
                storage,
                conn,
                config,
                ..
            } => {
                let mut storage = storage.clone();
                let removed = self.bounded(async move { storage.vacuum().await }).await?;
                // The ids of done tasks are kept in a set for statistics nobody reads here.
                let mut conn = conn.clone();
                let done = config.done_jobs_set();
                self.bounded(async move {
                    redis::cmd("DEL")
                        .arg(done)
                        .query_async::<i64>(&mut conn)
                        .await
                })
                .await?;
                Ok(removed)
            }
        }
    }

    /// Starts a worker consuming this queue, `concurrency` jobs at a time (the engine batches
    /// them). It runs until the returned handle is shut down (or dropped). If the storage fails
    /// under it (Redis restarted), it registers again and goes on, without anyone restarting the
    /// process.
    pub async fn spawn_worker(
        &self,
        name: &str,
        handler: Arc<dyn JobHandler>,
        concurrency: usize,
    ) -> WorkerHandle {
        let (stop_tx, stop_rx) = watch::channel(false);
        let queue = self.clone();
        let name = name.to_string();
        let mut vacuum_stop = stop_rx.clone();
        let cleaner = self.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(cleaner.heartbeat * VACUUM_EVERY_BEATS);
            loop {
                tokio::select! {
                    _ = every.tick() => {}
                    _ = vacuum_stop.wait_for(|s| *s) => break,
                }
                match cleaner.vacuum().await {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(queue = %cleaner.name, removed = n, "queue vacuumed"),
                    Err(e) => {
                        tracing::debug!(queue = %cleaner.name, error = %e, "queue vacuum failed")
                    }
                }
            }
        });
        let join = tokio::spawn(async move {
            let mut failures = 0u32;
            loop {
                let stop = stop_rx.clone();
                let signal = async move {
                    let mut stop = stop;
                    let _ = stop.wait_for(|s| *s).await;
                    Ok::<(), std::io::Error>(())
                };
                let result = queue
                    .run_worker(&name, handler.clone(), concurrency.max(1), signal)
                    .await;
                if *stop_rx.borrow() {
                    break;
                }
                failures = failures.saturating_add(1);
                let pause = Duration::from_millis(250 * u64::from(failures.min(8)));
                match result {
                    Ok(()) => tracing::warn!(queue = %queue.name, "queue worker ended; restarting"),
                    Err(e) => {
                        tracing::warn!(queue = %queue.name, error = %e, ?pause, "queue worker lost its storage; reconnecting");
                    }
                }
                let mut stop = stop_rx.clone();
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    _ = stop.wait_for(|s| *s) => break,
                }
                // A run that lasted a while was a recovery: start the backoff over.
                if failures > 8 {
                    failures = 1;
                }
            }
        });
        WorkerHandle {
            stop: Some(stop_tx),
            join: Some(join),
        }
    }

    async fn run_worker(
        &self,
        name: &str,
        handler: Arc<dyn JobHandler>,
        concurrency: usize,
        signal: impl std::future::Future<Output = Result<(), std::io::Error>> + Send + 'static,
    ) -> Result<(), String> {
        let poll = Duration::from_millis(250);
        match &self.store {
            Store::Sqlite {
                pool,
                config,
                listener,
                ..
            } => {
                let mut strategy = Strategy::new().interval(poll);
                if let Some(listener) = listener.lock().await.take() {
                    strategy = Strategy::new().stream(listener).interval(poll);
                }
                let backend = SqliteStorage::<GenerationJob>::new(pool)
                    .with_config(config.clone())
                    .poll_with_strategy(strategy);
                WorkerBuilder::new(name.to_string())
                    .backend(backend)
                    .data(HandlerData(handler))
                    .concurrency(concurrency)
                    .build(handle_task)
                    .run_until(signal)
                    .await
                    .map_err(|e| e.to_string())
            }
            Store::Redis {
                client,
                conn,
                config,
                ..
            } => {
                let wake = wake_stream(client, &wake_channel(config)).await;
                let strategy = match wake {
                    Some(wake) => Strategy::new().stream(wake).interval(poll),
                    None => Strategy::new().interval(poll),
                };
                let backend = RedisStorage::<GenerationJob>::new(conn.clone())
                    .with_config(config.clone())
                    .poll_with_strategy(strategy);
                WorkerBuilder::new(name.to_string())
                    .backend(backend)
                    .data(HandlerData(handler))
                    .concurrency(concurrency)
                    .build(handle_task)
                    .run_until(signal)
                    .await
                    .map_err(|e| e.to_string())
            }
        }
    }
}

/// The channel apalis-redis announces available tasks on (`tasks:<queue>:active:available`).
fn wake_channel(config: &apalis_redis::Config) -> String {
    format!("tasks:{}:available", config.active_jobs_list())
}

/// Wakes a Redis worker the moment a job is pushed (apalis-redis publishes on
/// `tasks:<queue>:active:available`); `None` when Redis is down (the poll interval remains).
async fn wake_stream(
    client: &apalis_redis::Client,
    channel: &str,
) -> Option<std::pin::Pin<Box<dyn futures::Stream<Item = ()> + Send + Sync>>> {
    let mut pubsub = client.get_async_pubsub().await.ok()?;
    pubsub.subscribe(channel).await.ok()?;
    let (tx, rx) = futures::channel::mpsc::unbounded::<()>();
    tokio::spawn(async move {
        let mut messages = pubsub.into_on_message();
        while messages.next().await.is_some() {
            if tx.unbounded_send(()).is_err() {
                break;
            }
        }
    });
    Some(Box::pin(rx))
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
    stop: Option<watch::Sender<bool>>,
    join: Option<tokio::task::JoinHandle<()>>,
}

impl WorkerHandle {
    /// Asks the worker to stop taking jobs and waits for it to finish the current one.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
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

    /// A write lock held on the embedded queue's file longer than Redis's budget delays a push;
    /// it does not fail it (it did when SQLite pushes had `redis_timeout_ms` as their bound).
    #[tokio::test]
    async fn a_busy_embedded_queue_is_waited_for_not_reported_down() {
        use sqlx::Connection as _;
        let dir = std::env::temp_dir().join(format!("tollgate-queue-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let url = format!("sqlite://{}/q.sqlite?mode=rwc", dir.display());
        let settings = QueueSettings {
            url: url.clone(),
            redis_timeout_ms: 50,
            ..QueueSettings::default()
        };
        let queue = JobQueue::connect(&settings, "m").await.expect("queue");
        let mut holder = sqlx::SqliteConnection::connect(&url)
            .await
            .expect("connect");
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut holder)
            .await
            .expect("write lock");
        let release = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(400)).await;
            sqlx::query("COMMIT")
                .execute(&mut holder)
                .await
                .expect("commit");
        });
        let job = GenerationJob {
            job_id: "busy".into(),
            api_key_id: 1,
            work: Work::from(GenerationRequest {
                model: "m".into(),
                prompt: Prompt::Raw { text: "x".into() },
                params: SamplingParams::greedy(1),
                adapter: None,
            }),
            request_id: None,
            priority: 0,
        };
        let started = std::time::Instant::now();
        queue.push(job).await.expect("the push waits for the lock");
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "the push did wait: {:?}",
            started.elapsed()
        );
        release.await.expect("released");
        assert_eq!(queue.depth().await.expect("depth"), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn both_kinds_round_trip() {
        let generate = GenerationJob {
            job_id: "g".into(),
            api_key_id: 1,
            work: Work::from(GenerationRequest {
                model: "m".into(),
                prompt: Prompt::Raw { text: "x".into() },
                params: SamplingParams::greedy(1),
                adapter: Some(crate::engine::AdapterChoice {
                    name: "a".into(),
                    path: "/x/a.gguf".into(),
                    scale: 0.5,
                }),
            }),
            request_id: Some("req-1".into()),
            priority: 3,
        };
        let embed = GenerationJob {
            job_id: "e".into(),
            api_key_id: 1,
            work: Work::Embed(EmbeddingRequest {
                model: "m".into(),
                inputs: vec!["a".into(), "b".into()],
            }),
            request_id: None,
            priority: 0,
        };
        for job in [generate, embed] {
            let text = serde_json::to_string(&job).expect("serialise");
            let back: GenerationJob = serde_json::from_str(&text).expect("deserialise");
            assert_eq!(back, job, "{text}");
        }
    }
}
