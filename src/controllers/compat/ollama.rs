//! Ollama's own API, for the tools built on it (the `ollama` client libraries, LangChain's
//! `ChatOllama` and `OllamaEmbeddings`, LlamaIndex, Open WebUI, Continue): `POST /api/chat`,
//! `POST /api/generate`, `POST /api/embed` (and the older `/api/embeddings`), `GET /api/tags`,
//! `POST /api/show`, `GET /api/ps`, and the unauthenticated probes `GET /api/version` and
//! `GET /` ("Ollama is running"). Errors come as Ollama's `{"error": "<message>"}`, which its
//! clients raise with the message.
//! Thin adapters over the one admission path, with Tollgate's keys (`Authorization: Bearer`,
//! which Ollama's clients send as a header, or the `/k/<key>/` path).
//!
//! As Ollama does, answers stream by default (`stream` absent or true): newline-delimited JSON
//! objects with the text so far (`message.content` / `response`) and `"done": false`, then one
//! with `"done": true`, `done_reason` and the counts. `options` takes Ollama's sampler names
//! (`num_predict`, `temperature`, `top_p`, `top_k`, `min_p`, `typical_p`, `repeat_penalty`,
//! `repeat_last_n`, `presence_penalty`, `frequency_penalty`, `seed`, `stop`) and `format` is
//! `"json"` or a JSON Schema. Runner settings (`num_thread`, `num_gpu`, `keep_alive`, …) are
//! accepted: the model stays loaded and the server sets its own runner. `tools` (OpenAI's
//! function shape, as Ollama takes them) are offered as on `/v1/chat/completions` with
//! `tool_choice: "auto"`; calls come back as `message.tool_calls` with their arguments as
//! objects, and earlier calls and `tool` turns may be sent back. What would change the answer
//! and cannot be honoured here (images, `think`, `suffix`, `template`, `context`, mirostat) is
//! refused by name. `num_ctx` asks for room: the served context is fixed per sequence, so it is
//! accepted (LlamaIndex and Continue send it on every call) and a prompt that does not fit is
//! refused as `context_length_exceeded`, whatever `num_ctx` said. Ollama's `name:latest` is the
//! model `name`, as in Ollama.

use axum::{
    body::Body,
    extract::State,
    http::header,
    response::{IntoResponse, Response},
    Json,
};
use futures::StreamExt;
use loco_rs::{app::AppContext, controller::Routes};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::{
    admission::{
        input::{chat_messages, prompt_text, Content, WireMessage, WireToolCall},
        resolve::available_models,
        Admitted, EmbeddingInput, Follow, GenerationInput, ModelChoice, SamplerFields,
        SamplingInput, Ticket,
    },
    controllers::{
        openai::{check_dimensions, vectors},
        respond::{accepted, settled, try_answer},
        tool_calls::{self, tools_input, ToolWire},
    },
    engine::{
        grammar::ResponseFormat,
        tools::{self, ToolFormat},
        ChatMessage, Prompt,
    },
    errors::{ApiError, ApiResult, ErrorCode},
    extractors::{Caller, JsonBody, MeteredCaller},
    models::jobs,
    notify::{text_updates, TextUpdate},
    services::Services,
};

fn yes() -> bool {
    true
}

/// One message of `/api/chat`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub(crate) struct OllamaMessage {
    role: String,
    #[serde(default)]
    content: String,
    /// A `tool` turn's tool.
    tool_name: Option<String>,
    /// Calls an assistant turn made, `{"function": {"name", "arguments": {…}}}`.
    tool_calls: Option<Vec<WireToolCall>>,
    /// Every other field (`images`, `thinking`): refused unless empty.
    #[serde(flatten)]
    #[schema(ignore)]
    rest: Map<String, Value>,
}

/// `POST /api/chat`, as Ollama documents it (docs/api.md).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub(crate) struct ChatRequest {
    model: Option<String>,
    /// None (or none sent): a load request, answered without generating.
    #[serde(default)]
    messages: Vec<OllamaMessage>,
    /// Functions the model may call (OpenAI's shape); it decides whether to.
    tools: Option<Vec<ToolWire>>,
    /// True unless given: Ollama streams by default.
    #[serde(default = "yes")]
    stream: bool,
    /// `"json"`, or a JSON Schema the answer must match.
    format: Option<Value>,
    /// Ollama's sampler names (`num_predict`, `temperature`, …).
    #[schema(value_type = Option<Object>)]
    options: Option<Map<String, Value>>,
    /// A system turn before the messages (Open WebUI sends one at the top level).
    system: Option<String>,
    /// Every other field: `keep_alive` is accepted, a top-level `num_predict` (Open WebUI's
    /// task requests) is `options.num_predict`, the rest refused unless empty.
    #[serde(flatten)]
    #[schema(ignore)]
    rest: Map<String, Value>,
}

