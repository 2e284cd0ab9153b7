//! Models: what is served now (the default model, models loaded here, models held by worker
//! processes elsewhere) with readiness and context length, and seed 004's stored configurations
//! with the buttons that load and unload them (the same rules as `/llm/load_model` and
//! `/llm/unload_model`).

use axum::{
    extract::{Path, State},
    http::StatusCode,
    response::IntoResponse,
};
use loco_rs::{
    app::AppContext,
    controller::views::{engines::TeraView, ViewEngine},
};
use serde_json::{json, Value};

use super::{internal, not_found_page, render, see_other, AdminForm, PageResult, SignedIn};
use crate::{models::model_configs, services::Services};

pub(super) async fn page(
    State(ctx): State<AppContext>,
    admin: SignedIn,
    ViewEngine(v): ViewEngine<TeraView>,
) -> PageResult {
    view(&ctx, &admin, &v, StatusCode::OK, None).await
}

async fn view(
    ctx: &AppContext,
    admin: &SignedIn,
    v: &TeraView,
    status: StatusCode,
    problem: Option<String>,
) -> PageResult {
    let services = Services::from_ctx(ctx).map_err(IntoResponse::into_response)?;
    let models = &services.models;
    let remote = models.remote_workers().await;
    let mut served = Vec::new();
    let default = models.default_name().to_string();
    let (ready, reason) = match models.engine_status() {
        Some(s) => (s.ready, models.engine_down(&default)),
        None => (
            remote
                .iter()
                .any(|w| w.model_list().iter().any(|m| m == &default)),
            None,
        ),
    };
    served.push(json!({
        "id": default,
        "where": if models.engine().is_some() { "this process (default model)" } else { "worker processes (default model)" },
        "ready": ready,
        "reason": reason,
        "context": models.context_size_of(&default, &remote),
        "config": null,
    }));
    for m in models.loaded() {
        let status = m.status();
        served.push(json!({
            "id": m.model_id,
            "where": "this process (loaded at run time)",
            "ready": status.ready,
            "reason": models.engine_down(&m.model_id),
            "context": status.context_size,
            "config": m.config_id,
        }));
    }
    for id in models.models_of(&remote) {
        let holders: Vec<&str> = remote
            .iter()
            .filter(|w| w.model_list().iter().any(|m| m == &id))
            .map(|w| w.id.as_str())
            .collect();
        served.push(json!({
            "id": id,
            "where": format!("workers: {}", holders.join(", ")),
            "ready": true,
            "reason": null,
            "context": models.context_size_of(&id, &remote),
            "config": null,
        }));
    }
    let configs: Vec<Value> = model_configs::Model::list(&ctx.db)
        .await
        .map_err(internal)?
        .iter()
        .map(|c| {
            let mut row = c.to_json();
            row["loaded"] = json!(models.is_loaded_from(c));
            row["model_kwargs"] = json!(row["model_kwargs"].to_string());
            row
        })
        .collect();
    let aliases: Vec<Value> = services
        .settings
        .aliases
        .iter()
        .map(|(from, to)| json!({"from": from, "to": to}))
        .collect();
    render(
        v,
        status,
        "dashboard/models.html",
        &admin.page(json!({
            "served": served,
            "configs": configs,
            "aliases": aliases,
            "problem": problem,
            "loads_here": services.settings.queue.embedded_worker,
        })),
    )
}

/// `POST /admin/models/{config_id}/load`.
pub(super) async fn load(
    State(ctx): State<AppContext>,
    ViewEngine(v): ViewEngine<TeraView>,
    Path(config_id): Path<String>,
    AdminForm { admin, .. }: AdminForm,
) -> PageResult {
    let services = Services::from_ctx(&ctx).map_err(IntoResponse::into_response)?;
    let Some(config) = model_configs::Model::find_by_config_id(&ctx.db, &config_id)
        .await
        .map_err(internal)?
    else {
        return Err(not_found_page("No such configuration."));
    };
    match services.models.load_or_place(&config).await {
        Ok(_) => {
            tracing::info!(config_id = %config_id, admin = %admin.admin.email, "model loaded from the dashboard");
            Ok(see_other("/admin/models"))
        }
        Err(e) => {
            let status = e.status();
            view(&ctx, &admin, &v, status, Some(e.message)).await
        }
    }
}

/// `POST /admin/models/{model_id}/unload`.
pub(super) async fn unload(
    State(ctx): State<AppContext>,
    ViewEngine(v): ViewEngine<TeraView>,
    Path(model_id): Path<String>,
    AdminForm { admin, .. }: AdminForm,
) -> PageResult {
    let services = Services::from_ctx(&ctx).map_err(IntoResponse::into_response)?;
    match services.models.unload_or_unplace(&model_id).await {
        Ok(()) => {
            tracing::info!(model_id = %model_id, admin = %admin.admin.email, "model unloaded from the dashboard");
            Ok(see_other("/admin/models"))
        }
        Err(e) => {
            let status = e.status();
            view(&ctx, &admin, &v, status, Some(e.message)).await
        }
    }
}
