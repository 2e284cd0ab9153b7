//! OpenAI-compatible routes: `GET /v1/models`, `POST /v1/chat/completions`,
//! `POST /v1/completions` (with or without `stream: true`: server-sent events ending in
//! `data: [DONE]`), `POST /v1/embeddings`, and the Responses API ([`responses`]). Spec: <https://platform.openai.com/docs/api-reference>.
//! Each body becomes the one admission input; same keys, quota, queue and worker as every
//! other route.
//!
//! A LoRA head is a model of its own here, `base:adapter` (as OpenAI names fine-tuned models),
//! listed by `/v1/models` for the keys allowed to use it.

use axum::{
    extract::State,
    response::{
        sse::{Event, KeepAlive, Sse},
        IntoResponse, Response,
    },
    Json,
};
use base64::Engine as _;
use futures::StreamExt;
use loco_rs::{app::AppContext, controller::Routes};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{
    compat::llama_server::{token_ids, tokenizer_of},
    respond::{answer, try_answer, usage_json},
    tool_calls::{self, tools_input, ToolWire},
};
mod responses;
pub(crate) use responses::ResponsesRequest;

use crate::{
    admission::{
        input::{chat_messages, prompt_text, WireMessage},
        resolve::available_models,
        Admitted, EmbeddingInput, Follow, GenerationInput, ModelChoice, SamplerFields,
        SamplingInput, StopWords, Ticket,
    },
    engine::{
        grammar::ResponseFormat, tools::ToolFormat, Choice, Prompt, TokenLogprob, MAX_TOP_LOGPROBS,
    },
    errors::{ApiError, ApiResult, ErrorCode},
    extractors::{Caller, JsonBody, MeteredCaller},
    models::{api_keys, jobs},
    notify::{job_updates, JobUpdate},
    services::Services,
};

/// Fields shared by both completion routes.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[schema(as = CompletionOptions)]
struct Common {
    model: Option<String>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    seed: Option<i64>,
    stop: Option<StopWords>,
    /// OpenAI's penalties and `logit_bias`; llama.cpp server's and vLLM's own controls.
    #[serde(flatten)]
    controls: SamplerFields,
    #[serde(default, deserialize_with = "null_is_false")]
    stream: bool,
    stream_options: Option<StreamOptions>,
    n: Option<i64>,
    /// Structured output: `json_object` or `json_schema` constrain decoding with a grammar.
    response_format: Option<ResponseFormatWire>,
    /// Every other field: accepted only where OpenAI documents it as advisory (or it asks for
    /// what happens anyway); anything else is refused by name ([`check_rest`]).
    #[serde(flatten)]
    #[schema(ignore)]
    rest: serde_json::Map<String, Value>,
}

/// Fields OpenAI documents as advisory (identifiers, storage and tier hints, prediction
/// hints): accepted and ignored.
const ADVISORY: [&str; 8] = [
    "user",
    "metadata",
    "store",
    "service_tier",
    "prediction",
    "safety_identifier",
    "prompt_cache_key",
    "parallel_tool_calls",
];

/// Refuses, by name, every field this server would otherwise silently ignore: the client
/// believes a tool or a schema was honoured when it was not. Fields at the value that changes
/// nothing (`echo: false`, empty `tools`, `modalities: ["text"]`) are accepted.
fn check_rest(rest: &serde_json::Map<String, Value>) -> ApiResult<()> {
    let inert = |name: &str, v: &Value| match name {
        "echo" => v.is_null() || v == &Value::Bool(false),
        "tools" | "functions" => {
            v.is_null()
                || v.as_object().is_some_and(serde_json::Map::is_empty)
                || v.as_array().is_some_and(Vec::is_empty)
        }
        "tool_choice" | "function_call" => v.is_null() || v == "none",
        "modalities" => v.as_array().is_some_and(|m| m.iter().all(|x| x == "text")),
        "best_of" => v.is_null() || v.as_i64() == Some(1),
        "suffix" => v.is_null(),
        _ => ADVISORY.contains(&name),
    };
    // `null` is OpenAI's "not set" (typed clients and proxies send every field).
    let refused: Vec<&str> = rest
        .iter()
        .filter(|(k, v)| !v.is_null() && !inert(k, v))
        .map(|(k, _)| k.as_str())
        .collect();
    if refused.is_empty() {
        return Ok(());
    }
    Err(ApiError::unsupported_fields(&refused))
}

/// `stream` with `null` read as not set (false).
fn null_is_false<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(d)?.unwrap_or_default())
}

