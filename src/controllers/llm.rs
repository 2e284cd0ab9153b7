//! Seed 004's model-configuration manager under `/llm/`: store configurations, load and unload
//! them on this process's worker, list what is loaded, and run inference on a loaded model.
//! Spec: ../shared/seeds/004.
//!
//! Changing state (configure, load, unload, delete) needs an `admin`-scope key; reading and
//! inference take any key. Inference is charged and queued like every generation.
//!
//! Seed 002's `/vllm_request/start` and `/vllm_request/terminate` live here too: on Tollgate
//! "starting an engine" is loading a GGUF on the worker, the same operation as `load_model`.

use axum::{
    extract::{Path, State},
    http::HeaderMap,
    response::{IntoResponse, Response},
    Json,
};
use loco_rs::{app::AppContext, controller::Routes};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::api::run;
use crate::{
    engine::{ChatMessage, Prompt},
    errors::{ApiError, ApiResult},
    extractors::{AdminKey, ApiKey, JsonBody},
    models::model_configs::{self, NewConfig},
    services::Services,
    validation::{prompt_text, SamplingInput, StopWords},
};

#[derive(Debug, Deserialize)]
struct ConfigureRequest {
    model_id: String,
    model_name: String,
    model_type: String,
    #[serde(default)]
    model_kwargs: Option<Map<String, Value>>,
}

/// `inference_kwargs`: the sampling options Tollgate knows; others are ignored.
#[derive(Debug, Default, Deserialize)]
struct InferenceKwargs {
    max_tokens: Option<i64>,
    max_new_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    seed: Option<i64>,
    stop: Option<StopWords>,
}

#[derive(Debug, Deserialize)]
struct InferenceRequest {
    model_id: String,
    prompt: String,
    #[serde(default)]
    inference_kwargs: Option<InferenceKwargs>,
}

fn config_not_found(config_id: &str) -> ApiError {
    ApiError::not_found("config_not_found", format!("no configuration {config_id}"))
}

/// Stores a configuration; invalid ids or names are 422 `invalid_config`.
async fn create_config(
    db: &sea_orm::DatabaseConnection,
    new: NewConfig,
) -> ApiResult<model_configs::Model> {
    model_configs::ActiveModel::create(db, new)
        .await
        .map_err(|e| match e {
            crate::models::ModelError::Invalid(m) => ApiError::unprocessable("invalid_config", m),
            other => other.into(),
        })
}

