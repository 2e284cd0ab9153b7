//! Typed view of the `settings:` block of `config/<env>.yaml`.
//!
//! Loco keeps app settings as free-form JSON; parsing them once into this struct means a typo in
//! the config fails at start-up with a clear message instead of at the first request.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    #[serde(default)]
    pub engine: EngineSettings,
    #[serde(default)]
    pub queue: QueueSettings,
    #[serde(default)]
    pub api: ApiSettings,
    #[serde(default)]
    pub policy: PolicySettings,
    #[serde(default)]
    pub auth: AuthSettings,
    #[serde(default)]
    pub retention: RetentionSettings,
    /// Names clients send for a model (a Hugging Face id such as `meta-llama/Llama-3.1-8B`)
    /// → the model id served here, or a GGUF file in the models folder to load under it.
    #[serde(default)]
    pub aliases: std::collections::BTreeMap<String, String>,
    /// OpenAI-compatible upstreams (a vLLM or llama-server cluster) served under ids of their
    /// own, started with the server (see [`crate::engine::remote`]).
    #[serde(default)]
    pub remote_models: Vec<RemoteModelSettings>,
    /// Which credentials remote-model configurations made through the API may name.
    #[serde(default)]
    pub remote_credentials: RemoteCredentialSettings,
}

/// One upstream in `settings.remote_models`. The key is named (a variable or a file), never
/// written here; unknown fields (such as `api_key`) stop the server at start.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteModelSettings {
    /// The model id clients use here.
    pub id: String,
    /// The upstream's OpenAI base URL (`http://vllm:8000/v1`).
    pub base_url: String,
    /// The model's name on the upstream.
    pub model: String,
    /// Environment variable holding the upstream's key.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// File holding the upstream's key (its first line).
    #[serde(default)]
    pub api_key_file: Option<PathBuf>,
    /// Longest a forwarded request may take, streaming included (default 300).
    #[serde(default)]
    pub timeout_seconds: Option<u64>,
    /// Requests forwarded at once (default 8).
    #[serde(default)]
    pub parallel: Option<u32>,
    /// The upstream's context length, reported in model lists (default 4096).
    #[serde(default)]
    pub context_size: Option<u32>,
}

/// What an admin key may point a remote configuration's credential at: configurations are
/// made over HTTP, so they may not name any variable or file of the server (that would send,
/// say, `DATABASE_URL` to a URL of the caller's choosing).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteCredentialSettings {
    /// Environment variables `model_kwargs.api_key_env` may name.
    #[serde(default = "default_credential_env")]
    pub env: Vec<String>,
    /// The folder `model_kwargs.api_key_file` names a file in (relative path).
    #[serde(default = "default_secrets_dir")]
    pub dir: PathBuf,
}

fn default_credential_env() -> Vec<String> {
    vec!["OPENAI_API_KEY".into()]
}
fn default_secrets_dir() -> PathBuf {
    PathBuf::from("secrets")
}

impl Default for RemoteCredentialSettings {
    fn default() -> Self {
        Self {
            env: default_credential_env(),
            dir: default_secrets_dir(),
        }
    }
}

/// How long finished jobs keep their texts.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionSettings {
    /// Days after which the prompt, output and error texts of finished jobs are erased (the job
    /// row, its token counts and the usage records stay, so quotas, `/usage/` and the
    /// dashboard's charts are unchanged). 0 keeps them forever.
    #[serde(default)]
    pub job_text_days: u32,
}