/// `POST /api/generate`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub(crate) struct GenerateRequest {
    model: Option<String>,
    /// Empty (or absent): a load request, answered without generating.
    #[serde(default)]
    prompt: String,
    /// A system turn before the prompt (not with `raw`).
    system: Option<String>,
    /// The prompt as the model reads it, without the chat template.
    #[serde(default)]
    raw: bool,
    #[serde(default = "yes")]
    stream: bool,
    format: Option<Value>,
    #[schema(value_type = Option<Object>)]
    options: Option<Map<String, Value>>,
    #[serde(flatten)]
    #[schema(ignore)]
    rest: Map<String, Value>,
}

/// Whether `v` asks for nothing: absent, null, false, empty.
fn empty(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

/// Refuses the body's other fields that ask for something (`keep_alive` is accepted).
fn check_rest(rest: &Map<String, Value>, prefix: &str) -> ApiResult<()> {
    let refused: Vec<String> = rest
        .iter()
        .filter(|(k, v)| !matches!(k.as_str(), "keep_alive" | "num_predict") && !empty(v))
        .map(|(k, _)| format!("{prefix}{k}"))
        .collect();
    if refused.is_empty() {
        return Ok(());
    }
    Err(ApiError::unsupported_fields(&refused))
}

/// A top-level `num_predict` (not Ollama's schema, but what Open WebUI sends for its task
/// requests) moved into `options`, where it means the same; `options` wins if both say.
fn hoist_num_predict(
    rest: &mut Map<String, Value>,
    options: Option<Map<String, Value>>,
) -> Option<Map<String, Value>> {
    match rest.remove("num_predict") {
        None | Some(Value::Null) => options,
        Some(n) => {
            let mut options = options.unwrap_or_default();
            options.entry("num_predict").or_insert(n);
            Some(options)
        }
    }
}

/// Ollama's `name:latest` is `name`: its clients add the tag to a bare name (Open WebUI).
fn model_name(model: Option<String>) -> Option<String> {
    model.map(|m| match m.strip_suffix(":latest") {
        Some(bare) => bare.to_string(),
        None => m,
    })
}

/// Ollama's runner settings: how the model runs, not what it answers; the server sets its own.
/// (`f16_kv`, `logits_all`, `vocab_only`, `embedding_only`, `num_gqa` are older ones that
/// ollama-python's `Options` and Continue still declare.)
const RUNNER: [&str; 14] = [
    "num_keep",
    "f16_kv",
    "logits_all",
    "vocab_only",
    "embedding_only",
    "num_gqa",
    "num_batch",
    "num_gpu",
    "main_gpu",
    "use_mmap",
    "use_mlock",
    "num_thread",
    "low_vram",
    "numa",
];

/// `options` (and `format`) as the sampling input.
///
/// # Errors
/// 400 `unsupported_parameter` naming an option this server cannot honour; 422 for a value
/// out of bounds (named by admission's checks) or a mistyped one.
fn sampling(
    options: Option<Map<String, Value>>,
    format: Option<Value>,
) -> ApiResult<SamplingInput> {
    let options = options.unwrap_or_default();
    let mut controls = Map::new();
    let mut sampling = SamplingInput {
        clamp_max_tokens: true,
        ..SamplingInput::default()
    };
    let number = |k: &str, v: &Value| {
        v.as_f64().ok_or_else(|| {
            ApiError::new(
                ErrorCode::InvalidSampling,
                format!("options.{k} must be a number"),
            )
        })
    };
    let mut refused = Vec::new();
    for (k, v) in options {
        match k.as_str() {
            _ if v.is_null() => {}
            "num_predict" => {
                sampling.max_tokens = match number(&k, &v)? {
                    // Ollama's -1 (and -2, to the context's end) is as many as allowed.
                    n if n < 0.0 => Some(i64::MAX),
                    n if n >= 1.0 => Some(n as i64),
                    n => {
                        return Err(ApiError::new(
                            ErrorCode::InvalidMaxTokens,
                            format!("options.num_predict must be -1 (as many as allowed) or at least 1, got {n}"),
                        ))
                    }
                };
            }
            "temperature" => sampling.temperature = Some(number(&k, &v)?),
            "top_p" => sampling.top_p = Some(number(&k, &v)?),
            "seed" => sampling.seed = Some(number(&k, &v)? as i64),
            "stop" => {
                sampling.stop = Some(serde_json::from_value(v).map_err(|_| {
                    ApiError::new(
                        ErrorCode::InvalidStop,
                        "options.stop must be a list of strings",
                    )
                })?);
            }
            "top_k" | "min_p" | "typical_p" | "repeat_penalty" | "repeat_last_n"
            | "presence_penalty" | "frequency_penalty" => {
                controls.insert(k, v);
            }
            "num_ctx" => {
                // Room asked for: the served context is what it is; a prompt that does not
                // fit it is refused by admission (`context_length_exceeded`).
                number(&k, &v)?;
            }
            "mirostat" | "mirostat_eta" | "mirostat_tau" | "tfs_z" if number(&k, &v)? == 0.0 => {}
            "penalize_newline" if v == Value::Bool(false) => {}
            name if RUNNER.contains(&name) => {}
            _ => refused.push(format!("options.{k}")),
        }
    }
    if !refused.is_empty() {
        return Err(ApiError::unsupported_fields(&refused));
    }
    sampling.controls = serde_json::from_value::<SamplerFields>(Value::Object(controls))
        .map_err(|e| ApiError::new(ErrorCode::InvalidSampling, format!("options: {e}")))?;
    sampling.response_format = match format {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) if s == "json" => Some(ResponseFormat::JsonObject),
        Some(schema @ Value::Object(_)) => Some(ResponseFormat::JsonSchema {
            name: "format".into(),
            schema,
            strict: true,
        }),
        Some(_) => {
            return Err(ApiError::new(
                ErrorCode::InvalidResponseFormat,
                "format must be \"json\" or a JSON Schema object",
            ))
        }
    };
    Ok(sampling)
}

