//! llama.cpp server's token routes, for the tools built on it: `POST /tokenize`
//! (`{"content", "add_special"?, "parse_special"?, "with_pieces"?}` → `{"tokens"}`),
//! `POST /detokenize` (`{"tokens"}` → `{"content"}`), with the served model's own tokenizer,
//! and `POST /apply-template` (a chat completion's body → `{"prompt"}`: the text the model
//! would read, through admission's own checks and tool rendering), and `GET /props` (the
//! context, slots and chat template its clients size requests by).
//! Any key in good standing; nothing is charged (no generation runs). Its completion route,
//! charged like every generation, is [`completion`].

mod completion;
pub(crate) use completion::CompletionRequest;

use axum::{
    extract::State,
    response::{IntoResponse, Response},
    Json,
};
use loco_rs::{app::AppContext, controller::Routes};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::{
    admission::GenerationInput,
    controllers::openai::ChatRequest,
    errors::{ApiError, ApiResult, ErrorCode},
    extractors::{Caller, JsonBody},
    services::Services,
};

/// Longest text `/tokenize` takes (the body limit bounds it too).
const MAX_CONTENT_BYTES: usize = 1 << 20;
/// Most ids `/detokenize` takes.
const MAX_TOKENS: usize = 1 << 17;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct TokenizeRequest {
    content: String,
    #[serde(default)]
    add_special: bool,
    #[serde(default = "yes")]
    parse_special: bool,
    #[serde(default)]
    with_pieces: bool,
    model: Option<String>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct DetokenizeRequest {
    tokens: Vec<i64>,
    model: Option<String>,
}

#[tracing::instrument(skip_all, fields(api_key))]
async fn tokenize(
    State(ctx): State<AppContext>,
    Caller(_key): Caller,
    body: Result<JsonBody<TokenizeRequest>, ApiError>,
) -> ApiResult<Response> {
    let services = Services::from_ctx(&ctx)?;
    let JsonBody(body) = body?;
    if body.content.len() > MAX_CONTENT_BYTES {
        return Err(ApiError::new(
            ErrorCode::InvalidInput,
            format!("`content` takes at most {MAX_CONTENT_BYTES} bytes"),
        ));
    }
    let tokenizer = tokenizer_of(&services, body.model.as_deref());
    let ids = tokenizer.token_ids(&body.content, body.add_special, body.parse_special);
    let tokens: Vec<Value> = if body.with_pieces {
        ids.iter()
            .map(|id| json!({"id": id, "piece": tokenizer.piece(*id)}))
            .collect()
    } else {
        ids.iter().map(|id| json!(id)).collect()
    };
    Ok(Json(json!({"tokens": tokens})).into_response())
}

#[tracing::instrument(skip_all, fields(api_key))]
async fn detokenize(
    State(ctx): State<AppContext>,
    Caller(_key): Caller,
    body: Result<JsonBody<DetokenizeRequest>, ApiError>,
) -> ApiResult<Response> {
    let services = Services::from_ctx(&ctx)?;
    let JsonBody(body) = body?;
    if body.tokens.len() > MAX_TOKENS {
        return Err(ApiError::new(
            ErrorCode::InvalidInput,
            format!("`tokens` takes at most {MAX_TOKENS} ids"),
        ));
    }
    let tokenizer = tokenizer_of(&services, body.model.as_deref());
    let ids = token_ids(&body.tokens, |t| tokenizer.is_token(t), "tokens")?;
    let content = tokenizer
        .text_of(&ids)
        .map_err(|i| not_a_token("tokens", i))?;
    Ok(Json(json!({"content": content})).into_response())
}

#[tracing::instrument(skip_all, fields(api_key))]
async fn apply_template(
    State(ctx): State<AppContext>,
    Caller(key): Caller,
    body: Result<JsonBody<ChatRequest>, ApiError>,
) -> ApiResult<Response> {
    let services = Services::from_ctx(&ctx)?;
    let JsonBody(body) = body?;
    let input = GenerationInput::try_from(body)?;
    let (_, prompt) = services.admission.rendered(&key, input).await?;
    Ok(Json(json!({"prompt": prompt})).into_response())
}

/// `GET /props`: what llama-server's clients read before they call: the context each sequence
/// has (`default_generation_settings.n_ctx`), how many are decoded together (`total_slots`),
/// the chat template, the model. Read-only (llama-server's `POST /props` is not served).
#[tracing::instrument(skip_all, fields(api_key))]
async fn props(State(ctx): State<AppContext>, Caller(_key): Caller) -> ApiResult<Response> {
    let services = Services::from_ctx(&ctx)?;
    let models = &services.models;
    let remote = models.remote_workers().await;
    let name = models.default_name().to_string();
    let engine = &services.settings.engine;
    let file = engine
        .model_path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(Json(json!({
        "default_generation_settings": {
            "n_ctx": models.context_size_of(&name, &remote),
            "params": {"n_predict": services.settings.api.default_max_tokens},
        },
        "total_slots": engine.parallel,
        "model_alias": name,
        "model_path": file,
        "chat_template": models.tokenizer_for(&name).chat_template().unwrap_or_default(),
        "modalities": {"vision": false, "audio": false},
        "build_info": format!("tollgate {}", env!("CARGO_PKG_VERSION")),
    }))
    .into_response())
}

/// The tokenizer of the model a request names (through `settings.aliases`; none: the default).
#[must_use]
pub fn tokenizer_of(
    services: &Services,
    model: Option<&str>,
) -> std::sync::Arc<crate::engine::tokenizer::PromptTokenizer> {
    let models = &services.models;
    models.tokenizer_for(&models.canonical(model.unwrap_or_default()))
}

fn not_a_token(field: &str, index: usize) -> ApiError {
    ApiError::new(
        ErrorCode::InvalidInput,
        format!("{field}[{index}] is not a token id of this model"),
    )
}

/// `values` as token ids of a vocabulary (`is_token`), or 422 naming the first that is not.
///
/// # Errors
/// 422 `invalid_input` naming `field[index]`.
pub fn token_ids(
    values: &[i64],
    is_token: impl Fn(i32) -> bool,
    field: &str,
) -> ApiResult<Vec<i32>> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            i32::try_from(*v)
                .ok()
                .filter(|t| is_token(*t))
                .ok_or_else(|| not_a_token(field, i))
        })
        .collect()
}

pub fn routes() -> Routes {
    Routes::new()
        .add("/tokenize", axum::routing::post(tokenize))
        .add("/detokenize", axum::routing::post(detokenize))
        .add("/apply-template", axum::routing::post(apply_template))
        .add("/props", axum::routing::get(props))
        .add("/completion", axum::routing::post(completion::completion))
        .add("/completions", axum::routing::post(completion::completion))
}