/// OpenAI's `response_format`: plain text (the default), any JSON object, or JSON valid
/// against a schema. Both JSON kinds constrain decoding with a grammar
/// ([`crate::engine::grammar`]), so the answer parses (unless `max_tokens` cuts it short,
/// reported as `finish_reason: "length"`).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ResponseFormatWire {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchemaWire },
}

/// `response_format.json_schema`, as OpenAI defines it.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
struct JsonSchemaWire {
    /// `a-z`, `A-Z`, `0-9`, `_` and `-`, at most 64 characters.
    name: String,
    /// For the model in OpenAI's API; a grammar has no use for it.
    description: Option<String>,
    /// A JSON Schema; absent means any JSON object.
    #[schema(value_type = Option<Object>)]
    schema: Option<Value>,
    /// Accepted either way: the grammar enforces the schema exactly as strict mode would.
    strict: Option<bool>,
}

impl ResponseFormatWire {
    /// The format admission turns into a grammar; `None` for text.
    ///
    /// # Errors
    /// 400 `invalid_response_format` for a name OpenAI would refuse.
    fn into_format(self) -> ApiResult<Option<ResponseFormat>> {
        let spec = match self {
            Self::Text => return Ok(None),
            Self::JsonObject => return Ok(Some(ResponseFormat::JsonObject)),
            Self::JsonSchema { json_schema } => json_schema,
        };
        if !super::tool_calls::is_openai_name(&spec.name) {
            return Err(ApiError::new(
                ErrorCode::InvalidResponseFormat,
                "response_format.json_schema.name must be 1 to 64 of a-z, A-Z, 0-9, _ and -",
            ));
        }
        let _ = spec.description;
        Ok(Some(match spec.schema {
            None => ResponseFormat::JsonObject,
            Some(schema) => ResponseFormat::JsonSchema {
                name: spec.name,
                schema,
                strict: spec.strict.unwrap_or(false),
            },
        }))
    }
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
struct StreamOptions {
    /// Adds a last chunk with `usage` and no choices, as OpenAI does.
    #[serde(default)]
    include_usage: bool,
}

/// How a streamed answer is shaped.
#[derive(Debug, Clone, Copy)]
enum Shape {
    Chat,
    Text,
}

/// Whether and how to stream, taken from the request before it becomes an engine request.
#[derive(Debug, Clone, Copy)]
struct Streaming {
    on: bool,
    include_usage: bool,
}

impl Common {
    fn streaming(&self) -> Streaming {
        Streaming {
            on: self.stream,
            include_usage: self
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage),
        }
    }
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub(crate) struct ChatRequest {
    #[schema(min_items = 1)]
    messages: Vec<WireMessage>,
    /// Log-probabilities of the answer's tokens (`choices[].logprobs.content`).
    logprobs: Option<bool>,
    /// With `logprobs: true`, this many most likely alternatives per token (0 to 20).
    top_logprobs: Option<i64>,
    /// Functions the model may call; its calls come back as `message.tool_calls`.
    tools: Option<Vec<ToolWire>>,
    /// `none`, `auto` (the default with tools), `required`, or
    /// `{"type": "function", "function": {"name": …}}`.
    #[schema(value_type = Option<Object>)]
    tool_choice: Option<Value>,
    /// Several calls in one answer (default true).
    parallel_tool_calls: Option<bool>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub(crate) struct CompletionRequest {
    /// A string, or a list of one (LangChain's `OpenAI` sends its prompts as a list).
    #[schema(value_type = Object)]
    prompt: CompletionPrompt,
    /// Log-probabilities of the answer's tokens with this many most likely alternatives per
    /// token (0 to 20; `choices[].logprobs`).
    logprobs: Option<i64>,
    #[serde(flatten)]
    common: Common,
}

/// A number of alternatives per token, 0 to [`MAX_TOP_LOGPROBS`].
///
/// # Errors
/// 422 `invalid_sampling` naming `field`.
fn top_logprobs(field: &str, n: i64) -> ApiResult<u8> {
    u8::try_from(n)
        .ok()
        .filter(|n| *n <= MAX_TOP_LOGPROBS)
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::InvalidSampling,
                format!("{field} must be between 0 and {MAX_TOP_LOGPROBS}, got {n}"),
            )
        })
}

