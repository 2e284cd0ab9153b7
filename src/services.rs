//! The long-lived parts of a running server, built once at start-up and shared by handlers:
//! settings, the queue, the job-event registry, the prompt tokenizer and, in embedded mode, the
//! engine and its worker. `cargo loco task …` does not start them (no model load for a task).

use std::{sync::Arc, time::Duration};

use loco_rs::app::AppContext;
use tokio::sync::Mutex;
use tracing::Instrument;

use crate::{
    engine::{
        llama::LlamaEngine, tokenizer::PromptTokenizer, AdapterChoice, Algorithm, EngineError,
        EngineStatus, GenerationRequest, Prompt, SamplingParams,
    },
    errors::ApiError,
    models::{
        adapters,
        api_keys::{self, Refusal},
        budgets::{self, BudgetRefusal},
        jobs,
    },
    notify::JobEvents,
    queue::{GenerationJob, JobQueue, Work, WorkerHandle},
    ratelimit::RateLimits,
    registry::ModelRegistry,
    settings::Settings,
    throttle::LoginThrottle,
    workers::heartbeat::HeartbeatHandle,
};

pub struct Services {
    pub settings: Settings,
    /// Compiled `settings.policy.deny`.
    deny: regex::RegexSet,
    pub queue: JobQueue,
    pub events: JobEvents,
    pub tokenizer: Arc<PromptTokenizer>,
    rate_limits: RateLimits,
    /// Models loaded at run time (seed 004), besides the default one.
    pub registry: ModelRegistry,
    /// The in-process engine (embedded mode); `None` when workers run elsewhere.
    pub engine: Option<Arc<dyn Algorithm>>,
    /// The embedded worker's id (as recorded on the jobs it runs), when there is one.
    pub worker_name: Option<String>,
    /// Failed-login throttle of `POST /token`.
    pub logins: LoginThrottle,
    /// The first-run setup link's token (its hash) and expiry, while there is no admin.
    setup: std::sync::Mutex<Option<(String, std::time::Instant)>>,
    worker: Mutex<Option<(WorkerHandle, HeartbeatHandle)>>,
    /// Queues of models held only by worker processes elsewhere (production), opened on first
    /// use.
    remote_queues: Mutex<std::collections::HashMap<String, JobQueue>>,
}

/// What a request asked for: a model id (`base` or `base:adapter`), a LoRA head named apart
/// from it, and a scale for that head.
#[derive(Debug, Clone, Default)]
pub struct ModelChoice {
    pub model: Option<String>,
    pub adapter: Option<String>,
    pub scale: Option<f64>,
    /// Seed 001 clients name their own deployment's model (its example says "gpt-model"): an
    /// unknown base name is served by the configured model instead of refused.
    pub lenient_base: bool,
}

/// The model and head a request will run with, permission checked.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub model: String,
    pub adapter: Option<AdapterChoice>,
}

impl Resolved {
    /// The engine request for `prompt` on this model and head.
    #[must_use]
    pub fn request(self, prompt: Prompt, params: SamplingParams) -> GenerationRequest {
        GenerationRequest {
            model: self.model,
            prompt,
            params,
            adapter: self.adapter,
        }
    }
}

impl std::fmt::Debug for Services {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Services")
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

/// How a submitted generation ended for the waiting request.
#[derive(Debug)]
pub enum Submission {
    /// Settled within the wait: done or failed.
    Finished(jobs::Model),
    /// Still queued or running when the wait ran out; poll `GET /api/jobs/{id}`.
    Pending(jobs::Model),
}

/// How a submission ended inside [`Services`]: settled/pending, or subscribed for streaming.
enum Outcome {
    Plain(Submission),
    Streaming(JobStream),
}

/// A queued job and its subscriptions: text deltas as the worker generates, then the record.
#[derive(Debug)]
pub struct JobStream {
    pub job: jobs::Model,
    pub deltas: Option<tokio::sync::broadcast::Receiver<String>>,
    pub done: tokio::sync::oneshot::Receiver<jobs::Model>,
}

/// What a submission waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Follow {
    /// The result, up to the configured timeout.
    Result,
    /// Nothing: answer as soon as the job is queued.
    Nothing,
    /// Subscribe to its updates (no timeout: the client reads them as they come).
    Updates,
}