/// Seed 002's username/password logins (`POST /token`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    /// How long a token from `POST /token` stays valid.
    #[serde(default = "default_token_ttl_minutes")]
    pub token_ttl_minutes: u32,
    /// Failed logins for one username before further attempts get 429.
    #[serde(default = "default_login_max_failures")]
    pub login_max_failures: u32,
    /// Failed logins (any usernames, `/token` and the dashboard together) from one client
    /// address before further attempts from it get 429 for `login_lockout_seconds`.
    #[serde(default = "default_login_max_failures_per_address")]
    pub login_max_failures_per_address: u32,
    /// Take the client address from the last `X-Forwarded-For` entry (set only behind a reverse
    /// proxy that appends it; otherwise clients could pick their own address).
    #[serde(default)]
    pub trust_forwarded_for: bool,
    /// How long a username stays locked after too many failures (and the window in which
    /// failures are counted).
    #[serde(default = "default_login_lockout_seconds")]
    pub login_lockout_seconds: u64,
    /// How long a dashboard sign-in lasts.
    #[serde(default = "default_session_ttl_minutes")]
    pub session_ttl_minutes: u32,
    /// Mark the dashboard cookie `Secure` (set when the dashboard is served over HTTPS).
    #[serde(default)]
    pub secure_cookies: bool,
    /// How long the first-run setup link printed at start stays usable.
    #[serde(default = "default_setup_link_minutes")]
    pub setup_link_minutes: u32,
    /// Password checks (argon2, ~20 MiB and tens of ms each) run at once at most; more sign-ins
    /// at the same moment get 503 with `Retry-After` at once. 0 = one per CPU core.
    #[serde(default)]
    pub password_checks: u32,
}

fn default_session_ttl_minutes() -> u32 {
    720
}
fn default_setup_link_minutes() -> u32 {
    60
}

fn default_token_ttl_minutes() -> u32 {
    1440
}
fn default_login_max_failures() -> u32 {
    5
}
fn default_login_max_failures_per_address() -> u32 {
    30
}
fn default_login_lockout_seconds() -> u64 {
    60
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            token_ttl_minutes: default_token_ttl_minutes(),
            login_max_failures: default_login_max_failures(),
            login_max_failures_per_address: default_login_max_failures_per_address(),
            trust_forwarded_for: false,
            login_lockout_seconds: default_login_lockout_seconds(),
            session_ttl_minutes: default_session_ttl_minutes(),
            secure_cookies: false,
            setup_link_minutes: default_setup_link_minutes(),
            password_checks: 0,
        }
    }
}

/// Seed 000's disallowed-content check, applied to every prompt before anything is charged.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySettings {
    /// Case-insensitive regular expressions (a plain word is a valid one); a prompt matching
    /// any of them is refused with 400 `content_policy_violation`.
    #[serde(default)]
    pub deny: Vec<String>,
}

/// The llama.cpp model a worker keeps resident, and how it runs it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EngineSettings {
    /// Name clients use for this model (`model` fields, job records).
    #[serde(default = "default_model_name")]
    pub model_name: String,
    /// Path to the GGUF file.
    #[serde(default = "default_model_path")]
    pub model_path: PathBuf,
    /// CPU threads for decoding; 0 = all available cores.
    #[serde(default)]
    pub threads: u32,
    /// Context window in tokens (prompt + generated), per running job.
    #[serde(default = "default_context_size")]
    pub context_size: u32,
    /// Jobs decoded together in one batch (continuous batching); 1 = one job at a time. The KV
    /// cache holds `context_size` tokens for each.
    #[serde(default = "default_parallel")]
    pub parallel: u32,
    /// Jobs a worker takes from the queue beyond those running, to pick fairly among keys.
    #[serde(default = "default_lookahead")]
    pub lookahead: u32,
    /// Longest a generation may run once started; then it fails (refunded) and its sequence
    /// goes to the next job.
    #[serde(default = "default_job_timeout_ms")]
    pub job_timeout_ms: u64,
    /// Keep each sequence's KV cache after its job and read only the part of a new prompt that
    /// it does not already hold (llama.cpp server's `cache_prompt`): a conversation's next turn
    /// then skips its whole history. Off: every prompt is read in full (as before; for
    /// benchmarks).
    #[serde(default = "default_true")]
    pub prefix_reuse: bool,
    /// Most prompt tokens read in one decode step while other jobs generate: a new prompt is
    /// read a chunk per step beside their tokens (chunked prefill), so a long one holds running
    /// streams back by one chunk at a time, not for its whole read. 0 reads each prompt whole
    /// when its job starts (as before). Jobs under a LoRA head always read theirs whole.
    #[serde(default = "default_prompt_chunk")]
    pub prompt_chunk: u32,
    /// Layers offloaded to the GPU (0 = CPU only; needs a `cuda` build to matter).
    #[serde(default)]
    pub n_gpu_layers: u32,
    /// Which GPU holds the model when several are visible.
    #[serde(default)]
    pub main_gpu: i32,
    /// The only folder LoRA adapters are registered from (relative to the working directory).
    #[serde(default = "default_adapters_dir")]
    pub adapters_dir: PathBuf,
    /// LoRA adapters a worker keeps loaded at once; the least recently used is freed first.
    #[serde(default = "default_adapter_cache_size")]
    pub adapter_cache_size: usize,
    #[serde(default)]
    pub embeddings: EmbeddingSettings,
    /// Which engine serves jobs: the model (`llama`), or a stand-in without weights for tests
    /// (`scripted`, see [`crate::engine::scripted`]).
    #[serde(default)]
    pub backend: EngineBackend,
    /// How the engine comes back when its thread dies (see [`crate::engine::supervisor`]).
    #[serde(default)]
    pub restart: RestartSettings,
}

