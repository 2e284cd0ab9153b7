//! The one admission path. Every route that spends a call — whatever its wire shape — converts
//! its body into an [`Input`] and calls [`Admission::admit`], which:
//!
//! 1. follows an earlier job with the same client id (seed 001's `job_id`), charging nothing;
//! 2. resolves the model and LoRA head against the key's allow-lists ([`resolve`]);
//! 3. bounds the sampling numbers and, for seed 002's memory, puts the stored conversation
//!    before the prompt;
//! 4. applies the content policy and counts tokens against the context ([`policy`]);
//! 5. checks that the model's queue answers;
//! 6. charges the call, reserves token budgets, records the job and pushes it — the one step
//!    with side effects ([`commit`]), run apart from the request so that it completes even when
//!    the client hangs up halfway, and together with the key's other admissions that arrive
//!    meanwhile ([`batches`]);
//! 7. follows the job as the route asked: wait for the result, answer at once, or stream.
//!
//! Steps 1–5 change nothing, so every refusal leaves no trace. A job that nonetheless stays
//! `queued` or `running` too long (its process died mid-step) is failed and refunded by the
//! [`reaper`].

pub mod batches;
mod commit;
pub mod input;
pub mod policy;
pub mod reaper;
pub mod resolve;

use std::{sync::Arc, time::Duration};

use sea_orm::DatabaseConnection;

use self::{
    batches::Batches,
    commit::{Commit, Committed},
};

pub use self::input::{
    EmbeddingInput, GenerationInput, HeadInput, Input, Memory, ModelChoice, SamplerFields,
    SamplingInput, StopWords, ToolsInput,
};
use crate::{
    engine::{EmbeddingRequest, Prompt},
    errors::{ApiError, ErrorCode},
    models::{
        api_keys::{self, Refusal},
        budgets::BudgetRefusal,
        conversations, jobs,
    },
    notify::JobEvents,
    queue::{JobQueue, Work},
    serving::ModelRegistry,
    settings::Settings,
};

/// Longest a memory request's exchange is waited for, so that it still lands in the
/// conversation when its job outlived the request.
const REMEMBER_FOR: Duration = Duration::from_secs(3600);

/// How often a request that waits until its job settles re-reads the record, at most and at
/// least (whatever `wait_timeout_ms` says).
const RECHECK_EVERY: Duration = Duration::from_secs(10);
const RECHECK_AT_LEAST_EVERY: Duration = Duration::from_millis(100);

/// What the caller wants once the job is admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Follow {
    /// The result, up to `settings.api.wait_timeout_ms` (then 202 and the job to poll).
    Result,
    /// The result however long it takes: the peers' routes (OpenAI's, Ollama's,
    /// llama-server's), whose clients know no 202 and bring their own timeout. A client that
    /// hangs up leaves the job running.
    Settled,
    /// Nothing: answer as soon as the job is queued.
    Nothing,
    /// Its token deltas and final record (no timeout: the client reads them as they come).
    Updates,
}

/// How an admission ended for the caller.
#[derive(Debug)]
pub enum Admitted {
    /// Settled within the wait: done or failed.
    Finished(jobs::Model),
    /// Still queued or running; poll `GET /api/jobs/{id}`.
    Pending(jobs::Model),
    /// Subscribed for streaming.
    Streaming(JobStream),
}

/// A queued job and its subscriptions: text deltas as the worker generates, then the record.
#[derive(Debug)]
pub struct JobStream {
    pub job: jobs::Model,
    pub deltas: Option<tokio::sync::broadcast::Receiver<String>>,
    pub done: tokio::sync::oneshot::Receiver<jobs::Model>,
}

/// Where a request came from and how it wants to be answered.
#[derive(Debug, Clone)]
pub struct Ticket {
    /// The route, as recorded on the job.
    pub endpoint: &'static str,
    /// The client's own id for the job (seed 001's `job_id`), idempotent per key.
    pub client_ref: Option<String>,
    pub follow: Follow,
    /// What the route's answer repeats of the request and the job does not keep (JSON),
    /// recorded with the job so the answer read back later says the same.
    pub echo: Option<String>,
}

