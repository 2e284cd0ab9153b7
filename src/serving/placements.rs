//! Model control in production, where API instances hold no engine: `load_model` and
//! `unload_model` record the wish in `model_placements` and wait for a worker process to act;
//! worker processes started with `accept_loads=true` run [`follow`], which claims wanted
//! models (exactly one worker each, another one after the holder dies), loads them through this
//! registry (the same code as the embedded mode) and unloads them when asked.

use std::{sync::Arc, time::Duration};

use sea_orm::DatabaseConnection;

use super::ModelRegistry;
use crate::{
    errors::{ApiError, ErrorCode},
    models::{model_configs, model_placements, workers},
};

/// What a load request came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    pub model_id: String,
    pub config_id: String,
    /// Loaded by this request (not already served).
    pub newly: bool,
    /// Still loading when the wait ran out (production only): a worker will finish it.
    pub pending: bool,
}

/// How often the API looks whether a worker has acted.
const POLL: Duration = Duration::from_millis(300);

impl ModelRegistry {
    /// Whether models load in this process (it runs the embedded worker).
    #[must_use]
    pub fn loads_here(&self) -> bool {
        self.settings.queue.embedded_worker
    }

    /// Serves `config`: loads it here in embedded mode, else has a worker process load it.
    ///
    /// # Errors
    /// As [`Self::load`]; in production 422 `model_not_loadable` with the worker's reason.
    pub async fn load_or_place(&self, config: &model_configs::Model) -> Result<Placed, ApiError> {
        let placed = |newly, pending| Placed {
            model_id: config.model_id.clone(),
            config_id: config.config_id.clone(),
            newly,
            pending,
        };
        // Upstreams (`openai`/`vllm` types) are forwarded from this process in every mode.
        if self.loads_here() || crate::engine::remote::is_remote_type(&config.model_type) {
            let (_, newly) = self.load(config).await?;
            return Ok(placed(newly, false));
        }
        if config.model_id == self.default_name() {
            return Err(ApiError::new(
                ErrorCode::ModelIdReserved,
                format!(
                    "{:?} is the default model, served by the workers; choose another model_id",
                    config.model_id
                ),
            ));
        }
        if self.remote_models().await.contains(&config.model_id) {
            return Ok(placed(false, false));
        }
        model_placements::want_loaded(&self.db, &config.model_id, &config.config_id).await?;
        tracing::info!(model_id = %config.model_id, config_id = %config.config_id, "load requested from the workers");
        let deadline = tokio::time::Instant::now()
            + Duration::from_secs(self.settings.queue.model_change_wait_seconds);
        loop {
            if self.remote_models().await.contains(&config.model_id) {
                return Ok(placed(true, false));
            }
            match model_placements::find(&self.db, &config.model_id).await? {
                Some(p) => {
                    if let Some(reason) = p.error {
                        return Err(ApiError::new(ErrorCode::ModelNotLoadable, reason));
                    }
                }
                None => {
                    return Err(ApiError::new(
                        ErrorCode::ModelNotLoaded,
                        format!("model {:?} was unloaded while loading", config.model_id),
                    ))
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(placed(true, true));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Stops serving `model_id`: here in embedded mode, else on the worker that holds it.
    ///
    /// # Errors
    /// As [`Self::unload`]: 409 for the default model or a model a worker was started with,
    /// 404 when nothing serves it.
    pub async fn unload_or_unplace(&self, model_id: &str) -> Result<(), ApiError> {
        if self.loads_here() || self.get(model_id).is_some() {
            return self.unload(model_id).await;
        }
        if model_id == self.default_name() {
            return Err(ApiError::new(
                ErrorCode::ModelPinned,
                format!("{model_id:?} is the default model (settings.engine); it stays loaded"),
            ));
        }
        if !model_placements::want_unloaded(&self.db, model_id).await? {
            return Err(
                if self.remote_models().await.iter().any(|m| m == model_id) {
                    ApiError::new(
                    ErrorCode::ModelPinned,
                    format!("{model_id:?} is served by a worker started with model={model_id}; stop that worker to unload it"),
                )
                } else {
                    ApiError::new(
                        ErrorCode::ModelNotLoaded,
                        format!("model {model_id:?} is not loaded"),
                    )
                },
            );
        }
        tracing::info!(model_id = %model_id, "unload requested from the workers");
        let deadline = tokio::time::Instant::now()
            + Duration::from_secs(self.settings.queue.model_change_wait_seconds);
        let mut served = true;
        while served && tokio::time::Instant::now() < deadline {
            served = self.remote_models().await.iter().any(|m| m == model_id);
            if served {
                tokio::time::sleep(POLL).await;
            }
        }
        // Once no live worker serves it, the request has done its work: the row goes now, so
        // an unload answered 200 is followed by 404s, whether its holder has deleted the row
        // yet (it does so after reporting the model gone), is gone, or nobody held it. Only a
        // row still wanted unloaded is deleted: a load asked for meanwhile stays.
        if !served {
            model_placements::remove(&self.db, model_id).await?;
        }
        Ok(())
    }
}

/// A worker process's side: every `every`, make this process serve the models placed on it.
/// Runs until the task is aborted (worker shutdown).
pub async fn follow(
    registry: Arc<ModelRegistry>,
    db: DatabaseConnection,
    me: String,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = follow_once(&registry, &db, &me).await {
            tracing::warn!(error = %e, "model placements: cannot act now; retrying");
        }
    }
}

async fn follow_once(
    registry: &ModelRegistry,
    db: &DatabaseConnection,
    me: &str,
) -> Result<(), crate::models::ModelError> {
    let gone_after = registry.settings.queue.orphan_after();
    let dead: Vec<String> = workers::list(db)
        .await?
        .into_iter()
        .filter(|w| !w.is_live(gone_after))
        .map(|w| w.id)
        .collect();
    for p in model_placements::all(db).await? {
        let held_here = registry.get(&p.model_id).is_some();
        if p.desired == model_placements::UNLOADED {
            if held_here {
                if let Err(e) = registry.unload(&p.model_id).await {
                    tracing::warn!(model_id = %p.model_id, error = %e.message, "unload failed");
                }
            }
            if held_here || p.holder.as_deref() == Some(me) {
                model_placements::remove(db, &p.model_id).await?;
            }
            continue;
        }
        if held_here || p.error.is_some() {
            continue;
        }
        let mine = p.holder.as_deref() == Some(me);
        if !mine && !model_placements::claim(db, &p.model_id, me, &dead).await? {
            continue;
        }
        let Some(config) = model_configs::Model::find_by_config_id(db, &p.config_id).await? else {
            model_placements::failed(db, &p.model_id, me, "its configuration was deleted").await?;
            continue;
        };
        tracing::info!(model_id = %p.model_id, config_id = %p.config_id, "loading a placed model");
        if let Err(e) = registry.load(&config).await {
            tracing::warn!(model_id = %p.model_id, error = %e.message, "cannot load a placed model");
            model_placements::failed(db, &p.model_id, me, &e.message).await?;
        }
    }
    Ok(())
}