/// Restarts of an engine whose thread died (a panic): bounded, with a doubling back-off.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RestartSettings {
    /// Restarts in a row before the engine gives up and stays down (reported on `/ping`).
    #[serde(default = "default_restart_attempts")]
    pub max_attempts: u32,
    /// Wait before the first restart; each further one in a row waits twice as long.
    #[serde(default = "default_restart_backoff_ms")]
    pub backoff_ms: u64,
}

fn default_restart_attempts() -> u32 {
    5
}
fn default_restart_backoff_ms() -> u64 {
    1000
}

impl Default for RestartSettings {
    fn default() -> Self {
        Self {
            max_attempts: default_restart_attempts(),
            backoff_ms: default_restart_backoff_ms(),
        }
    }
}

/// The engine behind [`crate::engine::start`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EngineBackend {
    /// The llama.cpp model at `model_path`.
    #[default]
    Llama,
    /// Deterministic replies derived from the prompt, no weights loaded (tests only).
    Scripted,
}

/// Embedding vectors from the same model, through a second context in embedding mode.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingSettings {
    /// Serve `/generate-embedding` and `/v1/embeddings`.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// How token states become one vector.
    #[serde(default)]
    pub pooling: Pooling,
    /// Longest input in tokens; the embedding context reads each input in one batch.
    #[serde(default = "default_embedding_context")]
    pub context_size: u32,
    /// Most tokens one embedding call may hold across its inputs: the engine embeds between
    /// decode steps, so one huge call must not stall every running generation.
    #[serde(default = "default_embedding_call_tokens")]
    pub max_tokens_per_call: u32,
}

fn default_embedding_call_tokens() -> u32 {
    16_384
}

/// Pooling of token states into a sequence embedding.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// Average of every token's state.
    #[default]
    Mean,
    /// The first token's state.
    Cls,
    /// The last token's state.
    Last,
}

