//! The long-lived parts of a running server, built once at start-up and shared by handlers:
//! settings, the queue, the job-event registry, the prompt tokenizer and, in embedded mode, the
//! engine and its worker. `cargo loco task …` does not start them (no model load for a task).

use std::{sync::Arc, time::Duration};

use loco_rs::app::AppContext;
use tokio::sync::Mutex;
use tracing::Instrument;

use crate::{
    engine::{
        llama::LlamaEngine, tokenizer::PromptTokenizer, Algorithm, EngineError, EngineStatus,
        GenerationRequest,
    },
    errors::ApiError,
    models::{
        api_keys::{self, Refusal},
        budgets::{self, BudgetRefusal},
        jobs,
    },
    notify::JobEvents,
    queue::{GenerationJob, JobQueue, WorkerHandle},
    settings::Settings,
    throttle::LoginThrottle,
    workers::generation::GenerationWorker,
};

pub struct Services {
    pub settings: Settings,
    /// Compiled `settings.policy.deny`.
    deny: regex::RegexSet,
    pub queue: JobQueue,
    pub events: JobEvents,
    pub tokenizer: Arc<PromptTokenizer>,
    /// The in-process engine (embedded mode); `None` when workers run elsewhere.
    pub engine: Option<Arc<dyn Algorithm>>,
    /// The embedded worker's id (as recorded on the jobs it runs), when there is one.
    pub worker_name: Option<String>,
    /// Failed-login throttle of `POST /token`.
    pub logins: LoginThrottle,
    worker: Mutex<Option<WorkerHandle>>,
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
        let events = JobEvents::default();
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
            let handler = Arc::new(GenerationWorker::new(
                ctx.db.clone(),
                llama.clone(),
                events.clone(),
                name.clone(),
            ));
            worker = Some(queue.spawn_worker(&name, handler).await);
            engine = Some(llama);
            worker_name = Some(name);
        }
        let logins = LoginThrottle::new(
            settings.auth.login_max_failures,
            Duration::from_secs(settings.auth.login_lockout_seconds),
        );
        Ok(Arc::new(Self {
            settings,
            deny,
            queue,
            events,
            tokenizer: Arc::new(tokenizer),
            engine,
            worker_name,
            logins,
            worker: Mutex::new(worker),
        }))
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
        if let Some(worker) = self.worker.lock().await.take() {
            worker.shutdown().await;
        }
    }

    #[must_use]
    pub fn engine_status(&self) -> Option<EngineStatus> {
        self.engine.as_ref().map(|e| e.status())
    }

    /// Refuses early (403/429/401) when the key, as last read, may not call now; the atomic
    /// charge decides again later. Key problems are reported before body problems.
    ///
    /// # Errors
    /// The refusal as an HTTP error.
    pub fn precheck(&self, key: &api_keys::Model) -> Result<(), ApiError> {
        key.refusal_at(crate::models::now())
            .map_or(Ok(()), |refusal| Err(refusal_error(refusal, key)))
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
        request: GenerationRequest,
        client_ref: Option<&str>,
    ) -> Result<Submission, ApiError> {
        self.submit(db, key, endpoint, request, client_ref, true)
            .await
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
        request: GenerationRequest,
        client_ref: Option<&str>,
        wait: bool,
    ) -> Result<Submission, ApiError> {
        if let Some(r) = client_ref {
            if let Some(existing) = jobs::Model::find_by_client_ref(db, key.id, r).await? {
                return self.follow(db, existing, wait).await;
            }
        }
        let prompt_tokens = self.check_prompt(&request)?;
        charge(db, key).await?;
        let reservation = match budgets::reserve(
            db,
            key,
            i64::try_from(prompt_tokens).unwrap_or(i64::MAX),
            i64::from(request.params.max_tokens),
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
        let request_json = serde_json::to_string(&request).map_err(ApiError::internal)?;
        let record = match jobs::ActiveModel::create_queued(
            db,
            jobs::NewJob {
                id: job_id.clone(),
                api_key_id: key.id,
                endpoint: endpoint.to_string(),
                model: request.model.clone(),
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
        self.queue_and_wait(db, key.id, record, request, wait)
            .instrument(span)
            .await
    }

    async fn queue_and_wait(
        &self,
        db: &sea_orm::DatabaseConnection,
        api_key_id: i32,
        record: jobs::Model,
        request: GenerationRequest,
        wait: bool,
    ) -> Result<Submission, ApiError> {
        let job_id = record.id.clone();
        let done = wait.then(|| self.events.subscribe(&job_id));
        let job = GenerationJob {
            job_id: job_id.clone(),
            api_key_id,
            request,
        };
        if let Err(e) = self.queue.push(job).await {
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
        match done {
            Some(done) => self.await_settled(db, done, record).await,
            None => Ok(Submission::Pending(record)),
        }
    }

    /// Follows an existing job (a repeated client id) without charging anything.
    async fn follow(
        &self,
        db: &sea_orm::DatabaseConnection,
        job: jobs::Model,
        wait: bool,
    ) -> Result<Submission, ApiError> {
        if job.is_finished() {
            return Ok(Submission::Finished(job));
        }
        if !wait {
            return Ok(Submission::Pending(job));
        }
        let done = self.events.subscribe(&job.id);
        // It may have settled between the read and the subscription.
        let current = jobs::Model::find_any(db, &job.id).await?.unwrap_or(job);
        if current.is_finished() {
            self.events.forget(&current.id);
            return Ok(Submission::Finished(current));
        }
        self.await_settled(db, done, current).await
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

    /// Counts prompt tokens with the model's tokenizer; 400 when the prompt cannot fit.
    fn check_prompt(&self, request: &GenerationRequest) -> Result<usize, ApiError> {
        if !self.deny.is_empty() && request.prompt.texts().any(|t| self.deny.is_match(t)) {
            return Err(ApiError::bad_request(
                "content_policy_violation",
                "the input contains content this server does not accept",
            ));
        }
        let n = self.tokenizer.count(&request.prompt).map_err(|e| {
            ApiError::unprocessable("invalid_prompt", format!("prompt cannot be rendered: {e}"))
        })?;
        let limit = self.tokenizer.context_size() as usize;
        if n >= limit {
            return Err(ApiError::bad_request(
                "context_length_exceeded",
                format!(
                    "prompt is {n} tokens; model {} accepts at most {} prompt tokens (context {limit})",
                    self.tokenizer.model_name(),
                    limit - 1
                ),
            ));
        }
        Ok(n)
    }
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
