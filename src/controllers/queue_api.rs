//! Seed 001's queue-based API: `POST /generate` (`content`) and `POST /chat_completion`
//! (`messages`), each with a client `job_id` and `meta {temperature, tokens_limit, stop_words,
//! model}`, answering `{"content": …}`. Spec: ../shared/seeds/001.
//!
//! `job_id` is idempotent per key: a repeat returns the first job's result (or its status while
//! it runs) and is never generated or charged twice.
//!
//! Seed 000 uses the same `POST /generate` with a LoRA head: `lora` (alias `head`) names a
//! registered adapter and `scale` sets its strength, at the top level or inside `meta`; its
//! clients send the text as `prompt`, accepted as an alias of `content`.

use axum::{extract::State, response::Response};
use loco_rs::{app::AppContext, controller::Routes};
use serde::Deserialize;
use serde_json::json;

use super::api::run;
use crate::{
    engine::{ChatMessage, GenerationRequest, Prompt},
    errors::{ApiError, ApiResult},
    extractors::{ApiKey, JsonBody},
    services::{ModelChoice, Services},
    validation::{prompt_text, SamplingInput, StopWords},
};

/// Seed 001's documented defaults.
const DEFAULT_TEMPERATURE: f64 = 0.2;
const MAX_JOB_ID_LEN: usize = 128;

#[derive(Debug, Default, Deserialize)]
struct Meta {
    temperature: Option<f64>,
    tokens_limit: Option<i64>,
    stop_words: Option<StopWords>,
    model: Option<String>,
    #[serde(alias = "head")]
    lora: Option<String>,
    scale: Option<f64>,
}

/// A LoRA head given at the top level of the body (seed 000) rather than in `meta`.
#[derive(Debug, Default, Deserialize)]
struct TopHead {
    #[serde(alias = "head")]
    lora: Option<String>,
    scale: Option<f64>,
}

/// `job_id` as clients send it (the seed documents a string; numbers are common too).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum JobId {
    Text(String),
    Number(i64),
}

#[derive(Debug, Deserialize)]
struct GenerateRequest {
    job_id: Option<JobId>,
    #[serde(default)]
    meta: Meta,
    #[serde(alias = "prompt")]
    content: String,
    #[serde(flatten)]
    head: TopHead,
}

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    content: String,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    job_id: Option<JobId>,
    #[serde(default)]
    meta: Meta,
    messages: Vec<Message>,
    #[serde(flatten)]
    head: TopHead,
}

/// One value given at the top level or in `meta`: both is fine when they agree.
fn one_of<T: PartialEq + std::fmt::Debug>(
    field: &str,
    top: Option<T>,
    meta: Option<T>,
) -> ApiResult<Option<T>> {
    match (top, meta) {
        (Some(a), Some(b)) if a != b => Err(ApiError::unprocessable(
            "conflicting_adapter",
            format!("`{field}` is {a:?} at the top level but {b:?} in `meta`"),
        )),
        (Some(a), _) => Ok(Some(a)),
        (None, b) => Ok(b),
    }
}

fn client_ref(job_id: Option<JobId>) -> ApiResult<Option<String>> {
    let Some(id) = job_id else { return Ok(None) };
    let id = match id {
        JobId::Text(t) => t.trim().to_string(),
        JobId::Number(n) => n.to_string(),
    };
    if id.is_empty() || id.len() > MAX_JOB_ID_LEN {
        return Err(ApiError::unprocessable(
            "invalid_job_id",
            format!("job_id must be 1 to {MAX_JOB_ID_LEN} characters"),
        ));
    }
    Ok(Some(id))
}

