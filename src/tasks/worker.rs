//! `cargo loco task worker gpu=0 layers=99 name=gpu0`: a worker process (production).
//!
//! It loads the configured model once on one device, serves only that model's queue, one job
//! at a time, heartbeats into the `workers` table, publishes job events through Redis so the
//! API instance a client waits on hears them, and on SIGTERM/Ctrl-C finishes its current job,
//! stops taking new ones and exits. Run one per GPU (`CUDA_VISIBLE_DEVICES=<n>` + `gpu=0`).

use std::{sync::Arc, time::Duration};

use loco_rs::{
    app::AppContext,
    task::{Task, TaskInfo, Vars},
    Result,
};

use super::{num_arg, opt_arg};
use crate::{
    engine::{llama::LlamaEngine, Algorithm},
    notify::JobEvents,
    queue::JobQueue,
    settings::Settings,
    workers::{
        generation::GenerationWorker,
        heartbeat::{self, hostname, Identity},
    },
};

pub struct Worker;

fn msg(e: impl std::fmt::Display) -> loco_rs::Error {
    loco_rs::Error::Message(e.to_string())
}

#[async_trait::async_trait]
impl Task for Worker {
    fn task(&self) -> TaskInfo {
        TaskInfo {
            name: "worker".into(),
            detail: "serve the model's queue: worker gpu=<n> layers=<n> threads=<n> name=<id> model=<name>"
                .into(),
        }
    }

    async fn run(&self, ctx: &AppContext, vars: &Vars) -> Result<()> {
        let mut settings = Settings::from_config(&ctx.config)?;
        let engine = &mut settings.engine;
        if let Some(gpu) = num_arg::<i32>(vars, "gpu")? {
            engine.main_gpu = gpu;
        }
        if let Some(layers) = num_arg::<u32>(vars, "layers")? {
            engine.n_gpu_layers = layers;
        }
        if let Some(threads) = num_arg::<u32>(vars, "threads")? {
            engine.threads = threads;
        }
        // `model=`/`models=` name what the operator expects this worker to hold; a worker holds
        // the configured model (TOLLGATE_MODEL_NAME / TOLLGATE_MODEL_PATH), so a mismatch is a
        // deployment mistake worth refusing loudly.
        for asked in ["model", "models"]
            .iter()
            .filter_map(|k| opt_arg(vars, k))
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|m| !m.is_empty())
        {
            if asked != engine.model_name {
                return Err(msg(format!(
                    "this worker serves the configured model {:?}; for {asked:?} set TOLLGATE_MODEL_NAME and TOLLGATE_MODEL_PATH",
                    engine.model_name
                )));
            }
        }
        let device_label = if engine.n_gpu_layers > 0 {
            format!("gpu{}", engine.main_gpu)
        } else {
            "cpu".into()
        };
        let id = opt_arg(vars, "name").map_or_else(
            || format!("{}-{device_label}-{}", hostname(), engine.model_name),
            str::to_string,
        );

        let queue = JobQueue::connect(&settings.queue, &settings.engine.model_name)
            .await
            .map_err(msg)?;
        let events = if settings.queue.is_redis() {
            JobEvents::with_redis(
                &settings.queue.url,
                &settings.queue.prefix,
                Duration::from_millis(settings.queue.redis_timeout_ms),
                ctx.db.clone(),
                false,
            )
            .await
            .map_err(msg)?
        } else {
            tracing::warn!("queue is SQLite: API processes elsewhere learn of results by polling the database; use Redis for production");
            JobEvents::default()
        };
        let started = std::time::Instant::now();
        let engine_settings = settings.engine.clone();
        let llama = tokio::task::spawn_blocking(move || LlamaEngine::start(engine_settings))
            .await
            .map_err(msg)?
            .map_err(msg)?;
        let llama: Arc<dyn Algorithm> = Arc::new(llama);
        let handler = GenerationWorker::new(ctx.db.clone(), llama.clone(), events, id.clone())
            .with_max_attempts(settings.queue.max_attempts);
        let beat = heartbeat::start(
            ctx.db.clone(),
            Identity {
                id: id.clone(),
                device: llama.status().device,
            },
            llama.clone(),
            handler.stats(),
            Duration::from_secs(settings.queue.heartbeat_seconds.max(1)),
        )
        .await;
        let worker = queue.spawn_worker(&id, Arc::new(handler)).await;
        tracing::info!(
            worker = %id,
            queue = %queue.name(),
            device = %llama.status().device,
            ms = started.elapsed().as_millis() as u64,
            "worker ready"
        );
        loco_rs::boot::shutdown_signal().await;
        tracing::info!(worker = %id, "stopping: finishing the current job, taking no new ones");
        worker.shutdown().await;
        beat.stop().await;
        tracing::info!(worker = %id, "worker stopped");
        Ok(())
    }
}
