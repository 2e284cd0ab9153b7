//! OpenAI-compatible routes: `GET /v1/models`, `POST /v1/chat/completions`,
//! `POST /v1/completions`, with or without `stream: true` (server-sent events ending in
//! `data: [DONE]`). Spec: <https://platform.openai.com/docs/api-reference>.
//! Same key auth, quota, queue and worker as every other generation route.
//!
//! A LoRA head is a model of its own here, `base:adapter` (as OpenAI names fine-tuned models),
//! listed by `/v1/models` for the keys allowed to use it. `/v1/embeddings` lives with the other
//! embedding route in [`super::embeddings`].

use axum::{
    extract::State,
    response::{
        sse::{Event, KeepAlive, Sse},
        IntoResponse, Response,
    },
    Json,
};
use futures::StreamExt;
use loco_rs::{app::AppContext, controller::Routes};
use serde::Deserialize;
use serde_json::{json, Value};

use super::api::{run, usage_json};
use crate::{
    engine::{ChatMessage, GenerationRequest, Prompt},
    errors::{ApiError, ApiResult},
    extractors::{ApiKey, JsonBody},
    models::{api_keys, jobs},
    notify::{job_updates, JobUpdate},
    services::{ModelChoice, Services},
    validation::{prompt_text, SamplingInput, StopWords},
};

/// Roles a chat message may have.
const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// Message content: a string, or OpenAI's list of content parts (text parts only).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct WireMessage {
    role: String,
    content: Option<Content>,
}

/// Fields shared by both completion routes.
#[derive(Debug, Deserialize)]
struct Common {
    model: Option<String>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    seed: Option<i64>,
    stop: Option<StopWords>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    n: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
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

#[derive(Debug, Deserialize)]
struct ChatRequest {
    messages: Vec<WireMessage>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    prompt: String,
    #[serde(flatten)]
    common: Common,
}

fn chat_messages(wire: Vec<WireMessage>) -> ApiResult<Vec<ChatMessage>> {
    if wire.is_empty() {
        return Err(ApiError::unprocessable(
            "invalid_messages",
            "`messages` must contain at least one message",
        ));
    }
    wire.into_iter()
        .enumerate()
        .map(|(i, m)| {
            if !ROLES.contains(&m.role.as_str()) {
                return Err(ApiError::unprocessable(
                    "invalid_role",
                    format!(
                        "messages[{i}].role must be one of {ROLES:?}, got {:?}",
                        m.role
                    ),
                ));
            }
            let content = match m.content {
                None => String::new(),
                Some(Content::Text(t)) => t,
                Some(Content::Parts(parts)) => {
                    if let Some(p) = parts.iter().find(|p| p.kind != "text") {
                        return Err(ApiError::unprocessable(
                            "unsupported_content",
                            format!(
                                "messages[{i}]: content parts of type {:?} are not supported",
                                p.kind
                            ),
                        ));
                    }
                    parts
                        .into_iter()
                        .filter_map(|p| p.text)
                        .collect::<Vec<_>>()
                        .join("")
                }
            };
            if content.contains('\0') {
                return Err(ApiError::unprocessable(
                    "invalid_prompt",
                    format!("messages[{i}].content must not contain NUL characters"),
                ));
            }
            Ok(ChatMessage {
                role: m.role,
                content,
            })
        })
        .collect()
}

/// Checks the request against what this server serves and builds the engine request.
async fn build_request(
    ctx: &AppContext,
    services: &Services,
    key: &crate::models::api_keys::Model,
    common: Common,
    prompt: Prompt,
) -> ApiResult<GenerationRequest> {
    if common.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad_request(
            "invalid_n",
            "only n = 1 is supported",
        ));
    }
    let sampling = SamplingInput {
        max_tokens: common.max_completion_tokens.or(common.max_tokens),
        temperature: common.temperature,
        top_p: common.top_p,
        seed: common.seed,
        stop: common.stop,
    };
    let params = sampling.into_params(&services.settings.api)?;
    let choice = ModelChoice {
        model: common.model,
        ..ModelChoice::default()
    };
    let resolved = services.resolve_model(&ctx.db, key, choice).await?;
    Ok(resolved.request(prompt, params))
}

#[tracing::instrument(skip_all, fields(api_key))]
async fn chat_completions(
    State(ctx): State<AppContext>,
    ApiKey(key): ApiKey,
    body: Result<JsonBody<ChatRequest>, ApiError>,
) -> ApiResult<Response> {
    let services = Services::from_ctx(&ctx)?;
    services.precheck(&key).await?;
    let JsonBody(body) = body?;
    let messages = chat_messages(body.messages)?;
    let streaming = body.common.streaming();
    let request = build_request(
        &ctx,
        &services,
        &key,
        body.common,
        Prompt::Chat { messages },
    )
    .await?;
    if streaming.on {
        return stream(
            &ctx,
            &services,
            &key,
            "/v1/chat/completions",
            request,
            Shape::Chat,
            streaming,
        )
        .await;
    }
    run(&ctx, &services, &key, "/v1/chat/completions", request, None, |job| {
        json!({
            "id": format!("chatcmpl-{}", job.id),
            "object": "chat.completion",
            "created": job.queued_at.timestamp(),
            "model": job.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": job.result.clone().unwrap_or_default()},
                "finish_reason": job.finish_reason,
                "logprobs": null,
            }],
            "usage": usage_json(job),
        })
    })
    .await
}

