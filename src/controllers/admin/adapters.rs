//! LoRA head management (admin keys only): `POST /api/adapters` (and seed 000's
//! `POST /attach-head`) registers an adapter file from the configured adapters folder;
//! `GET /api/adapters` lists the registrations and where they are loaded;
//! `DELETE /api/adapters/{name}` removes one (never the file).

use axum::{
    extract::{Path, State},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use loco_rs::{app::AppContext, controller::Routes};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::{
    errors::{ApiError, ApiResult, ErrorCode},
    extractors::{AdminCaller, JsonBody},
    models::adapters::{self, NewAdapter},
    services::Services,
};

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct AttachRequest {
    /// Also `head`, `lora` (the names seed 000's generation fields use for it).
    #[serde(
        alias = "head",
        alias = "lora",
        alias = "head_name",
        alias = "lora_name"
    )]
    name: String,
    /// Relative to the adapters folder; absent, `<name>.gguf` there.
    #[serde(
        alias = "file",
        alias = "lora_path",
        alias = "adapter_path",
        alias = "head_path"
    )]
    path: Option<String>,
    /// Applied when a request names the head without a scale.
    scale: Option<f64>,
    /// Defaults to the served model (the only one adapters can be registered for).
    base_model: Option<String>,
}

/// Names of the workers that hold the adapter `name` loaded now.
#[must_use]
pub fn loaded_on(holders: &[(String, Vec<String>)], name: &str) -> Vec<String> {
    holders
        .iter()
        .filter(|(_, adapters)| adapters.iter().any(|a| a == name))
        .map(|(worker, _)| worker.clone())
        .collect()
}

fn adapter_json(holders: &[(String, Vec<String>)], a: &adapters::Model) -> Value {
    json!({
        "name": a.name,
        "model": format!("{}:{}", a.base_model, a.name),
        "file": a.file,
        "base_model": a.base_model,
        "default_scale": a.default_scale,
        "loaded_on": loaded_on(holders, &a.name),
        "created_at": a.created_at.to_rfc3339(),
    })
}

/// Registers a LoRA head after every check (name, scale, base model, a free name, a file inside
/// the adapters folder, a LoRA GGUF for the served architecture); nothing is stored otherwise.
/// Shared by the admin API and the dashboard.
///
/// # Errors
/// 409 for a taken name, 422 for anything wrong with the request or the file.
pub async fn register(
    ctx: &AppContext,
    services: &Services,
    name: &str,
    path: &str,
    scale: Option<f64>,
    base_model: Option<&str>,
) -> ApiResult<adapters::Model> {
    let name = name.trim().to_string();
    adapters::validate_name(&name)?;
    let scale = scale.unwrap_or(1.0);
    adapters::validate_scale(scale)?;
    let served = services.models.default_name().to_string();
    if let Some(base) = base_model.map(str::trim) {
        if !base.is_empty() && base != served {
            return Err(ApiError::new(
                ErrorCode::UnknownBaseModel,
                format!("this server serves {served:?}; adapters can only be registered for it"),
            ));
        }
    }
    if adapters::Model::find_by_name(&ctx.db, &name)
        .await?
        .is_some()
    {
        return Err(adapters::AdapterError::Exists(name).into());
    }
    let file = adapters::resolve_file(&services.settings.engine.adapters_dir, path)?;
    adapters::check_lora(&file.path, services.models.base_architecture().as_deref())?;
    Ok(adapters::ActiveModel::register(
        &ctx.db,
        NewAdapter {
            name,
            file: file.relative,
            base_model: served,
            default_scale: scale,
        },
    )
    .await?)
}

fn not_found(name: &str) -> ApiError {
    ApiError::new(
        ErrorCode::AdapterNotFound,
        format!("no LoRA head named {name:?}"),
    )
}

/// `POST /attach-head` (and `POST /api/adapters`): 201 with the adapter, 409 for a taken name,
/// 422 for anything wrong with the file; nothing is stored unless every check passes.
#[tracing::instrument(skip_all, fields(api_key))]
pub async fn attach(
    State(ctx): State<AppContext>,
    AdminCaller(key): AdminCaller,
    body: Result<JsonBody<AttachRequest>, ApiError>,
) -> ApiResult<Response> {
    let services = Services::from_ctx(&ctx)?;
    let JsonBody(body) = body?;
    let path = body
        .path
        .unwrap_or_else(|| format!("{}.gguf", body.name.trim()));
    let record = register(
        &ctx,
        &services,
        &body.name,
        &path,
        body.scale,
        body.base_model.as_deref(),
    )
    .await?;
    tracing::info!(admin = %key.prefix, adapter = %record.name, file = %record.file, "LoRA head registered");
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("/api/adapters/{}", record.name))],
        Json(adapter_json(
            &services.models.adapter_holders().await,
            &record,
        )),
    )
        .into_response())
}

#[tracing::instrument(skip_all, fields(api_key))]
async fn list(
    State(ctx): State<AppContext>,
    AdminCaller(_key): AdminCaller,
) -> ApiResult<Response> {
    let services = Services::from_ctx(&ctx)?;
    let holders = services.models.adapter_holders().await;
    let data: Vec<Value> = adapters::Model::list(&ctx.db)
        .await?
        .iter()
        .map(|a| adapter_json(&holders, a))
        .collect();
    Ok(Json(json!({ "adapters": data })).into_response())
}

#[tracing::instrument(skip_all, fields(api_key, adapter = %name))]
async fn show(
    State(ctx): State<AppContext>,
    AdminCaller(_key): AdminCaller,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    let services = Services::from_ctx(&ctx)?;
    let record = adapters::Model::find_by_name(&ctx.db, &name)
        .await?
        .ok_or_else(|| not_found(&name))?;
    Ok(Json(adapter_json(
        &services.models.adapter_holders().await,
        &record,
    ))
    .into_response())
}

#[tracing::instrument(skip_all, fields(api_key, adapter = %name))]
async fn remove(
    State(ctx): State<AppContext>,
    AdminCaller(key): AdminCaller,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    let services = Services::from_ctx(&ctx)?;
    let record = adapters::ActiveModel::remove(&ctx.db, &name)
        .await?
        .ok_or_else(|| not_found(&name))?;
    tracing::info!(admin = %key.prefix, "LoRA head removed");
    Ok(
        Json(json!({ "deleted": adapter_json(&services.models.adapter_holders().await, &record) }))
            .into_response(),
    )
}

pub fn routes() -> Routes {
    Routes::new()
        .add("/api/adapters", axum::routing::get(list).post(attach))
        .add(
            "/api/adapters/{name}",
            axum::routing::get(show).delete(remove),
        )
}
