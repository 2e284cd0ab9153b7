//! `cargo loco task worker gpu=0 layers=99 name=gpu0 [model=<name> path=<gguf>]
//! [accept_loads=true]`: a worker process (production).
//!
//! It loads the configured model once on one device, serves only that model's queue, one job
//! at a time, heartbeats into the `workers` table, publishes job events through Redis so the
//! API instance a client waits on hears them, and on SIGTERM/Ctrl-C finishes the jobs it took,
//! stops taking new ones and exits. Run one per GPU (`CUDA_VISIBLE_DEVICES=<n>` + `gpu=0`).
//!
//! With `accept_loads=true` it also takes models that `load_model` (seed 004) or
//! `/vllm_request/start` (seed 002) ask for at run time, one worker per model
//! ([`crate::serving::placements`]), and unloads them when asked.

use loco_rs::{
    app::AppContext,
    task::{Task, TaskInfo, Vars},
    Result,
};

use super::{num_arg, opt_arg};
use crate::{notify::JobEvents, queue::JobQueue, settings::Settings, workers::heartbeat::hostname};

pub struct Worker;

fn msg(e: impl std::fmt::Display) -> loco_rs::Error {
    loco_rs::Error::Message(e.to_string())
}

#[async_trait::async_trait]
impl Task for Worker {
    fn task(&self) -> TaskInfo {
        TaskInfo {
            name: "worker".into(),
            detail: "serve a model's queue: worker gpu=<n> layers=<n> threads=<n> name=<id> [model=<name> path=<gguf>] [accept_loads=true]"
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
        // `model=<name> path=<gguf>`: this worker holds another model than the configured
        // default (one model per GPU); API instances route requests naming it to its queue.
        // `model=` alone must name the configured model (a guard against a wrong unit file).
        let asked = opt_arg(vars, "model").or_else(|| opt_arg(vars, "models"));
        match (asked, opt_arg(vars, "path")) {
            (Some(name), Some(path)) => {
                if !std::path::Path::new(path).is_file() {
                    return Err(msg(format!("path={path}: no such model file")));
                }
                engine.model_name = name.to_string();
                engine.model_path = path.into();
            }
            (Some(name), None) if name != engine.model_name => {
                return Err(msg(format!(
                    "this worker's configured model is {:?}; to serve {name:?} give its file too: model={name} path=models/<file>.gguf",
                    engine.model_name
                )));
            }
            (None, Some(_)) => return Err(msg("path= needs model=<name> too")),
            _ => {}
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
        if !settings.queue.is_redis() {
            tracing::warn!("queue is SQLite: API processes elsewhere learn of results by polling the database; use Redis for production");
        }
        let events = JobEvents::for_settings(&settings.queue, &ctx.db, false)
            .await
            .map_err(msg)?;
        let started = std::time::Instant::now();
        let engine_settings = settings.engine.clone();
        let llama = tokio::task::spawn_blocking(move || crate::engine::start(&engine_settings))
            .await
            .map_err(msg)?
            .map_err(msg)?;
        let (worker, beat) = crate::workers::serve_queue(
            &ctx.db,
            llama.clone(),
            events.clone(),
            &id,
            &settings,
            &queue,
        )
        .await;
        let placements = if opt_arg(vars, "accept_loads") == Some("true") {
            Some(accept_loads(ctx, &settings, &id, llama.clone(), events, queue.clone()).await?)
        } else {
            None
        };
        tracing::info!(
            worker = %id,
            queue = %queue.name(),
            device = %llama.status().device,
            ms = started.elapsed().as_millis() as u64,
            "worker ready"
        );
        loco_rs::boot::shutdown_signal().await;
        tracing::info!(worker = %id, "stopping: finishing the jobs taken, taking no new ones");
        if let Some((registry, follower)) = placements {
            follower.abort();
            registry.shutdown().await;
        }
        worker.shutdown().await;
        beat.stop().await;
        tracing::info!(worker = %id, "worker stopped");
        Ok(())
    }
}

/// Starts following model placements: a registry of this process's models (the worker's own
/// as the default, loaded ones beside it) and the loop that loads and unloads them.
async fn accept_loads(
    ctx: &AppContext,
    settings: &Settings,
    id: &str,
    engine: std::sync::Arc<dyn crate::engine::Algorithm>,
    events: JobEvents,
    queue: JobQueue,
) -> Result<(
    std::sync::Arc<crate::serving::ModelRegistry>,
    tokio::task::JoinHandle<()>,
)> {
    let engine_settings = settings.engine.clone();
    let tokenizer = tokio::task::spawn_blocking(move || {
        crate::engine::tokenizer::PromptTokenizer::load(&engine_settings)
    })
    .await
    .map_err(msg)?
    .map_err(msg)?;
    // This process is a worker: models load here.
    let mut here = settings.clone();
    here.queue.embedded_worker = true;
    let registry = std::sync::Arc::new(crate::serving::ModelRegistry::new(
        here,
        ctx.db.clone(),
        events,
        crate::serving::DefaultModel {
            queue,
            tokenizer: std::sync::Arc::new(tokenizer),
            engine: Some(engine),
            worker_name: Some(id.to_string()),
            worker: None,
        },
    ));
    let every = std::time::Duration::from_secs(settings.queue.heartbeat_seconds.max(1));
    let follower = tokio::spawn(crate::serving::placements::follow(
        registry.clone(),
        ctx.db.clone(),
        id.to_string(),
        every,
    ));
    tracing::info!(worker = %id, "accepting model loads");
    Ok((registry, follower))
}
