//! OpenAI's Responses API: `POST /v1/responses` (answered whole, or streamed as its typed
//! events with `stream: true`), `GET /v1/responses/{id}` (with the `instructions`, `metadata`
//! and `previous_response_id` it was made with, kept in the job's `echo`),
//! `GET /v1/responses/{id}/input_items`, `POST /v1/responses/{id}/cancel` and
//! `DELETE /v1/responses/{id}`. It is what the `openai` SDKs'
//! `client.responses` send and what agent frameworks built on them (the OpenAI Agents SDK's
//! default model, LangChain's `use_responses_api`) call; vLLM, Ollama and LiteLLM serve it.
//!
//! A thin adapter: the body becomes the chat request of `/v1/chat/completions` (`instructions`
//! a system turn, `input` items messages, `function_call`/`function_call_output` items the
//! assistant's calls and the tools' results, flat `tools` OpenAI's chat tools, `text.format`
//! the `response_format`, `include: ["message.output_text.logprobs"]` and `top_logprobs` the
//! chat's `logprobs`), so the one admission path charges, validates and queues it, and the
//! job becomes a `response` object. Earlier turns come from the key's own job records, as
//! vLLM's store keeps them: `previous_response_id` puts that response's conversation and output
//! before `input` (OpenAI's documented way to continue, and the OpenAI Agents SDK's
//! `previous_response_id`), and an input item `{"type": "item_reference", "id"}` naming an item
//! of one of the key's earlier responses (what Vercel's AI SDK sends for earlier turns, `store`
//! being its default) is that item; `conversation` objects are refused by name. A request
//! with `background: true`, or one still running when the wait ends, is answered 202 with the
//! `response` as it stands; `GET /v1/responses/{id}` reads it until its job record is purged.

use axum::{
    extract::{Path, Query, State},
    http::{header, StatusCode},
    response::{
        sse::{Event, KeepAlive, Sse},
        IntoResponse, Response,
    },
    Json,
};
use futures::StreamExt;
use loco_rs::app::AppContext;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::{
    logprobs_json, ChatRequest, Common, JsonSchemaWire, ResponseFormatWire, Shape, ADVISORY,
};
use crate::{
    admission::{
        input::{Content, WireFunctionCall, WireMessage, WireToolCall},
        Admitted, Follow, GenerationInput, JobStream, SamplerFields, Ticket,
    },
    controllers::{respond::settled, tool_calls::ToolWire},
    engine::{
        grammar::ResponseFormat,
        tools::{self, ToolChoice, ToolFormat},
        ChatMessage, GenerationRequest, Prompt,
    },
    errors::{ApiError, ApiResult, ErrorCode},
    extractors::{Caller, JsonBody, MeteredCaller},
    models::jobs,
    notify::{text_updates, TextUpdate},
    services::Services,
};

/// The endpoint recorded with each job (and the only one `GET /v1/responses/{id}` reads).
const ENDPOINT: &str = "/v1/responses";

/// `POST /v1/responses`, as OpenAI defines it
/// (<https://platform.openai.com/docs/api-reference/responses/create>).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub(crate) struct ResponsesRequest {
    model: Option<String>,
    /// A text (one user turn) or a list of items: messages (`role` and `content`, a text or
    /// `input_text`/`output_text` parts), `function_call` and `function_call_output`.
    input: Value,
    /// A system turn before `input`.
    instructions: Option<String>,
    /// A response of this key to continue: its conversation and output come before `input`.
    previous_response_id: Option<String>,
    max_output_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    #[serde(default, deserialize_with = "super::null_is_false")]
    stream: bool,
    /// Answer 202 at once with the queued `response`; read it at `GET /v1/responses/{id}`.
    background: Option<bool>,
    /// Function tools, `{"type": "function", "name", "description", "parameters", "strict"}`.
    #[schema(value_type = Option<Vec<Object>>)]
    tools: Option<Vec<Value>>,
    /// `none`, `auto`, `required`, or `{"type": "function", "name": …}`.
    tool_choice: Option<Value>,
    parallel_tool_calls: Option<bool>,
    /// `{"format": {"type": "text" | "json_object" | "json_schema", …}}`.
    #[schema(value_type = Option<Object>)]
    text: Option<Value>,
    /// Echoed in the answer.
    #[schema(value_type = Option<Object>)]
    metadata: Option<Value>,
    /// `message.output_text.logprobs` adds each output token's log-probability to the text
    /// (`reasoning.encrypted_content` is accepted: there are no reasoning items to encrypt).
    include: Option<Vec<String>>,
    /// With logprobs, this many most likely alternatives per token (0 to 20); asks for them.
    top_logprobs: Option<i64>,
    /// Every other field: accepted only where it is advisory or asks for what happens anyway.
    #[serde(flatten)]
    #[schema(ignore)]
    rest: Map<String, Value>,
}

/// What the answer repeats of the request that the job does not keep; recorded with the job
/// (its `echo`), so the response read back says the same.
#[derive(Debug, Clone, Default, serde::Serialize, Deserialize)]
struct Echo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    instructions: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    metadata: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    previous_response_id: Option<String>,
    /// How many of the recorded chat turns came before this request's own `input` (the
    /// system turn of its `instructions`, the conversation it continued): its input items
    /// are the turns after them.
    #[serde(default)]
    input_from: usize,
}

impl Echo {
    /// The echo recorded with a job (none for a job recorded before it was kept, or erased).
    fn of(job: &jobs::Model) -> Self {
        job.echo
            .as_deref()
            .and_then(|e| serde_json::from_str(e).ok())
            .unwrap_or_default()
    }
}

fn invalid_input(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::InvalidInput, message)
}

fn unsupported(field: &str, why: &str) -> ApiError {
    ApiError::new(
        ErrorCode::UnsupportedParameter,
        format!("this server does not support {field}: {why}; leave it out"),
    )
}

/// Refuses by name every other field this server would otherwise ignore.
fn check_rest(rest: &Map<String, Value>) -> ApiResult<()> {
    for (name, v) in rest {
        let inert = match name.as_str() {
            "truncation" => v.is_null() || v == "disabled",
            "reasoning" => {
                v.is_null()
                    || v.as_object()
                        .is_some_and(|o| o.values().all(Value::is_null))
            }
            "stream_options" => v.is_null() || v.is_object(),
            "conversation" | "prompt" | "max_tool_calls" => v.is_null(),
            // `null` is "not set" for every field.
            other => v.is_null() || ADVISORY.contains(&other),
        };
        if !inert {
            let why = match name.as_str() {
                "conversation" => {
                    "there are no conversation objects here; send the whole conversation in `input`, or continue a response with `previous_response_id`"
                }
                "reasoning" => "the model has no reasoning mode",
                "truncation" => "a conversation that does not fit is refused, not truncated",
                _ => "it would be ignored",
            };
            return Err(unsupported(name, why));
        }
    }
    Ok(())
}

