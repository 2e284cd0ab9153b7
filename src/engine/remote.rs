//! An engine that holds no model: it forwards each job to an OpenAI-compatible upstream (vLLM,
//! llama.cpp's server, another Tollgate, OpenAI itself) and passes the reply back.
//!
//! Why behind [`Algorithm`]: a remote model then gets everything a local one has — keys,
//! quotas, token budgets, rate limits, allow-lists, durable jobs, streaming — with no route
//! knowing the difference. A chat prompt goes to the upstream's `/chat/completions`, a raw one
//! to `/completions`, always with `stream: true` and `stream_options.include_usage`, so text
//! deltas reach the job's stream as the upstream sends them and the token counts are the
//! upstream's own (`usage`). Embeddings go to `/embeddings`.
//!
//! Credentials: a [`RemoteSpec`] names an environment variable or a secret file, never the key
//! itself, and the key is read at each request (a rotated key needs no reload). It is never
//! logged, never stored, and scrubbed from any upstream message that echoes it.
//!
//! Failures carry a stable code as the first word of their message ([`UpstreamFailure`]), which
//! is all a failed job keeps; the API reads it back to answer 502 `upstream_error`, 504
//! `upstream_timeout` or 400 `context_length_exceeded` instead of a generic 500.

use std::{
    path::PathBuf,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use async_trait::async_trait;
use serde_json::{json, Map, Value};

use super::{
    grammar::ResponseFormat,
    tools::{self, Tool, ToolChoice, ToolUse},
    Algorithm, ChatMessage, EmbeddingRequest, Embeddings, EngineError, EngineStatus, FinishReason,
    Generation, GenerationRequest, Prompt, TokenSink,
};
use crate::settings::RemoteModelSettings;

/// Default base URL of `model_type: "openai"` configurations (the official OpenAI client's).
pub const OPENAI_BASE_URL: &str = "https://api.openai.com/v1";
/// Default credential of `model_type: "openai"` configurations (the official client's).
pub const OPENAI_KEY_ENV: &str = "OPENAI_API_KEY";
/// The configuration types served by this engine (seed 004's examples).
pub const REMOTE_TYPES: [&str; 2] = ["openai", "vllm"];

const DEFAULT_TIMEOUT_SECONDS: u64 = 300;
const DEFAULT_PARALLEL: u32 = 8;
const DEFAULT_CONTEXT_SIZE: u32 = 4096;
/// Longest SSE line or whole JSON answer read from an upstream: a broken or hostile upstream
/// cannot make the worker buffer without end.
const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
/// Most of an upstream's error message kept in a job's failure reason.
const MAX_MESSAGE_CHARS: usize = 300;
/// Largest secret file read (a key is tens of bytes; anything bigger is the wrong file).
const MAX_SECRET_BYTES: u64 = 16 * 1024;

/// Tokens reserved per chat message beyond its text, and per prompt, for template markup
/// (role headers, BOS, a default system preamble): generous for common templates.
const PER_MESSAGE_OVERHEAD: usize = 16;
const PER_PROMPT_OVERHEAD: usize = 64;

/// Is `model_type` one this engine serves?
#[must_use]
pub fn is_remote_type(model_type: &str) -> bool {
    REMOTE_TYPES
        .iter()
        .any(|t| t.eq_ignore_ascii_case(model_type.trim()))
}

/// An upper bound of the tokens an upstream will count for `prompt`, for budget reservations
/// when there is no local tokenizer: byte-level BPE and byte-fallback tokenizers never make
/// more tokens than the text has bytes, and the markup allowance covers common chat templates.
/// The reservation is settled to the upstream's `usage` when the job finishes.
#[must_use]
pub fn reserve_estimate(prompt: &Prompt) -> usize {
    match prompt {
        Prompt::Raw { text } => text.len() + 2,
        Prompt::Chat { messages, tools } => {
            PER_PROMPT_OVERHEAD
                + messages
                    .iter()
                    .map(|m| {
                        m.role.len()
                            + m.content.len()
                            + m.tool_calls
                                .iter()
                                .map(|c| c.name.len() + c.arguments.len() + c.id.len())
                                .sum::<usize>()
                            + PER_MESSAGE_OVERHEAD
                    })
                    .sum::<usize>()
                // Tools are rendered into the upstream's prompt too.
                + tools.as_deref().map_or(0, |t| {
                    serde_json::to_string(&t.tools).map_or(0, |j| j.len())
                })
        }
    }
}

/// The same bound for texts to embed.
#[must_use]
pub fn embedding_estimate(inputs: &[String]) -> usize {
    inputs.iter().map(|t| t.len() + 2).sum()
}

/// Where the upstream's key comes from: named here, read at each request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// The upstream takes no key (a vLLM or llama-server on a private network).
    None,
    /// An environment variable of the serving process.
    Env(String),
    /// A file holding the key (its first line), e.g. a mounted secret.
    File(PathBuf),
    /// `OPENAI_API_KEY` when set, else no key: the official client's default (only for
    /// `model_type: "openai"` without a `base_url`, i.e. for OpenAI itself).
    EnvIfSet(String),
}