impl From<bool> for Follow {
    fn from(wait: bool) -> Self {
        if wait {
            Self::Result
        } else {
            Self::Nothing
        }
    }
}

fn load_error(e: EngineError) -> loco_rs::Error {
    loco_rs::Error::Message(e.to_string())
}

impl Services {
    /// Builds the services and, in embedded mode, loads the model and starts the worker.
    ///
    /// # Errors
    /// When the settings are invalid, the model cannot be loaded or the queue cannot be opened.
    pub async fn start(ctx: &AppContext) -> loco_rs::Result<Arc<Self>> {
        let settings = Settings::from_config(&ctx.config)?;
        let deny = regex::RegexSetBuilder::new(&settings.policy.deny)
            .case_insensitive(true)
            .build()
            .map_err(|e| loco_rs::Error::Message(format!("settings.policy.deny: {e}")))?;
        let engine_settings = settings.engine.clone();
        let tokenizer =
            tokio::task::spawn_blocking(move || PromptTokenizer::load(&engine_settings))
                .await
                .map_err(|e| loco_rs::Error::Message(e.to_string()))?
                .map_err(load_error)?;
        let queue = JobQueue::connect(&settings.queue, &settings.engine.model_name)
            .await
            .map_err(|e| loco_rs::Error::Message(e.to_string()))?;
        // With workers elsewhere, their events reach this instance's requests through Redis.
        let events = JobEvents::for_settings(&settings.queue, &ctx.db, true)
            .await
            .map_err(|e| loco_rs::Error::Message(e.to_string()))?;
        let mut engine: Option<Arc<dyn Algorithm>> = None;
        let mut worker = None;
        let mut worker_name = None;
        if settings.queue.embedded_worker {
            let engine_settings = settings.engine.clone();
            let started = std::time::Instant::now();
            let llama = tokio::task::spawn_blocking(move || LlamaEngine::start(engine_settings))
                .await
                .map_err(|e| loco_rs::Error::Message(e.to_string()))?
                .map_err(load_error)?;
            tracing::info!(
                ms = started.elapsed().as_millis() as u64,
                "engine ready (embedded worker)"
            );
            let llama: Arc<dyn Algorithm> = Arc::new(llama);
            let name = format!("embedded-{}", std::process::id());
            worker = Some(
                crate::workers::serve_queue(
                    &ctx.db,
                    llama.clone(),
                    events.clone(),
                    &name,
                    &settings,
                    &queue,
                )
                .await,
            );
            engine = Some(llama);
            worker_name = Some(name);
        }
        let logins = LoginThrottle::new(
            settings.auth.login_max_failures,
            Duration::from_secs(settings.auth.login_lockout_seconds),
        );
        let mut rate_limits = RateLimits::new(&settings.api.rate_limit);
        if settings.queue.is_redis() {
            let timeout = Duration::from_millis(settings.queue.redis_timeout_ms);
            let (_, conn) = crate::queue::redis_connect(&settings.queue.url, timeout)
                .await
                .map_err(|e| loco_rs::Error::Message(e.to_string()))?;
            rate_limits = rate_limits.shared_in_redis(conn, &settings.queue.prefix, timeout);
        }
        Ok(Arc::new(Self {
            rate_limits,
            registry: ModelRegistry::default(),
            settings,
            deny,
            queue,
            events,
            tokenizer: Arc::new(tokenizer),
            engine,
            worker_name,
            logins,
            setup: std::sync::Mutex::new(None),
            worker: Mutex::new(worker),
            remote_queues: Mutex::default(),
        }))
    }

    /// Makes a new single-use first-run setup link token (replacing any earlier one) valid for
    /// `settings.auth.setup_link_minutes`, and returns it.
    #[must_use]
    pub fn new_setup_link(&self) -> String {
        let token = uuid::Uuid::new_v4().simple().to_string();
        let ttl = Duration::from_secs(u64::from(self.settings.auth.setup_link_minutes) * 60);
        if let Ok(mut slot) = self.setup.lock() {
            *slot = Some((
                api_keys::hash_secret(&token),
                std::time::Instant::now() + ttl,
            ));
        }
        token
    }

