//! Models loaded at run time (seed 004's `load_model` / `unload_model`), besides the configured
//! default model.
//!
//! Each loaded model gets what the default model has: its own engine thread (weights and
//! context resident until unloaded), a vocab-only tokenizer for prompt checks, its own queue
//! (`tollgate.generate.<model_id>`) and a serial worker on it. `loaded_models` is read from
//! here, so it reports what this process actually holds, not what was requested.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use sea_orm::prelude::DateTimeWithTimeZone;
use tokio::sync::Mutex;

use crate::{
    engine::{tokenizer::PromptTokenizer, Algorithm, EngineStatus},
    queue::{JobQueue, WorkerHandle},
};

/// Sampling defaults a configuration's `model_kwargs` may set for its model.
#[derive(Debug, Clone, Default)]
pub struct InferenceDefaults {
    pub temperature: Option<f64>,
    pub max_tokens: Option<i64>,
    pub top_p: Option<f64>,
}

/// One model held by this process.
pub struct LoadedModel {
    pub model_id: String,
    /// The configuration it was loaded from.
    pub config_id: String,
    pub engine: Arc<dyn Algorithm>,
    pub tokenizer: Arc<PromptTokenizer>,
    pub queue: JobQueue,
    pub defaults: InferenceDefaults,
    pub loaded_at: DateTimeWithTimeZone,
    worker: Mutex<Option<WorkerHandle>>,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("model_id", &self.model_id)
            .field("config_id", &self.config_id)
            .finish_non_exhaustive()
    }
}

impl LoadedModel {
    #[must_use]
    pub fn new(
        model_id: String,
        config_id: String,
        engine: Arc<dyn Algorithm>,
        tokenizer: Arc<PromptTokenizer>,
        queue: JobQueue,
        defaults: InferenceDefaults,
        worker: WorkerHandle,
    ) -> Self {
        Self {
            model_id,
            config_id,
            engine,
            tokenizer,
            queue,
            defaults,
            loaded_at: crate::models::now(),
            worker: Mutex::new(Some(worker)),
        }
    }

    #[must_use]
    pub fn status(&self) -> EngineStatus {
        self.engine.status()
    }

    /// Stops the worker after its current job. The engine thread exits when the last handle
    /// to the engine is dropped.
    pub async fn stop(&self) {
        if let Some(worker) = self.worker.lock().await.take() {
            worker.shutdown().await;
        }
    }
}

#[derive(Debug, Default)]
pub struct ModelRegistry {
    models: RwLock<HashMap<String, Arc<LoadedModel>>>,
    /// Serializes loads and unloads so two requests never load the same model twice.
    pub changes: Mutex<()>,
}

impl ModelRegistry {
    #[must_use]
    pub fn get(&self, model_id: &str) -> Option<Arc<LoadedModel>> {
        self.models
            .read()
            .ok()
            .and_then(|m| m.get(model_id).cloned())
    }

    /// Loaded models, by id.
    #[must_use]
    pub fn all(&self) -> Vec<Arc<LoadedModel>> {
        let mut all: Vec<_> = self
            .models
            .read()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        all.sort_by(|a, b| a.model_id.cmp(&b.model_id));
        all
    }

    pub fn insert(&self, model: Arc<LoadedModel>) {
        if let Ok(mut m) = self.models.write() {
            m.insert(model.model_id.clone(), model);
        }
    }

    pub fn remove(&self, model_id: &str) -> Option<Arc<LoadedModel>> {
        self.models
            .write()
            .ok()
            .and_then(|mut m| m.remove(model_id))
    }
}

use sea_orm::DatabaseConnection;
use serde_json::{Map, Value};

use crate::{
    engine::llama::LlamaEngine,
    errors::ApiError,
    models::{jobs, model_configs},
    services::Services,
    workers::generation::GenerationWorker,
};

fn kw_u32(kwargs: &Map<String, Value>, names: &[&str]) -> Result<Option<u32>, ApiError> {
    for name in names {
        if let Some(v) = kwargs.get(*name) {
            return v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| {
                    ApiError::unprocessable(
                        "invalid_model_kwargs",
                        format!("model_kwargs.{name} must be a whole number"),
                    )
                });
        }
    }
    Ok(None)
}

fn kw_f64(kwargs: &Map<String, Value>, name: &str) -> Result<Option<f64>, ApiError> {
    kwargs
        .get(name)
        .map(|v| {
            v.as_f64().ok_or_else(|| {
                ApiError::unprocessable(
                    "invalid_model_kwargs",
                    format!("model_kwargs.{name} must be a number"),
                )
            })
        })
        .transpose()
}

impl Services {
    /// Names of every model this process can serve now: the default one and those loaded.
    #[must_use]
    pub fn served_models(&self) -> Vec<String> {
        let mut names = vec![self.settings.engine.model_name.clone()];
        names.extend(self.registry.all().iter().map(|m| m.model_id.clone()));
        names
    }

    /// The queue a job for `model` goes to, if this process knows the model.
    #[must_use]
    pub fn queue_for(&self, model: &str) -> Option<JobQueue> {
        if model == self.settings.engine.model_name {
            return Some(self.queue.clone());
        }
        self.registry.get(model).map(|m| m.queue.clone())
    }

    /// The tokenizer that counts prompts for `model` (the default one for unknown names).
    #[must_use]
    pub fn tokenizer_for(&self, model: &str) -> Arc<PromptTokenizer> {
        self.registry
            .get(model)
            .map_or_else(|| self.tokenizer.clone(), |m| m.tokenizer.clone())
    }

