//! What this deployment serves, and where a job for each model goes.
//!
//! [`ModelRegistry`] owns the models: the default one (its queue, its prompt tokenizer and, in
//! embedded mode, the engine and worker inside this process), the models loaded at run time
//! (seed 004's `load_model`, seed 002's `/vllm_request/start`; see [`load`]), and what live
//! worker processes elsewhere hold (production: one model per GPU, read from the `workers`
//! table). Every route that names a model asks it, so each answers the same way.

pub mod load;
pub mod placements;
pub mod remote;

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use sea_orm::{prelude::DateTimeWithTimeZone, DatabaseConnection};
use tokio::sync::Mutex;

use crate::{
    engine::{tokenizer::PromptTokenizer, Algorithm, EngineStatus},
    errors::{ApiError, ErrorCode},
    models::workers,
    notify::JobEvents,
    queue::{JobQueue, WorkerHandle},
    settings::Settings,
    workers::heartbeat::HeartbeatHandle,
};

/// Queues of models held only by workers elsewhere that one API process keeps open; a
/// deployment serving more models than this reopens the least used ones.
const MAX_REMOTE_QUEUES: usize = 64;

/// A model id from a GGUF file name: its stem, with anything unusual replaced.
#[must_use]
pub fn model_id_for_file(file: &str) -> String {
    let stem = file.trim().trim_end_matches(".gguf");
    let stem = stem.rsplit('/').next().unwrap_or(stem);
    stem.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect()
}

/// Whether a client's model `name` is the GGUF file of stem `stem` or the repository it was
/// quantized from: the stem is the name's last part, give or take the quantization suffix
/// (`.Q4_1`), a `.gguf` extension and a `-GGUF` repository suffix; case aside.
#[must_use]
pub fn names_model_file(stem: &str, name: &str) -> bool {
    let stem = stem.to_lowercase();
    let last = name
        .trim()
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_lowercase();
    let last = last.trim_end_matches(".gguf");
    let last = last.strip_suffix("-gguf").unwrap_or(last);
    !last.is_empty()
        && (stem == last
            || stem
                .strip_prefix(last)
                .is_some_and(|rest| rest.starts_with('.')))
}

/// Sampling defaults a configuration's `model_kwargs` may set for its model: the request
/// fields under their own names (`max_tokens`, `temperature`, `top_p`, `top_k`, `min_p`, …),
/// used where a request leaves them out.
#[derive(Debug, Clone, Default)]
pub struct InferenceDefaults {
    pub sampling: crate::admission::SamplingInput,
}

impl InferenceDefaults {
    /// The sampling defaults in `kwargs`, read as a request's fields and held to the same
    /// bounds now, so a bad default is refused when the model loads rather than on every
    /// request.
    ///
    /// # Errors
    /// 422 `invalid_model_kwargs` naming the field.
    pub fn from_kwargs(
        kwargs: &serde_json::Map<String, serde_json::Value>,
        api: &crate::settings::ApiSettings,
    ) -> Result<Self, ApiError> {
        let invalid = |why: String| ApiError::new(ErrorCode::InvalidModelKwargs, why);
        // Read as a request body is: the sampling fields by name, the load options left.
        let sampling: crate::admission::SamplingInput =
            serde_json::from_value(serde_json::Value::Object(kwargs.clone()))
                .map_err(|e| invalid(format!("model_kwargs: {e}")))?;
        sampling
            .clone()
            .into_params(api)
            .map_err(|e| invalid(format!("model_kwargs: {}", e.message)))?;
        Ok(Self { sampling })
    }
}

/// A queue consumer and its heartbeat, stopped together.
pub type Worker = (WorkerHandle, HeartbeatHandle);

/// One model held by this process besides the default one.
pub struct LoadedModel {
    pub model_id: String,
    /// The configuration it was loaded from.
    pub config_id: String,
    pub engine: Arc<dyn Algorithm>,
    pub tokenizer: Arc<PromptTokenizer>,
    pub queue: JobQueue,
    pub defaults: InferenceDefaults,
    pub loaded_at: DateTimeWithTimeZone,
    /// The upstream it forwards to, for a remote model (`None`: a GGUF served here).
    pub remote: Option<crate::engine::remote::RemoteSpec>,
    worker: Mutex<Option<Worker>>,
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
    pub fn status(&self) -> EngineStatus {
        self.engine.status()
    }