    /// Whether `token` is the current, unexpired setup link.
    #[must_use]
    pub fn setup_link_valid(&self, token: &str) -> bool {
        let hash = api_keys::hash_secret(token);
        self.setup.lock().is_ok_and(|slot| {
            slot.as_ref()
                .is_some_and(|(h, until)| *h == hash && std::time::Instant::now() < *until)
        })
    }

    /// The setup link is single use.
    pub fn consume_setup_link(&self) {
        if let Ok(mut slot) = self.setup.lock() {
            *slot = None;
        }
    }

    /// The services of a running server.
    ///
    /// # Errors
    /// 503 when the server has not finished starting.
    pub fn from_ctx(ctx: &AppContext) -> Result<Arc<Self>, ApiError> {
        ctx.shared_store
            .get::<Arc<Self>>()
            .ok_or_else(|| ApiError::unavailable("starting", "the server is still starting"))
    }

    /// Stops the embedded worker after its current job.
    pub async fn shutdown(&self) {
        self.stop_loaded_models().await;
        if let Some((worker, beat)) = self.worker.lock().await.take() {
            worker.shutdown().await;
            beat.stop().await;
        }
    }

    #[must_use]
    pub fn engine_status(&self) -> Option<EngineStatus> {
        self.engine.as_ref().map(|e| e.status())
    }

    /// Refuses early (403/429/401) when the key, as last read, may not call now, or is over its
    /// request rate (429 with `Retry-After`); the atomic charge decides the quota again later.
    /// Key problems are reported before body problems.
    ///
    /// # Errors
    /// The refusal as an HTTP error.
    pub async fn precheck(&self, key: &api_keys::Model) -> Result<(), ApiError> {
        if let Some(refusal) = key.refusal_at(crate::models::now()) {
            return Err(refusal_error(refusal, key));
        }
        self.rate_limits.check(key).await
    }

    /// Checks a request against the model's context, charges the key atomically, queues the job
    /// and waits for its result up to the configured timeout.
    ///
    /// Nothing is charged or queued when this returns an error before the job is recorded.
    /// With a `client_ref` (a client-chosen job id) the submission is idempotent per key: a
    /// repeat gets the first job's result or status and is neither generated nor charged again.
    ///
    /// # Errors
    /// 400 prompt too long, 401/403/429 from the charge, 503 when the queue is down.
    pub async fn submit_and_wait(
        &self,
        db: &sea_orm::DatabaseConnection,
        key: &api_keys::Model,
        endpoint: &str,
        work: impl Into<Work>,
        client_ref: Option<&str>,
    ) -> Result<Submission, ApiError> {
        self.submit(db, key, endpoint, work, client_ref, true).await
    }

    /// Like [`Self::submit_and_wait`]; with `wait = false` it returns as soon as the job is
    /// queued (`Submission::Pending`), for clients that poll or stream the job.
    ///
    /// # Errors
    /// As [`Self::submit_and_wait`].
    pub async fn submit(
        &self,
        db: &sea_orm::DatabaseConnection,
        key: &api_keys::Model,
        endpoint: &str,
        work: impl Into<Work>,
        client_ref: Option<&str>,
        wait: bool,
    ) -> Result<Submission, ApiError> {
        match self
            .submit_following(db, key, endpoint, work.into(), client_ref, wait.into())
            .await?
        {
            Outcome::Plain(submission) => Ok(submission),
            // Only `submit_streaming` asks for updates.
            Outcome::Streaming(stream) => Ok(Submission::Pending(stream.job)),
        }
    }