impl Common {
    /// The request as admission takes it.
    ///
    /// # Errors
    /// 400 for fields this server would otherwise ignore, or an unusable `response_format`.
    fn into_input(self, prompt: Prompt, logprobs: Option<u8>) -> ApiResult<GenerationInput> {
        check_rest(&self.rest)?;
        let response_format = match self.response_format {
            Some(f) => f.into_format()?,
            None => None,
        };
        Ok(GenerationInput {
            prompt,
            sampling: SamplingInput {
                max_tokens: self.max_completion_tokens.or(self.max_tokens),
                temperature: self.temperature,
                top_p: self.top_p,
                seed: self.seed,
                stop: self.stop,
                // Clients often ask for more than a small model's context holds (4096 is a
                // common default): cut to what fits, reported as `finish_reason: "length"`.
                clamp_max_tokens: true,
                response_format,
                logprobs,
                n: self.n,
                controls: self.controls,
            },
            model: ModelChoice::named(self.model),
            memory: None,
            tools: None,
        })
    }
}

impl TryFrom<ChatRequest> for GenerationInput {
    type Error = ApiError;

    fn try_from(body: ChatRequest) -> Result<Self, ApiError> {
        let messages = chat_messages(body.messages)?;
        let logprobs = match (body.logprobs, body.top_logprobs) {
            (Some(true), top) => Some(top_logprobs("top_logprobs", top.unwrap_or(0))?),
            (_, None) => None,
            (_, Some(_)) => {
                return Err(ApiError::new(
                    ErrorCode::InvalidSampling,
                    "top_logprobs needs logprobs: true",
                ))
            }
        };
        let tools = tools_input(
            body.tools,
            body.tool_choice.as_ref(),
            body.parallel_tool_calls,
        )?;
        let mut input = body.common.into_input(Prompt::chat(messages), logprobs)?;
        input.tools = tools;
        Ok(input)
    }
}

/// `/v1/completions`' `prompt`: OpenAI takes a string or a list (a batch of prompts).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum CompletionPrompt {
    One(String),
    Many(Vec<Value>),
}

impl CompletionPrompt {
    /// The one prompt text. A batch of several is refused by name: one request is one job
    /// here, and `n` asks for several answers to one prompt.
    fn text(self) -> ApiResult<String> {
        match self {
            Self::One(text) => Ok(text),
            Self::Many(items) => match <[Value; 1]>::try_from(items) {
                Ok([Value::String(text)]) => Ok(text),
                Ok(_) => Err(ApiError::new(
                    ErrorCode::UnsupportedParameter,
                    "prompt: a list must hold one string here (token ids are not taken on /v1/completions; send the text)",
                )),
                Err(items) => Err(ApiError::new(
                    ErrorCode::UnsupportedParameter,
                    format!(
                        "prompt: one prompt per request here, got a batch of {}; send each as its own request",
                        items.len()
                    ),
                )),
            },
        }
    }
}

impl TryFrom<CompletionRequest> for GenerationInput {
    type Error = ApiError;

    fn try_from(body: CompletionRequest) -> Result<Self, ApiError> {
        let text = body.prompt.text()?;
        prompt_text("prompt", &text)?;
        let logprobs = body
            .logprobs
            .map(|n| top_logprobs("logprobs", n))
            .transpose()?;
        body.common.into_input(Prompt::Raw { text }, logprobs)
    }
}

/// Admits a completion request and answers it whole with `body(job)`, or as a stream.
async fn complete(
    ctx: &AppContext,
    key: &api_keys::Model,
    endpoint: &'static str,
    input: GenerationInput,
    streaming: Streaming,
    shape: Shape,
    body: impl FnOnce(&jobs::Model) -> Value,
) -> ApiResult<Response> {
    let services = Services::from_ctx(ctx)?;
    let follow = if streaming.on {
        Follow::Updates
    } else {
        Follow::Settled
    };
    let ticket = Ticket::wait(endpoint).follow(follow);
    match services.admission.admit(key, input, ticket).await? {
        Admitted::Streaming(js) => Ok(stream(js, shape, streaming)),
        admitted => answer(admitted, body),
    }
}

#[tracing::instrument(skip_all, fields(api_key))]
async fn chat_completions(
    State(ctx): State<AppContext>,
    MeteredCaller(key): MeteredCaller,
    body: Result<JsonBody<ChatRequest>, ApiError>,
) -> ApiResult<Response> {
    let JsonBody(body) = body?;
    let streaming = body.common.streaming();
    let input = GenerationInput::try_from(body)?;
    complete(
        &ctx,
        &key,
        "/v1/chat/completions",
        input,
        streaming,
        Shape::Chat,
        |job| {
            json!({
                "id": format!("chatcmpl-{}", job.id),
                "object": "chat.completion",
                "created": job.queued_at.timestamp(),
                "model": job.model,
                "choices": choices_json(job, Shape::Chat),
                "usage": usage_json(job),
            })
        },
    )
    .await
}