impl Credential {
    /// The key, if this credential has one now.
    ///
    /// # Errors
    /// When a named variable is unset or a named file cannot be read (the message names the
    /// variable or path, never a value).
    pub fn resolve(&self) -> Result<Option<String>, String> {
        match self {
            Self::None => Ok(None),
            Self::EnvIfSet(name) => Ok(std::env::var(name).ok().filter(|v| !v.trim().is_empty())),
            Self::Env(name) => match std::env::var(name) {
                Ok(v) if !v.trim().is_empty() => Ok(Some(v.trim().to_string())),
                _ => Err(format!(
                    "the environment variable {name} named by api_key_env is not set"
                )),
            },
            Self::File(path) => {
                let meta = std::fs::metadata(path)
                    .map_err(|e| format!("api_key_file {} cannot be read: {e}", path.display()))?;
                if !meta.is_file() || meta.len() > MAX_SECRET_BYTES {
                    return Err(format!(
                        "api_key_file {} is not a small regular file",
                        path.display()
                    ));
                }
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("api_key_file {} cannot be read: {e}", path.display()))?;
                let key = text.lines().next().unwrap_or_default().trim().to_string();
                if key.is_empty() {
                    return Err(format!("api_key_file {} is empty", path.display()));
                }
                Ok(Some(key))
            }
        }
    }

    /// What it names, for status pages and logs (never the key).
    #[must_use]
    pub fn describe(&self) -> String {
        match self {
            Self::None => "none".into(),
            Self::Env(n) | Self::EnvIfSet(n) => format!("env:{n}"),
            Self::File(p) => format!("file:{}", p.display()),
        }
    }
}

/// Whether an environment variable name is a plain one (letters, digits, `_`).
#[must_use]
pub fn valid_env_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// An upstream model as Tollgate serves it, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteSpec {
    /// The id clients use here.
    pub model_id: String,
    /// The OpenAI base URL, ending in its API version (`…/v1`), without a trailing slash.
    pub base_url: String,
    /// The model's name on the upstream.
    pub upstream_model: String,
    pub credential: Credential,
    pub timeout: Duration,
    /// Jobs forwarded at once.
    pub parallel: u32,
    /// The upstream's context length as configured (reported in model lists).
    pub context_size: u32,
}

/// Checks and normalises an upstream base URL: http(s), no credentials or query in it; a URL
/// with no path gets `/v1`, as vLLM, llama.cpp's server and Tollgate serve.
///
/// # Errors
/// Naming what is wrong.
pub fn normalize_base_url(raw: &str) -> Result<String, String> {
    let url = reqwest::Url::parse(raw.trim())
        .map_err(|e| format!("base_url {:?} is not a URL: {e}", raw.trim()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("base_url must be an http:// or https:// URL".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(
            "base_url must not carry credentials; name them with api_key_env or api_key_file"
                .into(),
        );
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("base_url must not have a query or fragment".into());
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("base_url has no host".into());
    }
    let mut s = url.to_string();
    while s.ends_with('/') {
        s.pop();
    }
    if url.path().trim_matches('/').is_empty() {
        s.push_str("/v1");
    }
    Ok(s)
}

/// Keys of `model_kwargs` that would put a credential itself in the database.
#[must_use]
pub fn is_secret_kwarg(name: &str) -> bool {
    let n = name.trim().to_ascii_lowercase();
    if n == "api_key_env" || n == "api_key_file" {
        return false;
    }
    matches!(
        n.as_str(),
        "api_key"
            | "apikey"
            | "key"
            | "token"
            | "access_token"
            | "auth_token"
            | "bearer"
            | "bearer_token"
            | "authorization"
            | "password"
            | "secret"
            | "hf_token"
            | "hugging_face_hub_token"
            | "huggingface_token"
    ) || n.ends_with("_api_key")
        || n.ends_with("_secret")
        || n.ends_with("_password")
}

fn kw_str<'a>(kwargs: &'a Map<String, Value>, names: &[&str]) -> Result<Option<&'a str>, String> {
    for name in names {
        if let Some(v) = kwargs.get(*name) {
            return v
                .as_str()
                .map(|s| Some(s.trim()))
                .ok_or_else(|| format!("model_kwargs.{name} must be a string"));
        }
    }
    Ok(None)
}

fn kw_u64(kwargs: &Map<String, Value>, names: &[&str]) -> Result<Option<u64>, String> {
    for name in names {
        if let Some(v) = kwargs.get(*name) {
            return v
                .as_u64()
                .or_else(|| {
                    v.as_f64()
                        .filter(|f| f.fract() == 0.0 && *f >= 0.0)
                        .map(|f| f as u64)
                })
                .map(Some)
                .ok_or_else(|| format!("model_kwargs.{name} must be a whole number"));
        }
    }
    Ok(None)
}