/// Where jobs wait and whether this process also serves them.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSettings {
    /// apalis storage URL; `sqlite://…` in the embedded default.
    #[serde(default = "default_queue_url")]
    pub url: String,
    /// Run the generation worker inside the API process (embedded mode).
    #[serde(default = "default_true")]
    pub embedded_worker: bool,
    /// How many times a job is tried before it is marked failed (a worker killed mid-job
    /// counts as a try).
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Namespace of every queue and channel name, so several deployments (or test runs) can
    /// share one Redis: queues are `<prefix>.generate.<model>`.
    #[serde(default = "default_queue_prefix")]
    pub prefix: String,
    /// How often a worker proves it is alive (queue lease and the `workers` table).
    #[serde(default = "default_heartbeat_seconds")]
    pub heartbeat_seconds: u64,
    /// Heartbeats a worker may miss before its running job is handed to another worker and the
    /// dashboard shows it as gone.
    #[serde(default = "default_missed_heartbeats")]
    pub missed_heartbeats: u32,
    /// Longest a request waits on Redis before answering 503 (Redis down must fail fast).
    #[serde(default = "default_redis_timeout_ms")]
    pub redis_timeout_ms: u64,
    /// Longest a job may wait for a worker before the reaper fails it (refunded), so that a
    /// client never waits on a job nobody will take.
    #[serde(default = "default_max_queued_seconds")]
    pub max_queued_seconds: u64,
    /// Production: how long `load_model`/`unload_model` wait for a worker process to act
    /// before answering 202 (the request stays recorded and a worker still acts on it).
    #[serde(default = "default_model_change_wait_seconds")]
    pub model_change_wait_seconds: u64,
}

fn default_model_change_wait_seconds() -> u64 {
    120
}

/// Limits and defaults of the HTTP API.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSettings {
    /// How long a request waits for its job before answering 202 with the job id.
    #[serde(default = "default_wait_timeout_ms")]
    pub wait_timeout_ms: u64,
    /// Largest accepted request body; bigger ones get 413.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Ceiling for a request that names no `max_tokens`: it generates until the model stops or
    /// the context is full, and at most this many tokens.
    #[serde(default = "default_max_tokens")]
    pub default_max_tokens: u32,
    /// Upper bound a request may ask for.
    #[serde(default = "default_max_tokens_limit")]
    pub max_tokens_limit: u32,
    /// Sampling temperature when the request names none (0 = greedy).
    #[serde(default = "default_temperature")]
    pub default_temperature: f32,
    /// Default per-key request rate; a key's own limit overrides it.
    #[serde(default)]
    pub rate_limit: RateLimitSettings,
    /// How long the routes that spend a call may use a key's identity read by an earlier
    /// request ([`crate::extractors::KnownKeys`]) instead of reading it again; 0 = every
    /// request reads its key. The charge checks secret, revocation, window and quota itself.
    #[serde(default = "default_key_cache_ms")]
    pub key_cache_ms: u64,
    /// When set, `GET /metrics` answers only `Authorization: Bearer <this>` (what Prometheus'
    /// `authorization` block sends); unset, it is open (keep it off the public side).
    #[serde(default)]
    pub metrics_token: Option<String>,
    /// Most choices one OpenAI request may ask for (`n`); each is generated on its own
    /// sequence and reserves its own `max_tokens`.
    #[serde(default = "default_max_n")]
    pub max_n: u32,
}

/// Requests per minute and burst. `per_minute: 0` means no default limit.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct RateLimitSettings {
    #[serde(default)]
    pub per_minute: u32,
    /// How many requests may arrive at once; defaults to a second's worth.
    #[serde(default)]
    pub burst: Option<u32>,
}

fn default_key_cache_ms() -> u64 {
    1000
}

fn default_prompt_chunk() -> u32 {
    128
}