    /// Stops the worker after its current job. The engine thread exits when the last handle
    /// to the engine is dropped.
    pub async fn stop(&self) {
        if let Some((worker, beat)) = self.worker.lock().await.take() {
            worker.shutdown().await;
            beat.stop().await;
        }
    }
}

/// The default model as this process holds it.
pub struct DefaultModel {
    pub queue: JobQueue,
    pub tokenizer: Arc<PromptTokenizer>,
    /// The in-process engine (embedded mode); `None` when workers run elsewhere.
    pub engine: Option<Arc<dyn Algorithm>>,
    /// The embedded worker's id (as recorded on the jobs it runs), when there is one.
    pub worker_name: Option<String>,
    pub worker: Option<Worker>,
}

pub struct ModelRegistry {
    settings: Settings,
    db: DatabaseConnection,
    events: JobEvents,
    queue: JobQueue,
    tokenizer: Arc<PromptTokenizer>,
    engine: Option<Arc<dyn Algorithm>>,
    worker_name: Option<String>,
    worker: Mutex<Option<Worker>>,
    loaded: RwLock<HashMap<String, Arc<LoadedModel>>>,
    /// Serializes loads and unloads so two requests never load the same model twice.
    changes: Mutex<()>,
    /// Queues of models held only by worker processes elsewhere, opened on first use.
    remote_queues: Mutex<HashMap<String, JobQueue>>,
    /// The live workers elsewhere as last read, and when: admission asks on every request
    /// whether they can take a model's jobs, and reads the registry at most once a second.
    workers_seen: Mutex<Option<(std::time::Instant, Vec<workers::Model>)>>,
}

impl std::fmt::Debug for ModelRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelRegistry")
            .field("default", &self.settings.engine.model_name)
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

impl ModelRegistry {
    #[must_use]
    pub fn new(
        settings: Settings,
        db: DatabaseConnection,
        events: JobEvents,
        default: DefaultModel,
    ) -> Self {
        Self {
            settings,
            db,
            events,
            queue: default.queue,
            tokenizer: default.tokenizer,
            engine: default.engine,
            worker_name: default.worker_name,
            worker: Mutex::new(default.worker),
            loaded: RwLock::default(),
            changes: Mutex::default(),
            remote_queues: Mutex::default(),
            workers_seen: Mutex::default(),
        }
    }

    /// The default model's name (`settings.engine.model_name`).
    #[must_use]
    pub fn default_name(&self) -> &str {
        &self.settings.engine.model_name
    }

    /// The default model's queue.
    #[must_use]
    pub fn default_queue(&self) -> &JobQueue {
        &self.queue
    }

    /// The embedded engine, when this process runs one.
    #[must_use]
    pub fn engine(&self) -> Option<&Arc<dyn Algorithm>> {
        self.engine.as_ref()
    }

    #[must_use]
    pub fn engine_status(&self) -> Option<EngineStatus> {
        self.engine.as_ref().map(|e| e.status())
    }

    /// Why the engine in this process that serves `model` takes no jobs now (its thread died
    /// and is restarting, or gave up); `None` when it does, or when workers elsewhere serve it.
    #[must_use]
    pub fn engine_down(&self, model: &str) -> Option<String> {
        let status = if model == self.default_name() {
            self.engine_status()?
        } else {
            self.get(model)?.status()
        };
        (!status.ready).then(|| {
            status
                .reason
                .unwrap_or_else(|| "the engine is not ready".into())
        })
    }

    /// The embedded worker's id, when this process runs one.
    #[must_use]
    pub fn worker_name(&self) -> Option<&str> {
        self.worker_name.as_deref()
    }

    /// The served model's architecture, which adapters must match.
    #[must_use]
    pub fn base_architecture(&self) -> Option<String> {
        self.tokenizer.architecture()
    }

    /// Width of the default model's embedding vectors.
    #[must_use]
    pub fn n_embd(&self) -> u32 {
        self.tokenizer.n_embd()
    }

    /// The model id a client's model name stands for: an alias from `settings.aliases`
    /// (to a served id, or to a GGUF file, whose id is its stem); a GGUF file started as an
    /// engine of its own (its stem); the default model's own file or Hugging Face name
    /// (`SmolLM2-135M-Instruct.Q4_1.gguf`, `HuggingFaceTB/SmolLM2-135M-Instruct`, as vLLM's
    /// clients name what it serves); another GGUF file name (the id it would be started
    /// under); else the name itself.
    #[must_use]
    pub fn canonical(&self, name: &str) -> String {
        let name = name.trim();
        match self.settings.aliases.get(name) {
            Some(target) if target.ends_with(".gguf") => model_id_for_file(target),
            Some(target) => target.clone(),
            // A file started as its own engine (with its own settings) is that engine.
            None if name.ends_with(".gguf") && self.get(&model_id_for_file(name)).is_some() => {
                model_id_for_file(name)
            }
            None if self.names_default_file(name) => self.default_name().to_string(),
            None if name.ends_with(".gguf") => model_id_for_file(name),
            None => name.to_string(),
        }
    }

