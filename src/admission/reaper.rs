//! Fails and refunds jobs that are stuck, once: a job `queued` for longer than
//! `settings.queue.max_queued_seconds` (no worker took it), or `running` for longer than
//! `engine.job_timeout_ms` plus the time a dead worker takes to be noticed and its job handed
//! on (the engine stops a job at its timeout, and a worker that died mid-job is replaced
//! within `heartbeat_seconds × missed_heartbeats`), plus a margin.
//!
//! Every API process runs one; `jobs::fail` is a conditional update, so two reapers (or a
//! reaper and a worker) never fail or refund a job twice.

use std::time::Duration;

use sea_orm::DatabaseConnection;

use crate::{
    models::{jobs, ModelError},
    notify::JobEvents,
    settings::Settings,
};

/// Slack beyond every bound, for clocks and slow databases.
const MARGIN: Duration = Duration::from_secs(30);

/// How long a job may stay in each unfinished state.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub queued: Duration,
    pub running: Duration,
}

impl Bounds {
    #[must_use]
    pub fn from_settings(settings: &Settings) -> Self {
        Self {
            queued: Duration::from_secs(settings.queue.max_queued_seconds.max(1)),
            running: Duration::from_millis(settings.engine.job_timeout_ms)
                + settings.queue.orphan_after()
                + MARGIN,
        }
    }

    /// How often to look: often enough that nothing outlives its bound by much.
    #[must_use]
    pub fn period(&self) -> Duration {
        (self.queued.min(self.running) / 4).clamp(Duration::from_secs(1), Duration::from_secs(60))
    }
}

/// Fails every job past its bound now; returns how many it failed.
///
/// # Errors
/// On database errors.
pub async fn sweep(
    db: &DatabaseConnection,
    events: &JobEvents,
    bounds: Bounds,
) -> Result<usize, ModelError> {
    let now = crate::models::now();
    let ago = |d: Duration| now - chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX);
    let mut failed = 0;
    for (job, reason) in jobs::Model::stuck(db, ago(bounds.queued), ago(bounds.running)).await? {
        let why = match reason {
            jobs::Stuck::Queued => format!(
                "no worker took the job within {} s",
                bounds.queued.as_secs()
            ),
            jobs::Stuck::Running => format!(
                "the job ran longer than {} s without finishing",
                bounds.running.as_secs()
            ),
        };
        if let Some(record) = jobs::fail(db, &job, &why).await? {
            tracing::warn!(job_id = %record.id, reason = %why, "reaper failed a stuck job (refunded)");
            events.publish(&record);
            failed += 1;
        }
    }
    Ok(failed)
}

/// Sweeps every [`Bounds::period`] until the returned handle is aborted or the runtime stops.
#[must_use]
pub fn start(
    db: DatabaseConnection,
    events: JobEvents,
    bounds: Bounds,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(bounds.period());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = sweep(&db, &events, bounds).await {
                tracing::warn!(error = %e, "reaper sweep failed");
            }
        }
    })
}