impl ChatRequest {
    fn into_input(mut self) -> ApiResult<GenerationInput> {
        let options = hoist_num_predict(&mut self.rest, self.options);
        check_rest(&self.rest, "")?;
        let mut wire = Vec::with_capacity(self.messages.len() + 1);
        if let Some(system) = self.system.filter(|s| !s.is_empty()) {
            wire.push(WireMessage {
                role: "system".into(),
                content: Some(Content::Text(system)),
                tool_calls: None,
                tool_call_id: None,
                name: None,
            });
        }
        for (i, m) in self.messages.into_iter().enumerate() {
            check_rest(&m.rest, &format!("messages[{i}]."))?;
            wire.push(WireMessage {
                role: m.role,
                content: Some(Content::Text(m.content)),
                tool_calls: m.tool_calls,
                tool_call_id: None,
                name: m.tool_name,
            });
        }
        Ok(GenerationInput {
            prompt: Prompt::chat(chat_messages(wire)?),
            sampling: sampling(options, self.format)?,
            model: ModelChoice::named(model_name(self.model)),
            memory: None,
            tools: tools_input(self.tools, None, None)?,
        })
    }
}

impl GenerateRequest {
    fn into_input(mut self) -> ApiResult<GenerationInput> {
        let options = hoist_num_predict(&mut self.rest, self.options);
        check_rest(&self.rest, "")?;
        prompt_text("prompt", &self.prompt)?;
        let prompt = if self.raw {
            if self.system.as_deref().is_some_and(|s| !s.is_empty()) {
                return Err(ApiError::new(
                    ErrorCode::UnsupportedParameter,
                    "system has no place in a raw prompt; put it in the prompt",
                ));
            }
            Prompt::Raw { text: self.prompt }
        } else {
            let mut messages: Vec<ChatMessage> = Vec::new();
            if let Some(system) = self.system.filter(|s| !s.is_empty()) {
                messages.push(ChatMessage::new("system", system));
            }
            messages.push(ChatMessage::new("user", self.prompt));
            Prompt::chat(messages)
        };
        Ok(GenerationInput {
            prompt,
            sampling: sampling(options, self.format)?,
            model: ModelChoice::named(model_name(self.model)),
            memory: None,
            tools: None,
        })
    }
}

/// Which of Ollama's two answer shapes.
#[derive(Debug, Clone, Copy)]
enum Shape {
    Chat,
    Generate,
}

fn nanos(
    a: Option<sea_orm::prelude::DateTimeWithTimeZone>,
    b: Option<sea_orm::prelude::DateTimeWithTimeZone>,
) -> i64 {
    match (a, b) {
        (Some(a), Some(b)) => (b - a).num_nanoseconds().unwrap_or(0),
        _ => 0,
    }
}

/// One object of an answer: `text` (the whole answer, or a piece while streaming; read for
/// calls when the chat offered tools, `format`), and, when `done`, the reason and the counts.
fn object(
    shape: Shape,
    job: &jobs::Model,
    text: &str,
    done: bool,
    format: Option<ToolFormat>,
) -> Value {
    let mut v = json!({
        "model": job.model,
        "created_at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
        "done": done,
    });
    match shape {
        Shape::Chat => v["message"] = message(text, format),
        Shape::Generate => v["response"] = json!(text),
    }
    if done {
        v["done_reason"] = json!(job.finish_reason.as_deref().unwrap_or("stop"));
        v["total_duration"] = json!(nanos(Some(job.queued_at), job.finished_at));
        v["load_duration"] = json!(0);
        v["prompt_eval_count"] = json!(job.prompt_tokens);
        v["eval_count"] = json!(job.generated_tokens);
        v["eval_duration"] = json!(nanos(job.started_at, job.finished_at));
    }
    v
}

