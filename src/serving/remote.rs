//! Remote models: seed 004's `model_type` `openai` / `vllm` configurations and the upstreams
//! of `settings.remote_models`, served through [`RemoteEngine`].
//!
//! A remote model is loaded like a GGUF one — its own queue, a worker on it that heartbeats,
//! an entry in the registry every route reads — so keys, quotas, budgets, rate limits,
//! allow-lists, durable jobs and streaming apply unchanged. Its worker forwards instead of
//! decoding, so it needs no GPU and runs in the API process even in production (where GGUF
//! models live in worker processes): other API instances see it in the `workers` table and
//! route its jobs to its queue like any other model's.
//!
//! Prompt tokens: there is no local tokenizer for an upstream's model, so admission reserves
//! [`remote::reserve_estimate`] (an upper bound) and the job's settlement brings the counters
//! to the upstream's reported `usage` (see `budgets::settle`). The context check is the
//! upstream's own: its refusal comes back as 400 `context_length_exceeded`, refunded.

use std::sync::Arc;

use tokio::sync::Mutex;

use super::{InferenceDefaults, LoadedModel, ModelRegistry};
use crate::{
    engine::{
        remote::{self, Credential, RemoteEngine, RemoteSpec},
        tokenizer::PromptTokenizer,
        Algorithm,
    },
    errors::{ApiError, ErrorCode},
    models::model_configs,
    paths::contained_file,
};

/// The `config_id` recorded for upstreams declared in `settings.remote_models`.
pub const FROM_SETTINGS: &str = "settings.remote_models";

const SECRETS_FOLDER: &str = "the secrets folder (settings.remote_credentials.dir)";

fn invalid_kwargs(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::InvalidModelKwargs, message)
}

fn not_loadable(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::ModelNotLoadable, message)
}

/// Refuses, before it is stored, a configuration that would put a credential in the database
/// (any type), and a remote one whose fields do not parse or whose secret file path leaves
/// the secrets folder. Which variables and files may be named is checked again at load.
///
/// # Errors
/// 422 `invalid_model_kwargs` naming the field (never echoing a value).
pub fn check_new_config(new: &model_configs::NewConfig) -> Result<(), ApiError> {
    if let Some(secret) = new.model_kwargs.keys().find(|k| remote::is_secret_kwarg(k)) {
        return Err(invalid_kwargs(format!(
            "model_kwargs.{secret} would store a credential in the database; name an \
             environment variable (api_key_env) or a secret file (api_key_file) instead"
        )));
    }
    if !remote::is_remote_type(&new.model_type) {
        return Ok(());
    }
    // A `vllm` configuration may be stored before it says where its upstream is (seed 004
    // names the type alone); loading it without `base_url` is refused then. Everything else
    // is checked now, as if the URL were there.
    let mut kwargs = new.model_kwargs.clone();
    let names_base = ["base_url", "api_base", "openai_api_base"]
        .iter()
        .any(|k| kwargs.contains_key(*k));
    if !names_base && !new.model_type.trim().eq_ignore_ascii_case("openai") {
        kwargs.insert("base_url".into(), "http://upstream.invalid/v1".into());
    }
    let spec = RemoteSpec::from_config(&new.model_id, &new.model_type, &new.model_name, &kwargs)
        .map_err(invalid_kwargs)?;
    if let Credential::File(path) = &spec.credential {
        // Missing is fine (the secret may be mounted later); a path out of the folder is not.
        let inside = path.is_relative()
            && path.components().all(|c| {
                matches!(
                    c,
                    std::path::Component::Normal(_) | std::path::Component::CurDir
                )
            });
        if !inside {
            return Err(invalid_kwargs(format!(
                "model_kwargs.api_key_file must be a path relative to {SECRETS_FOLDER}, without `..`"
            )));
        }
    }
    Ok(())
}

