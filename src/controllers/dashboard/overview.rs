//! The overview: throughput and latency of the last minutes, queue depths, workers.

use axum::{extract::State, http::StatusCode, response::IntoResponse};
use loco_rs::{
    app::AppContext,
    controller::views::{engines::TeraView, ViewEngine},
};
use serde_json::json;

use super::{internal, jobs::ms_between, render, PageResult, SignedIn};
use crate::{
    models::{jobs, now},
    services::Services,
};

/// The value at quantile `q` (0..=1) of sorted `values`.
fn quantile(sorted: &[i64], q: f64) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted.get(i).copied()
}

pub(super) async fn page(
    State(ctx): State<AppContext>,
    admin: SignedIn,
    ViewEngine(v): ViewEngine<TeraView>,
) -> PageResult {
    let services = Services::from_ctx(&ctx).map_err(IntoResponse::into_response)?;
    let window_minutes = 15;
    let since = now() - chrono::Duration::minutes(window_minutes);
    let recent = jobs::Model::finished_since(&ctx.db, since)
        .await
        .map_err(internal)?;
    let mut latencies: Vec<i64> = recent
        .iter()
        .filter(|j| j.status == jobs::DONE)
        .filter_map(|j| ms_between(Some(j.queued_at), j.finished_at))
        .collect();
    latencies.sort_unstable();
    let failed = recent.iter().filter(|j| j.status == jobs::FAILED).count();
    let mut queues = Vec::new();
    for (model, queue) in services.models.served_queues().await {
        queues.push(json!({"model": model, "depth": queue.depth().await.ok()}));
    }
    // Every worker that ever heartbeated (the registry table): worker processes, this
    // process's embedded worker, and the workers of models loaded at run time (seed 004).
    let gone_after = services.settings.queue.orphan_after();
    let workers: Vec<serde_json::Value> = crate::models::workers::list(&ctx.db)
        .await
        .map_err(internal)?
        .iter()
        .map(|w| {
            let mut row = w.to_json(gone_after);
            row["heartbeat_age"] = json!(format!("{:.0} s", w.heartbeat_age().as_secs_f64()));
            row["tokens_per_second"] = json!(w.tokens_per_second.map(|t| format!("{t:.1}")));
            row
        })
        .collect();
    #[allow(clippy::cast_precision_loss)]
    let per_minute = recent.len() as f64 / window_minutes as f64;
    render(
        &v,
        StatusCode::OK,
        "dashboard/overview.html",
        &admin.page(json!({
            "window_minutes": window_minutes,
            "per_minute": format!("{per_minute:.1}"),
            "finished": recent.len(),
            "failed": failed,
            "p50": quantile(&latencies, 0.5),
            "p95": quantile(&latencies, 0.95),
            "queues": queues,
            "workers": workers,
            "mode": if services.models.engine().is_some() { "embedded worker (in this process)" } else { "external workers" },
        })),
    )
}

#[cfg(test)]
mod tests {
    use super::quantile;

    #[test]
    fn quantiles_of_sorted_values() {
        let v: Vec<i64> = (1..=100).collect();
        assert_eq!(quantile(&v, 0.5), Some(51));
        assert_eq!(quantile(&v, 0.95), Some(95));
        assert_eq!(quantile(&[7], 0.95), Some(7));
        assert_eq!(quantile(&[], 0.5), None);
    }
}
