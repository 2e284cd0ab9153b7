//! The jobs list (filtered by status, key and model) and one job's page.

use std::collections::HashMap;

use axum::{
    extract::{Path, Query, State},
    http::StatusCode,
};
use loco_rs::{
    app::AppContext,
    controller::views::{engines::TeraView, ViewEngine},
};
use serde_json::{json, Value};

use super::{internal, not_found_page, render, Fields, PageResult, SignedIn};
use crate::models::{api_keys, jobs};

/// Milliseconds from `a` to `b`, when both happened.
pub(super) fn ms_between(
    a: Option<sea_orm::prelude::DateTimeWithTimeZone>,
    b: Option<sea_orm::prelude::DateTimeWithTimeZone>,
) -> Option<i64> {
    Some((b? - a?).num_milliseconds())
}

/// One job as a table row; `prefixes` names the key of each (the key page passes none).
pub(super) fn job_row(j: &jobs::Model, prefixes: &HashMap<i32, String>) -> Value {
    json!({
        "id": j.id,
        "key": prefixes.get(&j.api_key_id),
        "endpoint": j.endpoint,
        "model": j.model,
        "status": j.status,
        "queued_at": j.queued_at.format("%Y-%m-%d %H:%M:%S").to_string(),
        "wait_ms": ms_between(Some(j.queued_at), j.started_at),
        "run_ms": ms_between(j.started_at, j.finished_at),
        "latency_ms": ms_between(Some(j.queued_at), j.finished_at),
        "prompt_tokens": j.prompt_tokens,
        "generated_tokens": j.generated_tokens,
        "finish_reason": j.finish_reason,
        "worker": j.worker,
        "attempts": j.attempts,
        "refunded": j.refunded,
        "error": j.error,
    })
}

pub(super) async fn list(
    State(ctx): State<AppContext>,
    admin: SignedIn,
    ViewEngine(v): ViewEngine<TeraView>,
    Query(q): Query<Fields>,
) -> PageResult {
    let pick = |name: &str| q.get(name).map(|s| s.trim()).filter(|s| !s.is_empty());
    // An unknown prefix matches no job (id -1).
    let key_id = match pick("key") {
        Some(prefix) => Some(
            api_keys::Model::find_by_prefix(&ctx.db, prefix)
                .await
                .map_err(internal)?
                .map_or(-1, |k| k.id),
        ),
        None => None,
    };
    let found = jobs::Model::recent(&ctx.db, pick("status"), key_id, pick("model"), 100)
        .await
        .map_err(internal)?;
    // Only the keys of the jobs shown are named: one query whatever the number of keys.
    let prefixes = api_keys::Model::prefixes_of(&ctx.db, found.iter().map(|j| j.api_key_id))
        .await
        .map_err(internal)?;
    let rows: Vec<Value> = found.iter().map(|j| job_row(j, &prefixes)).collect();
    render(
        &v,
        StatusCode::OK,
        "dashboard/jobs.html",
        &admin.page(json!({
            "jobs": rows,
            "filter": {
                "status": pick("status").unwrap_or_default(),
                "key": pick("key").unwrap_or_default(),
                "model": pick("model").unwrap_or_default(),
            },
            "statuses": [jobs::QUEUED, jobs::RUNNING, jobs::DONE, jobs::FAILED],
        })),
    )
}

pub(super) async fn detail(
    State(ctx): State<AppContext>,
    admin: SignedIn,
    ViewEngine(v): ViewEngine<TeraView>,
    Path(id): Path<String>,
) -> PageResult {
    let Some(job) = jobs::Model::find_any(&ctx.db, &id)
        .await
        .map_err(internal)?
    else {
        return Err(not_found_page("No such job."));
    };
    let prefixes = api_keys::Model::prefixes_of(&ctx.db, [job.api_key_id])
        .await
        .map_err(internal)?;
    let mut row = job_row(&job, &prefixes);
    row["request"] = json!(job.request);
    row["result"] = json!(job
        .result
        .as_deref()
        .map(|r| r.chars().take(4000).collect::<String>()));
    row["started_at"] = json!(job
        .started_at
        .map(|t| t.format("%Y-%m-%d %H:%M:%S%.3f").to_string()));
    row["finished_at"] = json!(job
        .finished_at
        .map(|t| t.format("%Y-%m-%d %H:%M:%S%.3f").to_string()));
    render(
        &v,
        StatusCode::OK,
        "dashboard/job.html",
        &admin.page(json!({"job": row})),
    )
}