impl RemoteSpec {
    /// The spec of a seed 004 configuration (`model_type` `openai` or `vllm`): `model_name` is
    /// the upstream's model name; `model_kwargs` may set `base_url` (also `api_base`,
    /// `openai_api_base`; required for `vllm`, OpenAI's by default for `openai`),
    /// `api_key_env` or `api_key_file` (for `openai`, `OPENAI_API_KEY` when set by default),
    /// `timeout_seconds` (`timeout`), `parallel` and `context_size` (`max_model_len`, `n_ctx`).
    /// The file is returned as written; the caller decides which folder it must be in.
    ///
    /// # Errors
    /// A message naming the field that is wrong.
    pub fn from_config(
        model_id: &str,
        model_type: &str,
        model_name: &str,
        kwargs: &Map<String, Value>,
    ) -> Result<Self, String> {
        if let Some(secret) = kwargs.keys().find(|k| is_secret_kwarg(k)) {
            return Err(format!(
                "model_kwargs.{secret} would store a credential in the database; name an \
                 environment variable (api_key_env) or a secret file (api_key_file) instead"
            ));
        }
        let openai = model_type.trim().eq_ignore_ascii_case("openai");
        let named_base = kw_str(kwargs, &["base_url", "api_base", "openai_api_base"])?;
        // OPENAI_API_KEY goes by default only to OpenAI itself, never to a URL a caller chose.
        let openai_itself = openai && named_base.is_none();
        let base = match named_base {
            Some(b) => normalize_base_url(b)?,
            None if openai => OPENAI_BASE_URL.to_string(),
            None => {
                return Err(format!(
                    "model_kwargs.base_url is required for model_type {:?} (the upstream's \
                     OpenAI-compatible URL, e.g. http://vllm:8000/v1)",
                    model_type.trim()
                ))
            }
        };
        let env = kw_str(kwargs, &["api_key_env"])?;
        let file = kw_str(kwargs, &["api_key_file"])?;
        let credential = match (env, file) {
            (Some(_), Some(_)) => {
                return Err("name either api_key_env or api_key_file, not both".into())
            }
            (Some(name), None) if valid_env_name(name) => Credential::Env(name.to_string()),
            (Some(name), None) => {
                return Err(format!(
                    "model_kwargs.api_key_env {name:?} is not an environment variable name"
                ))
            }
            (None, Some("")) => return Err("model_kwargs.api_key_file is empty".into()),
            (None, Some(path)) => Credential::File(PathBuf::from(path)),
            (None, None) if openai_itself => Credential::EnvIfSet(OPENAI_KEY_ENV.into()),
            (None, None) => Credential::None,
        };
        let timeout = kw_u64(kwargs, &["timeout_seconds", "timeout"])?;
        let parallel = kw_u64(kwargs, &["parallel"])?;
        let context = kw_u64(kwargs, &["context_size", "max_model_len", "n_ctx"])?;
        Self::checked(
            model_id, model_name, base, credential, timeout, parallel, context,
        )
    }

    /// The spec of an upstream declared in `settings.remote_models` (the operator's own
    /// file: any variable or path may be named).
    ///
    /// # Errors
    /// A message naming the field that is wrong.
    pub fn from_settings(s: &RemoteModelSettings) -> Result<Self, String> {
        let credential = match (&s.api_key_env, &s.api_key_file) {
            (Some(_), Some(_)) => {
                return Err("name either api_key_env or api_key_file, not both".into())
            }
            (Some(name), None) if valid_env_name(name) => Credential::Env(name.clone()),
            (Some(name), None) => {
                return Err(format!(
                    "api_key_env {name:?} is not an environment variable name"
                ))
            }
            (None, Some(path)) => Credential::File(path.clone()),
            (None, None) => Credential::None,
        };
        Self::checked(
            &s.id,
            &s.model,
            normalize_base_url(&s.base_url)?,
            credential,
            s.timeout_seconds,
            s.parallel.map(u64::from),
            s.context_size.map(u64::from),
        )
    }

    fn checked(
        model_id: &str,
        upstream_model: &str,
        base_url: String,
        credential: Credential,
        timeout: Option<u64>,
        parallel: Option<u64>,
        context: Option<u64>,
    ) -> Result<Self, String> {
        if upstream_model.trim().is_empty() {
            return Err("the upstream's model name is empty".into());
        }
        let timeout = timeout.unwrap_or(DEFAULT_TIMEOUT_SECONDS);
        if !(1..=3600).contains(&timeout) {
            return Err("timeout_seconds must be 1 to 3600".into());
        }
        let parallel = parallel.unwrap_or(u64::from(DEFAULT_PARALLEL));
        if !(1..=256).contains(&parallel) {
            return Err("parallel must be 1 to 256".into());
        }
        let context = context.unwrap_or(u64::from(DEFAULT_CONTEXT_SIZE));
        if !(64..=10_000_000).contains(&context) {
            return Err("context_size must be 64 to 10000000".into());
        }
        Ok(Self {
            model_id: model_id.trim().to_string(),
            base_url,
            upstream_model: upstream_model.trim().to_string(),
            credential,
            timeout: Duration::from_secs(timeout),
            parallel: u32::try_from(parallel).unwrap_or(DEFAULT_PARALLEL),
            context_size: u32::try_from(context).unwrap_or(DEFAULT_CONTEXT_SIZE),
        })
    }
}

