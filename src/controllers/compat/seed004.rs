//! Seed 004's model-configuration manager under `/llm/`: store configurations, load and unload
//! them on this process's worker, list what is loaded, and run inference on a loaded model.
//! Spec: ../shared/seeds/004.
//!
//! Changing state (configure, load, unload, delete) needs an `admin`-scope key; reading and
//! inference take any key. Inference is charged and queued like every generation.
//!
//! Seed 002's `/vllm_request/start` and `/vllm_request/terminate` ([`super::seed002`]) use the
//! same registry: on Tollgate "starting an engine" is loading a GGUF, like `load_model`.

use axum::{
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};
use loco_rs::{app::AppContext, controller::Routes};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::{
    admission::{GenerationInput, ModelChoice, SamplerFields, SamplingInput, StopWords, Ticket},
    controllers::respond::{admit, answer},
    errors::{ApiError, ApiResult, ErrorCode},
    extractors::{AdminCaller, Caller, JsonBody, MeteredCaller},
    models::{
        model_configs::{self, NewConfig},
        model_placements,
    },
    services::Services,
};

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub(crate) struct ConfigureRequest {
    model_id: String,
    model_name: String,
    model_type: String,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    model_kwargs: Option<Map<String, Value>>,
}

/// `inference_kwargs`: the sampling options the OpenAI routes take, under the same names and
/// bounds; any other key is refused by name (never silently dropped).
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
struct InferenceKwargs {
    max_tokens: Option<i64>,
    max_new_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    seed: Option<i64>,
    stop: Option<StopWords>,
    #[serde(flatten)]
    controls: SamplerFields,
    #[serde(flatten)]
    #[schema(ignore)]
    rest: Map<String, Value>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub(crate) struct InferenceRequest {
    model_id: String,
    prompt: String,
    #[serde(default)]
    inference_kwargs: Option<InferenceKwargs>,
}

/// The stored configuration `config_id`, or 404 `config_not_found`.
async fn stored(ctx: &AppContext, config_id: &str) -> ApiResult<model_configs::Model> {
    model_configs::Model::find_by_config_id(&ctx.db, config_id)
        .await?
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::ConfigNotFound,
                format!("no configuration {config_id}"),
            )
        })
}

/// Stores a configuration; invalid ids or names are 422 `invalid_config`, a credential in
/// `model_kwargs` or a remote (`openai`/`vllm`) one that does not parse 422
/// `invalid_model_kwargs`.
pub async fn create_config(
    db: &sea_orm::DatabaseConnection,
    new: NewConfig,
) -> ApiResult<model_configs::Model> {
    crate::serving::remote::check_new_config(&new)?;
    model_configs::ActiveModel::create(db, new)
        .await
        .map_err(|e| match e {
            crate::models::ModelError::Invalid(m) => ApiError::new(ErrorCode::InvalidConfig, m),
            other => other.into(),
        })
}

#[tracing::instrument(skip_all, fields(api_key))]
async fn configure(
    State(ctx): State<AppContext>,
    AdminCaller(_key): AdminCaller,
    body: Result<JsonBody<ConfigureRequest>, ApiError>,
) -> ApiResult<Response> {
    let JsonBody(body) = body?;
    let config = create_config(
        &ctx.db,
        NewConfig {
            model_id: body.model_id,
            model_name: body.model_name,
            model_type: body.model_type,
            model_kwargs: body.model_kwargs.unwrap_or_default(),
        },
    )
    .await?;
    Ok(Json(json!({"config_id": config.config_id})).into_response())
}

#[tracing::instrument(skip_all, fields(api_key))]
async fn load(
    State(ctx): State<AppContext>,
    AdminCaller(_key): AdminCaller,
    Path(config_id): Path<String>,
) -> ApiResult<Response> {
    let services = Services::from_ctx(&ctx)?;
    let config = stored(&ctx, &config_id).await?;
    let placed = services.models.load_or_place(&config).await?;
    let (status, message) = if placed.pending {
        (StatusCode::ACCEPTED, "Model loading on a worker")
    } else if placed.newly {
        (StatusCode::OK, "Model loaded successfully")
    } else {
        (StatusCode::OK, "Model already loaded")
    };
    // Seed 004's body exactly (its clients compare it); the model's id is the configuration's.
    Ok((status, Json(json!({"message": message}))).into_response())
}

#[tracing::instrument(skip_all, fields(api_key))]
async fn unload(
    State(ctx): State<AppContext>,
    AdminCaller(_key): AdminCaller,
    Path(model_id): Path<String>,
) -> ApiResult<Response> {
    let services = Services::from_ctx(&ctx)?;
    services.models.unload_or_unplace(&model_id).await?;
    Ok(Json(json!({"message": "Model unloaded successfully"})).into_response())
}