/// The assistant's message: `text`, or, for a chat that offered tools, the calls the model made
/// (arguments as objects, as Ollama gives them) and any other text.
fn message(text: &str, format: Option<ToolFormat>) -> Value {
    let Some(format) = format else {
        return json!({"role": "assistant", "content": text});
    };
    let parsed = tools::parse(format, text);
    let calls: Vec<Value> = parsed
        .calls
        .iter()
        .map(|c| {
            let arguments: Value = serde_json::from_str(&c.arguments).unwrap_or_else(|_| json!({}));
            json!({"function": {"name": c.name, "arguments": arguments}})
        })
        .collect();
    let mut m = json!({"role": "assistant", "content": parsed.content.unwrap_or_default()});
    if !calls.is_empty() {
        m["tool_calls"] = json!(calls);
    }
    m
}

async fn answer(
    ctx: &AppContext,
    key: &crate::models::api_keys::Model,
    endpoint: &'static str,
    shape: Shape,
    stream: bool,
    input: GenerationInput,
) -> ApiResult<Response> {
    let services = Services::from_ctx(ctx)?;
    let follow = if stream {
        Follow::Updates
    } else {
        Follow::Settled
    };
    let ticket = Ticket::wait(endpoint).follow(follow);
    match services.admission.admit(key, input, ticket).await? {
        Admitted::Streaming(js) => Ok(ndjson(js, shape)),
        Admitted::Finished(job) => {
            let job = settled(job)?;
            let text = job.result.clone().unwrap_or_default();
            let format = tool_calls::format_of(&job);
            Ok(Json(object(shape, &job, &text, true, format)).into_response())
        }
        Admitted::Pending(job) => Ok(accepted(&job)),
    }
}

/// What the two generation routes' bodies share, so one handler admits both.
trait OllamaBody {
    fn stream(&self) -> bool;
    fn model(&self) -> Option<&str>;
    /// Ollama's load request (no prompt, no messages: what `ollama run` and Open WebUI send
    /// to load or unload a model): nothing to generate.
    fn is_load(&self) -> bool;
    /// The body as admission takes it.
    fn into_input(self) -> ApiResult<GenerationInput>;
}

impl OllamaBody for ChatRequest {
    fn stream(&self) -> bool {
        self.stream
    }
    fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }
    fn is_load(&self) -> bool {
        self.messages.is_empty()
    }
    fn into_input(self) -> ApiResult<GenerationInput> {
        Self::into_input(self)
    }
}

impl OllamaBody for GenerateRequest {
    fn stream(&self) -> bool {
        self.stream
    }
    fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }
    fn is_load(&self) -> bool {
        self.prompt.is_empty() && self.system.as_deref().is_none_or(str::is_empty)
    }
    fn into_input(self) -> ApiResult<GenerationInput> {
        Self::into_input(self)
    }
}

/// Admits an Ollama body and answers it in `shape`.
async fn admit<B: OllamaBody>(
    ctx: &AppContext,
    key: &crate::models::api_keys::Model,
    body: Result<JsonBody<B>, ApiError>,
    endpoint: &'static str,
    shape: Shape,
) -> ApiResult<Response> {
    let JsonBody(body) = body?;
    if body.is_load() {
        return loaded(ctx, key, body.model(), shape).await;
    }
    let stream = body.stream();
    let input = body.into_input()?;
    answer(ctx, key, endpoint, shape, stream, input).await
}

/// The served id a body's `model` names (`:latest` aside; none: the default model), if this
/// key may use it.
///
/// # Errors
/// 404 `model_not_found` naming what the key may use.
async fn listed_model(
    ctx: &AppContext,
    services: &Services,
    key: &crate::models::api_keys::Model,
    model: Option<&str>,
) -> ApiResult<String> {
    let models = &services.models;
    let asked = model_name(model.map(str::to_string)).unwrap_or_default();
    let name = if asked.is_empty() {
        models.default_name().to_string()
    } else {
        models.canonical(&asked)
    };
    let available = available_models(&ctx.db, models, key).await?;
    if !available.contains(&name) {
        return Err(ApiError::new(
            ErrorCode::ModelNotFound,
            format!("model {asked:?} not found; available: {available:?}"),
        ));
    }
    Ok(name)
}