/// How a forwarded request failed, as the stable code that starts its message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// Unreachable, refused the connection, answered an error or something unreadable.
    Error,
    /// No complete answer within the timeout.
    Timeout,
    /// The upstream says the prompt (with `max_tokens`) does not fit its context.
    ContextLength,
}

impl UpstreamFailure {
    /// The API error code this failure is answered with.
    #[must_use]
    pub const fn code(self) -> &'static str {
        match self {
            Self::Error => "upstream_error",
            Self::Timeout => "upstream_timeout",
            Self::ContextLength => "context_length_exceeded",
        }
    }
}

fn upstream(failure: UpstreamFailure, message: impl Into<String>) -> EngineError {
    EngineError::Upstream {
        failure,
        message: message.into(),
    }
}

/// The text of an upstream's error body (`{"error": {"message"}}`, `{"message"}`, `{"detail"}`
/// or plain text), shortened.
fn error_text(body: &str) -> String {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    let text = parsed
        .as_ref()
        .and_then(|v| {
            v.pointer("/error/message")
                .or_else(|| v.get("error").filter(|e| e.is_string()))
                .or_else(|| v.get("message"))
                .or_else(|| v.get("detail"))
        })
        .map_or_else(
            || body.trim().to_string(),
            |m| m.as_str().map_or_else(|| m.to_string(), str::to_string),
        );
    text.chars().take(MAX_MESSAGE_CHARS).collect()
}

/// Whether an upstream's 400 says the prompt does not fit its context (vLLM, llama.cpp's
/// server, OpenAI and Tollgate word it differently).
fn is_context_error(body: &str) -> bool {
    let b = body.to_ascii_lowercase();
    b.contains("context_length_exceeded")
        || b.contains("maximum context length")
        || b.contains("context length")
        || b.contains("exceeds the available context")
        || b.contains("exceed_context_size")
}

/// What one streamed or whole answer added up to.
#[derive(Debug, Default)]
struct Reply {
    text: String,
    finish: Option<String>,
    prompt_tokens: Option<u32>,
    completion_tokens: Option<u32>,
    /// Prompt tokens the upstream found in its own cache (`prompt_tokens_details`).
    cached_tokens: Option<u32>,
    /// Non-empty text pieces received (the token count when the upstream reports no usage).
    pieces: u32,
    /// Tool calls (name, arguments text), assembled from the upstream's deltas by index.
    calls: Vec<(String, String)>,
}

/// Most tool calls taken from one upstream answer.
const MAX_UPSTREAM_CALLS: usize = 64;

impl Reply {
    /// Takes one answer object (a stream chunk or a whole completion); `Err` for an error
    /// object the upstream sent in place of one.
    fn absorb(&mut self, v: &Value, sink: Option<&TokenSink>) -> Result<(), String> {
        if let Some(err) = v.get("error") {
            return Err(error_text(&err.to_string()));
        }
        if let Some(choice) = v.get("choices").and_then(|c| c.get(0)) {
            let piece = choice
                .pointer("/delta/content")
                .or_else(|| choice.pointer("/message/content"))
                .or_else(|| choice.get("text"))
                .and_then(Value::as_str)
                .unwrap_or_default();
            if !piece.is_empty() {
                self.text.push_str(piece);
                self.pieces = self.pieces.saturating_add(1);
                if let Some(sink) = sink {
                    // A client that went away does not stop the job (it was charged).
                    let _ = sink.send(piece.to_string());
                }
            }
            if let Some(f) = choice.get("finish_reason").and_then(Value::as_str) {
                self.finish = Some(f.to_string());
            }
            let calls = choice
                .pointer("/delta/tool_calls")
                .or_else(|| choice.pointer("/message/tool_calls"))
                .and_then(Value::as_array);
            for (pos, call) in calls.into_iter().flatten().enumerate() {
                let i = call
                    .get("index")
                    .and_then(Value::as_u64)
                    .and_then(|i| usize::try_from(i).ok())
                    .unwrap_or(pos);
                if i >= MAX_UPSTREAM_CALLS {
                    return Err(format!(
                        "the upstream sent more than {MAX_UPSTREAM_CALLS} tool calls"
                    ));
                }
                if self.calls.len() <= i {
                    self.calls.resize(i + 1, (String::new(), String::new()));
                }
                if let Some(name) = call.pointer("/function/name").and_then(Value::as_str) {
                    self.calls[i].0.push_str(name);
                }
                match call.pointer("/function/arguments") {
                    Some(Value::String(piece)) => self.calls[i].1.push_str(piece),
                    Some(v @ Value::Object(_)) => self.calls[i].1.push_str(&v.to_string()),
                    _ => {}
                }
            }
        }
        if let Some(usage) = v.get("usage").filter(|u| u.is_object()) {
            let n = |k: &str| {
                usage
                    .get(k)
                    .and_then(Value::as_u64)
                    .and_then(|n| u32::try_from(n).ok())
            };
            self.prompt_tokens = n("prompt_tokens").or(self.prompt_tokens);
            self.completion_tokens = n("completion_tokens").or(self.completion_tokens);
            self.cached_tokens = usage
                .pointer("/prompt_tokens_details/cached_tokens")
                .and_then(Value::as_u64)
                .and_then(|n| u32::try_from(n).ok())
                .or(self.cached_tokens);
        }
        Ok(())
    }
}