    /// Loads the model a configuration describes: a GGUF under the models directory (or the
    /// default model's own name), with `model_kwargs` `context_size`/`n_ctx`/`max_model_len`,
    /// `n_gpu_layers`, `threads`, and inference defaults `temperature`, `max_tokens`, `top_p`.
    /// Returns the loaded model and whether this call loaded it (false: it already was).
    ///
    /// # Errors
    /// 409 for the default model's id or when workers run in other processes, 422 for a file
    /// that is not there or not a model, 503 when the queue cannot be opened.
    pub async fn load_model(
        &self,
        db: &DatabaseConnection,
        config: &model_configs::Model,
    ) -> Result<(Arc<LoadedModel>, bool), ApiError> {
        let _changing = self.registry.changes.lock().await;
        let model_id = config.model_id.clone();
        if model_id == self.settings.engine.model_name {
            return Err(ApiError::conflict(
                "model_id_reserved",
                format!("{model_id:?} is the default model, loaded from settings.engine; choose another model_id"),
            ));
        }
        if let Some(existing) = self.registry.get(&model_id) {
            return Ok((existing, false));
        }
        if !self.settings.queue.embedded_worker {
            return Err(ApiError::conflict(
                "no_local_worker",
                "this API process has no worker; load models on the workers' command line",
            ));
        }
        let models_dir = self.settings.engine.model_path.parent().map_or_else(
            || std::path::PathBuf::from("."),
            std::path::Path::to_path_buf,
        );
        let path = if config.model_name == self.settings.engine.model_name {
            self.settings.engine.model_path.clone()
        } else {
            model_configs::file_inside(&models_dir, &config.model_name).map_err(|e| {
                ApiError::unprocessable(
                    "model_not_loadable",
                    format!(
                        "{e}; model_name must name a GGUF file in {} (available: {:?}) or the default model {:?}",
                        models_dir.display(),
                        model_configs::gguf_files(&models_dir),
                        self.settings.engine.model_name
                    ),
                )
            })?
        };
        let kwargs = config.kwargs();
        let mut engine_settings = self.settings.engine.clone();
        engine_settings.model_name.clone_from(&model_id);
        engine_settings.model_path = path;
        if let Some(n) = kw_u32(&kwargs, &["context_size", "n_ctx", "max_model_len"])? {
            engine_settings.context_size = n.clamp(64, 131_072);
        }
        if let Some(n) = kw_u32(&kwargs, &["n_gpu_layers"])? {
            engine_settings.n_gpu_layers = n;
        }
        if let Some(n) = kw_u32(&kwargs, &["threads", "n_threads"])? {
            engine_settings.threads = n;
        }
        let defaults = InferenceDefaults {
            temperature: kw_f64(&kwargs, "temperature")?,
            max_tokens: kw_u32(&kwargs, &["max_tokens"])?.map(i64::from),
            top_p: kw_f64(&kwargs, "top_p")?,
        };

        let for_engine = engine_settings.clone();
        let (engine, tokenizer) = tokio::task::spawn_blocking(move || {
            let engine = LlamaEngine::start(for_engine.clone())?;
            let tokenizer = PromptTokenizer::load(&for_engine)?;
            Ok::<_, crate::engine::EngineError>((engine, tokenizer))
        })
        .await
        .map_err(ApiError::internal)?
        .map_err(|e| ApiError::unprocessable("model_not_loadable", e.to_string()))?;
        let queue = JobQueue::connect(&self.settings.queue, &model_id)
            .await
            .map_err(|e| ApiError::unavailable("queue_unavailable", e.to_string()))?;
        let engine: Arc<dyn Algorithm> = Arc::new(engine);
        let name = format!("embedded-{}-{model_id}", std::process::id());
        let handler = Arc::new(
            GenerationWorker::new(
                db.clone(),
                engine.clone(),
                self.events.clone(),
                name.clone(),
            )
            .with_max_attempts(self.settings.queue.max_attempts),
        );
        let concurrency = handler.concurrency(engine_settings.lookahead);
        let worker = queue.spawn_worker(&name, handler, concurrency).await;
        let loaded = Arc::new(LoadedModel::new(
            model_id.clone(),
            config.config_id.clone(),
            engine,
            Arc::new(tokenizer),
            queue,
            defaults,
            worker,
        ));
        self.registry.insert(loaded.clone());
        tracing::info!(model_id = %model_id, config_id = %config.config_id, "model loaded");
        Ok((loaded, true))
    }

    /// Unloads a model: its worker finishes the current job and stops, its engine thread
    /// exits (weights freed), and jobs still queued for it fail with their calls refunded.
    ///
    /// # Errors
    /// 409 for the default model, 404 when the model is not loaded.
    pub async fn unload_model(
        &self,
        db: &DatabaseConnection,
        model_id: &str,
    ) -> Result<(), ApiError> {
        let _changing = self.registry.changes.lock().await;
        if model_id == self.settings.engine.model_name {
            return Err(ApiError::conflict(
                "model_pinned",
                format!("{model_id:?} is the default model (settings.engine); it stays loaded"),
            ));
        }
        let Some(model) = self.registry.remove(model_id) else {
            return Err(ApiError::not_found(
                "model_not_loaded",
                format!(
                    "model {model_id:?} is not loaded; loaded: {:?}",
                    self.served_models()
                ),
            ));
        };
        model.stop().await;
        for job in jobs::Model::queued_for_model(db, model_id).await? {
            if let Some(failed) = jobs::fail(db, &job.id, "the model was unloaded").await? {
                self.events.publish(&failed);
            }
        }
        tracing::info!(model_id = %model_id, "model unloaded");
        Ok(())
    }

    /// Stops the workers of run-time loaded models (server shutdown).
    pub async fn stop_loaded_models(&self) {
        for model in self.registry.all() {
            model.stop().await;
        }
    }
}