/// The answer to a load request: the model is there (every served model stays resident, so
/// `keep_alive: 0`, Ollama's unload, changes nothing either), nothing generated or charged.
///
/// # Errors
/// 404 `model_not_found` for a model this key may not use or this server does not serve.
async fn loaded(
    ctx: &AppContext,
    key: &crate::models::api_keys::Model,
    model: Option<&str>,
    shape: Shape,
) -> ApiResult<Response> {
    let services = Services::from_ctx(ctx)?;
    let name = listed_model(ctx, &services, key, model).await?;
    let mut v = json!({
        "model": tagged(&name),
        "created_at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
        "done": true,
        "done_reason": "load",
        // Nothing was read or generated.
        "total_duration": 0,
        "load_duration": 0,
        "prompt_eval_count": 0,
        "eval_count": 0,
        "eval_duration": 0,
    });
    match shape {
        Shape::Chat => v["message"] = json!({"role": "assistant", "content": ""}),
        Shape::Generate => v["response"] = json!(""),
    }
    Ok(Json(v).into_response())
}

#[tracing::instrument(skip_all, fields(api_key))]
async fn chat(
    State(ctx): State<AppContext>,
    MeteredCaller(key): MeteredCaller,
    body: Result<JsonBody<ChatRequest>, ApiError>,
) -> ApiResult<Response> {
    admit(&ctx, &key, body, "/api/chat", Shape::Chat).await
}

#[tracing::instrument(skip_all, fields(api_key))]
async fn generate(
    State(ctx): State<AppContext>,
    MeteredCaller(key): MeteredCaller,
    body: Result<JsonBody<GenerateRequest>, ApiError>,
) -> ApiResult<Response> {
    admit(&ctx, &key, body, "/api/generate", Shape::Generate).await
}

/// Ollama's `details` of a model: what this server can say of a GGUF without a Modelfile.
fn details(family: &str) -> Value {
    json!({"parent_model": "", "format": "gguf", "family": family,
           "families": [family], "parameter_size": "", "quantization_level": ""})
}

/// A listed model's name as Ollama writes it: with a tag (`:latest` for a bare name; an
/// adapter's `base:adapter` already has one).
fn tagged(name: &str) -> String {
    if name.contains(':') {
        name.to_string()
    } else {
        format!("{name}:latest")
    }
}

/// The models this key may use, each as `entry(tagged name)` makes it (with `details`).
async fn listed(
    ctx: &AppContext,
    key: &crate::models::api_keys::Model,
    entry: impl Fn(String, Value) -> Value,
) -> ApiResult<Response> {
    let services = Services::from_ctx(ctx)?;
    let family = services.models.base_architecture().unwrap_or_default();
    let models: Vec<Value> = available_models(&ctx.db, &services.models, key)
        .await?
        .iter()
        .map(|name| entry(tagged(name), details(&family)))
        .collect();
    Ok(Json(json!({"models": models})).into_response())
}

/// `GET /api/tags`: the models this key may use, as Ollama lists its local models.
#[tracing::instrument(skip_all, fields(api_key))]
async fn tags(State(ctx): State<AppContext>, Caller(key): Caller) -> ApiResult<Response> {
    let now = chrono::Utc::now().to_rfc3339();
    listed(&ctx, &key, |name, details| {
        json!({"name": name, "model": name, "modified_at": now, "size": 0, "digest": "",
               "details": details})
    })
    .await
}

/// `GET /api/ps`: the models loaded now; every model this server serves stays resident
/// (Ollama's `keep_alive: -1`, hence the far `expires_at`).
#[tracing::instrument(skip_all, fields(api_key))]
async fn ps(State(ctx): State<AppContext>, Caller(key): Caller) -> ApiResult<Response> {
    listed(&ctx, &key, |name, details| {
        json!({"name": name, "model": name, "size": 0, "digest": "", "details": details,
               "expires_at": "2318-01-01T00:00:00Z", "size_vram": 0})
    })
    .await
}

/// `POST /api/show`: the model's context length, chat template and family, which LlamaIndex,
/// Continue and Open WebUI read before they call.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub(crate) struct ShowRequest {
    /// `name` in older clients (Continue).
    #[serde(alias = "name")]
    model: String,
    /// Accepted; the answer is the same.
    #[serde(default)]
    verbose: bool,
}

