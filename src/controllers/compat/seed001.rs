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

use crate::{
    admission::{
        input::{chat_messages, user_prompt, WireMessage},
        GenerationInput, ModelChoice, SamplerFields, SamplingInput, StopWords, Ticket,
    },
    controllers::respond::answer,
    engine::Prompt,
    errors::{ApiError, ApiResult, ErrorCode},
    extractors::{JsonBody, MeteredCaller},
    services::Services,
};

/// Seed 001's documented defaults.
const DEFAULT_TEMPERATURE: f64 = 0.2;
const DEFAULT_TOKENS_LIMIT: i64 = 8096;
const MAX_JOB_ID_LEN: usize = 128;

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[schema(as = Seed001Meta)]
struct Meta {
    temperature: Option<f64>,
    tokens_limit: Option<i64>,
    stop_words: Option<StopWords>,
    model: Option<String>,
    #[serde(alias = "head")]
    lora: Option<String>,
    scale: Option<f64>,
    /// The rest of the sampling controls the OpenAI routes take, under the same names and
    /// bounds (the seed's `meta` is where its clients put generation settings).
    top_p: Option<f64>,
    seed: Option<i64>,
    #[serde(flatten)]
    controls: SamplerFields,
    /// Anything else is refused by name rather than ignored.
    #[serde(flatten)]
    #[schema(ignore)]
    rest: serde_json::Map<String, serde_json::Value>,
}

/// What seed 000's clients put at the top level of the body rather than in `meta` (its
/// document names no fields): a LoRA head, the model, and the usual sampling names. Each means
/// what it means in `meta`; saying it in both places differently is refused. Any other field
/// is refused by name rather than ignored.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
struct TopHead {
    #[serde(alias = "head", alias = "lora_head", alias = "adapter")]
    lora: Option<String>,
    scale: Option<f64>,
    model: Option<String>,
    /// `meta.tokens_limit`.
    max_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    seed: Option<i64>,
    /// `meta.stop_words`.
    stop: Option<StopWords>,
    #[serde(flatten)]
    #[schema(ignore)]
    rest: serde_json::Map<String, serde_json::Value>,
}

