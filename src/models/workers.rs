//! The worker registry (`workers` table): one row per worker, upserted on every heartbeat.
//!
//! The database is the registry because it is the one thing every API instance, worker and the
//! dashboard already share in both modes; a row whose heartbeat is older than the orphan timeout
//! is a worker that is gone (killed, host down), and its job has been handed to another worker.

use std::time::Duration;

use sea_orm::{entity::prelude::*, sea_query::OnConflict, ActiveValue::Set, QueryOrder};
use serde::Serialize;

pub use super::_entities::workers::{ActiveModel, Column, Entity, Model};
use super::{now, ModelError};

impl ActiveModelBehavior for ActiveModel {}

/// What a worker reports about itself on each heartbeat.
#[derive(Debug, Clone, Serialize)]
pub struct Heartbeat {
    pub id: String,
    pub host: String,
    pub pid: u32,
    /// `cpu`, or `gpu:<main_gpu> (<n> layers)` for a GPU worker (with `CUDA_VISIBLE_DEVICES`
    /// the visible GPU is always 0; the worker's id names the physical one).
    pub device: String,
    pub models: Vec<String>,
    pub adapters: Vec<String>,
    pub engine: crate::engine::EngineStatus,
    pub current_job: Option<String>,
    pub jobs_served: u64,
    /// Generation speed of its last job.
    pub tokens_per_second: Option<f64>,
    pub started_at: DateTimeWithTimeZone,
}

/// How a worker looks from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    /// Heartbeating, running a job.
    Busy,
    /// Heartbeating, waiting for a job.
    Idle,
    /// Shut down cleanly.
    Stopped,
    /// Heartbeat stopped without a clean shutdown.
    Gone,
}

/// Records a heartbeat (inserting the worker's row the first time).
///
/// # Errors
/// On database errors.
pub async fn heartbeat<C: ConnectionTrait>(db: &C, beat: &Heartbeat) -> Result<(), ModelError> {
    let ts = now();
    let row = ActiveModel {
        id: Set(beat.id.clone()),
        host: Set(beat.host.clone()),
        pid: Set(i32::try_from(beat.pid).unwrap_or(i32::MAX)),
        device: Set(beat.device.clone()),
        models: Set(serde_json::to_string(&beat.models).unwrap_or_else(|_| "[]".into())),
        adapters: Set(serde_json::to_string(&beat.adapters).unwrap_or_else(|_| "[]".into())),
        engine: Set(serde_json::to_string(&beat.engine).unwrap_or_else(|_| "{}".into())),
        current_job: Set(beat.current_job.clone()),
        jobs_served: Set(i64::try_from(beat.jobs_served).unwrap_or(i64::MAX)),
        tokens_per_second: Set(beat.tokens_per_second),
        started_at: Set(beat.started_at),
        heartbeat_at: Set(ts),
        stopped_at: Set(None),
    };
    Entity::insert(row)
        .on_conflict(
            OnConflict::column(Column::Id)
                .update_columns([
                    Column::Host,
                    Column::Pid,
                    Column::Device,
                    Column::Models,
                    Column::Adapters,
                    Column::Engine,
                    Column::CurrentJob,
                    Column::JobsServed,
                    Column::TokensPerSecond,
                    Column::StartedAt,
                    Column::HeartbeatAt,
                    Column::StoppedAt,
                ])
                .to_owned(),
        )
        .exec(db)
        .await?;
    Ok(())
}

/// Marks a worker as shut down cleanly.
///
/// # Errors
/// On database errors.
pub async fn mark_stopped<C: ConnectionTrait>(db: &C, id: &str) -> Result<(), ModelError> {
    let ts = now();
    Entity::update_many()
        .col_expr(Column::StoppedAt, Expr::value(ts))
        .col_expr(Column::CurrentJob, Expr::value(Option::<String>::None))
        .filter(Column::Id.eq(id))
        .exec(db)
        .await?;
    Ok(())
}

/// Every known worker, most recently seen first.
///
/// # Errors
/// On database errors.
pub async fn list<C: ConnectionTrait>(db: &C) -> Result<Vec<Model>, ModelError> {
    Ok(Entity::find()
        .order_by_desc(Column::HeartbeatAt)
        .all(db)
        .await?)
}

impl Model {
    /// The worker's state, given how long a heartbeat may be missing.
    #[must_use]
    pub fn state(&self, gone_after: Duration) -> WorkerState {
        if self.stopped_at.is_some() {
            return WorkerState::Stopped;
        }
        if self.heartbeat_age() > gone_after {
            return WorkerState::Gone;
        }
        if self.current_job.is_some() {
            WorkerState::Busy
        } else {
            WorkerState::Idle
        }
    }

    /// Time since the last heartbeat.
    #[must_use]
    pub fn heartbeat_age(&self) -> Duration {
        (now() - self.heartbeat_at).to_std().unwrap_or_default()
    }

    /// Models this worker holds.
    #[must_use]
    pub fn model_list(&self) -> Vec<String> {
        serde_json::from_str(&self.models).unwrap_or_default()
    }

    /// LoRA adapters loaded on it at its last heartbeat.
    #[must_use]
    pub fn adapter_list(&self) -> Vec<String> {
        serde_json::from_str(&self.adapters).unwrap_or_default()
    }

    /// The engine status it reported last.
    #[must_use]
    pub fn engine_status(&self) -> Option<crate::engine::EngineStatus> {
        serde_json::from_str(&self.engine).ok()
    }

    /// Whether it heartbeats now (busy or idle).
    #[must_use]
    pub fn is_live(&self, gone_after: Duration) -> bool {
        matches!(
            self.state(gone_after),
            WorkerState::Busy | WorkerState::Idle
        )
    }

    /// The row as the API and the dashboard show it.
    #[must_use]
    pub fn to_json(&self, gone_after: Duration) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "host": self.host,
            "pid": self.pid,
            "device": self.device,
            "models": self.model_list(),
            "adapters": self.adapter_list(),
            "current_job": self.current_job,
            "jobs_served": self.jobs_served,
            "tokens_per_second": self.tokens_per_second,
            "started_at": self.started_at.to_rfc3339(),
            "heartbeat_at": self.heartbeat_at.to_rfc3339(),
            "heartbeat_age_seconds": self.heartbeat_age().as_secs_f64(),
            "state": self.state(gone_after),
        })
    }
}
