//! A worker's heartbeat: its row in the `workers` table, refreshed every
//! `settings.queue.heartbeat_seconds` with what it holds and what it runs.

use std::{sync::Arc, time::Duration};

use sea_orm::DatabaseConnection;

use crate::{
    engine::Algorithm,
    models::workers::{self, Heartbeat},
    workers::generation::WorkerStats,
};

/// Who a worker is; the rest of its heartbeat is read from its engine and stats.
#[derive(Debug, Clone)]
pub struct Identity {
    pub id: String,
    pub device: String,
}

/// Refreshes the row until stopped; [`Self::stop`] marks the worker as shut down cleanly.
#[derive(Debug)]
pub struct HeartbeatHandle {
    id: String,
    db: DatabaseConnection,
    task: tokio::task::JoinHandle<()>,
}

/// This machine's name, as the registry shows it.
#[must_use]
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

/// Starts heartbeating for a worker running `engine`; the first beat is written before this
/// returns, so the worker is listed as soon as it serves.
pub async fn start(
    db: DatabaseConnection,
    who: Identity,
    engine: Arc<dyn Algorithm>,
    stats: Arc<WorkerStats>,
    every: Duration,
) -> HeartbeatHandle {
    let started_at = crate::models::now();
    let host = hostname();
    let beat = move || {
        let status = engine.status();
        let now = stats.snapshot();
        Heartbeat {
            id: who.id.clone(),
            host: host.clone(),
            pid: std::process::id(),
            device: who.device.clone(),
            models: vec![status.model.clone()],
            adapters: status.adapters.clone(),
            engine: status,
            current_job: now.current_job,
            jobs_served: now.jobs_served,
            tokens_per_second: now.tokens_per_second,
            started_at,
        }
    };
    let first = beat();
    let id = first.id.clone();
    if let Err(e) = workers::heartbeat(&db, &first).await {
        tracing::warn!(error = %e, "worker heartbeat failed");
    }
    let conn = db.clone();
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tick.tick().await;
            if let Err(e) = workers::heartbeat(&conn, &beat()).await {
                tracing::warn!(error = %e, "worker heartbeat failed");
            }
        }
    });
    HeartbeatHandle { id, db, task }
}

impl HeartbeatHandle {
    /// Stops beating and records a clean shutdown.
    pub async fn stop(self) {
        self.task.abort();
        if let Err(e) = workers::mark_stopped(&self.db, &self.id).await {
            tracing::warn!(error = %e, "could not mark the worker stopped");
        }
    }
}