async fn configure(
    State(ctx): State<AppContext>,
    AdminKey(_key): AdminKey,
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

async fn load(
    State(ctx): State<AppContext>,
    AdminKey(_key): AdminKey,
    Path(config_id): Path<String>,
) -> ApiResult<Response> {
    let services = Services::from_ctx(&ctx)?;
    let config = model_configs::Model::find_by_config_id(&ctx.db, &config_id)
        .await?
        .ok_or_else(|| config_not_found(&config_id))?;
    let (model, newly) = services.load_model(&ctx.db, &config).await?;
    let message = if newly {
        "Model loaded successfully"
    } else {
        "Model already loaded"
    };
    Ok(Json(json!({
        "message": message,
        "model_id": model.model_id,
        "config_id": model.config_id,
    }))
    .into_response())
}

async fn unload(
    State(ctx): State<AppContext>,
    AdminKey(_key): AdminKey,
    Path(model_id): Path<String>,
) -> ApiResult<Response> {
    let services = Services::from_ctx(&ctx)?;
    services.unload_model(&ctx.db, &model_id).await?;
    Ok(Json(json!({"message": "Model unloaded successfully"})).into_response())
}

async fn configurations(
    State(ctx): State<AppContext>,
    ApiKey(_key): ApiKey,
) -> ApiResult<Response> {
    let all = model_configs::Model::list(&ctx.db).await?;
    Ok(Json(Value::Array(
        all.iter().map(model_configs::Model::to_json).collect(),
    ))
    .into_response())
}

async fn configuration(
    State(ctx): State<AppContext>,
    ApiKey(_key): ApiKey,
    Path(config_id): Path<String>,
) -> ApiResult<Response> {
    let config = model_configs::Model::find_by_config_id(&ctx.db, &config_id)
        .await?
        .ok_or_else(|| config_not_found(&config_id))?;
    Ok(Json(config.to_json()).into_response())
}

async fn delete_configuration(
    State(ctx): State<AppContext>,
    AdminKey(_key): AdminKey,
    Path(config_id): Path<String>,
) -> ApiResult<Response> {
    let services = Services::from_ctx(&ctx)?;
    let config = model_configs::Model::find_by_config_id(&ctx.db, &config_id)
        .await?
        .ok_or_else(|| config_not_found(&config_id))?;
    if services
        .registry
        .get(&config.model_id)
        .is_some_and(|m| m.config_id == config.config_id)
    {
        return Err(ApiError::conflict(
            "config_in_use",
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
async fn loaded_models(State(ctx): State<AppContext>, ApiKey(key): ApiKey) -> ApiResult<Response> {
    let services = Services::from_ctx(&ctx)?;
    let mut ids: Vec<String> = Vec::new();
    if services.engine_status().is_some_and(|s| s.ready) {
        ids.push(services.settings.engine.model_name.clone());
    }
    ids.extend(
        services
            .registry
            .all()
            .iter()
            .filter(|m| m.status().ready)
            .map(|m| m.model_id.clone()),
    );
    // Models held by worker processes elsewhere (production).
    for w in services.remote_workers(&ctx.db).await {
        for m in w.model_list() {
            if !ids.contains(&m) {
                ids.push(m);
            }
        }
    }
    ids.retain(|id| key.permits_model(id));
    Ok(Json(ids).into_response())
}

async fn inference(
    State(ctx): State<AppContext>,
    ApiKey(key): ApiKey,
    body: Result<JsonBody<InferenceRequest>, ApiError>,
) -> ApiResult<Response> {
    let services = Services::from_ctx(&ctx)?;
    services.precheck(&key).await?;
    let JsonBody(body) = body?;
    prompt_text("prompt", &body.prompt)?;
    let model_id = body.model_id.trim().to_string();
    // The one resolution every generation route uses: loaded models, allow-lists, 404s.
    let resolved = services
        .resolve_model(
            &ctx.db,
            &key,
            crate::services::ModelChoice {
                model: Some(model_id.clone()),
                ..Default::default()
            },
        )
        .await?;
    let defaults = services
        .registry
        .get(&model_id)
        .map(|m| m.defaults.clone())
        .unwrap_or_default();
    let kw = body.inference_kwargs.unwrap_or_default();
    let sampling = SamplingInput {
        max_tokens: kw.max_tokens.or(kw.max_new_tokens).or(defaults.max_tokens),
        temperature: kw.temperature.or(defaults.temperature),
        top_p: kw.top_p.or(defaults.top_p),
        seed: kw.seed,
        stop: kw.stop,
    };
    let request = resolved.request(
        Prompt::Chat {
            messages: vec![ChatMessage {
                role: "user".into(),
                content: body.prompt,
            }],
        },
        sampling.into_params(&services.settings.api)?,
    );
    run(
        &ctx,
        &services,
        &key,
        "/llm/inference/",
        request,
        None,
        |job| json!({"response": job.result.clone().unwrap_or_default()}),
    )
    .await
}

/// Seed 002's engine start request. The Hugging Face token is accepted for compatibility and
/// dropped at once: models come from the local models directory, never from a hub.
#[derive(Debug, Deserialize)]
#[allow(non_snake_case)]
struct StartRequest {
    Model: String,
    MAX_MODEL_LEN: Option<u32>,
    SEED: Option<i64>,
}

#[derive(Debug, Deserialize)]
struct TerminateRequest {
    container_id: String,
}

/// This server's OpenAI base URL as the client reached it (`X-Forwarded-*` aware).
pub fn openai_base_url(headers: &HeaderMap) -> String {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let host = header("x-forwarded-host")
        .or_else(|| header("host"))
        .unwrap_or_else(|| "localhost".into());
    let scheme = header("x-forwarded-proto").unwrap_or_else(|| "http".into());
    format!("{scheme}://{host}/v1")
}

/// A model id from a file name: its stem, with anything unusual replaced.
fn model_id_for(file: &str) -> String {
    let stem = file.trim().trim_end_matches(".gguf");
    let stem = stem.rsplit('/').next().unwrap_or(stem);
    stem.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect()
}

async fn vllm_start(
    State(ctx): State<AppContext>,
    AdminKey(key): AdminKey,
    headers: HeaderMap,
    body: Result<JsonBody<StartRequest>, ApiError>,
) -> ApiResult<Response> {
    let services = Services::from_ctx(&ctx)?;
    let JsonBody(body) = body?;
    let default = services.settings.engine.model_name.clone();
    let model_id = if body.Model.trim() == default {
        default.clone()
    } else {
        model_id_for(&body.Model)
    };
    let message = if model_id == default {
        "the default model is always running".to_string()
    } else {
        let mut kwargs = Map::new();
        if let Some(n) = body.MAX_MODEL_LEN {
            kwargs.insert("context_size".into(), n.into());
        }
        if let Some(seed) = body.SEED {
            kwargs.insert("seed".into(), seed.into());
        }
        let config = create_config(
            &ctx.db,
            NewConfig {
                model_id: model_id.clone(),
                model_name: body.Model.trim().to_string(),
                model_type: "vllm_request".into(),
                model_kwargs: kwargs,
            },
        )
        .await?;
        match services.load_model(&ctx.db, &config).await {
            Ok((_, true)) => format!("engine {model_id} started"),
            Ok((_, false)) => {
                model_configs::delete(&ctx.db, &config.config_id).await?;
                format!("engine {model_id} was already running")
            }
            Err(e) => {
                model_configs::delete(&ctx.db, &config.config_id).await?;
                return Err(e);
            }
        }
    };
    Ok(Json(json!({
        "message": message,
        "vLLM_endpoint": openai_base_url(&headers),
        "engine_name": model_id,
        "container_id": model_id,
        "user_info": {"key": key.prefix, "name": key.name},
        "status": "healthy",
    }))
    .into_response())
}

async fn vllm_terminate(
    State(ctx): State<AppContext>,
    AdminKey(_key): AdminKey,
    body: Result<JsonBody<TerminateRequest>, ApiError>,
) -> ApiResult<Response> {
    let services = Services::from_ctx(&ctx)?;
    let JsonBody(body) = body?;
    let model_id = body.container_id.trim().to_string();
    let config_id = services
        .registry
        .get(&model_id)
        .map(|m| m.config_id.clone());
    services.unload_model(&ctx.db, &model_id).await?;
    // Engines started through /vllm_request own their configuration.
    if let Some(config_id) = config_id {
        if let Some(config) = model_configs::Model::find_by_config_id(&ctx.db, &config_id).await? {
            if config.model_type == "vllm_request" {
                model_configs::delete(&ctx.db, &config_id).await?;
            }
        }
    }
    Ok(Json(json!({"status": "terminated"})).into_response())
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

/// Seed 002's engine management, on the same registry as `/llm/load_model`.
pub fn vllm_routes() -> Routes {
    Routes::new()
        .prefix("/vllm_request")
        .add("/start", axum::routing::post(vllm_start))
        .add("/terminate", axum::routing::post(vllm_terminate))
}