#[tracing::instrument(skip_all, fields(api_key))]
async fn show(
    State(ctx): State<AppContext>,
    Caller(key): Caller,
    body: Result<JsonBody<ShowRequest>, ApiError>,
) -> ApiResult<Response> {
    let services = Services::from_ctx(&ctx)?;
    let JsonBody(body) = body?;
    let _ = body.verbose;
    let name = listed_model(&ctx, &services, &key, Some(&body.model)).await?;
    let models = &services.models;
    // An adapter (`base:adapter`) shows its base model.
    let base = name.split(':').next().unwrap_or(&name).to_string();
    let remote = models.remote_workers().await;
    let context = models.context_size_of(&base, &remote);
    let tokenizer = models.tokenizer_for(&base);
    let family = tokenizer.architecture().unwrap_or_default();
    let mut info = Map::new();
    info.insert("general.architecture".into(), json!(family));
    info.insert(format!("{family}.context_length"), json!(context));
    info.insert(
        format!("{family}.embedding_length"),
        json!(tokenizer.n_embd()),
    );
    let mut capabilities = vec!["completion", "tools"];
    if services.settings.engine.embeddings.enabled {
        capabilities.push("embedding");
    }
    Ok(Json(json!({
        "license": "",
        "modelfile": "",
        "parameters": format!("num_ctx {context}"),
        // The model's own (Jinja) chat template, which this server renders prompts with.
        "template": tokenizer.chat_template().unwrap_or_default(),
        "details": details(&family),
        "model_info": info,
        "capabilities": capabilities,
        "modified_at": chrono::Utc::now().to_rfc3339(),
    }))
    .into_response())
}

/// The Ollama version this API follows, as its clients compare it (numbers only).
pub const OLLAMA_VERSION: &str = "0.12.0";

/// `GET /api/version`: no key needed, as in Ollama (Open WebUI checks a connection with it).
async fn version() -> Response {
    Json(json!({"version": OLLAMA_VERSION})).into_response()
}

/// `GET /` (and `HEAD /`): Ollama's liveness answer, which its CLI and health checks read.
async fn running() -> &'static str {
    "Ollama is running"
}

/// `POST /api/embed`: `input` is a string or a list of them.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub(crate) struct EmbedRequest {
    model: Option<String>,
    #[schema(value_type = Object)]
    input: Value,
    /// Cut an input longer than the embedding context to fit (Ollama's default), instead of
    /// refusing it.
    #[serde(default = "yes")]
    truncate: bool,
    /// Must be the model's width when given.
    dimensions: Option<i64>,
    #[schema(value_type = Option<Object>)]
    options: Option<Map<String, Value>>,
    #[serde(flatten)]
    #[schema(ignore)]
    rest: Map<String, Value>,
}

/// `POST /api/embeddings` (Ollama's older route): one `prompt`, one `embedding`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub(crate) struct EmbeddingsRequest {
    model: Option<String>,
    prompt: String,
    #[schema(value_type = Option<Object>)]
    options: Option<Map<String, Value>>,
    #[serde(flatten)]
    #[schema(ignore)]
    rest: Map<String, Value>,
}

/// Embedding options: the runner's (and `num_ctx`) change nothing of a vector; the samplers
/// have no meaning here and are accepted as Ollama accepts them.
fn check_embed_options(options: Option<&Map<String, Value>>) -> ApiResult<()> {
    let refused: Vec<String> = options
        .into_iter()
        .flatten()
        .filter(|(k, v)| {
            !empty(v) && !RUNNER.contains(&k.as_str()) && !SAMPLERS.contains(&k.as_str())
        })
        .map(|(k, _)| format!("options.{k}"))
        .collect();
    if refused.is_empty() {
        Ok(())
    } else {
        Err(ApiError::unsupported_fields(&refused))
    }
}

/// Options that steer generation only; an embedding is the same whatever they say.
const SAMPLERS: [&str; 14] = [
    "num_ctx",
    "num_predict",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "typical_p",
    "repeat_penalty",
    "repeat_last_n",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "stop",
    "penalize_newline",
];

/// `text` cut to the embedding context's `limit` tokens (the model's special tokens
/// included), on a token boundary.
fn truncated(
    tokenizer: &crate::engine::tokenizer::PromptTokenizer,
    text: String,
    limit: usize,
) -> String {
    let total = tokenizer.count_embedding(&text);
    if total <= limit {
        return text;
    }
    let ids = tokenizer.token_ids(&text, false, false);
    let special = total.saturating_sub(ids.len());
    let mut keep = limit.saturating_sub(special).min(ids.len());
    // Read back, a cut text can tokenize a little longer; shorten until it fits.
    loop {
        let cut = tokenizer.text_of(&ids[..keep]).unwrap_or_default();
        if keep == 0 || tokenizer.count_embedding(&cut) <= limit {
            return cut;
        }
        keep -= 1;
    }
}