    /// Like [`Self::submit`], but returns as soon as the job is queued, with its token deltas
    /// and final record subscribed *before* the push, so a streaming client misses nothing.
    ///
    /// # Errors
    /// As [`Self::submit_and_wait`]; every refusal comes before anything is streamed.
    pub async fn submit_streaming(
        &self,
        db: &sea_orm::DatabaseConnection,
        key: &api_keys::Model,
        endpoint: &str,
        request: GenerationRequest,
    ) -> Result<JobStream, ApiError> {
        match self
            .submit_following(db, key, endpoint, request.into(), None, Follow::Updates)
            .await?
        {
            Outcome::Streaming(stream) => Ok(stream),
            Outcome::Plain(Submission::Finished(job) | Submission::Pending(job)) => {
                Ok(self.stream_of(db, job).await?)
            }
        }
    }

    /// Subscriptions for an existing job; a job that already settled gets its record at once.
    async fn stream_of(
        &self,
        db: &sea_orm::DatabaseConnection,
        job: jobs::Model,
    ) -> Result<JobStream, ApiError> {
        let deltas = self.events.subscribe_deltas(&job.id);
        let done = self.events.subscribe(&job.id);
        let current = jobs::Model::find_any(db, &job.id).await?.unwrap_or(job);
        if current.is_finished() {
            self.events.forget(&current.id);
            let (tx, done) = tokio::sync::oneshot::channel();
            let _ = tx.send(current.clone());
            return Ok(JobStream {
                job: current,
                deltas: None,
                done,
            });
        }
        Ok(JobStream {
            job: current,
            deltas,
            done,
        })
    }

    async fn submit_following(
        &self,
        db: &sea_orm::DatabaseConnection,
        key: &api_keys::Model,
        endpoint: &str,
        work: Work,
        client_ref: Option<&str>,
        wait: Follow,
    ) -> Result<Outcome, ApiError> {
        if let Some(r) = client_ref {
            if let Some(existing) = jobs::Model::find_by_client_ref(db, key.id, r).await? {
                return self.follow(db, existing, wait).await;
            }
        }
        let prompt_tokens = self.check_input(&work)?;
        self.check_queue(work.base_model()).await?;
        charge(db, key).await?;
        let reservation = match budgets::reserve(
            db,
            key,
            i64::try_from(prompt_tokens).unwrap_or(i64::MAX),
            i64::from(work.max_new_tokens()),
        )
        .await
        {
            Ok(Ok(reservation)) => reservation,
            Ok(Err(refusal)) => {
                api_keys::refund(db, key.id).await.ok();
                return Err(budget_error(&refusal));
            }
            Err(e) => {
                api_keys::refund(db, key.id).await.ok();
                return Err(e.into());
            }
        };

        let job_id = uuid::Uuid::new_v4().to_string();
        let request_json = work.to_json().map_err(ApiError::internal)?;
        let record = match jobs::ActiveModel::create_queued(
            db,
            jobs::NewJob {
                id: job_id.clone(),
                api_key_id: key.id,
                endpoint: endpoint.to_string(),
                model: work.display_model(),
                request_json,
                prompt_tokens: i32::try_from(prompt_tokens).unwrap_or(i32::MAX),
                client_ref: client_ref.map(str::to_string),
                reservation,
            },
        )
        .await
        {
            Ok(r) => r,
            Err(e) => {
                api_keys::refund(db, key.id).await.ok();
                budgets::release(db, key.id, &reservation).await.ok();
                // A concurrent repeat with the same client id won the insert: follow its job.
                if let Some(r) = client_ref {
                    if let Some(existing) = jobs::Model::find_by_client_ref(db, key.id, r).await? {
                        return self.follow(db, existing, wait).await;
                    }
                }
                return Err(e.into());
            }
        };
        let span = tracing::info_span!("job", job_id = %job_id);
        self.queue_and_wait(db, key, record, work, wait)
            .instrument(span)
            .await
    }

    /// 503 before anything is charged when the model's queue cannot take a job now (Redis
    /// down): clients get a fast, free answer they can retry.
    async fn check_queue(&self, model: &str) -> Result<(), ApiError> {
        let queue = self.queue_of(model).await.ok_or_else(|| {
            ApiError::unavailable(
                "model_unavailable",
                format!("model {model:?} is not loaded; nothing was charged"),
            )
        })?;
        queue.ping().await.map_err(|e| {
            tracing::warn!(error = %e, "queue unavailable");
            ApiError::unavailable(
                "queue_unavailable",
                "the job queue is unavailable; nothing was charged, try again",
            )
        })
    }

