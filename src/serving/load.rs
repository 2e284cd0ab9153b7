//! Loading and unloading models at run time (seed 004's `load_model` / `unload_model`, seed
//! 002's engines). A loaded model gets what the default model has: its own engine thread
//! (weights resident until unloaded), a vocab-only tokenizer for prompt checks, its own queue
//! (`<prefix>.generate.<model_id>`) and a worker on it that heartbeats like any other.

use std::sync::Arc;

use serde_json::{Map, Value};
use tokio::sync::Mutex;

use super::{InferenceDefaults, LoadedModel, ModelRegistry};
use crate::{
    engine::{tokenizer::PromptTokenizer, EngineError},
    errors::{ApiError, ErrorCode},
    models::{jobs, model_configs},
    queue::JobQueue,
};

fn kw_u32(kwargs: &Map<String, Value>, names: &[&str]) -> Result<Option<u32>, ApiError> {
    for name in names {
        if let Some(v) = kwargs.get(*name) {
            return v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| {
                    ApiError::new(
                        ErrorCode::InvalidModelKwargs,
                        format!("model_kwargs.{name} must be a whole number"),
                    )
                });
        }
    }
    Ok(None)
}

/// Models this process serves besides the default one, at most (GGUFs and upstreams alike):
/// each has a queue, a worker and a vocabulary in memory.
const MAX_LOADED: usize = 64;

impl ModelRegistry {
    /// Loads the model a configuration describes: a GGUF under the models directory (or the
    /// default model's own name), with `model_kwargs` `context_size`/`n_ctx`/`max_model_len`,
    /// `n_gpu_layers`, `threads`, and inference defaults `temperature`, `max_tokens`, `top_p`.
    /// Returns the loaded model and whether this call loaded it (false: it already was).
    /// A `model_type` `openai`/`vllm` configuration is an upstream instead ([`super::remote`]).
    ///
    /// # Errors
    /// 409 for the default model's id or when workers run in other processes, 422 for a file
    /// that is not there or not a model, 503 when the queue cannot be opened.
    pub async fn load(
        &self,
        config: &model_configs::Model,
    ) -> Result<(Arc<LoadedModel>, bool), ApiError> {
        let _changing = self.changes.lock().await;
        let model_id = config.model_id.clone();
        let engine_defaults = &self.settings.engine;
        if model_id == engine_defaults.model_name {
            return Err(ApiError::new(ErrorCode::ModelIdReserved,
                format!("{model_id:?} is the default model, loaded from settings.engine; choose another model_id"),
            ));
        }
        if let Some(existing) = self.get(&model_id) {
            return Ok((existing, false));
        }
        if let Some(full) = self.full() {
            return Err(full);
        }
        if crate::engine::remote::is_remote_type(&config.model_type) {
            // Forwarding needs no GPU: served from this process in every mode.
            return self.load_remote(config).await;
        }
        if !self.settings.queue.embedded_worker {
            return Err(ApiError::new(
                ErrorCode::NoLocalWorker,
                "this API process has no worker; load models on the workers' command line",
            ));
        }
        let models_dir = engine_defaults.model_path.parent().map_or_else(
            || std::path::PathBuf::from("."),
            std::path::Path::to_path_buf,
        );
        let path = if config.model_name == engine_defaults.model_name {
            engine_defaults.model_path.clone()
        } else {
            model_configs::file_inside(&models_dir, &config.model_name).map_err(|e| {
                ApiError::new(ErrorCode::ModelNotLoadable,
                    format!(
                        "{e}; model_name must name a GGUF file in {} (available: {:?}) or the default model {:?}",
                        models_dir.display(),
                        model_configs::gguf_files(&models_dir),
                        engine_defaults.model_name
                    ),
                )
            })?
        };
        let kwargs = config.kwargs();
        let mut settings = self.settings.clone();
        settings.engine.model_name.clone_from(&model_id);
        settings.engine.model_path = path;
        if let Some(n) = kw_u32(&kwargs, &["context_size", "n_ctx", "max_model_len"])? {
            settings.engine.context_size = n.clamp(64, 131_072);
        }
        if let Some(n) = kw_u32(&kwargs, &["n_gpu_layers"])? {
            settings.engine.n_gpu_layers = n;
        }
        if let Some(n) = kw_u32(&kwargs, &["threads", "n_threads"])? {
            settings.engine.threads = n;
        }
        let defaults = InferenceDefaults::from_kwargs(&kwargs, &self.settings.api)?;

        let for_engine = settings.engine.clone();
        let (engine, tokenizer) = tokio::task::spawn_blocking(move || {
            let engine = crate::engine::start(&for_engine)?;
            let tokenizer = PromptTokenizer::load(&for_engine)?;
            Ok::<_, EngineError>((engine, tokenizer))
        })
        .await
        .map_err(ApiError::internal)?
        .map_err(|e| ApiError::new(ErrorCode::ModelNotLoadable, e.to_string()))?;
        let (queue, worker) = self
            .serve(&settings, &model_id, &engine, "embedded")
            .await?;
        let loaded = Arc::new(LoadedModel {
            model_id: model_id.clone(),
            config_id: config.config_id.clone(),
            engine,
            tokenizer: Arc::new(tokenizer),
            queue,
            defaults,
            loaded_at: crate::models::now(),
            remote: None,
            worker: Mutex::new(Some(worker)),
        });
        self.register(&loaded);
        tracing::info!(model_id = %model_id, config_id = %config.config_id, "model loaded");
        Ok((loaded, true))
    }