#[tracing::instrument(skip_all, fields(api_key))]
async fn completions(
    State(ctx): State<AppContext>,
    ApiKey(key): ApiKey,
    body: Result<JsonBody<CompletionRequest>, ApiError>,
) -> ApiResult<Response> {
    let services = Services::from_ctx(&ctx)?;
    services.precheck(&key).await?;
    let JsonBody(body) = body?;
    prompt_text("prompt", &body.prompt)?;
    let streaming = body.common.streaming();
    let prompt = Prompt::Raw { text: body.prompt };
    let request = build_request(&ctx, &services, &key, body.common, prompt).await?;
    if streaming.on {
        return stream(
            &ctx,
            &services,
            &key,
            "/v1/completions",
            request,
            Shape::Text,
            streaming,
        )
        .await;
    }
    run(
        &ctx,
        &services,
        &key,
        "/v1/completions",
        request,
        None,
        |job| {
            json!({
                "id": format!("cmpl-{}", job.id),
                "object": "text_completion",
                "created": job.queued_at.timestamp(),
                "model": job.model,
                "choices": [{
                    "index": 0,
                    "text": job.result.clone().unwrap_or_default(),
                    "finish_reason": job.finish_reason,
                    "logprobs": null,
                }],
                "usage": usage_json(job),
            })
        },
    )
    .await
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
fn closing_events(
    chunks: &Chunks,
    sent: &str,
    job: &jobs::Model,
    include_usage: bool,
) -> Vec<Event> {
    let mut events = Vec::new();
    if job.status == jobs::DONE {
        let result = job.result.as_deref().unwrap_or_default();
        let missed = result.strip_prefix(sent).unwrap_or_default();
        if !missed.is_empty() {
            events.push(chunks.event(Some(missed), false, None, None));
        }
        let finish = job.finish_reason.as_deref().unwrap_or("stop");
        let tail = match chunks.shape {
            Shape::Chat => None,
            Shape::Text => Some(""),
        };
        events.push(chunks.event(tail, false, Some(finish), Some(usage_json(job))));
        if include_usage {
            events.push(chunks.usage(usage_json(job)));
        }
    } else {
        events.push(error_event(
            "generation_failed",
            &format!(
                "job {} failed: {} (the call was refunded)",
                job.id,
                job.error.as_deref().unwrap_or_default()
            ),
        ));
    }
    events.push(Event::default().data("[DONE]"));
    events
}

/// Queues the request and streams its tokens as OpenAI chunks. Every refusal (auth, quota,
/// validation) is an ordinary JSON error before the stream starts; a client that disconnects
/// leaves the job to finish (it was charged) and its result stays at `GET /api/jobs/{id}`.
async fn stream(
    ctx: &AppContext,
    services: &Services,
    key: &api_keys::Model,
    endpoint: &str,
    request: GenerationRequest,
    shape: Shape,
    streaming: Streaming,
) -> ApiResult<Response> {
    let js = services
        .submit_streaming(&ctx.db, key, endpoint, request)
        .await?;
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
    let updates = job_updates(js.deltas, js.done)
        .map(Some)
        .chain(futures::stream::once(async { None }));
    let body = updates
        .scan((String::new(), false), move |(sent, closed), update| {
            let events = match update {
                Some(JobUpdate::Delta(text)) => {
                    sent.push_str(&text);
                    vec![chunks.event(Some(&text), false, None, None)]
                }
                Some(JobUpdate::Skipped(_)) => Vec::new(),
                Some(JobUpdate::Done(job)) => {
                    *closed = true;
                    closing_events(&chunks, sent, &job, include_usage)
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
        })
        .flatten();
    let all = futures::stream::iter(opening)
        .chain(body)
        .map(Ok::<Event, std::convert::Infallible>);
    Ok(Sse::new(all)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// The served model and its LoRA heads (`base:adapter`), as far as this key may use them.
async fn models(State(ctx): State<AppContext>, ApiKey(key): ApiKey) -> ApiResult<Response> {
    let services = Services::from_ctx(&ctx)?;
    let data: Vec<_> = services
        .available_models(&ctx.db, &key)
        .await?
        .into_iter()
        .map(|id| {
            json!({
                "id": id,
                "object": "model",
                "created": 0,
                "owned_by": "tollgate",
            })
        })
        .collect();
    Ok(Json(json!({"object": "list", "data": data})).into_response())
}

pub fn routes() -> Routes {
    Routes::new()
        .prefix("/v1")
        .add("/models", axum::routing::get(models))
        .add("/chat/completions", axum::routing::post(chat_completions))
        .add("/completions", axum::routing::post(completions))
}