#[tracing::instrument(skip_all, fields(api_key))]
async fn completions(
    State(ctx): State<AppContext>,
    MeteredCaller(key): MeteredCaller,
    body: Result<JsonBody<CompletionRequest>, ApiError>,
) -> ApiResult<Response> {
    let JsonBody(body) = body?;
    let streaming = body.common.streaming();
    let input = GenerationInput::try_from(body)?;
    complete(
        &ctx,
        &key,
        "/v1/completions",
        input,
        streaming,
        Shape::Text,
        |job| {
            json!({
                "id": format!("cmpl-{}", job.id),
                "object": "text_completion",
                "created": job.queued_at.timestamp(),
                "model": job.model,
                "choices": choices_json(job, Shape::Text),
                "usage": usage_json(job),
            })
        },
    )
    .await
}

/// The job's per-token log-probabilities in OpenAI's shape for `shape` (chat:
/// `{"content": [{token, logprob, bytes, top_logprobs}]}`; completions: `{tokens,
/// token_logprobs, top_logprobs, text_offset}`), or null when it did not ask for them.
fn logprobs_json(job: &jobs::Model, shape: Shape) -> Value {
    logprobs_value(
        job.logprobs
            .as_deref()
            .and_then(|l| serde_json::from_str::<Vec<TokenLogprob>>(l).ok()),
        shape,
    )
}

/// A done job's choices in OpenAI's shape: the first from the record's own fields, the others
/// (`n` > 1) from `choices`.
fn choices_json(job: &jobs::Model, shape: Shape) -> Vec<Value> {
    // Only a chat can offer tools (and reading the request costs a parse of its JSON).
    let tools = match shape {
        Shape::Chat => tool_calls::format_of(job),
        Shape::Text => None,
    };
    let one = |index: usize, text: &str, finish: Option<&str>, logprobs: Value| match shape {
        Shape::Chat => {
            let (message, finish) = tool_calls::message(&job.id, index, text, finish, tools);
            json!({
                "index": index,
                "message": message,
                "finish_reason": finish,
                "logprobs": logprobs,
            })
        }
        Shape::Text => json!({
            "index": index,
            "text": text,
            "finish_reason": finish,
            "logprobs": logprobs,
        }),
    };
    let more: Vec<Choice> = job
        .choices
        .as_deref()
        .and_then(|c| serde_json::from_str(c).ok())
        .unwrap_or_default();
    std::iter::once(one(
        0,
        job.result.as_deref().unwrap_or_default(),
        job.finish_reason.as_deref(),
        logprobs_json(job, shape),
    ))
    .chain(more.into_iter().enumerate().map(|(i, c)| {
        one(
            i + 1,
            &c.text,
            Some(c.finish_reason.as_str()),
            logprobs_value(c.logprobs, shape),
        )
    }))
    .collect()
}

/// Per-token log-probabilities in OpenAI's shape for `shape`, or null.
fn logprobs_value(tokens: Option<Vec<TokenLogprob>>, shape: Shape) -> Value {
    let Some(tokens) = tokens else {
        return Value::Null;
    };
    let token = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    match shape {
        Shape::Chat => {
            let content: Vec<Value> = tokens
                .iter()
                .map(|t| {
                    let top: Vec<Value> = t
                        .top
                        .iter()
                        .map(|a| json!({"token": token(&a.bytes), "logprob": a.logprob, "bytes": a.bytes}))
                        .collect();
                    json!({"token": token(&t.bytes), "logprob": t.logprob, "bytes": t.bytes, "top_logprobs": top})
                })
                .collect();
            json!({"content": content, "refusal": null})
        }
        Shape::Text => {
            let mut offset = 0usize;
            let mut text_offset = Vec::with_capacity(tokens.len());
            for t in &tokens {
                text_offset.push(offset);
                offset += token(&t.bytes).chars().count();
            }
            let top: Vec<Value> = tokens
                .iter()
                .map(|t| {
                    let alternatives: serde_json::Map<String, Value> = t
                        .top
                        .iter()
                        .map(|a| (token(&a.bytes), json!(a.logprob)))
                        .collect();
                    Value::Object(alternatives)
                })
                .collect();
            json!({
                "tokens": tokens.iter().map(|t| token(&t.bytes)).collect::<Vec<_>>(),
                "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
                "top_logprobs": top,
                "text_offset": text_offset,
            })
        }
    }
}

