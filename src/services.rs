//! The long-lived parts of a running server, built once at start-up and shared by handlers
//! through Loco's shared store: the models served ([`ModelRegistry`]), the admission path
//! ([`Admission`]), job events, rate limits, the login throttle and the setup link. Each lives
//! in its own module; this one only builds them and stops them. `cargo loco task …` does not
//! start them (no model load for a task).

use std::{sync::Arc, time::Duration};

use loco_rs::app::AppContext;

use crate::{
    admission::{policy::Policy, reaper, Admission},
    engine::tokenizer::PromptTokenizer,
    errors::{ApiError, ErrorCode},
    notify::JobEvents,
    queue::JobQueue,
    ratelimit::RateLimits,
    serving::{DefaultModel, ModelRegistry},
    settings::Settings,
    setup_link::SetupLinks,
    throttle::Logins,
};

pub struct Services {
    pub settings: Settings,
    pub models: Arc<ModelRegistry>,
    pub admission: Admission,
    pub events: JobEvents,
    pub rate_limits: RateLimits,
    /// Identities of keys recently seen by the routes that spend a call.
    pub known_keys: crate::extractors::KnownKeys,
    /// Failed-login throttle of `POST /token`.
    pub logins: Logins,
    /// Bounds the password checks (argon2) running at once, so a flood of sign-ins cannot eat
    /// the memory or the blocking threads (see [`Self::password_check`]).
    password_checks: Arc<tokio::sync::Semaphore>,
    pub setup: SetupLinks,
    reaper: tokio::task::JoinHandle<()>,
    /// The hourly purge of old job texts, when retention is on.
    retention: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Services {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Services")
            .field("models", &self.models)
            .finish_non_exhaustive()
    }
}

fn startup(e: impl std::fmt::Display) -> loco_rs::Error {
    loco_rs::Error::Message(e.to_string())
}

impl Services {
    /// Builds the services and, in embedded mode, loads the model and starts the worker.
    ///
    /// # Errors
    /// When the settings are invalid, the model cannot be loaded or the queue cannot be opened.
    pub async fn start(ctx: &AppContext) -> loco_rs::Result<Arc<Self>> {
        let settings = Settings::from_config(&ctx.config)?;
        let policy = Policy::new(&settings.policy.deny)
            .map_err(|e| startup(format!("settings.policy.deny: {e}")))?;
        let engine_settings = settings.engine.clone();
        let tokenizer =
            tokio::task::spawn_blocking(move || PromptTokenizer::load(&engine_settings))
                .await
                .map_err(startup)?
                .map_err(startup)?;
        let queue = JobQueue::connect(&settings.queue, &settings.engine.model_name)
            .await
            .map_err(startup)?;
        // With workers elsewhere, their events reach this instance's requests through Redis.
        let events = JobEvents::for_settings(&settings.queue, &ctx.db, true)
            .await
            .map_err(startup)?;
        let mut default = DefaultModel {
            queue,
            tokenizer: Arc::new(tokenizer),
            engine: None,
            worker_name: None,
            worker: None,
        };
        if settings.queue.embedded_worker {
            let engine_settings = settings.engine.clone();
            let started = std::time::Instant::now();
            let engine =
                tokio::task::spawn_blocking(move || crate::engine::start(&engine_settings))
                    .await
                    .map_err(startup)?
                    .map_err(startup)?;
            tracing::info!(
                ms = started.elapsed().as_millis() as u64,
                "engine ready (embedded worker)"
            );
            let name = format!("embedded-{}", std::process::id());
            default.worker = Some(
                crate::workers::serve_queue(
                    &ctx.db,
                    engine.clone(),
                    events.clone(),
                    &name,
                    &settings,
                    &default.queue,
                )
                .await,
            );
            default.engine = Some(engine);
            default.worker_name = Some(name);
        }
        let logins = Logins::new(
            settings.auth.login_max_failures,
            settings.auth.login_max_failures_per_address,
            Duration::from_secs(settings.auth.login_lockout_seconds),
        );
        let mut rate_limits = RateLimits::new(&settings.api.rate_limit);
        if settings.queue.is_redis() {
            let timeout = Duration::from_millis(settings.queue.redis_timeout_ms);
            let (_, conn) = crate::queue::redis_connect(&settings.queue.url, timeout)
                .await
                .map_err(startup)?;
            rate_limits = rate_limits.shared_in_redis(conn, &settings.queue.prefix, timeout);
        }
        let models = Arc::new(ModelRegistry::new(
            settings.clone(),
            ctx.db.clone(),
            events.clone(),
            default,
        ));
        // Upstreams of settings.remote_models: forwarding needs no GPU, so every API process
        // serves them (production included).
        models.start_configured_remotes().await.map_err(startup)?;
        let admission = Admission::new(
            settings.clone(),
            ctx.db.clone(),
            policy,
            models.clone(),
            events.clone(),
        );
        let reaper = reaper::start(
            ctx.db.clone(),
            events.clone(),
            reaper::Bounds::from_settings(&settings),
        );
        let retention = crate::retention::start(ctx.db.clone(), settings.retention.job_text_days);
        let checks = match settings.auth.password_checks {
            0 => std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
            n => n as usize,
        };
        let password_checks = Arc::new(tokio::sync::Semaphore::new(checks));
        let setup = SetupLinks::new(Duration::from_secs(
            u64::from(settings.auth.setup_link_minutes) * 60,
        ));
        let known_keys =
            crate::extractors::KnownKeys::new(Duration::from_millis(settings.api.key_cache_ms));
        Ok(Arc::new(Self {
            settings,
            models,
            admission,
            events,
            rate_limits,
            known_keys,
            logins,
            password_checks,
            setup,
            reaper,
            retention,
        }))
    }

    /// The services of a running server.
    ///
    /// # Errors
    /// 503 when the server has not finished starting.
    pub fn from_ctx(ctx: &AppContext) -> Result<Arc<Self>, ApiError> {
        ctx.shared_store
            .get::<Arc<Self>>()
            .ok_or_else(|| ApiError::new(ErrorCode::Starting, "the server is still starting"))
    }

    /// A permit to run one password check now, or 503 `server_busy` at once when as many as
    /// allowed are running (sign-in floods are refused, not queued).
    ///
    /// # Errors
    /// 503 with `Retry-After: 1`.
    pub fn password_check(&self) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
        self.password_checks
            .clone()
            .try_acquire_owned()
            .map_err(|_| {
                ApiError::new(
                    ErrorCode::ServerBusy,
                    "too many sign-ins at this moment; try again in a second",
                )
            })
    }

    /// Stops the reaper, the purge and every worker of this process after its current job.
    pub async fn shutdown(&self) {
        self.reaper.abort();
        if let Some(purge) = &self.retention {
            purge.abort();
        }
        self.models.shutdown().await;
    }
}