    /// Opens `model_id`'s queue and starts its worker (heartbeat named `<prefix>-<pid>-<id>`):
    /// the same for a GGUF and an upstream.
    pub(super) async fn serve(
        &self,
        settings: &crate::settings::Settings,
        model_id: &str,
        engine: &Arc<dyn crate::engine::Algorithm>,
        prefix: &str,
    ) -> Result<(JobQueue, super::Worker), ApiError> {
        let queue = JobQueue::connect(&settings.queue, model_id)
            .await
            .map_err(|e| ApiError::new(ErrorCode::QueueUnavailable, e.to_string()))?;
        let name = format!("{prefix}-{}-{model_id}", std::process::id());
        let worker = crate::workers::serve_queue(
            &self.db,
            engine.clone(),
            self.events.clone(),
            &name,
            settings,
            &queue,
        )
        .await;
        Ok((queue, worker))
    }

    /// Adds a started model to the registry.
    pub(super) fn register(&self, loaded: &Arc<LoadedModel>) {
        if let Ok(mut m) = self.loaded.write() {
            m.insert(loaded.model_id.clone(), loaded.clone());
        }
    }

    /// Whether this process already serves as many run-time models as it may.
    pub(super) fn full(&self) -> Option<ApiError> {
        (self.loaded.read().map_or(0, |m| m.len()) >= MAX_LOADED).then(|| {
            ApiError::new(
                ErrorCode::ModelNotLoadable,
                format!("this process serves {MAX_LOADED} models already; unload one first"),
            )
        })
    }

    /// Unloads a model: its worker finishes the current job and stops, its engine thread
    /// exits (weights freed), and jobs still queued for it fail with their calls refunded.
    ///
    /// # Errors
    /// 409 for the default model, 404 when the model is not loaded.
    pub async fn unload(&self, model_id: &str) -> Result<(), ApiError> {
        let _changing = self.changes.lock().await;
        if model_id == self.default_name() {
            return Err(ApiError::new(
                ErrorCode::ModelPinned,
                format!("{model_id:?} is the default model (settings.engine); it stays loaded"),
            ));
        }
        let removed = self
            .loaded
            .write()
            .ok()
            .and_then(|mut m| m.remove(model_id));
        let Some(model) = removed else {
            return Err(ApiError::new(
                ErrorCode::ModelNotLoaded,
                format!(
                    "model {model_id:?} is not loaded; loaded: {:?}",
                    self.served_here()
                ),
            ));
        };
        model.stop().await;
        for job in jobs::Model::queued_for_model(&self.db, model_id).await? {
            if let Some(failed) = jobs::fail(&self.db, &job.id, "the model was unloaded").await? {
                self.events.publish(&failed);
            }
        }
        tracing::info!(model_id = %model_id, "model unloaded");
        Ok(())
    }

    /// Whether `config_id` is the configuration a loaded model came from.
    #[must_use]
    pub fn is_loaded_from(&self, config: &model_configs::Model) -> bool {
        self.get(&config.model_id)
            .is_some_and(|m| m.config_id == config.config_id)
    }
}