/// The remote engine: one HTTP client, shared by all jobs forwarded at once.
pub struct RemoteEngine {
    spec: RemoteSpec,
    client: reqwest::Client,
    embeddings: bool,
    served: AtomicU64,
    loaded_at: String,
}

impl std::fmt::Debug for RemoteEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteEngine")
            .field("model", &self.spec.model_id)
            .field("base_url", &self.spec.base_url)
            .field("credential", &self.spec.credential.describe())
            .finish_non_exhaustive()
    }
}

impl RemoteEngine {
    /// An engine for `spec`; `embeddings` is `settings.engine.embeddings.enabled`.
    ///
    /// # Errors
    /// When the HTTP client cannot be built (no TLS roots).
    pub fn new(spec: RemoteSpec, embeddings: bool) -> Result<Self, EngineError> {
        let client = reqwest::Client::builder()
            .connect_timeout(spec.timeout.min(Duration::from_secs(10)))
            // Upstream redirects would carry the key elsewhere: a moved upstream is an error.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| EngineError::Load(format!("HTTP client: {e}")))?;
        Ok(Self {
            spec,
            client,
            embeddings,
            served: AtomicU64::new(0),
            loaded_at: chrono::Utc::now().to_rfc3339(),
        })
    }

    #[must_use]
    pub fn spec(&self) -> &RemoteSpec {
        &self.spec
    }

    /// Sends `body` to `path` under the base URL with the credential; the key is resolved now
    /// and returned too, so messages can be scrubbed of it.
    async fn send(
        &self,
        path: &str,
        body: &Value,
    ) -> Result<(reqwest::Response, Option<String>), EngineError> {
        let key = self
            .spec
            .credential
            .resolve()
            .map_err(|e| upstream(UpstreamFailure::Error, e))?;
        let url = format!("{}{path}", self.spec.base_url);
        let mut request = self.client.post(&url).timeout(self.spec.timeout).json(body);
        if let Some(k) = &key {
            request = request.bearer_auth(k);
        }
        let response = request.send().await.map_err(|e| self.transport_error(&e))?;
        let status = response.status();
        if status.is_success() {
            return Ok((response, key));
        }
        let text = read_limited(response, 64 * 1024).await.unwrap_or_default();
        let text = scrub(&text, key.as_deref());
        let code = status.as_u16();
        Err(match status {
            s if s == reqwest::StatusCode::UNAUTHORIZED || s == reqwest::StatusCode::FORBIDDEN => {
                upstream(
                    UpstreamFailure::Error,
                    format!(
                        "the upstream at {} refused Tollgate's credential ({code}); check the \
                         model's api_key_env / api_key_file",
                        self.spec.base_url
                    ),
                )
            }
            s if s == reqwest::StatusCode::GATEWAY_TIMEOUT => upstream(
                UpstreamFailure::Timeout,
                format!("the upstream answered {code}: {}", error_text(&text)),
            ),
            s if s.is_client_error() && is_context_error(&text) => upstream(
                UpstreamFailure::ContextLength,
                format!("the upstream model's context: {}", error_text(&text)),
            ),
            _ => upstream(
                UpstreamFailure::Error,
                format!("the upstream answered {code}: {}", error_text(&text)),
            ),
        })
    }

    fn transport_error(&self, e: &reqwest::Error) -> EngineError {
        if e.is_timeout() {
            return upstream(
                UpstreamFailure::Timeout,
                format!(
                    "the upstream at {} did not answer within {} s",
                    self.spec.base_url,
                    self.spec.timeout.as_secs()
                ),
            );
        }
        // The innermost cause says what happened (connection refused, no such host).
        let mut cause: &dyn std::error::Error = e;
        while let Some(next) = cause.source() {
            cause = next;
        }
        let what = if e.is_connect() {
            "cannot connect to"
        } else {
            "lost the connection to"
        };
        upstream(
            UpstreamFailure::Error,
            format!("{what} the upstream at {}: {cause}", self.spec.base_url),
        )
    }

