//! `GET /ping`: liveness plus whether a worker and model are ready (no key needed); and
//! `GET /health`, the probe llama.cpp's server, vLLM and TGI serve (load balancers, Kubernetes
//! and client libraries poll it): 200 `{"status": "ok"}` when the default model can serve, 503
//! `model_unavailable` with the reason when it cannot.
//!
//! Anyone may ask, so the public answer says only `status`, `ready` and the names of the
//! models served. An admin key (`Authorization: Bearer …`) adds what operators need and
//! strangers should not see: the engine (model path, adapters loaded, device), the worker
//! processes and the queue depth.
//!
//! While this process's engine is down (its thread died and is restarting, or gave up), or, on
//! an API process without an engine, while every worker holding the default model reports its
//! engine down, the answer is 503 with `ready: false` and the `reason`.

use axum::{
    extract::{Request, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};
use loco_rs::{app::AppContext, controller::Routes};
use serde_json::{json, Value};

use crate::{
    engine::EngineStatus,
    errors::{ApiError, ErrorCode},
    extractors::caller::admin_if_any,
    models::workers,
    services::Services,
};

/// Whether the default model can serve now, as both probes say it.
struct Readiness {
    /// This process's engine is ready, or a live worker process holds the default model.
    ready: bool,
    /// Why it cannot serve: this process's engine is down, or (API-only processes) every
    /// worker holding the default model reports its engine down.
    down: Option<String>,
    engine: Option<EngineStatus>,
    remote: Vec<workers::Model>,
}

async fn readiness(services: &Services) -> Readiness {
    let models = &services.models;
    let remote = models.remote_workers().await;
    let default = models.default_name().to_string();
    let engine = models.engine_status();
    let ready = engine.as_ref().map_or_else(
        || remote.iter().any(|w| w.model_list().contains(&default)),
        |e| e.ready,
    );
    let down = match engine.as_ref() {
        Some(e) => (!e.ready).then(|| {
            e.reason
                .clone()
                .unwrap_or_else(|| "the engine is not ready".into())
        }),
        None => crate::serving::down_in(&remote, &default),
    };
    Readiness {
        ready,
        down,
        engine,
        remote,
    }
}

/// Seed 000's health check: `{"status": "ok"}` with the worker's readiness added.
async fn ping(State(ctx): State<AppContext>, request: Request) -> Response {
    let Ok(services) = Services::from_ctx(&ctx) else {
        return Json(json!({"status": "starting", "ready": false})).into_response();
    };
    let (parts, _) = request.into_parts();
    let models = &services.models;
    let Readiness {
        ready,
        down,
        engine,
        remote,
    } = readiness(&services).await;
    let mut names = models.served_here();
    names.extend(models.models_of(&remote));
    let mut answer = json!({"status": "ok", "ready": ready, "models": names});
    if let Some(reason) = &down {
        answer["ready"] = json!(false);
        answer["reason"] = json!(reason);
    }
    if admin_if_any(&parts, &ctx).await.is_some() {
        let workers: Vec<Value> = remote
            .iter()
            .map(|w| json!({"id": w.id, "models": w.model_list(), "device": w.device, "adapters": w.adapter_list()}))
            .collect();
        answer["worker"] = match engine {
            Some(engine) => json!({"mode": "embedded", "engine": engine}),
            None => json!({"mode": "external"}),
        };
        answer["workers"] = json!(workers);
        answer["queue"] = json!({"depth": models.default_queue().depth().await.ok()});
    }
    let status = if down.is_some() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (status, Json(answer)).into_response()
}

/// `GET /health`: 200 `{"status": "ok"}` when the default model can serve, else 503.
async fn health(State(ctx): State<AppContext>) -> Response {
    let Ok(services) = Services::from_ctx(&ctx) else {
        return ApiError::new(ErrorCode::Starting, "the server is starting").into_response();
    };
    let r = readiness(&services).await;
    match (r.ready, r.down) {
        (true, None) => Json(json!({"status": "ok"})).into_response(),
        (_, Some(reason)) => ApiError::new(ErrorCode::ModelUnavailable, reason).into_response(),
        (false, None) => ApiError::new(
            ErrorCode::ModelUnavailable,
            "no worker process holds the default model yet",
        )
        .into_response(),
    }
}

pub fn routes() -> Routes {
    Routes::new()
        .add("/ping", axum::routing::get(ping))
        .add("/health", axum::routing::get(health))
}