    /// Whether `name` is the default model's file, or the repository it was quantized from.
    fn names_default_file(&self, name: &str) -> bool {
        self.settings
            .engine
            .model_path
            .file_stem()
            .is_some_and(|stem| names_model_file(&stem.to_string_lossy(), name))
    }

    /// The alias `name` has in `settings.aliases`, if any.
    #[must_use]
    pub fn alias(&self, name: &str) -> Option<&str> {
        self.settings.aliases.get(name.trim()).map(String::as_str)
    }

    /// A model loaded at run time in this process.
    #[must_use]
    pub fn get(&self, model_id: &str) -> Option<Arc<LoadedModel>> {
        self.loaded
            .read()
            .ok()
            .and_then(|m| m.get(model_id).cloned())
    }

    /// Models loaded at run time, by id.
    #[must_use]
    pub fn loaded(&self) -> Vec<Arc<LoadedModel>> {
        let mut all: Vec<_> = self
            .loaded
            .read()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        all.sort_by(|a, b| a.model_id.cmp(&b.model_id));
        all
    }

    /// Names of every model this process can serve now: the default one and those loaded.
    #[must_use]
    pub fn served_here(&self) -> Vec<String> {
        let mut names = vec![self.default_name().to_string()];
        names.extend(self.loaded().iter().map(|m| m.model_id.clone()));
        names
    }

    /// The tokenizer that counts prompts for `model` (the default one for unknown names).
    #[must_use]
    pub fn tokenizer_for(&self, model: &str) -> Arc<PromptTokenizer> {
        self.get(model)
            .map_or_else(|| self.tokenizer.clone(), |m| m.tokenizer.clone())
    }

    /// Sampling defaults of a model loaded from a configuration.
    #[must_use]
    pub fn defaults_for(&self, model: &str) -> InferenceDefaults {
        self.get(model)
            .map(|m| m.defaults.clone())
            .unwrap_or_default()
    }

    /// The queue a job for `model` goes to when this process knows the model itself.
    fn queue_here(&self, model: &str) -> Option<JobQueue> {
        if model == self.default_name() {
            return Some(self.queue.clone());
        }
        self.get(model).map(|m| m.queue.clone())
    }

    /// The queue of `model`: this process's own, or that of a model held by workers elsewhere.
    pub async fn queue_of(&self, model: &str) -> Option<JobQueue> {
        if let Some(queue) = self.queue_here(model) {
            return Some(queue);
        }
        let mut remote = self.remote_queues.lock().await;
        if let Some(queue) = remote.get(model) {
            return Some(queue.clone());
        }
        match JobQueue::connect(&self.settings.queue, model).await {
            Ok(queue) => {
                if remote.len() >= MAX_REMOTE_QUEUES {
                    remote.clear();
                }
                remote.insert(model.to_string(), queue.clone());
                Some(queue)
            }
            Err(e) => {
                tracing::warn!(error = %e, model, "cannot open the model's queue");
                None
            }
        }
    }