impl Ticket {
    /// Wait for the result.
    #[must_use]
    pub fn wait(endpoint: &'static str) -> Self {
        Self {
            endpoint,
            client_ref: None,
            follow: Follow::Result,
            echo: None,
        }
    }

    #[must_use]
    pub fn follow(mut self, follow: Follow) -> Self {
        self.follow = follow;
        self
    }

    /// Wait for the result however long it takes ([`Follow::Settled`]).
    #[must_use]
    pub fn until_settled(self) -> Self {
        self.follow(Follow::Settled)
    }

    #[must_use]
    pub fn client_ref(mut self, client_ref: Option<String>) -> Self {
        self.client_ref = client_ref;
        self
    }

    #[must_use]
    pub fn echo(mut self, echo: Option<String>) -> Self {
        self.echo = echo;
        self
    }
}

/// The admission unit: what [`Admission::admit`] needs, built once at start-up.
pub struct Admission {
    settings: Settings,
    db: DatabaseConnection,
    policy: policy::Policy,
    models: Arc<ModelRegistry>,
    events: JobEvents,
    commits: Batches<commit::Pending>,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission").finish_non_exhaustive()
    }
}

impl Admission {
    #[must_use]
    pub fn new(
        settings: Settings,
        db: DatabaseConnection,
        policy: policy::Policy,
        models: Arc<ModelRegistry>,
        events: JobEvents,
    ) -> Self {
        Self {
            settings,
            db,
            policy,
            models,
            events,
            commits: commit::batches(),
        }
    }

    /// Admits `input` for `key` (whose standing the caller extractor has checked) and follows
    /// the job as `ticket` says.
    ///
    /// # Errors
    /// Every refusal (404/403/422 model or input, 400 policy or context, 401/403/429 from the
    /// charge, 429 budgets, 503 queue) comes before anything is charged or queued.
    pub async fn admit(
        &self,
        key: &api_keys::Model,
        input: impl Into<Input>,
        ticket: Ticket,
    ) -> Result<Admitted, ApiError> {
        if let Some(r) = ticket.client_ref.as_deref() {
            if let Some(existing) = jobs::Model::find_by_client_ref(&self.db, key.id, r).await? {
                return self.follow(existing, ticket.follow).await;
            }
        }
        let (mut work, memory, clamp) = self.work(key, input.into()).await?;
        let prompt_tokens = self
            .policy
            .admit_input(&work, &self.models, &self.settings.engine)?;
        // A remote model's count is an upper bound, not the room its context leaves: its
        // `max_tokens` goes to the upstream as asked (bounded by `max_tokens_limit`).
        let clamp = clamp && !self.models.is_remote(work.base_model());
        if let (true, Work::Generate(request)) = (clamp, &mut work) {
            // Cut to the room the prompt leaves in the model's context (never below 1; a
            // prompt that fills the context was refused above).
            let context = self.models.tokenizer_for(&request.model).context_size();
            let room = context.saturating_sub(u32::try_from(prompt_tokens).unwrap_or(u32::MAX));
            request.params.max_tokens = request.params.max_tokens.min(room.max(1));
        }
        let queue = self.queue_for(work.base_model()).await?;
        let memory_prompt = memory.map(|m| (m, last_user_text(&work)));
        let commit = Commit {
            db: self.db.clone(),
            events: self.events.clone(),
            queue,
            key: key.clone(),
            endpoint: ticket.endpoint,
            client_ref: ticket.client_ref.clone(),
            echo: ticket.echo.clone(),
            prompt_tokens,
            work,
            subscribe: ticket.follow,
            request_id: crate::request_id::current(),
            span: tracing::Span::current(),
        };
        // Run by the commit task: a client that hangs up cannot stop it between the charge and
        // the push.
        let (answer, committed) = tokio::sync::oneshot::channel();
        self.commits.submit((commit, answer));
        let committed = committed
            .await
            .map_err(|_| ApiError::internal("an admission's commit ended without an outcome"))?;
        let (record, deltas, done) = match committed {
            Committed::New(record, deltas, done) => (record, deltas, done),
            Committed::Existing(record) => return self.follow(record, ticket.follow).await,
            Committed::Refused(e) => return Err(e),
        };
        let remembered = memory_prompt.map(|(memory, prompt)| {
            remember(
                self.db.clone(),
                self.events.clone(),
                record.id.clone(),
                memory,
                prompt,
            )
        });
        let admitted = match (ticket.follow, done) {
            (Follow::Updates, Some(done)) => Admitted::Streaming(JobStream {
                job: record,
                deltas,
                done,
            }),
            (follow, Some(done)) => {
                self.await_settled(done, record, follow == Follow::Settled)
                    .await?
            }
            (_, None) => Admitted::Pending(record),
        };
        // A client answered with the result may send its next turn at once: the exchange is
        // stored before it hears back (and, should it hang up, stored all the same).
        if let (Admitted::Finished(_), Some(task)) = (&admitted, remembered) {
            let _ = task.await;
        }
        Ok(admitted)
    }