    async fn queue_and_wait(
        &self,
        db: &sea_orm::DatabaseConnection,
        key: &api_keys::Model,
        record: jobs::Model,
        work: Work,
        wait: Follow,
    ) -> Result<Outcome, ApiError> {
        let job_id = record.id.clone();
        let deltas = (wait == Follow::Updates)
            .then(|| self.events.subscribe_deltas(&job_id))
            .flatten();
        let done = (wait != Follow::Nothing).then(|| self.events.subscribe(&job_id));
        let job = GenerationJob {
            job_id: job_id.clone(),
            api_key_id: key.id,
            work,
            request_id: crate::request_id::current(),
            priority: key.priority,
        };
        let model = job.work.base_model().to_string();
        let pushed = match self.queue_of(&model).await {
            Some(queue) => queue.push(job).await,
            None => Err(crate::queue::QueueError::Storage(format!(
                "model {model:?} is not loaded"
            ))),
        };
        if let Err(e) = pushed {
            tracing::error!(error = %e, "could not queue job");
            self.events.forget(&job_id);
            jobs::fail(db, &job_id, "the queue is unavailable")
                .await
                .ok();
            return Err(ApiError::unavailable(
                "queue_unavailable",
                "the job queue is unavailable; nothing was charged, try again",
            ));
        }
        match (wait, done) {
            (Follow::Updates, Some(done)) => Ok(Outcome::Streaming(JobStream {
                job: record,
                deltas,
                done,
            })),
            (_, Some(done)) => Ok(Outcome::Plain(self.await_settled(db, done, record).await?)),
            (_, None) => Ok(Outcome::Plain(Submission::Pending(record))),
        }
    }

    /// Follows an existing job (a repeated client id) without charging anything.
    async fn follow(
        &self,
        db: &sea_orm::DatabaseConnection,
        job: jobs::Model,
        wait: Follow,
    ) -> Result<Outcome, ApiError> {
        if job.is_finished() {
            return Ok(Outcome::Plain(Submission::Finished(job)));
        }
        match wait {
            Follow::Nothing => return Ok(Outcome::Plain(Submission::Pending(job))),
            Follow::Updates => return Ok(Outcome::Streaming(self.stream_of(db, job).await?)),
            Follow::Result => {}
        }
        let done = self.events.subscribe(&job.id);
        // It may have settled between the read and the subscription.
        let current = jobs::Model::find_any(db, &job.id).await?.unwrap_or(job);
        if current.is_finished() {
            self.events.forget(&current.id);
            return Ok(Outcome::Plain(Submission::Finished(current)));
        }
        Ok(Outcome::Plain(self.await_settled(db, done, current).await?))
    }

    /// Waits for the notification up to the configured timeout, then trusts the record.
    async fn await_settled(
        &self,
        db: &sea_orm::DatabaseConnection,
        done: tokio::sync::oneshot::Receiver<jobs::Model>,
        record: jobs::Model,
    ) -> Result<Submission, ApiError> {
        let wait = Duration::from_millis(self.settings.api.wait_timeout_ms);
        if let Ok(Ok(job)) = tokio::time::timeout(wait, done).await {
            return Ok(Submission::Finished(job));
        }
        self.events.forget(&record.id);
        // Timed out (or the worker went away): report what the record says now.
        let current = jobs::Model::find_any(db, &record.id)
            .await?
            .unwrap_or(record);
        if current.is_finished() {
            Ok(Submission::Finished(current))
        } else {
            Ok(Submission::Pending(current))
        }
    }

