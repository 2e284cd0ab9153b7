//! `GET /ping`: liveness plus whether a worker and model are ready (no key needed).

use axum::{extract::State, response::IntoResponse, Json};
use loco_rs::{app::AppContext, controller::Routes};
use serde_json::json;

use crate::services::Services;

/// Seed 000's health check: `{"status": "ok"}` with the worker's readiness added.
async fn ping(State(ctx): State<AppContext>) -> impl IntoResponse {
    let Ok(services) = Services::from_ctx(&ctx) else {
        return Json(json!({"status": "starting", "ready": false}));
    };
    let models = &services.models;
    let depth = models.default_queue().depth().await.ok();
    let remote = models.remote_workers().await;
    let model = models.default_name().to_string();
    let workers: Vec<_> = remote
        .iter()
        .map(|w| json!({"id": w.id, "models": w.model_list(), "device": w.device, "adapters": w.adapter_list()}))
        .collect();
    match models.engine_status() {
        Some(engine) => Json(json!({
            "status": "ok",
            "ready": engine.ready,
            "worker": {"mode": "embedded", "engine": engine},
            "workers": workers,
            "queue": {"depth": depth},
        })),
        // Ready when a live worker process holds the default model.
        None => Json(json!({
            "status": "ok",
            "ready": remote.iter().any(|w| w.model_list().contains(&model)),
            "worker": {"mode": "external"},
            "workers": workers,
            "queue": {"depth": depth},
        })),
    }
}

pub fn routes() -> Routes {
    Routes::new().add("/ping", axum::routing::get(ping))
}