/// Admits an embedding of `inputs` and answers `body(job, vectors)`.
async fn embed_inputs(
    ctx: &AppContext,
    key: &crate::models::api_keys::Model,
    model: Option<String>,
    inputs: Vec<(String, String)>,
    truncate: bool,
    endpoint: &'static str,
    body: impl FnOnce(&jobs::Model, Vec<Vec<f32>>) -> Value,
) -> ApiResult<Response> {
    let services = Services::from_ctx(ctx)?;
    let model = model_name(model);
    let inputs = if truncate {
        let tokenizer =
            crate::controllers::compat::llama_server::tokenizer_of(&services, model.as_deref());
        let limit = services.settings.engine.embeddings.context_size as usize;
        inputs
            .into_iter()
            .map(|(field, text)| (field, truncated(&tokenizer, text, limit)))
            .collect()
    } else {
        inputs
    };
    let input = EmbeddingInput::new(inputs, model)?;
    let admitted = services
        .admission
        .admit(key, input, Ticket::wait(endpoint).until_settled())
        .await?;
    try_answer(admitted, |job| Ok(body(job, vectors(job)?)))
}

#[tracing::instrument(skip_all, fields(api_key))]
async fn embed(
    State(ctx): State<AppContext>,
    MeteredCaller(key): MeteredCaller,
    body: Result<JsonBody<EmbedRequest>, ApiError>,
) -> ApiResult<Response> {
    let services = Services::from_ctx(&ctx)?;
    let JsonBody(body) = body?;
    check_rest(&body.rest, "")?;
    check_embed_options(body.options.as_ref())?;
    check_dimensions(&services, body.dimensions)?;
    let inputs = match body.input {
        Value::String(s) => vec![("input".to_string(), s)],
        Value::Array(items) => items
            .into_iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok((format!("input[{i}]"), s)),
                _ => Err(ApiError::new(
                    ErrorCode::InvalidInput,
                    format!("input[{i}] must be a string"),
                )),
            })
            .collect::<ApiResult<_>>()?,
        _ => {
            return Err(ApiError::new(
                ErrorCode::InvalidInput,
                "input must be a string or a list of strings",
            ))
        }
    };
    embed_inputs(
        &ctx,
        &key,
        body.model,
        inputs,
        body.truncate,
        "/api/embed",
        |job, vectors| {
            json!({
                "model": job.model,
                "embeddings": vectors,
                "total_duration": nanos(Some(job.queued_at), job.finished_at),
                "load_duration": 0,
                "prompt_eval_count": job.prompt_tokens,
            })
        },
    )
    .await
}

#[tracing::instrument(skip_all, fields(api_key))]
async fn embeddings(
    State(ctx): State<AppContext>,
    MeteredCaller(key): MeteredCaller,
    body: Result<JsonBody<EmbeddingsRequest>, ApiError>,
) -> ApiResult<Response> {
    let JsonBody(body) = body?;
    check_rest(&body.rest, "")?;
    check_embed_options(body.options.as_ref())?;
    let inputs = vec![("prompt".to_string(), body.prompt)];
    // The older route truncates as the newer one does by default.
    embed_inputs(
        &ctx,
        &key,
        body.model,
        inputs,
        true,
        "/api/embeddings",
        |_, vectors| json!({"embedding": vectors.into_iter().next().unwrap_or_default()}),
    )
    .await
}

/// Ollama's error body, `{"error": "<message>"}` (and this server's `code`): its clients
/// (ollama-python, ollama-js, Continue, Open WebUI) read `error` as the message. Rewrites this
/// server's `{"error": {"message", …}}` on the Ollama routes, refusals of the key included.
async fn ollama_errors(response: Response) -> Response {
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if response.status().is_success() || !is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    // Error bodies are small; a larger one is passed on as it was read.
    let Ok(bytes) = axum::body::to_bytes(body, 1 << 20).await else {
        return Response::from_parts(parts, Body::empty());
    };
    let error = serde_json::from_slice::<Value>(&bytes)
        .ok()
        .and_then(|v| v.get("error").filter(|e| e.is_object()).cloned());
    match error {
        Some(error) => {
            parts.headers.remove(header::CONTENT_LENGTH);
            // The code beside it, for what tells refusals apart (Ollama's clients ignore it).
            let body = json!({"error": error["message"], "code": error["code"]}).to_string();
            Response::from_parts(parts, Body::from(body))
        }
        None => Response::from_parts(parts, Body::from(bytes)),
    }
}