/// The text of a message's `content`: a string, or `input_text`/`output_text`/`text` (and
/// `refusal`) parts joined.
fn content_text(at: &str, content: &Value) -> ApiResult<String> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut text = String::new();
            for (j, part) in parts.iter().enumerate() {
                let kind = part.get("type").and_then(Value::as_str).unwrap_or_default();
                let field = match kind {
                    "input_text" | "output_text" | "text" => "text",
                    "refusal" => "refusal",
                    _ => {
                        return Err(ApiError::new(
                            ErrorCode::UnsupportedContent,
                            format!(
                                "{at}.content[{j}]: content parts of type {kind:?} are not supported (text only)"
                            ),
                        ))
                    }
                };
                let Some(t) = part.get(field).and_then(Value::as_str) else {
                    return Err(invalid_input(format!(
                        "{at}.content[{j}].{field} must be a string"
                    )));
                };
                text.push_str(t);
            }
            Ok(text)
        }
        _ => Err(invalid_input(format!(
            "{at}.content must be a string or a list of content parts"
        ))),
    }
}

fn string_field<'a>(item: &'a Value, at: &str, field: &str) -> ApiResult<&'a str> {
    item.get(field)
        .and_then(Value::as_str)
        .ok_or_else(|| invalid_input(format!("{at}.{field} must be a string")))
}

fn message(role: &str, content: String) -> WireMessage {
    WireMessage {
        role: role.to_string(),
        content: Some(Content::Text(content)),
        tool_calls: None,
        tool_call_id: None,
        name: None,
    }
}

/// `instructions` and `input` as chat messages, and how many of those messages come before
/// input item `mark` (the turns a continued response put first, and the system turn).
///
/// # Errors
/// 422 `invalid_input` naming the item at fault, 422 `unsupported_content` for a part or an
/// item that is not text, a call or a call's output.
fn messages(
    instructions: Option<String>,
    input: Value,
    mark: usize,
) -> ApiResult<(Vec<WireMessage>, usize)> {
    let mut out: Vec<WireMessage> = Vec::new();
    if let Some(i) = instructions.filter(|i| !i.is_empty()) {
        out.push(message("system", i));
    }
    let mut before_mark = out.len();
    let items = match input {
        Value::String(text) => {
            out.push(message("user", text));
            return Ok((out, before_mark));
        }
        Value::Array(items) => items,
        _ => {
            return Err(invalid_input(
                "input must be a string or a list of input items",
            ))
        }
    };
    if items.is_empty() {
        return Err(invalid_input("input must hold at least one item"));
    }
    let count = items.len();
    for (i, item) in items.into_iter().enumerate() {
        if i == mark {
            before_mark = out.len();
        }
        let at = format!("input[{i}]");
        if !item.is_object() {
            return Err(invalid_input(format!("{at} must be an object")));
        }
        match item.get("type").and_then(Value::as_str) {
            None | Some("message") => {
                let role = string_field(&item, &at, "role")?;
                let content = item.get("content").unwrap_or(&Value::Null);
                let text = content_text(&at, content)?;
                out.push(message(role, text));
            }
            Some("function_call") => {
                let call = WireToolCall {
                    id: Some(string_field(&item, &at, "call_id")?.to_string()),
                    kind: Some("function".into()),
                    function: WireFunctionCall {
                        name: string_field(&item, &at, "name")?.to_string(),
                        arguments: Some(Value::String(
                            string_field(&item, &at, "arguments")?.to_string(),
                        )),
                    },
                };
                // Calls right after an assistant turn (or after each other) are that turn's.
                match out.last_mut() {
                    Some(last) if last.role == "assistant" => {
                        last.tool_calls.get_or_insert_with(Vec::new).push(call);
                    }
                    _ => out.push(WireMessage {
                        role: "assistant".into(),
                        content: None,
                        tool_calls: Some(vec![call]),
                        tool_call_id: None,
                        name: None,
                    }),
                }
            }
            Some("function_call_output") => {
                let call_id = string_field(&item, &at, "call_id")?.to_string();
                let output = match item.get("output") {
                    Some(o @ (Value::String(_) | Value::Array(_))) => content_text(&at, o)?,
                    _ => {
                        return Err(invalid_input(format!(
                            "{at}.output must be a string or a list of content parts"
                        )))
                    }
                };
                // The tool's name, from the call it answers (templates show it).
                let name = out
                    .iter()
                    .flat_map(|m| m.tool_calls.iter().flatten())
                    .find(|c| c.id.as_deref() == Some(call_id.as_str()))
                    .map(|c| c.function.name.clone());
                out.push(WireMessage {
                    role: "tool".into(),
                    content: Some(Content::Text(output)),
                    tool_calls: None,
                    tool_call_id: Some(call_id),
                    name,
                });
            }
            Some(other) => {
                return Err(ApiError::new(
                    ErrorCode::UnsupportedContent,
                    format!(
                        "{at}: items of type {other:?} are not supported (messages, function_call and function_call_output are)"
                    ),
                ))
            }
        }
    }
    if mark >= count {
        before_mark = out.len();
    }
    Ok((out, before_mark))
}

/// Flat function tools as chat tools.
///
/// # Errors
/// 400 `invalid_tools` for a tool that is not a function or has no name.
fn chat_tools(tools: Option<Vec<Value>>) -> ApiResult<Option<Vec<ToolWire>>> {
    let Some(tools) = tools else {
        return Ok(None);
    };
    let invalid = |m: String| ApiError::new(ErrorCode::InvalidTools, m);
    tools
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            let kind = t.get("type").and_then(Value::as_str).unwrap_or_default();
            if kind != "function" {
                return Err(invalid(format!(
                    "tools[{i}]: only tools of type \"function\" are supported, got {kind:?}"
                )));
            }
            let name = t.get("name").and_then(Value::as_str).ok_or_else(|| {
                invalid(format!(
                    "tools[{i}].name must be 1 to 64 of a-z, A-Z, 0-9, _ and -"
                ))
            })?;
            let description = match t.get("description") {
                None | Some(Value::Null) => None,
                Some(Value::String(d)) => Some(d.clone()),
                Some(_) => return Err(invalid(format!("tools[{i}].description must be a string"))),
            };
            let parameters = t.get("parameters").filter(|p| !p.is_null()).cloned();
            let strict = t.get("strict").and_then(Value::as_bool);
            Ok(ToolWire::function(
                name.to_string(),
                description,
                parameters,
                strict,
            ))
        })
        .collect::<ApiResult<Vec<_>>>()
        .map(Some)
}

/// `tool_choice` in the chat form (`{"type": "function", "function": {"name"}}`).
///
/// # Errors
/// 400 `invalid_tools` for another form.
fn chat_tool_choice(choice: Option<Value>) -> ApiResult<Option<Value>> {
    match choice {
        None | Some(Value::Null) => Ok(None),
        Some(s @ Value::String(_)) => Ok(Some(s)),
        Some(v) => match (
            v.get("type").and_then(Value::as_str),
            v.get("name").and_then(Value::as_str),
        ) {
            (Some("function"), Some(name)) => {
                Ok(Some(json!({"type": "function", "function": {"name": name}})))
            }
            _ => Err(ApiError::new(
                ErrorCode::InvalidTools,
                "tool_choice must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"name\": …}",
            )),
        },
    }
}