async fn request(
    ctx: &AppContext,
    services: &Services,
    key: &crate::models::api_keys::Model,
    meta: Meta,
    head: TopHead,
    prompt: Prompt,
) -> ApiResult<GenerationRequest> {
    let api = &services.settings.api;
    // The seed's default `tokens_limit` (8096) exceeds most contexts: a limit above this
    // server's maximum is clamped to it rather than refused, so unchanged clients keep working.
    let max_tokens = match meta.tokens_limit {
        Some(n) if n < 1 => {
            return Err(ApiError::unprocessable(
                "invalid_tokens_limit",
                format!("meta.tokens_limit must be at least 1, got {n}"),
            ))
        }
        Some(n) => Some(n.min(i64::from(api.max_tokens_limit))),
        None => None,
    };
    let params = SamplingInput {
        max_tokens,
        temperature: Some(meta.temperature.unwrap_or(DEFAULT_TEMPERATURE)),
        top_p: None,
        seed: None,
        stop: meta.stop_words,
    }
    .into_params(api)?;
    let choice = ModelChoice {
        model: meta.model,
        adapter: one_of("lora", head.lora, meta.lora)?,
        scale: one_of("scale", head.scale, meta.scale)?,
        // Seed 001 clients name their deployment's model (its example says "gpt-model"):
        // this route serves them with the configured model instead of failing.
        lenient_base: true,
    };
    let resolved = services.resolve_model(&ctx.db, key, choice).await?;
    Ok(resolved.request(prompt, params))
}

/// Runs the job (or follows the earlier one with the same `job_id`) and answers in the seed's
/// shape: `{"content": …}`, plus the job id the client can quote.
async fn answer(
    ctx: &AppContext,
    services: &Services,
    key: &crate::models::api_keys::Model,
    endpoint: &str,
    req: GenerationRequest,
    job_ref: Option<String>,
) -> ApiResult<Response> {
    run(
        ctx,
        services,
        key,
        endpoint,
        req,
        job_ref.as_deref(),
        |job| {
            json!({
                "content": job.result.clone().unwrap_or_default(),
                "job_id": job_ref.clone().unwrap_or_else(|| job.id.clone()),
            })
        },
    )
    .await
}

#[tracing::instrument(skip_all, fields(api_key))]
async fn generate(
    State(ctx): State<AppContext>,
    ApiKey(key): ApiKey,
    body: Result<JsonBody<GenerateRequest>, ApiError>,
) -> ApiResult<Response> {
    let services = Services::from_ctx(&ctx)?;
    services.precheck(&key).await?;
    let JsonBody(body) = body?;
    let job_ref = client_ref(body.job_id)?;
    prompt_text("content", &body.content)?;
    let prompt = Prompt::Chat {
        messages: vec![ChatMessage {
            role: "user".into(),
            content: body.content,
        }],
    };
    let req = request(&ctx, &services, &key, body.meta, body.head, prompt).await?;
    answer(&ctx, &services, &key, "/generate", req, job_ref).await
}

#[tracing::instrument(skip_all, fields(api_key))]
async fn chat_completion(
    State(ctx): State<AppContext>,
    ApiKey(key): ApiKey,
    body: Result<JsonBody<ChatRequest>, ApiError>,
) -> ApiResult<Response> {
    let services = Services::from_ctx(&ctx)?;
    services.precheck(&key).await?;
    let JsonBody(body) = body?;
    let job_ref = client_ref(body.job_id)?;
    if body.messages.is_empty() {
        return Err(ApiError::unprocessable(
            "invalid_messages",
            "`messages` must contain at least one message",
        ));
    }
    for (i, m) in body.messages.iter().enumerate() {
        if m.content.contains('\0') || m.role.trim().is_empty() {
            return Err(ApiError::unprocessable(
                "invalid_messages",
                format!("messages[{i}] needs a role and content without NUL characters"),
            ));
        }
    }
    let prompt = Prompt::Chat {
        messages: body
            .messages
            .into_iter()
            .map(|m| ChatMessage {
                role: m.role,
                content: m.content,
            })
            .collect(),
    };
    let req = request(&ctx, &services, &key, body.meta, body.head, prompt).await?;
    answer(&ctx, &services, &key, "/chat_completion", req, job_ref).await
}

pub fn routes() -> Routes {
    Routes::new()
        .add("/generate", axum::routing::post(generate))
        .add("/chat_completion", axum::routing::post(chat_completion))
}