    /// Live worker processes other than this process's own worker: what production API
    /// instances (which hold no engine) know of the models being served.
    pub async fn remote_workers(&self) -> Vec<workers::Model> {
        let gone_after = self.settings.queue.orphan_after();
        match workers::list(&self.db).await {
            Ok(rows) => rows
                .into_iter()
                .filter(|w| w.is_live(gone_after))
                .filter(|w| self.worker_name.as_deref() != Some(w.id.as_str()))
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the worker registry");
                Vec::new()
            }
        }
    }

    /// Whether this process runs an engine for `model` (else worker processes serve it).
    #[must_use]
    pub fn has_engine_for(&self, model: &str) -> bool {
        if model == self.default_name() {
            self.engine.is_some()
        } else {
            self.get(model).is_some()
        }
    }

    /// Why the worker processes holding `model` take no jobs for it now: every live one that
    /// holds it reports its engine down (their heartbeat carries the engine's status); the
    /// first one's reason. `None` when one of them is ready, or none holds it (the reaper then
    /// bounds how long a job may wait). Reads the registry at most once a second.
    pub async fn workers_down(&self, model: &str) -> Option<String> {
        let mut seen = self.workers_seen.lock().await;
        let fresh = seen
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() < std::time::Duration::from_secs(1));
        if !fresh {
            *seen = Some((std::time::Instant::now(), self.remote_workers().await));
        }
        seen.as_ref().and_then(|(_, remote)| down_in(remote, model))
    }

    /// Models held by live workers elsewhere that this process does not hold itself.
    pub async fn remote_models(&self) -> Vec<String> {
        self.models_of(&self.remote_workers().await)
    }

    /// The context length of `model`: its tokenizer's here, or what one of `remote` (the live
    /// workers elsewhere, read once by the caller) reported for it.
    #[must_use]
    pub fn context_size_of(&self, model: &str, remote: &[workers::Model]) -> u32 {
        if model == self.default_name() || self.get(model).is_some() {
            return self.tokenizer_for(model).context_size();
        }
        remote
            .iter()
            .filter(|w| w.model_list().iter().any(|m| m == model))
            .find_map(|w| w.engine_status().map(|s| s.context_size))
            .unwrap_or_else(|| self.tokenizer.context_size())
    }

    /// Models held by the workers of `remote` that this process does not hold itself.
    #[must_use]
    pub fn models_of(&self, remote: &[workers::Model]) -> Vec<String> {
        let mut models: Vec<String> = remote
            .iter()
            .flat_map(workers::Model::model_list)
            .filter(|m| m != self.default_name() && self.get(m).is_none())
            .collect();
        models.sort();
        models.dedup();
        models
    }

    /// Every model served now (the default one, those loaded here, those held by live workers
    /// elsewhere) with its queue, for depth figures.
    pub async fn served_queues(&self) -> Vec<(String, JobQueue)> {
        let mut queues = vec![(self.default_name().to_string(), self.queue.clone())];
        for m in self.loaded() {
            queues.push((m.model_id.clone(), m.queue.clone()));
        }
        for model in self.remote_models().await {
            if let Some(queue) = self.queue_of(&model).await {
                queues.push((model, queue));
            }
        }
        queues
    }

    /// Which workers hold which adapters loaded now: this process's own worker (read live) and
    /// worker processes elsewhere (as of their last heartbeat).
    pub async fn adapter_holders(&self) -> Vec<(String, Vec<String>)> {
        let mut all = Vec::new();
        if let (Some(status), Some(worker)) = (self.engine_status(), &self.worker_name) {
            all.push((worker.clone(), status.adapters));
        }
        for w in self.remote_workers().await {
            let adapters = w.adapter_list();
            all.push((w.id, adapters));
        }
        all
    }

    /// Stops the embedded worker and those of run-time loaded models, each after its current
    /// job (server shutdown).
    pub async fn shutdown(&self) {
        for model in self.loaded() {
            model.stop().await;
        }
        if let Some((worker, beat)) = self.worker.lock().await.take() {
            worker.shutdown().await;
            beat.stop().await;
        }
    }
}

/// Why none of `remote` (live workers) can serve `model`: each that holds it reports its engine
/// down; the first one's reason. `None` when one is ready or none holds it.
#[must_use]
pub fn down_in(remote: &[workers::Model], model: &str) -> Option<String> {
    let mut holders = remote
        .iter()
        .filter(|w| w.model_list().iter().any(|m| m == model))
        .peekable();
    holders.peek()?;
    let mut first_reason = None;
    for w in holders {
        // A worker whose status cannot be read is taken as ready (older workers).
        let status = w.engine_status()?;
        if status.ready {
            return None;
        }
        first_reason.get_or_insert(status.reason);
    }
    Some(
        first_reason
            .flatten()
            .unwrap_or_else(|| "the engine is not ready".into()),
    )
}

#[cfg(test)]
mod tests {
    use super::names_model_file;

    #[test]
    fn a_model_is_named_by_its_file_or_its_repository() {
        let stem = "SmolLM2-135M-Instruct.Q4_1";
        for name in [
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "SmolLM2-135M-Instruct.Q4_1",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "smollm2-135m-instruct",
            "bartowski/SmolLM2-135M-Instruct-GGUF",
        ] {
            assert!(names_model_file(stem, name), "{name}");
        }
        for name in [
            "SmolLM2-135M",
            "HuggingFaceTB/SmolLM2-360M-Instruct",
            "",
            "smollm2",
            "gpt-4o",
        ] {
            assert!(!names_model_file(stem, name), "{name}");
        }
    }
}