    /// The text the model would read for `input`, and the model's name: the same resolution,
    /// checks and tool rendering as [`Self::admit`], with nothing charged or queued (llama.cpp
    /// server's `/apply-template`, which tools use to inspect or cache prompts).
    ///
    /// # Errors
    /// The refusals of [`Self::admit`] before its charge; 400 `unsupported_parameter` for a
    /// remote model (its template is its upstream's).
    pub async fn rendered(
        &self,
        key: &api_keys::Model,
        input: GenerationInput,
    ) -> Result<(String, String), ApiError> {
        let (work, _, _) = self.work(key, input.into()).await?;
        let Work::Generate(request) = &work else {
            return Err(ApiError::internal("a chat became another kind of work"));
        };
        if self.models.is_remote(&request.model) {
            return Err(ApiError::new(
                ErrorCode::UnsupportedParameter,
                format!(
                    "model {} is served by a remote upstream, whose template is its own",
                    request.model
                ),
            ));
        }
        self.policy
            .admit_input(&work, &self.models, &self.settings.engine)?;
        let text = self
            .models
            .tokenizer_for(&request.model)
            .render(&request.prompt)
            .map_err(|e| {
                ApiError::new(
                    ErrorCode::InvalidPrompt,
                    format!("prompt cannot be rendered: {e}"),
                )
            })?;
        Ok((request.display_model(), text))
    }

