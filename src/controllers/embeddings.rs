//! Embedding vectors: seed 000's `POST /generate-embedding` (`{"text": …}` → `{"embedding",
//! "dimensions", "model"}`) and OpenAI's `POST /v1/embeddings` (`input` a string or a list).
//!
//! Like generations, an embedding request is one charged call and one durable job: the worker
//! holds the model (the API process may not), so the vectors come back through the job record.

use axum::{
    extract::State,
    response::{IntoResponse, Response},
    Json,
};
use base64::Engine as _;
use loco_rs::{app::AppContext, controller::Routes};
use serde::Deserialize;
use serde_json::{json, Value};

use super::api::{accepted, settled};
use crate::{
    engine::EmbeddingRequest,
    errors::{ApiError, ApiResult},
    extractors::{ApiKey, JsonBody},
    models::{api_keys, jobs},
    services::{ModelChoice, Services, Submission},
};

/// Most inputs one request may embed.
pub const MAX_INPUTS: usize = 256;

#[derive(Debug, Deserialize)]
struct SeedRequest {
    #[serde(alias = "input", alias = "content")]
    text: String,
    model: Option<String>,
}

#[derive(Debug, Deserialize)]
struct OpenAiRequest {
    input: Value,
    model: Option<String>,
    encoding_format: Option<String>,
    dimensions: Option<i64>,
}

/// Checks one input text (422 naming it).
fn check_text(field: &str, text: &str) -> ApiResult<()> {
    if text.trim().is_empty() {
        return Err(ApiError::unprocessable(
            "empty_input",
            format!("`{field}` must not be empty"),
        ));
    }
    if text.contains('\0') {
        return Err(ApiError::unprocessable(
            "invalid_input",
            format!("`{field}` must not contain NUL characters"),
        ));
    }
    Ok(())
}

/// OpenAI's `input`: a string or a non-empty list of strings (token arrays are not accepted).
fn openai_inputs(input: Value) -> ApiResult<Vec<String>> {
    let texts = match input {
        Value::String(s) => vec![s],
        Value::Array(items) => {
            if items.is_empty() {
                return Err(ApiError::unprocessable(
                    "empty_input",
                    "`input` must contain at least one string",
                ));
            }
            if items.len() > MAX_INPUTS {
                return Err(ApiError::unprocessable(
                    "too_many_inputs",
                    format!("`input` takes at most {MAX_INPUTS} strings"),
                ));
            }
            items
                .into_iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) => Ok(s),
                    _ => Err(ApiError::unprocessable(
                        "invalid_input",
                        format!("input[{i}] must be a string (token arrays are not supported)"),
                    )),
                })
                .collect::<ApiResult<Vec<_>>>()?
        }
        _ => {
            return Err(ApiError::unprocessable(
                "invalid_input",
                "`input` must be a string or a list of strings",
            ))
        }
    };
    for (i, t) in texts.iter().enumerate() {
        check_text(&format!("input[{i}]"), t)?;
    }
    Ok(texts)
}

/// Resolves the model (adapters do not apply), charges one call, runs the job and hands its
/// vectors to `body`; 202 while the job is still pending.
async fn embed(
    ctx: &AppContext,
    services: &Services,
    key: &api_keys::Model,
    endpoint: &str,
    model: Option<String>,
    inputs: Vec<String>,
    body: impl FnOnce(&jobs::Model, Vec<Vec<f32>>) -> Value,
) -> ApiResult<Response> {
    if !services.settings.engine.embeddings.enabled {
        return Err(ApiError::not_found(
            "embeddings_disabled",
            "embeddings are disabled on this server",
        ));
    }
    let choice = ModelChoice {
        model,
        ..ModelChoice::default()
    };
    let resolved = services.resolve_model(&ctx.db, key, choice).await?;
    if resolved.adapter.is_some() {
        return Err(ApiError::bad_request(
            "adapter_not_supported",
            "LoRA heads apply to generation; embeddings come from the base model",
        ));
    }
    let request = EmbeddingRequest {
        model: resolved.model,
        inputs,
    };
    match services
        .submit_and_wait(&ctx.db, key, endpoint, request, None)
        .await?
    {
        Submission::Pending(job) => Ok(accepted(&job)),
        Submission::Finished(job) => {
            let job = settled(job)?;
            let vectors: Vec<Vec<f32>> =
                serde_json::from_str(job.result.as_deref().unwrap_or("[]"))
                    .map_err(ApiError::internal)?;
            Ok(Json(body(&job, vectors)).into_response())
        }
    }
}

fn usage(job: &jobs::Model) -> Value {
    json!({"prompt_tokens": job.prompt_tokens, "total_tokens": job.prompt_tokens})
}

/// Seed 000: one text, one vector.
#[tracing::instrument(skip_all, fields(api_key))]
async fn generate_embedding(
    State(ctx): State<AppContext>,
    ApiKey(key): ApiKey,
    body: Result<JsonBody<SeedRequest>, ApiError>,
) -> ApiResult<Response> {
    let services = Services::from_ctx(&ctx)?;
    services.precheck(&key).await?;
    let JsonBody(body) = body?;
    check_text("text", &body.text)?;
    embed(
        &ctx,
        &services,
        &key,
        "/generate-embedding",
        body.model,
        vec![body.text],
        |job, mut vectors| {
            let embedding = vectors.pop().unwrap_or_default();
            json!({
                "dimensions": embedding.len(),
                "embedding": embedding,
                "model": job.model,
                "job_id": job.id,
                "usage": usage(job),
            })
        },
    )
    .await
}

/// Little-endian f32 bytes in base64, as OpenAI sends `encoding_format: "base64"`.
fn base64_vector(v: &[f32]) -> String {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// OpenAI: `data[i].embedding` per input, in order.
#[tracing::instrument(skip_all, fields(api_key))]
async fn openai_embeddings(
    State(ctx): State<AppContext>,
    ApiKey(key): ApiKey,
    body: Result<JsonBody<OpenAiRequest>, ApiError>,
) -> ApiResult<Response> {
    let services = Services::from_ctx(&ctx)?;
    services.precheck(&key).await?;
    let JsonBody(body) = body?;
    let base64 = match body.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::unprocessable(
                "invalid_encoding_format",
                format!("encoding_format must be \"float\" or \"base64\", got {other:?}"),
            ))
        }
    };
    let width = i64::from(services.tokenizer.n_embd());
    if let Some(d) = body.dimensions.filter(|d| *d != width) {
        return Err(ApiError::unprocessable(
            "invalid_dimensions",
            format!("this model's vectors have {width} dimensions; got dimensions = {d}"),
        ));
    }
    let inputs = openai_inputs(body.input)?;
    embed(
        &ctx,
        &services,
        &key,
        "/v1/embeddings",
        body.model,
        inputs,
        |job, vectors| {
            let data: Vec<Value> = vectors
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
            json!({
                "object": "list",
                "data": data,
                "model": job.model,
                "usage": usage(job),
            })
        },
    )
    .await
}

pub fn routes() -> Routes {
    Routes::new()
        .add(
            "/generate-embedding",
            axum::routing::post(generate_embedding),
        )
        .add("/v1/embeddings", axum::routing::post(openai_embeddings))
}
