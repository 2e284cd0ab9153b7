//! OpenAI-compatible routes: `GET /v1/models`, `POST /v1/chat/completions`,
//! `POST /v1/completions` (non-streaming). Spec: <https://platform.openai.com/docs/api-reference>.
//! Same key auth, quota, queue and worker as every other generation route.
//!
//! A LoRA head is a model of its own here, `base:adapter` (as OpenAI names fine-tuned models),
//! listed by `/v1/models` for the keys allowed to use it. `/v1/embeddings` lives with the other
//! embedding route in [`super::embeddings`].

use axum::{
    extract::State,
    response::{IntoResponse, Response},
    Json,
};
use loco_rs::{app::AppContext, controller::Routes};
use serde::Deserialize;
use serde_json::json;

use super::api::{run, usage_json};
use crate::{
    engine::{ChatMessage, GenerationRequest, Prompt},
    errors::{ApiError, ApiResult},
    extractors::{ApiKey, JsonBody},
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
    n: Option<i64>,
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
    if common.stream {
        return Err(ApiError::bad_request(
            "streaming_unsupported",
            "stream: true is not supported yet; send stream: false",
        ));
    }
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
    services.precheck(&key)?;
    let JsonBody(body) = body?;
    let messages = chat_messages(body.messages)?;
    let request = build_request(
        &ctx,
        &services,
        &key,
        body.common,
        Prompt::Chat { messages },
    )
    .await?;
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
    services.precheck(&key)?;
    let JsonBody(body) = body?;
    prompt_text("prompt", &body.prompt)?;
    let prompt = Prompt::Raw { text: body.prompt };
    let request = build_request(&ctx, &services, &key, body.common, prompt).await?;
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