/// `text` as the chat request's `response_format`.
///
/// # Errors
/// 400 `invalid_response_format` for a format this API does not define; 400
/// `unsupported_parameter` for `text.verbosity` or another field.
fn response_format(text: Option<Value>) -> ApiResult<Option<ResponseFormatWire>> {
    let Some(text) = text.filter(|t| !t.is_null()) else {
        return Ok(None);
    };
    let Value::Object(text) = text else {
        return Err(ApiError::new(
            ErrorCode::InvalidResponseFormat,
            "text must be an object, {\"format\": {…}}",
        ));
    };
    let mut format = None;
    for (k, v) in text {
        match k.as_str() {
            "format" => format = Some(v),
            "verbosity" if v.is_null() => {}
            other => {
                return Err(unsupported(
                    &format!("text.{other}"),
                    "the answer's length follows max_output_tokens",
                ))
            }
        }
    }
    let Some(format) = format.filter(|f| !f.is_null()) else {
        return Ok(None);
    };
    let bad = || {
        ApiError::new(
            ErrorCode::InvalidResponseFormat,
            "text.format must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or {\"type\": \"json_schema\", \"name\": …, \"schema\": {…}}",
        )
    };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(Some(ResponseFormatWire::Text)),
        Some("json_object") => Ok(Some(ResponseFormatWire::JsonObject)),
        Some("json_schema") => {
            let name = format.get("name").and_then(Value::as_str).ok_or_else(bad)?;
            let description = format
                .get("description")
                .and_then(Value::as_str)
                .map(str::to_string);
            let schema = format.get("schema").filter(|s| !s.is_null()).cloned();
            Ok(Some(ResponseFormatWire::JsonSchema {
                json_schema: JsonSchemaWire {
                    name: name.to_string(),
                    description,
                    schema,
                    strict: format.get("strict").and_then(Value::as_bool),
                },
            }))
        }
        _ => Err(bad()),
    }
}

/// What `include` may ask for: log-probabilities, and the encrypted reasoning of reasoning items
/// (none are made here, so there is nothing to leave out).
const INCLUDABLE: [&str; 2] = [
    "message.output_text.logprobs",
    "reasoning.encrypted_content",
];

impl ResponsesRequest {
    /// Whether the answer's tokens carry log-probabilities (`include` or `top_logprobs`).
    ///
    /// # Errors
    /// 400 `unsupported_parameter` naming an `include` value this server cannot add.
    fn logprobs(&self) -> ApiResult<bool> {
        let include = self.include.as_deref().unwrap_or_default();
        if let Some(other) = include.iter().find(|i| !INCLUDABLE.contains(&i.as_str())) {
            return Err(unsupported(
                &format!("include {other:?}"),
                "only message.output_text.logprobs can be added",
            ));
        }
        Ok(self.top_logprobs.is_some() || include.iter().any(|i| i == INCLUDABLE[0]))
    }

    /// The request as `/v1/chat/completions` takes it, and what its answer repeats;
    /// `continued` is how many input items [`continue_from`] put before the request's own.
    fn into_chat(self, continued: usize) -> ApiResult<(ChatRequest, Echo)> {
        check_rest(&self.rest)?;
        let logprobs = self.logprobs()?;
        let instructions = self.instructions.clone();
        let (messages, input_from) = messages(self.instructions, self.input, continued)?;
        let echo = Echo {
            instructions,
            metadata: self.metadata,
            previous_response_id: self.previous_response_id,
            input_from,
        };
        let chat = ChatRequest {
            messages,
            logprobs: logprobs.then_some(true),
            top_logprobs: logprobs.then(|| self.top_logprobs.unwrap_or(0)),
            tools: chat_tools(self.tools)?,
            tool_choice: chat_tool_choice(self.tool_choice)?,
            parallel_tool_calls: self.parallel_tool_calls,
            common: Common {
                model: self.model,
                max_tokens: None,
                max_completion_tokens: self.max_output_tokens,
                temperature: self.temperature,
                top_p: self.top_p,
                seed: None,
                stop: None,
                controls: SamplerFields::default(),
                stream: self.stream,
                stream_options: None,
                n: None,
                response_format: response_format(self.text)?,
                rest: Map::new(),
            },
        };
        Ok((chat, echo))
    }
}

/// The answer's id for a job (`resp_` and the job's id).
fn response_id(job_id: &str) -> String {
    format!("resp_{job_id}")
}

fn message_id(job_id: &str) -> String {
    format!("msg_{}", job_id.replace('-', ""))
}

/// The `usage` of a `response`.
fn usage(job: &jobs::Model) -> Value {
    json!({
        "input_tokens": job.prompt_tokens,
        "input_tokens_details": {"cached_tokens": job.cached_tokens},
        "output_tokens": job.generated_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": job.prompt_tokens + job.generated_tokens,
    })
}

/// Whether the job stopped at `max_output_tokens`.
fn cut_short(job: &jobs::Model) -> bool {
    job.finish_reason.as_deref() == Some("length")
}

fn message_item(job: &jobs::Model, text: &str, status: &str) -> Value {
    json!({
        "type": "message",
        "id": message_id(&job.id),
        "status": status,
        "role": "assistant",
        "content": [text_part(text, token_logprobs(job))],
    })
}

/// An `output_text` part; `logprobs` is the list of its tokens' (empty unless asked for).
fn text_part(text: &str, logprobs: Value) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs})
}

/// The job's per-token log-probabilities as the Responses API lists them (`token`, `logprob`,
/// `bytes`, `top_logprobs`), or an empty list.
fn token_logprobs(job: &jobs::Model) -> Value {
    match logprobs_json(job, Shape::Chat)
        .get_mut("content")
        .map(Value::take)
    {
        Some(list @ Value::Array(_)) => list,
        _ => json!([]),
    }
}

/// A done job's `output`: its text as one assistant message, and, when it offered tools, each
/// call the model made as a `function_call` item (the text only when there is some).
fn output_items(job: &jobs::Model, format: Option<ToolFormat>) -> Vec<Value> {
    let text = job.result.as_deref().unwrap_or_default();
    let (content, calls) = match format {
        Some(f) => {
            let parsed = tools::parse(f, text);
            (parsed.content.unwrap_or_default(), parsed.calls)
        }
        None => (text.to_string(), Vec::new()),
    };
    let status = if cut_short(job) {
        "incomplete"
    } else {
        "completed"
    };
    let mut items = Vec::new();
    if calls.is_empty() || !content.is_empty() {
        items.push(message_item(job, &content, status));
    }
    for (i, c) in calls.iter().enumerate() {
        let call_id = tools::call_id(&job.id, 0, i);
        items.push(json!({
            "type": "function_call",
            // The job's id in it, so an `item_reference` to it finds the job.
            "id": format!("fc_{}_{i}", job.id.replace('-', "")),
            "call_id": call_id,
            "name": c.name,
            "arguments": c.arguments,
            "status": "completed",
        }));
    }
    items
}