fn default_model_name() -> String {
    "smollm2".into()
}
fn default_model_path() -> PathBuf {
    "models/SmolLM2-135M-Instruct.Q4_1.gguf".into()
}
fn default_context_size() -> u32 {
    2048
}
fn default_parallel() -> u32 {
    8
}
fn default_lookahead() -> u32 {
    8
}
fn default_job_timeout_ms() -> u64 {
    600_000
}
fn default_adapters_dir() -> PathBuf {
    "models/adapters".into()
}
fn default_adapter_cache_size() -> usize {
    4
}
fn default_embedding_context() -> u32 {
    512
}
fn default_queue_url() -> String {
    "sqlite://data/queue.sqlite?mode=rwc".into()
}
fn default_true() -> bool {
    true
}
fn default_max_attempts() -> u32 {
    3
}
fn default_queue_prefix() -> String {
    "tollgate".into()
}
fn default_heartbeat_seconds() -> u64 {
    5
}
fn default_missed_heartbeats() -> u32 {
    3
}
fn default_redis_timeout_ms() -> u64 {
    1000
}
fn default_max_queued_seconds() -> u64 {
    1800
}
fn default_wait_timeout_ms() -> u64 {
    120_000
}
fn default_max_body_bytes() -> usize {
    1024 * 1024
}
fn default_max_tokens() -> u32 {
    2048
}
fn default_max_n() -> u32 {
    4
}
fn default_max_tokens_limit() -> u32 {
    2048
}
fn default_temperature() -> f32 {
    0.7
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            model_name: default_model_name(),
            model_path: default_model_path(),
            threads: 0,
            context_size: default_context_size(),
            parallel: default_parallel(),
            lookahead: default_lookahead(),
            job_timeout_ms: default_job_timeout_ms(),
            prefix_reuse: true,
            prompt_chunk: default_prompt_chunk(),
            n_gpu_layers: 0,
            main_gpu: 0,
            adapters_dir: default_adapters_dir(),
            adapter_cache_size: default_adapter_cache_size(),
            embeddings: EmbeddingSettings::default(),
            backend: EngineBackend::default(),
            restart: RestartSettings::default(),
        }
    }
}

impl Default for EmbeddingSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            pooling: Pooling::default(),
            context_size: default_embedding_context(),
            max_tokens_per_call: default_embedding_call_tokens(),
        }
    }
}

impl Default for QueueSettings {
    fn default() -> Self {
        Self {
            url: default_queue_url(),
            embedded_worker: true,
            max_attempts: default_max_attempts(),
            prefix: default_queue_prefix(),
            heartbeat_seconds: default_heartbeat_seconds(),
            missed_heartbeats: default_missed_heartbeats(),
            redis_timeout_ms: default_redis_timeout_ms(),
            max_queued_seconds: default_max_queued_seconds(),
            model_change_wait_seconds: default_model_change_wait_seconds(),
        }
    }
}

impl Default for ApiSettings {
    fn default() -> Self {
        Self {
            wait_timeout_ms: default_wait_timeout_ms(),
            max_body_bytes: default_max_body_bytes(),
            default_max_tokens: default_max_tokens(),
            max_tokens_limit: default_max_tokens_limit(),
            default_temperature: default_temperature(),
            rate_limit: RateLimitSettings::default(),
            key_cache_ms: default_key_cache_ms(),
            metrics_token: None,
            max_n: default_max_n(),
        }
    }
}

impl QueueSettings {
    /// Whether jobs and events go through Redis (production) rather than SQLite (embedded).
    #[must_use]
    pub fn is_redis(&self) -> bool {
        self.url.starts_with("redis://") || self.url.starts_with("rediss://")
    }

    /// After this long without a heartbeat a worker is gone and its job is run elsewhere.
    #[must_use]
    pub fn orphan_after(&self) -> std::time::Duration {
        std::time::Duration::from_secs(
            self.heartbeat_seconds.max(1) * u64::from(self.missed_heartbeats.max(1)),
        )
    }
}

impl Settings {
    /// Reads the `settings:` block; a missing block means all defaults.
    ///
    /// # Errors
    /// When the block does not match the expected shape.
    #[allow(
        clippy::result_large_err,
        reason = "loco_rs::Error is what Loco's hooks take; its size is not ours to change"
    )]
    pub fn from_config(config: &loco_rs::config::Config) -> loco_rs::Result<Self> {
        let value = config
            .settings
            .clone()
            .unwrap_or_else(|| serde_json::json!({}));
        serde_json::from_value(value)
            .map_err(|e| loco_rs::Error::Message(format!("invalid `settings` in config: {e}")))
    }
}