    /// The upstream request for a generation: OpenAI's fields, and llama.cpp's sampler
    /// extensions only when the client set them (OpenAI itself refuses unknown fields).
    fn body(&self, request: &GenerationRequest) -> (&'static str, Value) {
        let p = &request.params;
        let mut body = json!({
            "model": self.spec.upstream_model,
            "max_tokens": p.max_tokens,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        let path = match &request.prompt {
            Prompt::Chat { messages, tools } => {
                body["messages"] = messages.iter().map(upstream_message).collect();
                if let Some(t) = tools {
                    offer_upstream(&mut body, t);
                }
                "/chat/completions"
            }
            Prompt::Raw { text } => {
                body["prompt"] = json!(text);
                "/completions"
            }
        };
        if let Some(seed) = p.seed {
            body["seed"] = json!(seed);
        }
        if !p.stop.is_empty() {
            body["stop"] = json!(p.stop);
        }
        let c = &p.controls;
        for (name, value) in [("top_k", c.top_k), ("repeat_last_n", c.repeat_last_n)] {
            if let Some(v) = value {
                body[name] = json!(v);
            }
        }
        let floats = [
            ("presence_penalty", c.presence_penalty),
            ("frequency_penalty", c.frequency_penalty),
            ("min_p", c.min_p),
            ("typical_p", c.typical_p),
            ("repeat_penalty", c.repeat_penalty),
        ];
        for (name, value) in floats {
            if let Some(v) = value {
                body[name] = json!(v);
            }
        }
        // The upstream enforces the format itself (a tool offer's grammar is not sent: the
        // upstream gets the tools).
        if let (Some(output), None) = (&c.output, request.prompt.tools()) {
            body["response_format"] = match &output.format {
                ResponseFormat::JsonObject => json!({"type": "json_object"}),
                ResponseFormat::JsonSchema {
                    name,
                    schema,
                    strict,
                } => json!({"type": "json_schema",
                            "json_schema": {"name": name, "schema": schema, "strict": strict}}),
            };
        }
        if !c.logit_bias.is_empty() {
            let bias: Map<String, Value> = c
                .logit_bias
                .iter()
                .map(|(t, b)| (t.to_string(), json!(b)))
                .collect();
            body["logit_bias"] = Value::Object(bias);
        }
        (path, body)
    }

    async fn generate(
        &self,
        request: GenerationRequest,
        sink: Option<TokenSink>,
    ) -> Result<Generation, EngineError> {
        let (path, body) = self.body(&request);
        let (mut response, key) = self.send(path, &body).await?;
        let streamed = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        let mut reply = Reply::default();
        let fail = |e: String| upstream(UpstreamFailure::Error, scrub(&e, key.as_deref()));
        if streamed {
            let mut line = Vec::new();
            let mut done = false;
            while !done {
                let Some(chunk) = response
                    .chunk()
                    .await
                    .map_err(|e| self.transport_error(&e))?
                else {
                    break;
                };
                for byte in chunk {
                    if byte != b'\n' {
                        line.push(byte);
                        if line.len() > MAX_BODY_BYTES {
                            return Err(fail("the upstream sent an event line too long".into()));
                        }
                        continue;
                    }
                    done |= sse_line(&line, &mut reply, sink.as_ref()).map_err(fail)?;
                    line.clear();
                }
            }
            if !line.is_empty() {
                sse_line(&line, &mut reply, sink.as_ref()).map_err(fail)?;
            }
        } else {
            // An upstream that ignores `stream` answers with the whole completion.
            let text = read_limited(response, MAX_BODY_BYTES)
                .await
                .map_err(|e| self.transport_error(&e))?;
            let v: Value = serde_json::from_str(&text)
                .map_err(|e| fail(format!("the upstream's answer is not JSON: {e}")))?;
            reply.absorb(&v, sink.as_ref()).map_err(fail)?;
        }
        if reply.finish.is_none() && reply.text.is_empty() {
            return Err(fail(
                "the upstream's answer ended before any text or finish reason".into(),
            ));
        }
        self.served.fetch_add(1, Ordering::Relaxed);
        let prompt_tokens = reply.prompt_tokens.unwrap_or_else(|| {
            u32::try_from(reserve_estimate(&request.prompt)).unwrap_or(u32::MAX)
        });
        Ok(Generation {
            generated_tokens: reply.completion_tokens.unwrap_or(reply.pieces),
            cached_tokens: reply.cached_tokens.unwrap_or(0).min(prompt_tokens),
            prompt_tokens,
            finish_reason: match reply.finish.as_deref() {
                Some("length") => FinishReason::Length,
                _ => FinishReason::Stop,
            },
            text: if reply.calls.is_empty() {
                reply.text
            } else {
                tools::generic_answer(&reply.calls, &reply.text)
            },
            // Not asked of the upstream: admission refuses `logprobs` for remote models.
            logprobs: None,
            more: Vec::new(),
        })
    }
}

/// A message in OpenAI's shape, with its calls or the call it answers.
fn upstream_message(m: &ChatMessage) -> Value {
    let mut v = json!({"role": m.role, "content": m.content});
    if !m.tool_calls.is_empty() {
        if m.content.is_empty() {
            v["content"] = Value::Null;
        }
        v["tool_calls"] = m
            .tool_calls
            .iter()
            .map(|c| {
                json!({"id": c.id, "type": "function",
                       "function": {"name": c.name, "arguments": c.arguments}})
            })
            .collect();
    }
    if let Some(id) = &m.tool_call_id {
        v["tool_call_id"] = json!(id);
    }
    if let Some(name) = &m.name {
        v["name"] = json!(name);
    }
    v
}

/// The tools as OpenAI's `tools`, `tool_choice` and `parallel_tool_calls`.
fn offer_upstream(body: &mut Value, t: &ToolUse) {
    body["tools"] = t.tools.iter().map(Tool::openai).collect();
    body["tool_choice"] = match &t.choice {
        ToolChoice::Auto => json!("auto"),
        ToolChoice::Required => json!("required"),
        ToolChoice::Function(name) => json!({"type": "function", "function": {"name": name}}),
    };
    if !t.parallel {
        body["parallel_tool_calls"] = json!(false);
    }
    // A response format beside the tools: the upstream enforces it on its reply.
    if let Some(schema) = &t.answer {
        body["response_format"] = json!({"type": "json_schema",
            "json_schema": {"name": "response", "schema": schema, "strict": true}});
    }
}

/// One line of a server-sent event stream; `Ok(true)` at `data: [DONE]`.
fn sse_line(line: &[u8], reply: &mut Reply, sink: Option<&TokenSink>) -> Result<bool, String> {
    let line = String::from_utf8_lossy(line);
    let line = line.trim_end_matches('\r');
    let Some(data) = line.strip_prefix("data:") else {
        // Comments, `event:`/`id:` fields and blank separators carry nothing here.
        return Ok(false);
    };
    let data = data.trim();
    if data == "[DONE]" {
        return Ok(true);
    }
    if data.is_empty() {
        return Ok(false);
    }
    let v: Value = serde_json::from_str(data)
        .map_err(|e| format!("the upstream sent an event that is not JSON: {e}"))?;
    reply.absorb(&v, sink).map(|()| false)
}

/// The body as text, at most `limit` bytes (an error past it).
async fn read_limited(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<String, reqwest::Error> {
    let mut bytes = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        bytes.extend_from_slice(&chunk);
        if bytes.len() > limit {
            bytes.truncate(limit);
            break;
        }
    }
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// `text` with every occurrence of `key` replaced: an upstream may echo the key it refused.
fn scrub(text: &str, key: Option<&str>) -> String {
    match key {
        Some(k) if k.len() >= 4 => text.replace(k, "[redacted]"),
        _ => text.to_string(),
    }
}

#[async_trait]
impl Algorithm for RemoteEngine {
    async fn run(&self, request: GenerationRequest) -> Result<Generation, EngineError> {
        self.generate(request, None).await
    }

    async fn run_streaming(
        &self,
        request: GenerationRequest,
        sink: TokenSink,
    ) -> Result<Generation, EngineError> {
        self.generate(request, Some(sink)).await
    }

    fn parallel(&self) -> usize {
        self.spec.parallel as usize
    }

    /// Forwards to the upstream's `/embeddings`; vectors come back as the upstream made them.
    async fn embed(&self, request: EmbeddingRequest) -> Result<Embeddings, EngineError> {
        let body = json!({
            "model": self.spec.upstream_model,
            "input": request.inputs,
            "encoding_format": "float",
        });
        let (response, key) = self.send("/embeddings", &body).await?;
        let fail = |e: String| upstream(UpstreamFailure::Error, scrub(&e, key.as_deref()));
        let text = read_limited(response, MAX_BODY_BYTES)
            .await
            .map_err(|e| self.transport_error(&e))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| fail(format!("the upstream's embeddings are not JSON: {e}")))?;
        let mut data: Vec<(u64, Vec<f32>)> = v
            .get("data")
            .and_then(Value::as_array)
            .map(|items| {
                items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| {
                        let index = item
                            .get("index")
                            .and_then(Value::as_u64)
                            .unwrap_or(i as u64);
                        let vector = item
                            .get("embedding")
                            .and_then(Value::as_array)
                            .map(|xs| {
                                xs.iter()
                                    .filter_map(Value::as_f64)
                                    .map(|x| x as f32)
                                    .collect()
                            })
                            .unwrap_or_default();
                        (index, vector)
                    })
                    .collect()
            })
            .unwrap_or_default();
        data.sort_by_key(|(i, _)| *i);
        if data.len() != request.inputs.len() || data.iter().any(|(_, v)| v.is_empty()) {
            return Err(fail(format!(
                "the upstream returned {} vectors for {} inputs",
                data.len(),
                request.inputs.len()
            )));
        }
        self.served.fetch_add(1, Ordering::Relaxed);
        let prompt_tokens = v
            .pointer("/usage/prompt_tokens")
            .and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or_else(|| {
                u32::try_from(embedding_estimate(&request.inputs)).unwrap_or(u32::MAX)
            });
        Ok(Embeddings {
            vectors: data.into_iter().map(|(_, v)| v).collect(),
            prompt_tokens,
        })
    }

    fn status(&self) -> EngineStatus {
        EngineStatus {
            ready: true,
            model: self.spec.model_id.clone(),
            // Where jobs go: the upstream and its model name (no credential is ever in it).
            model_path: format!("{} ({})", self.spec.base_url, self.spec.upstream_model),
            loads: 1,
            jobs_served: self.served.load(Ordering::Relaxed),
            context_size: self.spec.context_size,
            device: "remote".into(),
            adapters: Vec::new(),
            embeddings: self.embeddings,
            quantized: false,
            loaded_at: Some(self.loaded_at.clone()),
            parallel: u64::from(self.spec.parallel),
            // Never down on its own account (no thread to die); nothing batched here.
            ..EngineStatus::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kwargs(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn base_urls_get_their_api_version_and_lose_trailing_slashes() {
        assert_eq!(
            normalize_base_url("http://vllm:8000").as_deref(),
            Ok("http://vllm:8000/v1")
        );
        assert_eq!(
            normalize_base_url("http://vllm:8000/v1/").as_deref(),
            Ok("http://vllm:8000/v1")
        );
        assert_eq!(
            normalize_base_url("https://gw.example/openai/v1").as_deref(),
            Ok("https://gw.example/openai/v1")
        );
        for bad in [
            "ftp://x/v1",
            "http://user:pw@host/v1",
            "http://host/v1?key=x",
            "not a url",
        ] {
            assert!(normalize_base_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_configuration_never_holds_a_key_itself() {
        for secret in ["api_key", "openai_api_key", "token", "HF_TOKEN", "password"] {
            let kw = kwargs(json!({"base_url": "http://h/v1", secret: "sk-123"}));
            let err = RemoteSpec::from_config("m", "vllm", "x", &kw).expect_err(secret);
            assert!(err.contains("credential"), "{err}");
            assert!(!err.contains("sk-123"), "{err}");
        }
        // Names of where the key is are fine, and so are sampling defaults with "token" in them.
        let kw =
            kwargs(json!({"base_url": "http://h", "api_key_env": "VLLM_KEY", "max_tokens": 9}));
        let spec = RemoteSpec::from_config("m", "vllm", "org/model", &kw).expect("spec");
        assert_eq!(spec.credential, Credential::Env("VLLM_KEY".into()));
        assert_eq!(spec.base_url, "http://h/v1");
        assert_eq!(spec.upstream_model, "org/model");
    }

    #[test]
    fn openai_configurations_default_to_openai_and_its_key_variable() {
        let spec = RemoteSpec::from_config(
            "ex",
            "openai",
            "gpt-3",
            &kwargs(json!({"temperature": 0.7})),
        )
        .expect("spec");
        assert_eq!(spec.base_url, OPENAI_BASE_URL);
        assert_eq!(spec.credential, Credential::EnvIfSet(OPENAI_KEY_ENV.into()));
        // Pointed elsewhere, it sends no key unless one is named.
        let spec = RemoteSpec::from_config(
            "ex",
            "openai",
            "gpt-3",
            &kwargs(json!({"base_url": "http://elsewhere/v1"})),
        )
        .expect("spec");
        assert_eq!(spec.credential, Credential::None);
        let err = RemoteSpec::from_config("ex", "vllm", "m", &Map::new()).expect_err("no url");
        assert!(err.contains("base_url"), "{err}");
        let err = RemoteSpec::from_config(
            "ex",
            "vllm",
            "m",
            &kwargs(json!({"base_url": "http://h", "api_key_env": "A", "api_key_file": "k"})),
        )
        .expect_err("both");
        assert!(err.contains("either"), "{err}");
    }

    #[test]
    fn the_reservation_bounds_any_byte_level_tokenizer() {
        let chat = Prompt::chat(vec![ChatMessage::new("user", "héllo wörld")]);
        let bytes = "héllo wörld".len();
        assert!(reserve_estimate(&chat) >= bytes + PER_MESSAGE_OVERHEAD);
        let raw = Prompt::Raw { text: "abc".into() };
        assert!(reserve_estimate(&raw) >= 3);
    }

    #[test]
    fn stream_lines_add_up_to_text_usage_and_finish() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut reply = Reply::default();
        let lines = [
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}",
            ": keep-alive",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"}}]}\r",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo\"},\"finish_reason\":\"length\"}]}",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2,\"total_tokens\":9,\"prompt_tokens_details\":{\"cached_tokens\":5}}}",
            "",
        ];
        for line in lines {
            assert!(!sse_line(line.as_bytes(), &mut reply, Some(&tx)).expect("line"));
        }
        assert!(sse_line(b"data: [DONE]", &mut reply, Some(&tx)).expect("done"));
        assert_eq!(reply.text, "Hello");
        assert_eq!(reply.finish.as_deref(), Some("length"));
        assert_eq!(
            (reply.prompt_tokens, reply.completion_tokens),
            (Some(7), Some(2))
        );
        assert_eq!(
            reply.cached_tokens,
            Some(5),
            "the upstream's own cache hits"
        );
        assert_eq!(rx.try_recv().ok().as_deref(), Some("Hel"));
        assert_eq!(rx.try_recv().ok().as_deref(), Some("lo"));
        let err = sse_line(
            b"data: {\"error\":{\"message\":\"boom\"}}",
            &mut reply,
            None,
        )
        .expect_err("error event");
        assert_eq!(err, "boom");
    }

    #[test]
    fn upstream_messages_lose_the_key_and_context_errors_are_recognised() {
        assert_eq!(
            scrub("Incorrect API key provided: sk-abcdef", Some("sk-abcdef")),
            "Incorrect API key provided: [redacted]"
        );
        assert!(is_context_error(
            "{\"error\":{\"message\":\"This model's maximum context length is 4096 tokens\"}}"
        ));
        assert!(!is_context_error(
            "{\"error\":{\"message\":\"bad temperature\"}}"
        ));
        assert_eq!(error_text("{\"detail\":\"nope\"}"), "nope");
    }
}