    /// The engine work for `input` (model resolved, numbers bounded, history put before a
    /// memory request's prompt), its memory, and whether `max_tokens` is cut to the room the
    /// prompt leaves rather than kept as asked.
    async fn work(
        &self,
        key: &api_keys::Model,
        input: Input,
    ) -> Result<(Work, Option<Memory>, bool), ApiError> {
        match input {
            Input::Generate(g) => {
                let g = *g;
                // No `max_tokens`: until the model stops or the context is full (bounded by
                // `default_max_tokens`), so it is cut to the room like an oversized one.
                let clamp = g.sampling.clamp_max_tokens || g.sampling.max_tokens.is_none();
                let resolved = resolve::resolve(
                    &self.db,
                    &self.models,
                    &self.settings.engine.adapters_dir,
                    key,
                    g.model,
                )
                .await?;
                let d = self.models.defaults_for(&resolved.model);
                let params = g.sampling.or(d.sampling).into_params(&self.settings.api)?;
                let tokenizer = self.models.tokenizer_for(&resolved.model);
                // A remote model's ids are its upstream's, checked there.
                let local = !self.models.is_remote(&resolved.model);
                let unforwarded = [
                    ("logprobs", params.controls.logprobs.is_some()),
                    ("n", params.controls.n.is_some()),
                ];
                if let Some((field, _)) = unforwarded.iter().find(|(_, asked)| !local && *asked) {
                    // The remote engine does not forward these yet: refused, not ignored.
                    return Err(ApiError::new(
                        ErrorCode::UnsupportedParameter,
                        format!("{field} is not supported for remote models yet; leave it out"),
                    ));
                }
                if let Some((token, _)) = params
                    .controls
                    .logit_bias
                    .iter()
                    .find(|(t, _)| local && !tokenizer.is_token(*t))
                {
                    return Err(ApiError::new(
                        ErrorCode::InvalidSampling,
                        format!("logit_bias names token {token}, which this model does not have"),
                    ));
                }
                let prompt = match (g.memory, g.prompt) {
                    (Some(m), Prompt::Chat { mut messages, .. }) if !messages.is_empty() => {
                        let last = messages.remove(messages.len() - 1);
                        let tokenizer = self.models.tokenizer_for(&resolved.model);
                        let context = tokenizer.context_size();
                        let history =
                            conversations::recent(&self.db, m.owner, m.number, u64::from(context))
                                .await?;
                        let budget = context.saturating_sub(params.max_tokens) as usize;
                        let fitted = conversations::fit(history, last, budget, |chat| {
                            tokenizer.count(&Prompt::chat(chat.to_vec()))
                        })
                        .map_err(|e| {
                            ApiError::new(
                                ErrorCode::InvalidPrompt,
                                format!("prompt cannot be rendered: {e}"),
                            )
                        })?;
                        Prompt::chat(fitted)
                    }
                    (_, prompt) => prompt,
                };
                // An upstream is offered tools in OpenAI's shape; its calls come back as the
                // generic format (the local model's template does not apply).
                let format = if local {
                    tokenizer.tool_format()
                } else {
                    crate::engine::tools::ToolFormat::Generic
                };
                let (prompt, params) = offer_tools(prompt, params, g.tools, format)?;
                Ok((
                    Work::from(resolved.request(prompt, params)),
                    g.memory,
                    clamp,
                ))
            }
            Input::Embed(e) => {
                if !self.settings.engine.embeddings.enabled {
                    return Err(ApiError::new(
                        ErrorCode::EmbeddingsDisabled,
                        "embeddings are disabled on this server",
                    ));
                }
                let resolved = resolve::resolve(
                    &self.db,
                    &self.models,
                    &self.settings.engine.adapters_dir,
                    key,
                    ModelChoice::named(e.model),
                )
                .await?;
                if resolved.adapter.is_some() {
                    return Err(ApiError::new(
                        ErrorCode::AdapterNotSupported,
                        "LoRA heads apply to generation; embeddings come from the base model",
                    ));
                }
                Ok((
                    Work::Embed(EmbeddingRequest {
                        model: resolved.model,
                        inputs: e.inputs,
                    }),
                    None,
                    false,
                ))
            }
        }
    }

    /// 503 before anything is charged when the model's queue cannot take a job now (Redis
    /// down) or this process's engine for it is down (restarting): clients get a fast, free
    /// answer they can retry.
    async fn queue_for(&self, model: &str) -> Result<JobQueue, ApiError> {
        // This process's engine, or else (production) the worker processes holding the model.
        let down = match self.models.engine_down(model) {
            Some(reason) => Some(reason),
            None if !self.models.has_engine_for(model) => self.models.workers_down(model).await,
            None => None,
        };
        if let Some(reason) = down {
            return Err(ApiError::new(
                ErrorCode::ModelUnavailable,
                format!("model {model:?} is not ready: {reason}; nothing was charged"),
            ));
        }
        let queue = self.models.queue_of(model).await.ok_or_else(|| {
            ApiError::new(
                ErrorCode::ModelUnavailable,
                format!("model {model:?} is not loaded; nothing was charged"),
            )
        })?;
        queue.ping().await.map_err(|e| {
            tracing::warn!(error = %e, "queue unavailable");
            queue_unavailable()
        })?;
        Ok(queue)
    }

    /// Subscriptions for an existing job; a job that already settled gets its record at once.
    ///
    /// # Errors
    /// On database errors.
    pub async fn stream_of(&self, job: jobs::Model) -> Result<JobStream, ApiError> {
        let deltas = self.events.subscribe_deltas(&job.id);
        let done = self.events.subscribe(&job.id);
        match self.recheck(job).await? {
            Err(settled) => {
                drop((deltas, done));
                self.events.forget(&settled.id);
                let (tx, done) = tokio::sync::oneshot::channel();
                let _ = tx.send(settled.clone());
                Ok(JobStream {
                    job: settled,
                    deltas: None,
                    done,
                })
            }
            Ok(job) => Ok(JobStream { job, deltas, done }),
        }
    }