    /// Applies the content policy and counts input tokens with the model's tokenizer; 400 when
    /// the input cannot fit. Returns the token count recorded with the job.
    fn check_input(&self, work: &Work) -> Result<usize, ApiError> {
        match work {
            Work::Generate(request) => self.check_prompt(&request.model, &request.prompt),
            Work::Embed(request) => {
                self.check_policy(request.inputs.iter().map(String::as_str))?;
                let limit = self.settings.engine.embeddings.context_size as usize;
                let mut total = 0;
                for (i, text) in request.inputs.iter().enumerate() {
                    let n = self.tokenizer.count_embedding(text);
                    if n == 0 {
                        return Err(ApiError::unprocessable(
                            "empty_input",
                            format!("input {i} has no tokens"),
                        ));
                    }
                    if n > limit {
                        return Err(ApiError::bad_request(
                            "context_length_exceeded",
                            format!(
                                "input {i} is {n} tokens; embeddings take at most {limit} tokens per input"
                            ),
                        ));
                    }
                    total += n;
                }
                Ok(total)
            }
        }
    }

    /// Seed 000's disallowed-content check (400 `content_policy_violation`).
    fn check_policy<'a>(&self, mut texts: impl Iterator<Item = &'a str>) -> Result<(), ApiError> {
        if !self.deny.is_empty() && texts.any(|t| self.deny.is_match(t)) {
            return Err(ApiError::bad_request(
                "content_policy_violation",
                "the input contains content this server does not accept",
            ));
        }
        Ok(())
    }

    /// Counts prompt tokens with the model's tokenizer; 400 when the prompt cannot fit.
    fn check_prompt(&self, model: &str, prompt: &Prompt) -> Result<usize, ApiError> {
        self.check_policy(prompt.texts())?;
        let tokenizer = self.tokenizer_for(model);
        let n = tokenizer.count(prompt).map_err(|e| {
            ApiError::unprocessable("invalid_prompt", format!("prompt cannot be rendered: {e}"))
        })?;
        let limit = tokenizer.context_size() as usize;
        if n >= limit {
            return Err(ApiError::bad_request(
                "context_length_exceeded",
                format!(
                    "prompt is {n} tokens; model {} accepts at most {} prompt tokens (context {limit})",
                    tokenizer.model_name(),
                    limit - 1
                ),
            ));
        }
        Ok(n)
    }

    /// Model ids `key` may use: the served model and one `base:adapter` per adapter registered
    /// for it, filtered by the key's allow-lists.
    ///
    /// # Errors
    /// On database errors.
    pub async fn available_models(
        &self,
        db: &sea_orm::DatabaseConnection,
        key: &api_keys::Model,
    ) -> Result<Vec<String>, ApiError> {
        let served = &self.settings.engine.model_name;
        let mut ids = Vec::new();
        if key.permits_model(served) {
            ids.push(served.clone());
            for a in adapters::Model::list_for_base(db, served).await? {
                if key.permits_adapter(&a.name) {
                    ids.push(format!("{served}:{}", a.name));
                }
            }
        }
        ids.extend(
            self.registry
                .all()
                .iter()
                .map(|m| m.model_id.clone())
                .filter(|m| key.permits_model(m)),
        );
        ids.extend(
            self.remote_models(db)
                .await
                .into_iter()
                .filter(|m| key.permits_model(m)),
        );
        Ok(ids)
    }

    /// The one place a request's model and LoRA head are resolved and checked against the
    /// key's allow-lists. Nothing is charged before this succeeds.
    ///
    /// # Errors
    /// 404 unknown model or adapter (naming what the key may use), 403 not allowed for this key,
    /// 422 bad scale or conflicting heads, 503 when an adapter's file is gone.
    pub async fn resolve_model(
        &self,
        db: &sea_orm::DatabaseConnection,
        key: &api_keys::Model,
        choice: ModelChoice,
    ) -> Result<Resolved, ApiError> {
        let served = self.settings.engine.model_name.clone();
        let named = choice
            .model
            .as_deref()
            .map(str::trim)
            .filter(|m| !m.is_empty());
        // A model loaded at run time (seed 004), or held only by worker processes elsewhere
        // (production: one model per GPU), is served as-is; LoRA heads attach to the default
        // model only.
        if let Some(m) = named {
            let here = self.registry.get(m).is_some();
            if here
                || (m != served
                    && !m.starts_with(&format!("{served}:"))
                    && self.remote_models(db).await.iter().any(|r| r == m))
            {
                return other_model(key, m, &served, &choice);
            }
        }
        let from_model = match named {
            None => None,
            Some(m) if m == served => None,
            Some(m) => match m
                .strip_prefix(served.as_str())
                .and_then(|r| r.strip_prefix(':'))
            {
                Some(head) => Some(head.to_string()),
                None if choice.lenient_base => {
                    tracing::debug!(asked = m, served = %served, "unknown model name mapped to the served model");
                    None
                }
                None => {
                    let available = self.available_models(db, key).await?;
                    return Err(ApiError::not_found(
                        "model_not_found",
                        format!("model {m:?} does not exist; available: {available:?}"),
                    ));
                }
            },
        };
        let explicit = choice
            .adapter
            .as_deref()
            .map(str::trim)
            .filter(|a| !a.is_empty());
        let head = match (from_model, explicit) {
            (Some(a), Some(b)) if a != b => {
                return Err(ApiError::unprocessable(
                    "conflicting_adapter",
                    format!("the model names the head {a:?} but the request asks for {b:?}"),
                ))
            }
            (Some(a), _) => Some(a),
            (None, b) => b.map(str::to_string),
        };
        if !key.permits_model(&served) {
            return Err(ApiError::forbidden(
                "model_not_allowed",
                format!(
                    "this key may not use model {served:?}; it may use {:?}",
                    key.allowed_models()
                ),
            ));
        }
        let Some(head) = head else {
            if choice.scale.is_some() {
                return Err(ApiError::unprocessable(
                    "scale_without_adapter",
                    "`scale` applies to a LoRA head; name one with `lora` (or model \"base:adapter\")",
                ));
            }
            return Ok(Resolved {
                model: served,
                adapter: None,
            });
        };
        let record = adapters::Model::find_by_name(db, &head)
            .await?
            .filter(|a| a.base_model == served);
        let Some(record) = record else {
            let available: Vec<String> = adapters::Model::list_for_base(db, &served)
                .await?
                .into_iter()
                .map(|a| a.name)
                .filter(|a| key.permits_adapter(a))
                .collect();
            return Err(ApiError::not_found(
                "adapter_not_found",
                format!("no LoRA head {head:?} for model {served:?}; available: {available:?}"),
            ));
        };
        if !key.permits_adapter(&record.name) {
            return Err(ApiError::forbidden(
                "adapter_not_allowed",
                format!(
                    "this key may not use the LoRA head {:?}; it may use {:?}",
                    record.name,
                    key.allowed_adapters()
                ),
            ));
        }
        let scale = adapters::validate_scale(choice.scale.unwrap_or(record.default_scale))?;
        let file = record
            .resolve(&self.settings.engine.adapters_dir)
            .map_err(|e| {
                tracing::error!(adapter = %record.name, error = %e, "registered adapter file unusable");
                ApiError::unavailable(
                    "adapter_unavailable",
                    format!(
                        "the file of LoRA head {:?} is missing on the server; nothing was charged",
                        record.name
                    ),
                )
            })?;
        Ok(Resolved {
            model: served,
            adapter: Some(AdapterChoice {
                name: record.name,
                path: file.path,
                scale,
            }),
        })
    }

    /// Live worker processes other than this process's own worker: what production API
    /// instances (which hold no engine) know of the models being served.
    pub async fn remote_workers(
        &self,
        db: &sea_orm::DatabaseConnection,
    ) -> Vec<crate::models::workers::Model> {
        let gone_after = self.settings.queue.orphan_after();
        match crate::models::workers::list(db).await {
            Ok(rows) => rows
                .into_iter()
                .filter(|w| w.is_live(gone_after))
                .filter(|w| self.worker_name.as_deref() != Some(w.id.as_str()))
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the worker registry");
                Vec::new()
            }
        }
    }

    /// Models held by live workers elsewhere that this process does not hold itself.
    async fn remote_models(&self, db: &sea_orm::DatabaseConnection) -> Vec<String> {
        let mut models: Vec<String> = self
            .remote_workers(db)
            .await
            .iter()
            .flat_map(crate::models::workers::Model::model_list)
            .filter(|m| *m != self.settings.engine.model_name && self.registry.get(m).is_none())
            .collect();
        models.sort();
        models.dedup();
        models
    }

    /// Every model served now (the default one, those loaded here, those held by live workers
    /// elsewhere) with its queue, for depth figures.
    pub async fn served_queues(&self, db: &sea_orm::DatabaseConnection) -> Vec<(String, JobQueue)> {
        let mut queues = vec![(self.settings.engine.model_name.clone(), self.queue.clone())];
        for m in self.registry.all() {
            queues.push((m.model_id.clone(), m.queue.clone()));
        }
        for model in self.remote_models(db).await {
            if let Some(queue) = self.queue_of(&model).await {
                queues.push((model, queue));
            }
        }
        queues
    }

    /// The queue of `model`: this process's own, or that of a model held by workers elsewhere.
    async fn queue_of(&self, model: &str) -> Option<JobQueue> {
        if let Some(queue) = self.queue_for(model) {
            return Some(queue);
        }
        let mut remote = self.remote_queues.lock().await;
        if let Some(queue) = remote.get(model) {
            return Some(queue.clone());
        }
        match JobQueue::connect(&self.settings.queue, model).await {
            Ok(queue) => {
                remote.insert(model.to_string(), queue.clone());
                Some(queue)
            }
            Err(e) => {
                tracing::warn!(error = %e, model, "cannot open the model's queue");
                None
            }
        }
    }

    /// The served model's architecture, which adapters must match.
    #[must_use]
    pub fn base_architecture(&self) -> Option<String> {
        self.tokenizer.architecture()
    }
}