/// `job_id` as clients send it (the seed documents a string; numbers are common too).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
enum JobId {
    Text(String),
    Number(i64),
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub(crate) struct GenerateRequest {
    job_id: Option<JobId>,
    #[serde(default)]
    meta: Meta,
    #[serde(alias = "prompt", alias = "text")]
    content: String,
    #[serde(flatten)]
    head: TopHead,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[schema(as = Seed001ChatRequest)]
pub(crate) struct ChatRequest {
    job_id: Option<JobId>,
    #[serde(default)]
    meta: Meta,
    #[schema(min_items = 1)]
    messages: Vec<WireMessage>,
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
        (Some(a), Some(b)) if a != b => Err(ApiError::new(
            ErrorCode::ConflictingAdapter,
            format!("`{field}` is {a:?} at the top level but {b:?} in `meta`"),
        )),
        (Some(a), _) => Ok(Some(a)),
        (None, b) => Ok(b),
    }
}

/// A setting given at the top level (`top`) or in `meta` (`inner`); both only if they agree.
fn both<T: PartialEq + std::fmt::Debug>(
    top: &str,
    a: Option<T>,
    inner: &str,
    b: Option<T>,
) -> ApiResult<Option<T>> {
    match (a, b) {
        (Some(a), Some(b)) if a != b => Err(ApiError::new(
            ErrorCode::InvalidBody,
            format!("`{top}` is {a:?} but `{inner}` is {b:?}; give it once"),
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
        return Err(ApiError::new(
            ErrorCode::InvalidJobId,
            format!("job_id must be 1 to {MAX_JOB_ID_LEN} characters"),
        ));
    }
    Ok(Some(id))
}

impl Meta {
    /// The sampling and model fields of `meta` (and a head at the top level) as admission
    /// takes them.
    fn into_input(self, head: TopHead, prompt: Prompt) -> ApiResult<GenerationInput> {
        // The seed's default `tokens_limit` (8096) exceeds most contexts: a limit above this
        // server's maximum, or above the room the prompt leaves in the context, is cut by
        // admission rather than refused, so unchanged clients keep working.
        if let Some(name) = self.rest.keys().next() {
            return Err(ApiError::new(
                ErrorCode::UnsupportedParameter,
                format!("meta.{name} is not a setting this server knows; leave it out"),
            ));
        }
        if let Some(name) = head.rest.iter().find(|(_, v)| !v.is_null()).map(|(k, _)| k) {
            return Err(ApiError::new(
                ErrorCode::UnsupportedParameter,
                format!("{name} is not a field this route knows; leave it out"),
            ));
        }
        let tokens_limit = both(
            "max_tokens",
            head.max_tokens,
            "meta.tokens_limit",
            self.tokens_limit,
        )?;
        let temperature = both(
            "temperature",
            head.temperature,
            "meta.temperature",
            self.temperature,
        )?;
        let top_p = both("top_p", head.top_p, "meta.top_p", self.top_p)?;
        let seed = both("seed", head.seed, "meta.seed", self.seed)?;
        let stop = both("stop", head.stop, "meta.stop_words", self.stop_words)?;
        let model = both("model", head.model, "meta.model", self.model)?;
        if let Some(n) = tokens_limit.filter(|n| *n < 1) {
            return Err(ApiError::new(
                ErrorCode::InvalidTokensLimit,
                format!("meta.tokens_limit must be at least 1, got {n}"),
            ));
        }
        Ok(GenerationInput {
            prompt,
            sampling: SamplingInput {
                // Absent: the seed's documented default, cut to what the context has room for.
                max_tokens: Some(tokens_limit.unwrap_or(DEFAULT_TOKENS_LIMIT)),
                temperature: Some(temperature.unwrap_or(DEFAULT_TEMPERATURE)),
                top_p,
                seed,
                stop,
                controls: self.controls,
                clamp_max_tokens: true,
                ..SamplingInput::default()
            },
            model: ModelChoice {
                model,
                adapter: one_of("lora", head.lora, self.lora)?,
                scale: one_of("scale", head.scale, self.scale)?,
                // Seed 001 clients name their deployment's model (its example says
                // "gpt-model"): this route serves them with the configured model instead.
                lenient_base: true,
            },
            memory: None,
            tools: None,
        })
    }
}

impl TryFrom<GenerateRequest> for GenerationInput {
    type Error = ApiError;

    fn try_from(body: GenerateRequest) -> Result<Self, ApiError> {
        let prompt = user_prompt("content", body.content)?;
        body.meta.into_input(body.head, prompt)
    }
}

impl TryFrom<ChatRequest> for GenerationInput {
    type Error = ApiError;

    fn try_from(body: ChatRequest) -> Result<Self, ApiError> {
        let messages = chat_messages(body.messages)?;
        body.meta.into_input(body.head, Prompt::chat(messages))
    }
}

/// Admits the job (or follows the earlier one with the same `job_id`) and answers in the seed's
/// shape: `{"content": …}`, plus the job id the client can quote.
async fn run(
    ctx: &AppContext,
    key: &crate::models::api_keys::Model,
    endpoint: &'static str,
    job_id: Option<JobId>,
    input: ApiResult<GenerationInput>,
) -> ApiResult<Response> {
    let services = Services::from_ctx(ctx)?;
    let job_ref = client_ref(job_id)?;
    let input = input?;
    // The same `job_id` is the same job only for the same route and body (a client's retry);
    // reused with another request (the seed's own two examples both say "12345") it is a new
    // job. The stored reference carries a digest of what was asked.
    let stored_ref = job_ref.as_ref().map(|id| {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(format!("{endpoint}\n{input:?}").as_bytes());
        format!("{id}#{}", &hex::encode(digest)[..16])
    });
    let ticket = Ticket::wait(endpoint).client_ref(stored_ref);
    let admitted = services.admission.admit(key, input, ticket).await?;
    answer(admitted, |job| {
        json!({
            "content": job.result.clone().unwrap_or_default(),
            "job_id": job_ref.clone().unwrap_or_else(|| job.id.clone()),
        })
    })
}

#[tracing::instrument(skip_all, fields(api_key))]
async fn generate(
    State(ctx): State<AppContext>,
    MeteredCaller(key): MeteredCaller,
    body: Result<JsonBody<GenerateRequest>, ApiError>,
) -> ApiResult<Response> {
    let JsonBody(mut body) = body?;
    let job_id = body.job_id.take();
    run(&ctx, &key, "/generate", job_id, body.try_into()).await
}

#[tracing::instrument(skip_all, fields(api_key))]
async fn chat_completion(
    State(ctx): State<AppContext>,
    MeteredCaller(key): MeteredCaller,
    body: Result<JsonBody<ChatRequest>, ApiError>,
) -> ApiResult<Response> {
    let JsonBody(mut body) = body?;
    let job_id = body.job_id.take();
    run(&ctx, &key, "/chat_completion", job_id, body.try_into()).await
}

pub fn routes() -> Routes {
    Routes::new()
        .add("/generate", axum::routing::post(generate))
        .add("/chat_completion", axum::routing::post(chat_completion))
}