/// Streams the job as Ollama does: a JSON object per line, each piece of text with
/// `"done": false`, then the closing object (any text the client missed, the counts). A failed
/// job ends with `{"error": …}`, which Ollama's clients raise.
fn ndjson(js: crate::admission::JobStream, shape: Shape) -> Response {
    let job = js.job.clone();
    // An answer that may be calls is sent whole when done (its text may be a call).
    let format = tool_calls::format_of(&job);
    let lines = text_updates(js.deltas, js.done, format.is_some()).map(move |update| {
        let line = match update {
            TextUpdate::Piece(text) => object(shape, &job, &text, false, None),
            TextUpdate::Settled(done, rest) => match settled(*done) {
                Ok(done) => object(shape, &done, &rest, true, format),
                Err(e) => json!({"error": e.message}),
            },
            TextUpdate::Ended => json!({"error": format!(
                "the stream ended early; the result will be at GET /api/jobs/{}",
                job.id
            )}),
        };
        Ok::<_, std::convert::Infallible>(format!("{line}\n").into_bytes())
    });
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(lines),
    )
        .into_response()
}

pub fn routes() -> Routes {
    Routes::new()
        .add("/api/chat", axum::routing::post(chat))
        .add("/api/generate", axum::routing::post(generate))
        .add("/api/embed", axum::routing::post(embed))
        .add("/api/embeddings", axum::routing::post(embeddings))
        .add("/api/tags", axum::routing::get(tags))
        .add("/api/ps", axum::routing::get(ps))
        .add("/api/show", axum::routing::post(show))
        .add("/api/version", axum::routing::get(version))
        .add("/", axum::routing::get(running))
        .layer(axum::middleware::map_response(ollama_errors))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat_input(body: Value) -> ApiResult<GenerationInput> {
        serde_json::from_value::<ChatRequest>(body)
            .expect("a body")
            .into_input()
    }

    #[test]
    fn options_and_format_map_to_the_one_input() {
        let i = chat_input(json!({
            "model": "m", "messages": [{"role": "user", "content": "hi", "images": []}],
            "stream": false, "keep_alive": "5m", "format": "json",
            "options": {"num_predict": -1, "temperature": 0, "top_k": 3, "seed": 4,
                        "stop": ["\n"], "num_ctx": 2048, "num_thread": 8, "mirostat": 0},
        }))
        .expect("valid");
        assert_eq!(i.sampling.max_tokens, Some(i64::MAX));
        assert_eq!(i.sampling.temperature, Some(0.0));
        assert_eq!(i.sampling.seed, Some(4));
        assert_eq!(i.sampling.controls.top_k, Some(3));
        assert!(matches!(
            i.sampling.response_format,
            Some(ResponseFormat::JsonObject)
        ));
        let raw = serde_json::from_value::<GenerateRequest>(json!({"prompt": "x", "raw": true}))
            .expect("a body")
            .into_input()
            .expect("valid");
        assert!(matches!(raw.prompt, Prompt::Raw { .. }));
        assert!(raw.sampling.max_tokens.is_none());
        // As Open WebUI and LlamaIndex send them: `name:latest`, a top-level `num_predict` and
        // `system`, a `num_ctx` beyond the served context (room asked for, not refused).
        let i = chat_input(json!({
            "model": "m:latest", "messages": [{"role": "user", "content": "hi"}],
            "num_predict": 7, "system": "Be brief.", "options": {"num_ctx": 100000, "f16_kv": true},
        }))
        .expect("valid");
        assert_eq!(i.sampling.max_tokens, Some(7));
        assert_eq!(i.model.model.as_deref(), Some("m"));
        let Prompt::Chat { messages, .. } = &i.prompt else {
            panic!("a chat");
        };
        assert_eq!(
            (messages[0].role.as_str(), messages[0].content.as_str()),
            ("system", "Be brief.")
        );
        // `options` wins over the top level.
        let i = chat_input(json!({"messages": [{"role": "user", "content": "hi"}],
                                  "num_predict": 7, "options": {"num_predict": 3}}))
        .expect("valid");
        assert_eq!(i.sampling.max_tokens, Some(3));
    }

    #[test]
    fn what_it_cannot_honour_is_refused_by_name() {
        for (body, code, name) in [
            (
                json!({"tools": [{"type": "web_search"}]}),
                "invalid_tools",
                "tools[0]",
            ),
            (json!({"think": true}), "unsupported_parameter", "think"),
            (
                json!({"options": {"mirostat": 2}}),
                "unsupported_parameter",
                "options.mirostat",
            ),
            (
                json!({"options": {"temperature": "hot"}}),
                "invalid_sampling",
                "options.temperature",
            ),
            (json!({"format": 3}), "invalid_response_format", "format"),
            (
                json!({"messages": [{"role": "user", "content": "hi", "images": ["aGk="]}]}),
                "unsupported_parameter",
                "messages[0].images",
            ),
        ] {
            let mut full = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
            for (k, v) in body.as_object().expect("an object") {
                full[k] = v.clone();
            }
            let err = chat_input(full).expect_err("refused");
            assert_eq!(err.code.as_str(), code, "{body}");
            assert!(err.message.contains(name), "{}", err.message);
        }
    }
}