/// A request for a model other than the default one: allowed for this key, and without a head.
fn other_model(
    key: &api_keys::Model,
    model: &str,
    served: &str,
    choice: &ModelChoice,
) -> Result<Resolved, ApiError> {
    if !key.permits_model(model) {
        return Err(ApiError::forbidden(
            "model_not_allowed",
            format!(
                "this key may not use model {model:?}; it may use {:?}",
                key.allowed_models()
            ),
        ));
    }
    if choice.adapter.is_some() || choice.scale.is_some() {
        return Err(ApiError::unprocessable(
            "adapter_not_supported",
            format!("LoRA heads apply to {served:?} only, not to {model:?}"),
        ));
    }
    Ok(Resolved {
        model: model.to_string(),
        adapter: None,
    })
}

/// Spends one call of `key` or says why not (401/403/429).
async fn charge(db: &sea_orm::DatabaseConnection, key: &api_keys::Model) -> Result<(), ApiError> {
    match api_keys::charge(db, key.id).await? {
        Ok(_) => Ok(()),
        Err(refusal) => Err(refusal_error(refusal, key)),
    }
}

/// The HTTP error for a request its token budgets cannot take (nothing was spent).
#[must_use]
pub fn budget_error(refusal: &BudgetRefusal) -> ApiError {
    match refusal {
        BudgetRefusal::Exceeded { .. } => ApiError::token_budget_exceeded(refusal.to_string()),
        BudgetRefusal::UserDisabled => ApiError::forbidden("user_disabled", refusal.to_string()),
    }
}

/// The HTTP error for a key that may not call now.
#[must_use]
pub fn refusal_error(refusal: Refusal, key: &api_keys::Model) -> ApiError {
    match refusal {
        Refusal::Revoked => ApiError::unauthorized("key_revoked", "this API key has been revoked"),
        Refusal::Unknown => ApiError::unauthorized("invalid_api_key", "unknown API key"),
        Refusal::NotYetValid => ApiError::forbidden(
            "key_not_yet_valid",
            format!(
                "this key is valid from {}",
                key.valid_from.map(|t| t.to_rfc3339()).unwrap_or_default()
            ),
        ),
        Refusal::Expired => ApiError::forbidden(
            "key_expired",
            format!(
                "this key expired at {}",
                key.valid_until.map(|t| t.to_rfc3339()).unwrap_or_default()
            ),
        ),
        Refusal::QuotaExhausted { max_calls } => ApiError::quota_exhausted(max_calls),
    }
}
