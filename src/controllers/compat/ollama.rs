//! Ollama's own API, for the tools built on it (the `ollama` client libraries, LangChain's
//! `ChatOllama`, chat front ends): `POST /api/chat`, `POST /api/generate` and `GET /api/tags`.
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
//! and cannot be honoured here (images, `think`, `suffix`, `template`, `context`, mirostat, a
//! `num_ctx` above the served context) is refused by name.

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
        Admitted, Follow, GenerationInput, ModelChoice, SamplerFields, SamplingInput, Ticket,
    },
    controllers::{
        respond::{accepted, settled},
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
    /// Every other field: `keep_alive` is accepted, the rest refused unless empty.
    #[serde(flatten)]
    #[schema(ignore)]
    rest: Map<String, Value>,
}

/// `POST /api/generate`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub(crate) struct GenerateRequest {
    model: Option<String>,
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
        .filter(|(k, v)| k.as_str() != "keep_alive" && !empty(v))
        .map(|(k, _)| format!("{prefix}{k}"))
        .collect();
    if refused.is_empty() {
        return Ok(());
    }
    Err(ApiError::unsupported_fields(&refused))
}

/// Ollama's runner settings: how the model runs, not what it answers; the server sets its own.
const RUNNER: [&str; 9] = [
    "num_keep",
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
    context: u32,
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
                // More room than asked is harmless; less is not there to give.
                if number(&k, &v)? > f64::from(context) {
                    return Err(ApiError::new(
                        ErrorCode::UnsupportedParameter,
                        format!(
                            "options.num_ctx: the served context holds {context} tokens a sequence; ask for at most that"
                        ),
                    ));
                }
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
    fn into_input(self, context: u32) -> ApiResult<GenerationInput> {
        check_rest(&self.rest, "")?;
        let mut wire = Vec::with_capacity(self.messages.len());
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
            sampling: sampling(self.options, self.format, context)?,
            model: ModelChoice::named(self.model),
            memory: None,
            tools: tools_input(self.tools, None, None)?,
        })
    }
}

impl GenerateRequest {
    fn into_input(self, context: u32) -> ApiResult<GenerationInput> {
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
            sampling: sampling(self.options, self.format, context)?,
            model: ModelChoice::named(self.model),
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
        Follow::Result
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
    fn model(&self) -> Option<&str>;
    fn stream(&self) -> bool;
    fn options(&self) -> Option<&Map<String, Value>>;
    /// The body as admission takes it; `context` bounds `options.num_ctx`.
    fn into_input(self, context: u32) -> ApiResult<GenerationInput>;
}

impl OllamaBody for ChatRequest {
    fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }
    fn stream(&self) -> bool {
        self.stream
    }
    fn options(&self) -> Option<&Map<String, Value>> {
        self.options.as_ref()
    }
    fn into_input(self, context: u32) -> ApiResult<GenerationInput> {
        Self::into_input(self, context)
    }
}

impl OllamaBody for GenerateRequest {
    fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }
    fn stream(&self) -> bool {
        self.stream
    }
    fn options(&self) -> Option<&Map<String, Value>> {
        self.options.as_ref()
    }
    fn into_input(self, context: u32) -> ApiResult<GenerationInput> {
        Self::into_input(self, context)
    }
}

/// Admits an Ollama body and answers it in `shape`. The served context is looked up only for
/// a body that sets `options.num_ctx`.
async fn admit<B: OllamaBody>(
    ctx: &AppContext,
    key: &crate::models::api_keys::Model,
    body: Result<JsonBody<B>, ApiError>,
    endpoint: &'static str,
    shape: Shape,
) -> ApiResult<Response> {
    let JsonBody(body) = body?;
    let services = Services::from_ctx(ctx)?;
    let context = if body.options().is_some_and(|o| o.contains_key("num_ctx")) {
        let models = &services.models;
        let remote = models.remote_workers().await;
        models.context_size_of(&models.canonical(body.model().unwrap_or_default()), &remote)
    } else {
        u32::MAX
    };
    let stream = body.stream();
    let input = body.into_input(context)?;
    answer(ctx, key, endpoint, shape, stream, input).await
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

/// `GET /api/tags`: the models this key may use, as Ollama lists its local models.
#[tracing::instrument(skip_all, fields(api_key))]
async fn tags(State(ctx): State<AppContext>, Caller(key): Caller) -> ApiResult<Response> {
    let services = Services::from_ctx(&ctx)?;
    let now = chrono::Utc::now().to_rfc3339();
    let models: Vec<Value> = available_models(&ctx.db, &services.models, &key)
        .await?
        .iter()
        .map(|name| {
            json!({
                "name": name,
                "model": name,
                "modified_at": now,
                "size": 0,
                "digest": "",
                "details": {"format": "gguf", "family": "", "families": null,
                            "parameter_size": "", "quantization_level": ""},
            })
        })
        .collect();
    Ok(Json(json!({"models": models})).into_response())
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
        .add("/api/tags", axum::routing::get(tags))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat_input(body: Value) -> ApiResult<GenerationInput> {
        serde_json::from_value::<ChatRequest>(body)
            .expect("a body")
            .into_input(2048)
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
            .into_input(2048)
            .expect("valid");
        assert!(matches!(raw.prompt, Prompt::Raw { .. }));
        assert!(raw.sampling.max_tokens.is_none());
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
                json!({"options": {"num_ctx": 100000}}),
                "unsupported_parameter",
                "options.num_ctx",
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