/// Model ids: they become queue names and `model` fields (as `model_configs` requires).
fn valid_model_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl ModelRegistry {
    /// Whether `model` is served here by forwarding to an upstream (no local tokenizer).
    #[must_use]
    pub fn is_remote(&self, model: &str) -> bool {
        self.get(model).is_some_and(|m| m.remote.is_some())
    }

    /// The spec of a stored remote configuration, its credential held to what configurations
    /// made over HTTP may name (`settings.remote_credentials`) and its secret file resolved.
    fn spec_of(&self, config: &model_configs::Model) -> Result<RemoteSpec, ApiError> {
        let mut spec = RemoteSpec::from_config(
            &config.model_id,
            &config.model_type,
            &config.model_name,
            &config.kwargs(),
        )
        .map_err(invalid_kwargs)?;
        let allowed = &self.settings.remote_credentials;
        match &spec.credential {
            Credential::Env(name) if !allowed.env.contains(name) => {
                return Err(not_loadable(format!(
                    "api_key_env {name} is not a variable configurations may name; the \
                     server's operator lists those in settings.remote_credentials.env \
                     (now {:?})",
                    allowed.env
                )));
            }
            Credential::EnvIfSet(name) if !allowed.env.contains(name) => {
                spec.credential = Credential::None;
            }
            Credential::File(path) => {
                let real = contained_file(
                    &allowed.dir,
                    path.to_str().unwrap_or_default(),
                    SECRETS_FOLDER,
                )
                .map_err(|e| not_loadable(format!("api_key_file: {e}")))?;
                spec.credential = Credential::File(real.path);
            }
            _ => {}
        }
        Ok(spec)
    }

    /// Loads a remote configuration (called by [`Self::load`] with its lock held).
    pub(super) async fn load_remote(
        &self,
        config: &model_configs::Model,
    ) -> Result<(Arc<LoadedModel>, bool), ApiError> {
        let spec = self.spec_of(config)?;
        let defaults = InferenceDefaults::from_kwargs(&config.kwargs(), &self.settings.api)?;
        let loaded = self
            .start_remote(spec, config.config_id.clone(), defaults)
            .await?;
        Ok((loaded, true))
    }

    /// Starts the upstreams of `settings.remote_models` (server start-up).
    ///
    /// # Errors
    /// A message naming the entry that cannot be served (a bad URL or id, a named credential
    /// that is not there): the server does not start half-configured.
    pub async fn start_configured_remotes(&self) -> Result<(), String> {
        let _changing = self.changes.lock().await;
        for (i, entry) in self.settings.remote_models.iter().enumerate() {
            let at = format!("settings.remote_models[{i}] ({:?})", entry.id);
            let spec = RemoteSpec::from_settings(entry).map_err(|e| format!("{at}: {e}"))?;
            if !valid_model_id(&spec.model_id) {
                return Err(format!(
                    "{at}: id must be 1-64 letters, digits, '-', '_' or '.'"
                ));
            }
            if spec.model_id == self.default_name() || self.get(&spec.model_id).is_some() {
                return Err(format!("{at}: the id is already served"));
            }
            self.start_remote(spec, FROM_SETTINGS.into(), InferenceDefaults::default())
                .await
                .map_err(|e| format!("{at}: {}", e.message))?;
        }
        Ok(())
    }

    /// The engine, queue and worker of one upstream, registered under its id.
    async fn start_remote(
        &self,
        spec: RemoteSpec,
        config_id: String,
        defaults: InferenceDefaults,
    ) -> Result<Arc<LoadedModel>, ApiError> {
        if let Some(full) = self.full() {
            return Err(full);
        }
        // The credential is read again at each request; a missing one is a load error now.
        spec.credential.resolve().map_err(not_loadable)?;
        let engine = RemoteEngine::new(spec.clone(), self.settings.engine.embeddings.enabled)
            .map_err(|e| not_loadable(e.to_string()))?;
        let engine: Arc<dyn Algorithm> = Arc::new(engine);
        let mut settings = self.settings.clone();
        settings.engine.model_name.clone_from(&spec.model_id);
        settings.engine.context_size = spec.context_size;
        // Only for what needs a vocabulary (chat history trimming, /tokenize); prompt tokens
        // of a remote model are reserved by estimate and settled to the upstream's usage.
        let for_tokenizer = settings.engine.clone();
        let tokenizer = tokio::task::spawn_blocking(move || PromptTokenizer::load(&for_tokenizer))
            .await
            .map_err(ApiError::internal)?
            .map_err(ApiError::internal)?;
        let (queue, worker) = self
            .serve(&settings, &spec.model_id, &engine, "remote")
            .await?;
        tracing::info!(
            model_id = %spec.model_id,
            upstream = %spec.base_url,
            upstream_model = %spec.upstream_model,
            credential = %spec.credential.describe(),
            config_id = %config_id,
            "remote model loaded"
        );
        let loaded = Arc::new(LoadedModel {
            model_id: spec.model_id.clone(),
            config_id,
            engine,
            tokenizer: Arc::new(tokenizer),
            queue,
            defaults,
            loaded_at: crate::models::now(),
            remote: Some(spec),
            worker: Mutex::new(Some(worker)),
        });
        self.register(&loaded);
        Ok(loaded)
    }
}