/// The job as a `response` object: its status, output once done, and the settings it ran with.
fn response_json(job: &jobs::Model, asked: Option<&GenerationRequest>, echo: &Echo) -> Value {
    let tool_use = asked.and_then(|r| r.prompt.tools());
    let format = tool_use.map(|t| t.format);
    let status = response_status(job);
    let (output, error, incomplete) = match status {
        "incomplete" => (
            output_items(job, format),
            Value::Null,
            json!({"reason": "max_output_tokens"}),
        ),
        "completed" => (output_items(job, format), Value::Null, Value::Null),
        "failed" => {
            let reason = job.error.as_deref().unwrap_or_default();
            (
                Vec::new(),
                json!({
                    "code": ErrorCode::of_job_failure(reason).as_str(),
                    "message": format!("job {} failed: {reason} (the call was refunded)", job.id),
                }),
                Value::Null,
            )
        }
        // Queued, in progress, cancelled: nothing to show yet, or ever.
        _ => (Vec::new(), Value::Null, Value::Null),
    };
    let tools: Vec<Value> = tool_use
        .map(|t| {
            t.tools
                .iter()
                .map(|tool| {
                    json!({
                        "type": "function",
                        "name": tool.name,
                        "description": tool.description,
                        "parameters": tool.parameters,
                        "strict": false,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let tool_choice = match tool_use.map(|t| &t.choice) {
        None | Some(ToolChoice::Auto) => json!("auto"),
        Some(ToolChoice::Required) => json!("required"),
        Some(ToolChoice::Function(name)) => json!({"type": "function", "name": name}),
    };
    let text_format = match asked
        .filter(|_| tool_use.is_none())
        .and_then(|r| r.params.controls.output.as_deref())
        .map(|o| &o.format)
    {
        Some(ResponseFormat::JsonObject) => json!({"type": "json_object"}),
        Some(ResponseFormat::JsonSchema {
            name,
            schema,
            strict,
        }) => json!({"type": "json_schema", "name": name, "schema": schema, "strict": strict}),
        None => json!({"type": "text"}),
    };
    let settled = matches!(job.status.as_str(), jobs::DONE | jobs::FAILED);
    json!({
        "id": response_id(&job.id),
        "object": "response",
        "created_at": job.queued_at.timestamp(),
        "status": status,
        "error": error,
        "incomplete_details": incomplete,
        "instructions": echo.instructions,
        "max_output_tokens": asked.map(|r| r.params.max_tokens),
        "model": job.model,
        "output": output,
        "parallel_tool_calls": tool_use.is_none_or(|t| t.parallel),
        "previous_response_id": echo.previous_response_id,
        "reasoning": {"effort": null, "summary": null},
        "store": true,
        "temperature": asked.map(|r| r.params.temperature),
        "text": {"format": text_format},
        "tool_choice": tool_choice,
        "tools": tools,
        "top_p": asked.map(|r| r.params.top_p),
        "truncation": "disabled",
        "usage": if settled { usage(job) } else { Value::Null },
        "user": null,
        "metadata": echo.metadata.clone().unwrap_or_else(|| json!({})),
    })
}

fn asked_of(job: &jobs::Model) -> Option<GenerationRequest> {
    serde_json::from_str(&job.request).ok()
}

/// 202 with the `response` as it stands and where to read it.
fn pending(job: &jobs::Model, echo: &Echo) -> Response {
    let location = format!("{ENDPOINT}/{}", response_id(&job.id));
    (
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(response_json(job, asked_of(job).as_ref(), echo)),
    )
        .into_response()
}

#[tracing::instrument(skip_all, fields(api_key))]
pub(super) async fn create(
    State(ctx): State<AppContext>,
    MeteredCaller(key): MeteredCaller,
    body: Result<JsonBody<ResponsesRequest>, ApiError>,
) -> ApiResult<Response> {
    let JsonBody(body) = body?;
    let streaming = body.stream;
    let background = body.background.unwrap_or(false);
    if streaming && background {
        return Err(unsupported(
            "background with stream",
            "stream the job, or run it in the background and read it at GET /v1/responses/{id}",
        ));
    }
    let mut body = body;
    // Earlier turns sent by reference (Vercel's AI SDK) become those turns, and a response
    // continued puts its conversation first.
    resolve_references(&ctx.db, key.id, &mut body.input).await?;
    let continued = continue_from(&ctx.db, key.id, &mut body).await?;
    let (chat, echo) = body.into_chat(continued)?;
    let input = GenerationInput::try_from(chat)?;
    let services = Services::from_ctx(&ctx)?;
    let follow = match (streaming, background) {
        (true, _) => Follow::Updates,
        (false, true) => Follow::Nothing,
        (false, false) => Follow::Settled,
    };
    let ticket = Ticket::wait(ENDPOINT)
        .follow(follow)
        .echo(serde_json::to_string(&echo).ok());
    match services.admission.admit(&key, input, ticket).await? {
        Admitted::Streaming(js) => Ok(stream(js, echo)),
        Admitted::Finished(job) => {
            let job = settled(job)?;
            Ok(Json(response_json(&job, asked_of(&job).as_ref(), &echo)).into_response())
        }
        Admitted::Pending(job) => Ok(pending(&job, &echo)),
    }
}

/// The job an item's id names: an output item's `msg_<job>` or `fc_<job>_<n>`, or an input
/// item's `msg_`/`fc_`/`fco_<job>_in<n>` (the job's UUID without dashes).
fn referenced_job(id: &str) -> Option<String> {
    let rest = ["msg_", "fco_", "fc_"]
        .iter()
        .find_map(|p| id.strip_prefix(p))?;
    let hex = rest.split('_').next()?;
    uuid::Uuid::try_parse(hex).ok().map(|u| u.to_string())
}

/// The job behind one of this key's responses, named `resp_<job id>` or by the job id alone;
/// `None` for another key's, another route's, or one purged or deleted.
async fn own_response(
    db: &sea_orm::DatabaseConnection,
    key_id: i32,
    id: &str,
) -> ApiResult<Option<jobs::Model>> {
    let job_id = id.strip_prefix("resp_").unwrap_or(id);
    Ok(jobs::Model::find_for_key(db, job_id, key_id)
        .await?
        .filter(|j| j.endpoint == ENDPOINT && !j.is_purged()))
}

/// Replaces each `{"type": "item_reference", "id"}` of `input` with the item it names: an
/// input or output item of one of this key's earlier responses, read from its job record
/// (each job read once). Vercel's AI SDK sends earlier turns this way by default.
///
/// # Errors
/// 422 `invalid_input` naming an id that is no item of this key's responses (or whose job
/// record was purged).
async fn resolve_references(
    db: &sea_orm::DatabaseConnection,
    key_id: i32,
    input: &mut Value,
) -> ApiResult<()> {
    let Value::Array(items) = input else {
        return Ok(());
    };
    let mut outputs: std::collections::HashMap<String, Vec<Value>> =
        std::collections::HashMap::new();
    for (i, item) in items.iter_mut().enumerate() {
        if item.get("type").and_then(Value::as_str) != Some("item_reference") {
            continue;
        }
        let id = item
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let unknown = || {
            invalid_input(format!(
                "input[{i}]: item_reference {id:?} names no item of this key's responses; send the item itself"
            ))
        };
        let job_id = referenced_job(&id).ok_or_else(unknown)?;
        if !outputs.contains_key(&job_id) {
            let found = own_response(db, key_id, &job_id)
                .await?
                .map_or_else(Vec::new, |job| {
                    let mut items = listed_input_items(&job);
                    if job.status == jobs::DONE {
                        let format = asked_of(&job)
                            .as_ref()
                            .and_then(|r| r.prompt.tools())
                            .map(|t| t.format);
                        items.extend(output_items(&job, format));
                    }
                    items
                });
            outputs.insert(job_id.clone(), found);
        }
        *item = outputs
            .get(&job_id)
            .and_then(|o| o.iter().find(|o| o["id"] == id.as_str()))
            .cloned()
            .ok_or_else(unknown)?;
    }
    Ok(())
}

/// With `previous_response_id`, puts that response's conversation (its own earlier turns
/// included, as its job recorded them) and its output before `input`, as input items, so a
/// `function_call_output` answering one of its calls finds the call. The earlier response's
/// leading system turns are left out when this request brings `instructions` of its own
/// (OpenAI does not carry instructions over; the OpenAI Agents SDK sends them every turn).
/// Returns how many input items it put first (0 without `previous_response_id`).
///
/// # Errors
/// 404 `job_not_found` for an id that is no response of this key (or whose record was
/// purged); 422 `invalid_input` for one that has not completed, or an `input` that is neither
/// a string nor a list.
async fn continue_from(
    db: &sea_orm::DatabaseConnection,
    key_id: i32,
    body: &mut ResponsesRequest,
) -> ApiResult<usize> {
    let Some(id) = body.previous_response_id.as_deref() else {
        return Ok(0);
    };
    let not_found = || {
        ApiError::new(
            ErrorCode::JobNotFound,
            format!("previous_response_id: no response {id} of this key to continue from"),
        )
    };
    let job = own_response(db, key_id, id).await?.ok_or_else(not_found)?;
    if job.status != jobs::DONE {
        return Err(invalid_input(format!(
            "previous_response_id: response {id} is {}, not completed; continue from it once it has completed",
            job.status
        )));
    }
    let asked = asked_of(&job).ok_or_else(not_found)?;
    let Prompt::Chat {
        messages: earlier,
        tools,
    } = &asked.prompt
    else {
        return Err(not_found());
    };
    let own_instructions = body.instructions.as_deref().is_some_and(|i| !i.is_empty());
    let mut items: Vec<Value> = earlier
        .iter()
        .skip_while(|m| own_instructions && m.role == "system")
        .flat_map(input_items)
        .collect();
    items.extend(output_items(&job, tools.as_ref().map(|t| t.format)));
    let continued = items.len();
    match std::mem::take(&mut body.input) {
        Value::String(text) => items.push(json!({"role": "user", "content": text})),
        Value::Array(later) => items.extend(later),
        _ => {
            return Err(invalid_input(
                "input must be a string or a list of input items",
            ))
        }
    }
    body.input = Value::Array(items);
    Ok(continued)
}

/// A recorded turn as the input items that make it again.
fn input_items(m: &ChatMessage) -> Vec<Value> {
    if m.role == "tool" {
        return vec![json!({
            "type": "function_call_output",
            "call_id": m.tool_call_id,
            "output": m.content,
        })];
    }
    let mut items = Vec::new();
    if m.tool_calls.is_empty() || !m.content.is_empty() {
        items.push(json!({"type": "message", "role": m.role, "content": m.content}));
    }
    items.extend(m.tool_calls.iter().map(|c| {
        json!({
            "type": "function_call",
            "call_id": c.id,
            "name": c.name,
            "arguments": c.arguments,
        })
    }));
    items
}

/// 404 `job_not_found` for an id that is no response of this key.
fn no_response(id: &str) -> ApiError {
    ApiError::new(
        ErrorCode::JobNotFound,
        format!("no response {id} for this key"),
    )
}

/// The job of a response this key made, for the routes that name one by id.
///
/// # Errors
/// 404 `job_not_found` for an id that is no response of this key (or one deleted).
async fn named_response(ctx: &AppContext, key_id: i32, id: &str) -> ApiResult<jobs::Model> {
    own_response(&ctx.db, key_id, id)
        .await?
        .ok_or_else(|| no_response(id))
}

/// A stored response as it stands, with what it was created with.
fn stored(job: &jobs::Model) -> Response {
    Json(response_json(job, asked_of(job).as_ref(), &Echo::of(job))).into_response()
}

/// `GET /v1/responses/{id}`: a response this key made, as it stands, with what it was created
/// with (`instructions`, `metadata`, `previous_response_id`).
#[tracing::instrument(skip_all, fields(api_key))]
pub(super) async fn retrieve(
    State(ctx): State<AppContext>,
    Caller(key): Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let job = named_response(&ctx, key.id, &id).await?;
    Ok(stored(&job))
}

/// `DELETE /v1/responses/{id}`: erases a finished response's texts (its input, output and
/// what it echoed) now, as the retention purge would later; its usage stays counted. It can
/// no longer be read, listed, referenced or continued.
///
/// # Errors
/// 404 `job_not_found` for an id that is no response of this key (or one already deleted);
/// 409 `job_not_finished` for one still queued or running (cancel it first).
#[tracing::instrument(skip_all, fields(api_key))]
pub(super) async fn delete(
    State(ctx): State<AppContext>,
    Caller(key): Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let job = named_response(&ctx, key.id, &id).await?;
    // One conditional statement: two deletes racing each other erase it once; the loser, and
    // a response that is not finished, are told why.
    if !jobs::erase_finished(&ctx.db, &job.id, key.id).await? {
        return match jobs::Model::find_for_key(&ctx.db, &job.id, key.id).await? {
            Some(j) if !j.is_finished() => Err(ApiError::new(
                ErrorCode::JobNotFinished,
                format!(
                    "response {id} is {}; it can be deleted once it has finished (or been cancelled: POST {ENDPOINT}/{id}/cancel)",
                    response_status(&j)
                ),
            )),
            _ => Err(no_response(&id)),
        };
    }
    Ok(
        Json(json!({"id": response_id(&job.id), "object": "response", "deleted": true}))
            .into_response(),
    )
}

/// `POST /v1/responses/{id}/cancel`: stops a response that has not finished (queued, or being
/// generated: its worker stops it within a second) and refunds its call; answers it as
/// `cancelled`, as it does again for one already cancelled.
///
/// # Errors
/// 404 `job_not_found` for an id that is no response of this key; 409 `job_finished` for
/// one that finished first.
#[tracing::instrument(skip_all, fields(api_key))]
pub(super) async fn cancel(
    State(ctx): State<AppContext>,
    Caller(key): Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let mut job = named_response(&ctx, key.id, &id).await?;
    if !job.is_finished() {
        let services = Services::from_ctx(&ctx)?;
        if let Some(cancelled) = jobs::cancel(&ctx.db, &job.id, key.id).await? {
            // Whoever waits for it (here or, through the bus, elsewhere) learns it now.
            services.events.publish(&cancelled);
            job = cancelled;
        } else if let Some(now) = own_response(&ctx.db, key.id, &id).await? {
            job = now;
        }
    }
    if !job.is_cancelled() {
        return Err(ApiError::new(
            ErrorCode::JobFinished,
            format!(
                "response {id} is {}; only one that has not finished can be cancelled",
                response_status(&job)
            ),
        ));
    }
    Ok(stored(&job))
}

/// A response's `status` as the Responses API names it.
fn response_status(job: &jobs::Model) -> &'static str {
    match job.status.as_str() {
        jobs::QUEUED => "queued",
        jobs::RUNNING => "in_progress",
        jobs::DONE if cut_short(job) => "incomplete",
        jobs::DONE => "completed",
        _ if job.is_cancelled() => "cancelled",
        _ => "failed",
    }
}

/// A response's own input (not its `instructions`, nor the conversation it continued) as the
/// items `GET /v1/responses/{id}/input_items` lists, oldest first, each with an id that
/// `item_reference` also takes (`msg_`/`fc_`/`fco_`, the job, `in` and its place).
fn listed_input_items(job: &jobs::Model) -> Vec<Value> {
    let Some(Prompt::Chat { messages, .. }) = asked_of(job).map(|r| r.prompt) else {
        return Vec::new();
    };
    let hex = job.id.replace('-', "");
    messages
        .iter()
        .skip(Echo::of(job).input_from)
        .flat_map(input_items)
        .enumerate()
        .map(|(n, mut item)| {
            let prefix = match item["type"].as_str() {
                Some("function_call") => "fc",
                Some("function_call_output") => "fco",
                _ => "msg",
            };
            if prefix == "msg" {
                let text = item["content"].take();
                let part = if item["role"] == "assistant" {
                    json!({"type": "output_text", "text": text, "annotations": []})
                } else {
                    json!({"type": "input_text", "text": text})
                };
                item["content"] = json!([part]);
            }
            item["id"] = json!(format!("{prefix}_{hex}_in{n}"));
            item["status"] = json!("completed");
            item
        })
        .collect()
}

/// `GET /v1/responses/{id}/input_items` query: OpenAI's cursor pagination.
#[derive(Debug, Default)]
struct ItemsPage {
    limit: usize,
    ascending: bool,
    after: Option<String>,
}

impl ItemsPage {
    /// # Errors
    /// 422 `invalid_query` for a bad `limit` or `order`; 400 `unsupported_parameter` naming
    /// any other parameter (`include` included: input items carry nothing more to add).
    fn parse(pairs: Vec<(String, String)>) -> ApiResult<Self> {
        let mut page = Self {
            limit: 20,
            ..Self::default()
        };
        for (name, value) in pairs {
            match name.as_str() {
                "limit" => {
                    page.limit = value
                        .parse()
                        .ok()
                        .filter(|l| (1..=100).contains(l))
                        .ok_or_else(|| {
                            ApiError::new(
                                ErrorCode::InvalidQuery,
                                format!(
                                    "limit must be a whole number from 1 to 100, got {value:?}"
                                ),
                            )
                        })?;
                }
                "order" => {
                    page.ascending = match value.as_str() {
                        "asc" => true,
                        "desc" => false,
                        _ => {
                            return Err(ApiError::new(
                                ErrorCode::InvalidQuery,
                                format!("order must be asc or desc, got {value:?}"),
                            ))
                        }
                    };
                }
                "after" => page.after = Some(value),
                other => {
                    return Err(unsupported(
                        &format!("the query parameter {other}"),
                        "input items are listed with limit, order and after only",
                    ))
                }
            }
        }
        Ok(page)
    }

    /// This page of `items` (oldest first) as OpenAI's `list` object.
    fn of(&self, mut items: Vec<Value>) -> ApiResult<Value> {
        if !self.ascending {
            items.reverse();
        }
        let start = match &self.after {
            None => 0,
            Some(after) => {
                items
                    .iter()
                    .position(|i| i["id"] == after.as_str())
                    .ok_or_else(|| {
                        ApiError::new(
                            ErrorCode::InvalidQuery,
                            format!("after: {after:?} is no input item of this response"),
                        )
                    })?
                    + 1
            }
        };
        let has_more = items.len() > start + self.limit;
        let data: Vec<Value> = items.into_iter().skip(start).take(self.limit).collect();
        Ok(json!({
            "object": "list",
            "data": data,
            "first_id": data.first().map(|i| i["id"].clone()),
            "last_id": data.last().map(|i| i["id"].clone()),
            "has_more": has_more,
        }))
    }
}

/// `GET /v1/responses/{id}/input_items`: the items of a response's own input, newest first
/// unless `order=asc`, `limit` (1 to 100, default 20) at a time after the item `after`.
#[tracing::instrument(skip_all, fields(api_key))]
pub(super) async fn list_input_items(
    State(ctx): State<AppContext>,
    Caller(key): Caller,
    Path(id): Path<String>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> ApiResult<Response> {
    let page = ItemsPage::parse(pairs)?;
    let job = named_response(&ctx, key.id, &id).await?;
    Ok(Json(page.of(listed_input_items(&job))?).into_response())
}

/// One event of a streamed response: its `type` and fields (its `sequence_number` is added as
/// it is sent).
fn event(kind: &str, mut fields: Value) -> Value {
    fields["type"] = json!(kind);
    fields
}

/// The events of an output item that arrives whole (a call, or the text of an answer that
/// offered tools): added, its content, done.
fn whole_item(item: &Value, output_index: usize) -> Vec<Value> {
    let mut opened = item.clone();
    opened["status"] = json!("in_progress");
    let mut out = Vec::new();
    let id = item["id"].clone();
    if item["type"] == "function_call" {
        opened["arguments"] = json!("");
        out.push(event(
            "response.output_item.added",
            json!({"output_index": output_index, "item": opened}),
        ));
        out.push(event(
            "response.function_call_arguments.delta",
            json!({"item_id": id, "output_index": output_index, "delta": item["arguments"]}),
        ));
        out.push(event(
            "response.function_call_arguments.done",
            json!({"item_id": id, "output_index": output_index, "name": item["name"],
                   "arguments": item["arguments"]}),
        ));
    } else {
        opened["content"] = json!([]);
        out.push(event(
            "response.output_item.added",
            json!({"output_index": output_index, "item": opened}),
        ));
        let part = &item["content"][0];
        let text = part["text"].as_str().unwrap_or_default();
        out.extend(text_events(&id, output_index, false, text, part));
    }
    out.push(event(
        "response.output_item.done",
        json!({"output_index": output_index, "item": item}),
    ));
    out
}

/// The `output_text` part `part` opened (unless a streamed piece `opened` it), `delta` (the
/// text not sent yet), and the part closed whole (its log-probabilities included).
fn text_events(
    item_id: &Value,
    output_index: usize,
    opened: bool,
    delta: &str,
    part: &Value,
) -> Vec<Value> {
    let text = part["text"].as_str().unwrap_or_default();
    let at = json!({"item_id": item_id, "output_index": output_index, "content_index": 0});
    let with = |extra: Value| {
        let mut v = at.clone();
        if let (Some(v), Value::Object(extra)) = (v.as_object_mut(), extra) {
            v.extend(extra);
        }
        v
    };
    let mut out = Vec::new();
    if !opened {
        out.push(event(
            "response.content_part.added",
            with(json!({"part": text_part("", json!([]))})),
        ));
    }
    if !delta.is_empty() {
        out.push(event(
            "response.output_text.delta",
            with(json!({"delta": delta, "logprobs": []})),
        ));
    }
    out.push(event(
        "response.output_text.done",
        with(json!({"text": text, "logprobs": part["logprobs"]})),
    ));
    out.push(event(
        "response.content_part.done",
        with(json!({"part": part})),
    ));
    out
}

/// The events that end a streamed response once its job settled.
fn closing_events(
    job: &jobs::Model,
    asked: Option<&GenerationRequest>,
    echo: &Echo,
    live: bool,
    opened: bool,
    rest: &str,
) -> Vec<Value> {
    let response = response_json(job, asked, echo);
    let mut out = Vec::new();
    if job.status == jobs::DONE {
        let items = response["output"].as_array().cloned().unwrap_or_default();
        for (i, item) in items.iter().enumerate() {
            if live && i == 0 {
                // The text streamed as it came: the rest of it, then the item closed.
                out.extend(text_events(
                    &item["id"],
                    0,
                    opened,
                    rest,
                    &item["content"][0],
                ));
                out.push(event(
                    "response.output_item.done",
                    json!({"output_index": 0, "item": item}),
                ));
            } else {
                out.extend(whole_item(item, i));
            }
        }
    }
    let kind = match response["status"].as_str() {
        Some("completed") => "response.completed",
        Some("incomplete") => "response.incomplete",
        _ => "response.failed",
    };
    out.push(event(kind, json!({"response": response})));
    out
}

/// Streams an admitted job as the Responses API's events. An answer that may hold tool calls
/// is sent once the job is done (the model's text may be a call); any other streams its text
/// as it is generated. A client that disconnects leaves the job to finish (it was charged).
fn stream(js: JobStream, echo: Echo) -> Response {
    let asked = asked_of(&js.job);
    // Text streams live unless the answer may be calls.
    let live = asked.as_ref().is_none_or(|r| r.prompt.tools().is_none());
    let mut created = response_json(&js.job, asked.as_ref(), &echo);
    created["status"] = json!("in_progress");
    let item_id = json!(message_id(&js.job.id));
    let mut opening = vec![
        event("response.created", json!({"response": created.clone()})),
        event("response.in_progress", json!({"response": created})),
    ];
    if live {
        let mut item = message_item(&js.job, "", "in_progress");
        item["content"] = json!([]);
        opening.push(event(
            "response.output_item.added",
            json!({"output_index": 0, "item": item}),
        ));
    }
    let job_id = js.job.id.clone();
    // Whether a piece has opened the text part yet.
    let mut opened = false;
    let body = text_updates(js.deltas, js.done, !live)
        .map(move |update| match update {
            TextUpdate::Piece(text) => {
                let mut out = Vec::new();
                if !opened {
                    opened = true;
                    out.push(event(
                        "response.content_part.added",
                        json!({"item_id": item_id, "output_index": 0, "content_index": 0,
                               "part": text_part("", json!([]))}),
                    ));
                }
                out.push(event(
                    "response.output_text.delta",
                    json!({"item_id": item_id, "output_index": 0, "content_index": 0,
                           "delta": text, "logprobs": []}),
                ));
                futures::stream::iter(out)
            }
            TextUpdate::Settled(job, rest) => futures::stream::iter(closing_events(
                &job,
                asked.as_ref(),
                &echo,
                live,
                opened,
                &rest,
            )),
            TextUpdate::Ended => futures::stream::iter(vec![event(
                "error",
                json!({
                    "code": "stream_interrupted",
                    "message": format!("the stream ended early; the response will be at GET {ENDPOINT}/{}", response_id(&job_id)),
                    "param": null,
                }),
            )]),
        })
        .flatten();
    let numbered = futures::stream::iter(opening)
        .chain(body)
        .enumerate()
        .map(|(n, mut v)| {
            v["sequence_number"] = json!(n);
            let kind = v["type"].as_str().unwrap_or("message").to_string();
            Ok::<Event, std::convert::Infallible>(Event::default().event(kind).data(v.to_string()))
        });
    Sse::new(numbered)
        .keep_alive(KeepAlive::default())
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(body: Value) -> ResponsesRequest {
        serde_json::from_value(body).expect("a request body")
    }

    #[test]
    fn items_become_chat_turns_with_calls_merged_into_the_assistant_turn() {
        let (chat, echo) = request(json!({
            "model": "m",
            "instructions": "be brief",
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "weather "}, {"type": "input_text", "text": "in Paris?"}]},
                {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
                {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": "{\"city\":\"Paris\"}"},
                {"type": "function_call", "call_id": "c2", "name": "time", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
                {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "noon"}]},
            ],
            "max_output_tokens": 7,
            "metadata": {"a": "b"},
            "store": false,
            "include": [],
        }))
        .into_chat(0)
        .expect("converts");
        let m = &chat.messages;
        assert_eq!(m.len(), 5, "{m:?}");
        assert_eq!(m[0].role, "system");
        assert!(matches!(&m[1].content, Some(Content::Text(t)) if t == "weather in Paris?"));
        assert_eq!(m[2].role, "assistant");
        let calls = m[2].tool_calls.as_ref().expect("calls merged");
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[1].function.name, "time");
        assert_eq!(m[3].tool_call_id.as_deref(), Some("c1"));
        assert_eq!(m[3].name.as_deref(), Some("weather"));
        assert!(matches!(&m[4].content, Some(Content::Text(t)) if t == "noon"));
        assert_eq!(chat.common.max_completion_tokens, Some(7));
        assert_eq!(echo.instructions.as_deref(), Some("be brief"));
        assert_eq!(echo.metadata, Some(json!({"a": "b"})));
    }

    #[test]
    fn flat_tools_and_named_choice_become_the_chat_forms() {
        let (chat, _) = request(json!({
            "input": "hi",
            "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
            "tool_choice": {"type": "function", "name": "f"},
            "text": {"format": {"type": "json_schema", "name": "out", "schema": {"type": "object"}}},
        }))
        .into_chat(0)
        .expect("converts");
        assert_eq!(chat.tools.as_ref().map(Vec::len), Some(1));
        assert_eq!(
            chat.tool_choice,
            Some(json!({"type": "function", "function": {"name": "f"}}))
        );
        assert!(matches!(
            chat.common.response_format,
            Some(ResponseFormatWire::JsonSchema { .. })
        ));
    }

    #[test]
    fn fields_it_cannot_honour_are_refused_by_name() {
        for (field, value, code) in [
            ("conversation", json!("conv_1"), "unsupported_parameter"),
            (
                "include",
                json!(["file_search_call.results"]),
                "unsupported_parameter",
            ),
            ("truncation", json!("auto"), "unsupported_parameter"),
            (
                "reasoning",
                json!({"effort": "high"}),
                "unsupported_parameter",
            ),
            ("seed", json!(1), "unsupported_parameter"),
            ("tools", json!([{"type": "web_search"}]), "invalid_tools"),
            (
                "text",
                json!({"format": {"type": "xml"}}),
                "invalid_response_format",
            ),
            ("text", json!({"verbosity": "low"}), "unsupported_parameter"),
            (
                "input",
                json!([{"type": "reasoning", "summary": []}]),
                "unsupported_content",
            ),
            (
                "input",
                json!([{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]),
                "unsupported_content",
            ),
            ("input", json!([]), "invalid_input"),
            ("input", json!(3), "invalid_input"),
            (
                "input",
                json!([{"type": "function_call", "name": "f"}]),
                "invalid_input",
            ),
        ] {
            let mut body = json!({"input": "hi"});
            body[field] = value.clone();
            let err = request(body).into_chat(0).expect_err("refused");
            assert_eq!(err.code.as_str(), code, "{field}: {value}");
            if code == "unsupported_parameter" {
                assert!(err.message.contains(field), "{}", err.message);
            }
        }
    }

    fn job(status: &str, result: &str, finish: &str, request: &GenerationRequest) -> jobs::Model {
        let at = chrono::Utc::now().fixed_offset();
        jobs::Model {
            created_at: at,
            updated_at: at,
            id: "0000-aaaa".into(),
            api_key_id: 1,
            status: status.into(),
            endpoint: ENDPOINT.into(),
            model: "m".into(),
            request: serde_json::to_string(request).expect("serializes"),
            result: Some(result.into()),
            error: None,
            prompt_tokens: 5,
            generated_tokens: 3,
            finish_reason: Some(finish.into()),
            attempts: 1,
            refunded: false,
            worker: None,
            queued_at: at,
            started_at: None,
            finished_at: None,
            client_ref: None,
            user_id: None,
            reserved_prompt_tokens: 0,
            reserved_gen_tokens: 0,
            logprobs: None,
            choices: None,
            cached_tokens: 0,
            echo: None,
        }
    }

    #[test]
    fn a_done_job_is_a_completed_response_and_a_cut_one_is_incomplete() {
        use crate::engine::{Prompt, SamplingParams};
        let asked = GenerationRequest {
            model: "m".into(),
            prompt: Prompt::chat(vec![]),
            params: SamplingParams::greedy(3),
            adapter: None,
        };
        let done = response_json(
            &job(jobs::DONE, "hello", "stop", &asked),
            Some(&asked),
            &Echo::default(),
        );
        assert_eq!(done["status"], "completed");
        assert_eq!(done["output"][0]["content"][0]["text"], "hello");
        assert_eq!(done["usage"]["total_tokens"], 8);
        assert_eq!(done["tool_choice"], "auto");
        let cut = response_json(
            &job(jobs::DONE, "hel", "length", &asked),
            Some(&asked),
            &Echo::default(),
        );
        assert_eq!(cut["status"], "incomplete");
        assert_eq!(cut["incomplete_details"]["reason"], "max_output_tokens");
        let queued = response_json(
            &job(jobs::QUEUED, "", "", &asked),
            Some(&asked),
            &Echo::default(),
        );
        assert_eq!(queued["status"], "queued");
        assert_eq!(queued["output"], json!([]));
        assert_eq!(queued["usage"], Value::Null);
        // Streamed: the live text's rest, the item closed, the terminal event with the response.
        let events = closing_events(
            &job(jobs::DONE, "hello", "stop", &asked),
            Some(&asked),
            &Echo::default(),
            true,
            true,
            "llo",
        );
        let kinds: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
        assert_eq!(
            kinds,
            [
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.completed"
            ]
        );
        assert_eq!(events[0]["delta"], "llo");
        assert_eq!(
            events[4]["response"]["output"][0]["content"][0]["text"],
            "hello"
        );
    }

    #[test]
    fn item_ids_name_their_job_whether_input_or_output() {
        let job = "0b5c6f2e-8d3a-4f61-9a0e-1c2d3e4f5a6b";
        let hex = job.replace('-', "");
        for id in [
            format!("msg_{hex}"),
            format!("fc_{hex}_0"),
            format!("msg_{hex}_in2"),
            format!("fc_{hex}_in3"),
            format!("fco_{hex}_in4"),
        ] {
            assert_eq!(referenced_job(&id).as_deref(), Some(job), "{id}");
        }
        for id in ["msg_", "fc_nothex_0", "rs_abc", &hex] {
            assert_eq!(referenced_job(id), None, "{id}");
        }
    }

    #[test]
    fn input_items_are_paged_newest_first_unless_asked() {
        let items: Vec<Value> = (0..5).map(|n| json!({"id": format!("i{n}")})).collect();
        let ids = |page: &Value| -> Vec<String> {
            page["data"]
                .as_array()
                .map(|d| {
                    d.iter()
                        .map(|i| i["id"].as_str().unwrap_or("?").to_string())
                        .collect()
                })
                .unwrap_or_default()
        };
        let pairs = |q: &[(&str, &str)]| -> Vec<(String, String)> {
            q.iter().map(|(a, b)| ((*a).into(), (*b).into())).collect()
        };
        let page = |q: &[(&str, &str)]| {
            ItemsPage::parse(pairs(q))
                .and_then(|p| p.of(items.clone()))
                .map_err(|e| e.code.as_str())
        };
        let all = page(&[]).expect("default page");
        assert_eq!(ids(&all), ["i4", "i3", "i2", "i1", "i0"]);
        assert_eq!(
            (all["first_id"].clone(), all["has_more"].clone()),
            (json!("i4"), json!(false))
        );
        let first = page(&[("order", "asc"), ("limit", "2")]).expect("page");
        assert_eq!(
            (ids(&first), first["has_more"].clone()),
            (vec!["i0".into(), "i1".into()], json!(true))
        );
        let last = page(&[("order", "asc"), ("limit", "2"), ("after", "i3")]).expect("page");
        assert_eq!(
            (ids(&last), last["has_more"].clone()),
            (vec!["i4".into()], json!(false))
        );
        let empty = page(&[("after", "i0")]).expect("past the end");
        assert_eq!(
            (empty["data"].clone(), empty["first_id"].clone()),
            (json!([]), Value::Null)
        );
        assert_eq!(page(&[("limit", "0")]).err(), Some("invalid_query"));
        assert_eq!(page(&[("limit", "x")]).err(), Some("invalid_query"));
        assert_eq!(page(&[("order", "up")]).err(), Some("invalid_query"));
        assert_eq!(page(&[("after", "nope")]).err(), Some("invalid_query"));
        assert_eq!(
            page(&[("before", "i1")]).err(),
            Some("unsupported_parameter")
        );
    }

    #[test]
    fn the_turns_before_a_requests_own_input_are_counted_in_the_same_pass() {
        let items = json!([
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "x"},
        ]);
        let count = |instructions: Option<&str>, input: Value, mark| {
            messages(instructions.map(str::to_string), input, mark)
                .map(|(m, before)| (m.len(), before))
                .map_err(|e| e.code.as_str())
        };
        // The call merges into the assistant turn: four items, three turns (plus the system one).
        assert_eq!(count(Some("sys"), items.clone(), 0), Ok((4, 1)));
        assert_eq!(count(Some("sys"), items.clone(), 2), Ok((4, 3)));
        assert_eq!(count(None, items.clone(), 3), Ok((3, 2)));
        assert_eq!(count(None, items.clone(), 4), Ok((3, 3)), "no own items");
        assert_eq!(count(Some("sys"), json!("hi"), 0), Ok((2, 1)));
        assert_eq!(count(None, json!([]), 0), Err("invalid_input"));
    }
}
