//! Erases old job texts (`settings.retention.job_text_days`): prompts and outputs are personal
//! data that the quotas, usage reports and charts do not need once a job is old. Every API
//! process runs the purge hourly; it is one conditional UPDATE, so instances never collide.

use std::time::Duration;

use sea_orm::DatabaseConnection;

use crate::models::{jobs, now, ModelError};

/// How often the purge runs.
const PERIOD: Duration = Duration::from_secs(3600);

/// Erases the texts of jobs finished more than `days` days ago; returns how many.
///
/// # Errors
/// On database errors.
pub async fn purge(db: &DatabaseConnection, days: u32) -> Result<u64, ModelError> {
    let before = now() - chrono::Duration::days(i64::from(days));
    let erased = jobs::purge_texts(db, before).await?;
    if erased > 0 {
        tracing::info!(erased, days, "retention: erased the texts of old jobs");
    }
    Ok(erased)
}

/// Purges every hour (first at start) while `days` > 0; `None` when retention is off.
#[must_use]
pub fn start(db: DatabaseConnection, days: u32) -> Option<tokio::task::JoinHandle<()>> {
    (days > 0).then(|| {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PERIOD);
            loop {
                tick.tick().await;
                if let Err(e) = purge(&db, days).await {
                    tracing::warn!(error = %e, "retention: purge failed; retrying next hour");
                }
            }
        })
    })
}