    /// The job as recorded now, read after subscribing to it so that a job settling in between
    /// is not missed: `Err(job)` when it has settled (its subscription is dropped), else
    /// `Ok(job)` to wait on.
    async fn recheck(
        &self,
        job: jobs::Model,
    ) -> Result<Result<jobs::Model, jobs::Model>, ApiError> {
        let current = jobs::Model::find_any(&self.db, &job.id)
            .await?
            .unwrap_or(job);
        if current.is_finished() {
            self.events.forget(&current.id);
            return Ok(Err(current));
        }
        Ok(Ok(current))
    }

    /// Follows an existing job (a repeated client id) without charging anything.
    async fn follow(&self, job: jobs::Model, follow: Follow) -> Result<Admitted, ApiError> {
        if job.is_finished() {
            return Ok(Admitted::Finished(job));
        }
        match follow {
            Follow::Nothing => return Ok(Admitted::Pending(job)),
            Follow::Updates => return Ok(Admitted::Streaming(self.stream_of(job).await?)),
            Follow::Result | Follow::Settled => {}
        }
        let done = self.events.subscribe(&job.id);
        match self.recheck(job).await? {
            Err(settled) => Ok(Admitted::Finished(settled)),
            Ok(current) => {
                self.await_settled(done, current, follow == Follow::Settled)
                    .await
            }
        }
    }

    /// Waits for the notification up to the configured timeout, then trusts the record; with
    /// `until`, goes on waiting (re-reading the record every [`RECHECK_EVERY`] at most, in case
    /// a notification was lost with a worker) until the job settles.
    async fn await_settled(
        &self,
        mut done: tokio::sync::oneshot::Receiver<jobs::Model>,
        mut record: jobs::Model,
        until: bool,
    ) -> Result<Admitted, ApiError> {
        let wait = Duration::from_millis(self.settings.api.wait_timeout_ms);
        let wait = if until {
            wait.clamp(RECHECK_AT_LEAST_EVERY, RECHECK_EVERY)
        } else {
            wait
        };
        loop {
            let closed = match tokio::time::timeout(wait, &mut done).await {
                Ok(Ok(job)) => return Ok(Admitted::Finished(job)),
                Ok(Err(_)) => true,
                Err(_) => false,
            };
            // Timed out (or the worker went away): what does the record say now?
            let current = jobs::Model::find_any(&self.db, &record.id)
                .await?
                .unwrap_or(record);
            if current.is_finished() {
                self.events.forget(&current.id);
                return Ok(Admitted::Finished(current));
            }
            if !until {
                self.events.forget(&current.id);
                return Ok(Admitted::Pending(current));
            }
            if closed {
                // No notification will come on this one (its sender went with a worker, or
                // the registry was full): wait the interval out rather than spin on reads.
                tokio::time::sleep(wait).await;
                done = self.events.subscribe(&current.id);
            }
            record = current;
        }
    }
}

/// The prompt with the tools offered as the resolved model understands them, and the grammar
/// its calls are decoded with.
///
/// # Errors
/// 400 `unsupported_schema` naming each keyword of a tool's parameters the grammar cannot
/// enforce; 400 `invalid_tools` for parameters that are no schema, a `tool_choice` naming no
/// tool, or tools on a completion prompt.
fn offer_tools(
    prompt: Prompt,
    mut params: crate::engine::SamplingParams,
    tools: Option<input::ToolsInput>,
    format: crate::engine::tools::ToolFormat,
) -> Result<(Prompt, crate::engine::SamplingParams), ApiError> {
    use crate::engine::{grammar::FormatError, tools};
    let Some(t) = tools else {
        return Ok((prompt, params));
    };
    let Prompt::Chat { messages, .. } = prompt else {
        return Err(ApiError::new(
            ErrorCode::InvalidTools,
            "tools need a chat (messages), not a completion prompt",
        ));
    };
    // A response format beside tools (an agent with an output type) holds the reply that is
    // no call: the generic format's envelope carries it as `{"response": <value>}`, whatever
    // the model's own tool format.
    let answer = params.controls.output.take().map(|o| match o.format {
        crate::engine::grammar::ResponseFormat::JsonObject => serde_json::json!({"type": "object"}),
        crate::engine::grammar::ResponseFormat::JsonSchema { schema, .. } => schema,
    });
    let format = if answer.is_some() {
        tools::ToolFormat::Generic
    } else {
        format
    };
    let offer = tools::ToolUse {
        tools: t.tools,
        choice: t.choice,
        parallel: t.parallel,
        format,
        answer,
    };
    let constraint = tools::constrain(&offer).map_err(|e| match e {
        FormatError::Unsupported(_) => ApiError::new(
            ErrorCode::UnsupportedSchema,
            format!("{e}; remove or rewrite those keywords"),
        ),
        FormatError::Invalid(why) => ApiError::new(ErrorCode::InvalidTools, why),
    })?;
    params.controls.output = Some(Box::new(constraint));
    Ok((
        Prompt::Chat {
            messages,
            tools: Some(Box::new(offer)),
        },
        params,
    ))
}