/// One `data:` chunk of a streamed answer.
struct Chunks {
    id: String,
    created: i64,
    model: String,
    shape: Shape,
}

impl Chunks {
    fn event(
        &self,
        text: Option<&str>,
        role: bool,
        finish: Option<&str>,
        usage: Option<Value>,
    ) -> Event {
        Event::default().data(self.event_json(text, role, finish, usage).to_string())
    }

    /// The chunk [`Self::event`] sends, as JSON.
    fn event_json(
        &self,
        text: Option<&str>,
        role: bool,
        finish: Option<&str>,
        usage: Option<Value>,
    ) -> Value {
        let choice = match self.shape {
            Shape::Chat => {
                let mut delta = serde_json::Map::new();
                if role {
                    delta.insert("role".into(), "assistant".into());
                }
                if let Some(t) = text {
                    delta.insert("content".into(), t.into());
                }
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Shape::Text => {
                json!({"index": 0, "text": text.unwrap_or_default(), "logprobs": null, "finish_reason": finish})
            }
        };
        let mut chunk = self.base();
        chunk["choices"] = json!([choice]);
        if let Some(u) = usage {
            chunk["usage"] = u;
        }
        chunk
    }

    /// A chunk of choice `index` (several choices, `n` > 1): for chat `body` is its delta,
    /// for completions its text.
    fn choice(
        &self,
        index: usize,
        body: Value,
        finish: Option<&str>,
        usage: Option<Value>,
    ) -> Event {
        Event::default().data(self.choice_json(index, body, finish, usage).to_string())
    }

    fn choice_json(
        &self,
        index: usize,
        body: Value,
        finish: Option<&str>,
        usage: Option<Value>,
    ) -> Value {
        let choice = match self.shape {
            Shape::Chat => {
                json!({"index": index, "delta": body, "logprobs": null, "finish_reason": finish})
            }
            Shape::Text => json!({"index": index, "text": body.as_str().unwrap_or_default(),
                                  "logprobs": null, "finish_reason": finish}),
        };
        let mut chunk = self.base();
        chunk["choices"] = json!([choice]);
        if let Some(u) = usage {
            chunk["usage"] = u;
        }
        chunk
    }

    /// A chat chunk with this `delta` (tool-call deltas).
    fn delta(&self, delta: Value) -> Event {
        let mut chunk = self.base();
        chunk["choices"] =
            json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": null}]);
        Event::default().data(chunk.to_string())
    }

    /// OpenAI's `include_usage` chunk: usage, no choices.
    fn usage(&self, usage: Value) -> Event {
        let mut chunk = self.base();
        chunk["choices"] = json!([]);
        chunk["usage"] = usage;
        Event::default().data(chunk.to_string())
    }

    fn base(&self) -> Value {
        json!({
            "id": self.id,
            "object": match self.shape {
                Shape::Chat => "chat.completion.chunk",
                Shape::Text => "text_completion",
            },
            "created": self.created,
            "model": self.model,
        })
    }
}

fn error_event(code: &str, message: &str) -> Event {
    Event::default().data(
        json!({"error": {"message": message, "type": "server_error", "param": null, "code": code}})
            .to_string(),
    )
}

/// The events that end a streamed answer once the job settled: any text the client missed
/// (it lagged behind), the finish chunk with usage, OpenAI's usage chunk if asked, `[DONE]`.
/// A chat that offered tools streams nothing until the job is done (the model's text may be a
/// call), then its text and calls as deltas.
fn closing_events(
    chunks: &Chunks,
    sent: &str,
    job: &jobs::Model,
    include_usage: bool,
    tools: Option<ToolFormat>,
) -> Vec<Event> {
    let mut events = Vec::new();
    if job.status == jobs::DONE {
        let result = job.result.as_deref().unwrap_or_default();
        let mut finish = job.finish_reason.as_deref().unwrap_or("stop").to_string();
        let more: Vec<Choice> = job
            .choices
            .as_deref()
            .and_then(|c| serde_json::from_str(c).ok())
            .unwrap_or_default();
        if !more.is_empty() {
            let first = (result, finish.as_str(), logprobs_json(job, chunks.shape));
            let others = more.iter().map(|c| {
                (
                    c.text.as_str(),
                    c.finish_reason.as_str(),
                    logprobs_value(c.logprobs.clone(), chunks.shape),
                )
            });
            let all: Vec<_> = std::iter::once(first).chain(others).collect();
            let last = all.len() - 1;
            for (i, (text, finish, logprobs)) in all.into_iter().enumerate() {
                let (bodies, finish) = match (chunks.shape, tools) {
                    (Shape::Chat, Some(format)) => {
                        tool_calls::deltas(&job.id, i, text, finish, format)
                    }
                    (Shape::Chat, None) => (vec![json!({"content": text})], finish.to_string()),
                    (Shape::Text, _) => (vec![json!(text)], finish.to_string()),
                };
                if i > 0 && matches!(chunks.shape, Shape::Chat) {
                    events.push(chunks.choice(i, json!({"role": "assistant"}), None, None));
                }
                for body in bodies {
                    events.push(chunks.choice(i, body, None, None));
                }
                // With `include_usage` the usage chunk alone carries it (clients that add
                // every chunk's usage, LangChain's, would count it twice).
                let usage = (i == last && !include_usage).then(|| usage_json(job));
                let mut closing = chunks.choice_json(i, json!({}), Some(&finish), usage);
                closing["choices"][0]["logprobs"] = logprobs;
                events.push(Event::default().data(closing.to_string()));
            }
            if include_usage {
                events.push(chunks.usage(usage_json(job)));
            }
            events.push(Event::default().data("[DONE]"));
            return events;
        }
        if let Some(format) = tools {
            let (deltas, tool_finish) = tool_calls::deltas(&job.id, 0, result, &finish, format);
            events.extend(deltas.into_iter().map(|d| chunks.delta(d)));
            finish = tool_finish;
        } else {
            let missed = result.strip_prefix(sent).unwrap_or_default();
            if !missed.is_empty() {
                events.push(chunks.event(Some(missed), false, None, None));
            }
        }
        let finish = finish.as_str();
        let tail = match chunks.shape {
            Shape::Chat => None,
            Shape::Text => Some(""),
        };
        // Usage on the finish chunk (llama-server's place for it), or, with `include_usage`,
        // only on OpenAI's usage chunk after it: never both.
        let usage = (!include_usage).then(|| usage_json(job));
        let mut last = chunks.event_json(tail, false, Some(finish), usage);
        // The answer's log-probabilities travel with the finish chunk, all at once (clients
        // append every chunk's list).
        let logprobs = logprobs_json(job, chunks.shape);
        if !logprobs.is_null() {
            last["choices"][0]["logprobs"] = logprobs;
        }
        events.push(Event::default().data(last.to_string()));
        if include_usage {
            events.push(chunks.usage(usage_json(job)));
        }
    } else {
        let reason = job.error.as_deref().unwrap_or_default();
        events.push(error_event(
            crate::errors::ErrorCode::of_job_failure(reason).as_str(),
            &format!("job {} failed: {reason} (the call was refunded)", job.id),
        ));
    }
    events.push(Event::default().data("[DONE]"));
    events
}

/// Streams an admitted job's tokens as OpenAI chunks. Every refusal (auth, quota,
/// validation) was an ordinary JSON error before the stream started; a client that disconnects
/// leaves the job to finish (it was charged) and its result stays at `GET /api/jobs/{id}`.
fn stream(js: crate::admission::JobStream, shape: Shape, streaming: Streaming) -> Response {
    let chunks = Chunks {
        id: match shape {
            Shape::Chat => format!("chatcmpl-{}", js.job.id),
            Shape::Text => format!("cmpl-{}", js.job.id),
        },
        created: js.job.queued_at.timestamp(),
        model: js.job.model.clone(),
        shape,
    };
    let job_id = js.job.id.clone();
    let opening = match shape {
        Shape::Chat => vec![chunks.event(Some(""), true, None, None)],
        Shape::Text => Vec::new(),
    };
    let include_usage = streaming.include_usage;
    // Several choices are sent whole, each with its index, once all are done (their tokens
    // arrive interleaved); so are answers that may be tool calls. One parse of the request.
    let asked = serde_json::from_str::<crate::engine::GenerationRequest>(&js.job.request).ok();
    let tools = match shape {
        Shape::Chat => asked.as_ref().and_then(tool_calls::format_in),
        Shape::Text => None,
    };
    let several = asked.is_some_and(|r| r.params.controls.n.is_some_and(|n| n > 1));
    let updates = job_updates(js.deltas, js.done)
        .map(Some)
        .chain(futures::stream::once(async { None }));
    let body = updates
        .scan(
            (String::new(), false, tools.is_some() || several),
            move |(sent, closed, lagged), update| {
                let events = match update {
                    // After a gap, deltas would not continue what the client has: the rest of the
                    // text comes in one piece with the closing events.
                    Some(JobUpdate::Delta(_)) if *lagged => Vec::new(),
                    Some(JobUpdate::Delta(text)) => {
                        sent.push_str(&text);
                        vec![chunks.event(Some(&text), false, None, None)]
                    }
                    Some(JobUpdate::Skipped(_)) => {
                        *lagged = true;
                        Vec::new()
                    }
                    Some(JobUpdate::Done(job)) => {
                        *closed = true;
                        closing_events(&chunks, sent, &job, include_usage, tools)
                    }
                    None if *closed => Vec::new(),
                    None => vec![
                        error_event(
                            "stream_interrupted",
                            &format!(
                            "the stream ended early; the result will be at GET /api/jobs/{job_id}"
                        ),
                        ),
                        Event::default().data("[DONE]"),
                    ],
                };
                futures::future::ready(Some(futures::stream::iter(events)))
            },
        )
        .flatten();
    let all = futures::stream::iter(opening)
        .chain(body)
        .map(Ok::<Event, std::convert::Infallible>);
    Sse::new(all)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// The served model and its LoRA heads (`base:adapter`), as far as this key may use them.
#[tracing::instrument(skip_all, fields(api_key))]
async fn models(State(ctx): State<AppContext>, Caller(key): Caller) -> ApiResult<Response> {
    let services = Services::from_ctx(&ctx)?;
    let remote = services.models.remote_workers().await;
    let data: Vec<Value> = available_models(&ctx.db, &services.models, &key)
        .await?
        .iter()
        .map(|id| model_entry(&services, id, &remote))
        .collect();
    Ok(Json(json!({"object": "list", "data": data})).into_response())
}

/// One model as `/v1/models` lists it, with what clients size requests by: its context length
/// (`context_length`, and vLLM's `max_model_len`) and what it does.
fn model_entry(services: &Services, id: &str, remote: &[crate::models::workers::Model]) -> Value {
    let models = &services.models;
    let base = id.split_once(':').map_or(id, |(b, _)| b);
    let context = models.context_size_of(base, remote);
    let embeddings = base == models.default_name() && services.settings.engine.embeddings.enabled;
    json!({
        "id": id,
        "object": "model",
        "created": 0,
        "owned_by": "tollgate",
        "context_length": context,
        "max_model_len": context,
        "capabilities": {"chat": true, "completion": true, "embeddings": embeddings, "tools": true},
    })
}

/// `GET /v1/models/{id}`: one model the key may use, or 404 naming those it may.
#[tracing::instrument(skip_all, fields(api_key))]
async fn model(
    State(ctx): State<AppContext>,
    Caller(key): Caller,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> ApiResult<Response> {
    let services = Services::from_ctx(&ctx)?;
    let available = available_models(&ctx.db, &services.models, &key).await?;
    let wanted = services.models.canonical(&id);
    if !available.contains(&wanted) {
        return Err(ApiError::new(
            ErrorCode::ModelNotFound,
            format!("model {id:?} does not exist; available: {available:?}"),
        ));
    }
    let remote = services.models.remote_workers().await;
    let mut entry = model_entry(&services, &wanted, &remote);
    entry["id"] = json!(id);
    Ok(Json(entry).into_response())
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub(crate) struct EmbeddingsRequest {
    #[schema(value_type = crate::openapi::schemas::EmbeddingInputs)]
    input: Value,
    model: Option<String>,
    encoding_format: Option<String>,
    dimensions: Option<i64>,
}

/// OpenAI's `input`: a string, a list of strings, one list of token ids, or a list of them.
/// Ids are the served model's own (as vLLM and llama-server read them; LangChain's tiktoken
/// ids are not); they are read back to text.
fn embedding_inputs(
    input: Value,
    tokenizer: &crate::engine::tokenizer::PromptTokenizer,
) -> ApiResult<Vec<(String, String)>> {
    let ids = |field: String, values: &[Value]| -> ApiResult<(String, String)> {
        let numbers: Vec<i64> = values
            .iter()
            .enumerate()
            .map(|(j, v)| {
                v.as_i64().ok_or_else(|| {
                    ApiError::new(
                        ErrorCode::InvalidInput,
                        format!("{field}[{j}] must be a token id"),
                    )
                })
            })
            .collect::<ApiResult<_>>()?;
        let tokens = token_ids(&numbers, |t| tokenizer.is_token(t), &field)?;
        let text = tokenizer.text_of(&tokens).map_err(|j| {
            ApiError::new(
                ErrorCode::InvalidInput,
                format!("{field}[{j}] is not a token id"),
            )
        })?;
        Ok((field, text))
    };
    match input {
        Value::String(s) => Ok(vec![("input".into(), s)]),
        Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_number) => {
            Ok(vec![ids("input".into(), &items)?])
        }
        Value::Array(items) => items
            .into_iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok((format!("input[{i}]"), s)),
                Value::Array(values) => ids(format!("input[{i}]"), &values),
                _ => Err(ApiError::new(
                    ErrorCode::InvalidInput,
                    format!("input[{i}] must be a string or a list of token ids"),
                )),
            })
            .collect(),
        _ => Err(ApiError::new(
            ErrorCode::InvalidInput,
            "`input` must be a string, a list of strings or token ids",
        )),
    }
}

/// Little-endian f32 bytes in base64, as OpenAI sends `encoding_format: "base64"`.
fn base64_vector(v: &[f32]) -> String {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// `usage` of an embedding job: prompt tokens only.
#[must_use]
pub fn embedding_usage(job: &jobs::Model) -> Value {
    json!({"prompt_tokens": job.prompt_tokens, "total_tokens": job.prompt_tokens})
}

/// `dimensions` must be the served vectors' width when given (there is no shortening).
///
/// # Errors
/// 422 `invalid_dimensions` naming the width.
pub fn check_dimensions(services: &Services, dimensions: Option<i64>) -> ApiResult<()> {
    let width = i64::from(services.models.n_embd());
    match dimensions.filter(|d| *d != width) {
        Some(d) => Err(ApiError::new(
            ErrorCode::InvalidDimensions,
            format!("this model's vectors have {width} dimensions; got dimensions = {d}"),
        )),
        None => Ok(()),
    }
}

/// The vectors an embedding job stored.
///
/// # Errors
/// 500 when the stored result is not a list of vectors.
pub fn vectors(job: &jobs::Model) -> ApiResult<Vec<Vec<f32>>> {
    serde_json::from_str(job.result.as_deref().unwrap_or("[]")).map_err(ApiError::internal)
}

/// `POST /v1/embeddings`: `data[i].embedding` per input, in order.
#[tracing::instrument(skip_all, fields(api_key))]
async fn embeddings(
    State(ctx): State<AppContext>,
    MeteredCaller(key): MeteredCaller,
    body: Result<JsonBody<EmbeddingsRequest>, ApiError>,
) -> ApiResult<Response> {
    let services = Services::from_ctx(&ctx)?;
    let JsonBody(body) = body?;
    let base64 = match body.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::new(
                ErrorCode::InvalidEncodingFormat,
                format!("encoding_format must be \"float\" or \"base64\", got {other:?}"),
            ))
        }
    };
    check_dimensions(&services, body.dimensions)?;
    let tokenizer = tokenizer_of(&services, body.model.as_deref());
    let input = EmbeddingInput::new(embedding_inputs(body.input, &tokenizer)?, body.model)?;
    let admitted = services
        .admission
        .admit(&key, input, Ticket::wait("/v1/embeddings").until_settled())
        .await?;
    try_answer(admitted, |job| {
        let data: Vec<Value> = vectors(job)?
            .iter()
            .enumerate()
            .map(|(index, v)| {
                let embedding = if base64 {
                    json!(base64_vector(v))
                } else {
                    json!(v)
                };
                json!({"object": "embedding", "index": index, "embedding": embedding})
            })
            .collect();
        Ok(json!({
            "object": "list",
            "data": data,
            "model": job.model,
            "usage": embedding_usage(job),
        }))
    })
}

pub fn routes() -> Routes {
    Routes::new()
        .prefix("/v1")
        .add("/models", axum::routing::get(models))
        .add("/models/{*id}", axum::routing::get(model))
        .add("/chat/completions", axum::routing::post(chat_completions))
        .add("/completions", axum::routing::post(completions))
        .add("/embeddings", axum::routing::post(embeddings))
        .add("/responses", axum::routing::post(responses::create))
        .add(
            "/responses/{id}",
            axum::routing::get(responses::retrieve).delete(responses::delete),
        )
        .add(
            "/responses/{id}/input_items",
            axum::routing::get(responses::list_input_items),
        )
        .add(
            "/responses/{id}/cancel",
            axum::routing::post(responses::cancel),
        )
}