#[tracing::instrument(skip_all, fields(api_key))]
async fn configurations(State(ctx): State<AppContext>, Caller(key): Caller) -> ApiResult<Response> {
    // A key limited to some models sees only their configurations.
    let all = model_configs::Model::list(&ctx.db).await?;
    Ok(Json(Value::Array(
        all.iter()
            .filter(|c| key.permits_model(&c.model_id))
            .map(model_configs::Model::to_json)
            .collect(),
    ))
    .into_response())
}

#[tracing::instrument(skip_all, fields(api_key))]
async fn configuration(
    State(ctx): State<AppContext>,
    Caller(key): Caller,
    Path(config_id): Path<String>,
) -> ApiResult<Response> {
    let config = stored(&ctx, &config_id).await?;
    if !key.permits_model(&config.model_id) {
        return Err(ApiError::new(
            ErrorCode::ConfigNotFound,
            format!("no configuration {config_id}"),
        ));
    }
    Ok(Json(config.to_json()).into_response())
}

#[tracing::instrument(skip_all, fields(api_key))]
async fn delete_configuration(
    State(ctx): State<AppContext>,
    AdminCaller(_key): AdminCaller,
    Path(config_id): Path<String>,
) -> ApiResult<Response> {
    let services = Services::from_ctx(&ctx)?;
    let config = stored(&ctx, &config_id).await?;
    let placed = model_placements::find(&ctx.db, &config.model_id)
        .await?
        .is_some_and(|p| p.config_id == config_id && p.desired == model_placements::LOADED);
    if placed || services.models.is_loaded_from(&config) {
        return Err(ApiError::new(
            ErrorCode::ConfigInUse,
            format!(
                "model {:?} is loaded from this configuration; unload it first",
                config.model_id
            ),
        ));
    }
    model_configs::delete(&ctx.db, &config_id).await?;
    Ok(Json(json!({"detail": "Configuration deleted successfully"})).into_response())
}

/// The ids of the models the worker holds now (engine threads that are up), default included.
#[tracing::instrument(skip_all, fields(api_key))]
async fn loaded_models(State(ctx): State<AppContext>, Caller(key): Caller) -> ApiResult<Response> {
    let services = Services::from_ctx(&ctx)?;
    let models = &services.models;
    let mut ids: Vec<String> = Vec::new();
    if models.engine_status().is_some_and(|s| s.ready) {
        ids.push(models.default_name().to_string());
    }
    ids.extend(
        models
            .loaded()
            .iter()
            .filter(|m| m.status().ready)
            .map(|m| m.model_id.clone()),
    );
    // Models held by worker processes elsewhere (production).
    for w in models.remote_workers().await {
        for m in w.model_list() {
            if !ids.contains(&m) {
                ids.push(m);
            }
        }
    }
    ids.retain(|id| key.permits_model(id));
    Ok(Json(ids).into_response())
}

impl TryFrom<InferenceRequest> for GenerationInput {
    type Error = ApiError;

    /// `prompt` as one user turn on `model_id`; unset `inference_kwargs` fall back to the
    /// configuration's `model_kwargs` defaults in admission.
    fn try_from(body: InferenceRequest) -> Result<Self, ApiError> {
        let kw = body.inference_kwargs.unwrap_or_default();
        if let Some(name) = kw.rest.keys().next() {
            return Err(ApiError::new(
                ErrorCode::UnsupportedParameter,
                format!("inference_kwargs.{name} is not a setting this server knows; leave it out"),
            ));
        }
        let sampling = SamplingInput {
            max_tokens: kw.max_tokens.or(kw.max_new_tokens),
            temperature: kw.temperature,
            top_p: kw.top_p,
            seed: kw.seed,
            stop: kw.stop,
            controls: kw.controls,
            ..SamplingInput::default()
        };
        let model = ModelChoice::named(Some(body.model_id.trim().to_string()));
        Self::user_turn("prompt", body.prompt, sampling, model)
    }
}

#[tracing::instrument(skip_all, fields(api_key))]
async fn inference(
    State(ctx): State<AppContext>,
    MeteredCaller(key): MeteredCaller,
    body: Result<JsonBody<InferenceRequest>, ApiError>,
) -> ApiResult<Response> {
    let ticket = Ticket::wait("/llm/inference/");
    let admitted = admit::<_, GenerationInput>(&ctx, &key, body, ticket).await?;
    answer(
        admitted,
        |job| json!({"response": job.result.clone().unwrap_or_default()}),
    )
}

pub fn routes() -> Routes {
    // Seed 004's paths end in `/`; `app::into_service` trims it, so both forms reach these.
    Routes::new()
        .prefix("/llm")
        .add("/configure_model", axum::routing::post(configure))
        .add("/load_model/{config_id}", axum::routing::post(load))
        .add("/unload_model/{model_id}", axum::routing::post(unload))
        .add("/inference", axum::routing::post(inference))
        .add("/configurations", axum::routing::get(configurations))
        .add(
            "/configuration/{config_id}",
            axum::routing::get(configuration).delete(delete_configuration),
        )
        .add("/loaded_models", axum::routing::get(loaded_models))
}