fn queue_unavailable() -> ApiError {
    ApiError::new(
        ErrorCode::QueueUnavailable,
        "the job queue is unavailable; nothing was charged, try again",
    )
}

/// The text of the turn a memory request adds (its last message).
fn last_user_text(work: &Work) -> String {
    match work {
        Work::Generate(r) => match &r.prompt {
            Prompt::Chat { messages, .. } => messages
                .last()
                .map(|m| m.content.clone())
                .unwrap_or_default(),
            Prompt::Raw { text } => text.clone(),
        },
        Work::Embed(_) => String::new(),
    }
}

/// Appends a memory request's exchange once its job is done, whether or not its client still
/// waits (notification first, the record as the fallback for workers in other processes).
fn remember(
    db: DatabaseConnection,
    events: JobEvents,
    job_id: String,
    memory: Memory,
    prompt: String,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut done = events.subscribe(&job_id);
        let deadline = tokio::time::Instant::now() + REMEMBER_FOR;
        loop {
            match jobs::Model::find_any(&db, &job_id).await {
                Ok(Some(job)) if job.is_finished() => {
                    drop(done);
                    events.forget(&job_id);
                    if job.status == jobs::DONE {
                        let reply = job.result.unwrap_or_default();
                        if let Err(e) = conversations::append(
                            &db,
                            memory.owner,
                            memory.number,
                            &prompt,
                            &reply,
                            &job.id,
                        )
                        .await
                        {
                            tracing::error!(error = %e, "could not store the conversation turn");
                        }
                    }
                    return;
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "reading a job to remember it"),
            }
            if tokio::time::Instant::now() >= deadline {
                drop(done);
                events.forget(&job_id);
                return;
            }
            // Wakes at once on the notification, else re-reads the record every few seconds.
            if tokio::time::timeout(Duration::from_secs(5), &mut done)
                .await
                .is_ok()
            {
                done = events.subscribe(&job_id);
            }
        }
    })
}

/// The error for a request its token budgets cannot take (nothing was spent).
#[must_use]
pub fn budget_error(refusal: &BudgetRefusal) -> ApiError {
    match refusal {
        BudgetRefusal::Exceeded { .. } => {
            ApiError::new(ErrorCode::TokenBudgetExceeded, refusal.to_string())
        }
        BudgetRefusal::UserDisabled => ApiError::new(ErrorCode::UserDisabled, refusal.to_string()),
    }
}

/// The error for a key that may not call now; `key` (as read) adds the window's dates.
#[must_use]
pub fn refusal_error(refusal: Refusal, key: Option<&api_keys::Model>) -> ApiError {
    match refusal {
        Refusal::Revoked => ApiError::new(ErrorCode::KeyRevoked, "this API key has been revoked"),
        Refusal::Unknown => ApiError::new(ErrorCode::InvalidApiKey, "unknown API key"),
        Refusal::NotYetValid => ApiError::new(
            ErrorCode::KeyNotYetValid,
            match key.and_then(|k| k.valid_from) {
                Some(t) => format!("this key is valid from {}", t.to_rfc3339()),
                None => "this key is not valid yet".into(),
            },
        ),
        Refusal::Expired => ApiError::new(
            ErrorCode::KeyExpired,
            match key.and_then(|k| k.valid_until) {
                Some(t) => format!("this key expired at {}", t.to_rfc3339()),
                None => "this key has expired".into(),
            },
        ),
        Refusal::QuotaExhausted { max_calls } => ApiError::quota_exhausted(max_calls),
    }
}
