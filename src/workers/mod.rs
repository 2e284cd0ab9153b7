//! Queue consumers and their heartbeat.

pub mod generation;
pub mod heartbeat;

use std::{sync::Arc, time::Duration};

use sea_orm::DatabaseConnection;

use crate::{
    engine::Algorithm,
    notify::JobEvents,
    queue::{JobQueue, WorkerHandle},
    settings::Settings,
};

/// Starts serving `queue` with `engine` as the worker `name`: its heartbeat first (so it is
/// listed as soon as it serves), then the queue consumer. The embedded worker and the worker
/// process (`task worker`) both start this way.
pub async fn serve_queue(
    db: &DatabaseConnection,
    engine: Arc<dyn Algorithm>,
    events: JobEvents,
    name: &str,
    settings: &Settings,
    queue: &JobQueue,
) -> (WorkerHandle, heartbeat::HeartbeatHandle) {
    let handler =
        generation::GenerationWorker::new(db.clone(), engine.clone(), events, name.to_string())
            .with_max_attempts(settings.queue.max_attempts)
            .with_orphan_after(settings.queue.orphan_after());
    let beat = heartbeat::start(
        db.clone(),
        heartbeat::Identity {
            id: name.to_string(),
            device: engine.status().device,
        },
        engine,
        handler.stats(),
        Duration::from_secs(settings.queue.heartbeat_seconds.max(1)),
    )
    .await;
    let concurrency = handler.concurrency(settings.engine.lookahead);
    let worker = queue
        .spawn_worker(name, Arc::new(handler), concurrency)
        .await;
    (worker, beat)
}
