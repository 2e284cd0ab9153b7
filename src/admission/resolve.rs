//! Which model and LoRA head a request runs with, checked against the key's allow-lists.
//! The one place a request's model is resolved: nothing is charged before this succeeds.

use sea_orm::DatabaseConnection;

use super::input::ModelChoice;
use crate::{
    engine::{AdapterChoice, GenerationRequest, Prompt, SamplingParams},
    errors::{ApiError, ErrorCode},
    models::{adapters, api_keys},
    serving::ModelRegistry,
};

/// The model and head a request will run with, permission checked.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub model: String,
    pub adapter: Option<AdapterChoice>,
}

impl Resolved {
    /// The engine request for `prompt` on this model and head.
    #[must_use]
    pub fn request(self, prompt: Prompt, params: SamplingParams) -> GenerationRequest {
        GenerationRequest {
            model: self.model,
            prompt,
            params,
            adapter: self.adapter,
        }
    }
}

/// Model ids `key` may use: the served model and one `base:adapter` per adapter registered
/// for it, those loaded here and those held by workers elsewhere, filtered by the key's
/// allow-lists.
///
/// # Errors
/// On database errors.
pub async fn available_models(
    db: &DatabaseConnection,
    models: &ModelRegistry,
    key: &api_keys::Model,
) -> Result<Vec<String>, ApiError> {
    let served = models.default_name();
    let mut ids = Vec::new();
    if key.permits_model(served) {
        ids.push(served.to_string());
        for a in adapters::Model::list_for_base(db, served).await? {
            if key.permits_adapter(&a.name) {
                ids.push(format!("{served}:{}", a.name));
            }
        }
    }
    ids.extend(
        models
            .loaded()
            .iter()
            .map(|m| m.model_id.clone())
            .filter(|m| key.permits_model(m)),
    );
    ids.extend(
        models
            .remote_models()
            .await
            .into_iter()
            .filter(|m| key.permits_model(m)),
    );
    Ok(ids)
}

/// Resolves `choice` for `key`.
///
/// # Errors
/// 404 unknown model or adapter (naming what the key may use), 403 not allowed for this key,
/// 422 bad scale or conflicting heads, 503 when an adapter's file is gone.
pub async fn resolve(
    db: &DatabaseConnection,
    models: &ModelRegistry,
    adapters_dir: &std::path::Path,
    key: &api_keys::Model,
    choice: ModelChoice,
) -> Result<Resolved, ApiError> {
    let served = models.default_name().to_string();
    // A name clients send for a model (a Hugging Face id) stands for the id it aliases.
    let canonical = choice
        .model
        .as_deref()
        .map(|m| models.canonical(m))
        .filter(|m| !m.is_empty());
    let named = canonical.as_deref();
    // A model loaded at run time (seed 004), or held only by worker processes elsewhere
    // (production: one model per GPU), is served as-is; LoRA heads attach to the default
    // model only.
    if let Some(m) = named {
        let here = models.get(m).is_some();
        if here
            || (m != served
                && !m.starts_with(&format!("{served}:"))
                && models.remote_models().await.iter().any(|r| r == m))
        {
            return other_model(key, m, &served, &choice);
        }
    }
    let from_model = match named {
        None => None,
        Some(m) if m == served => None,
        Some(m) => match m
            .strip_prefix(served.as_str())
            .and_then(|r| r.strip_prefix(':'))
        {
            Some(head) => Some(head.to_string()),
            None if choice.lenient_base => {
                tracing::debug!(asked = m, served = %served, "unknown model name mapped to the served model");
                None
            }
            None => {
                let available = available_models(db, models, key).await?;
                return Err(ApiError::new(
                    ErrorCode::ModelNotFound,
                    format!("model {m:?} does not exist; available: {available:?}"),
                ));
            }
        },
    };
    let explicit = choice
        .adapter
        .as_deref()
        .map(str::trim)
        .filter(|a| !a.is_empty());
    let head = match (from_model, explicit) {
        (Some(a), Some(b)) if a != b => {
            return Err(ApiError::new(
                ErrorCode::ConflictingAdapter,
                format!("the model names the head {a:?} but the request asks for {b:?}"),
            ))
        }
        (Some(a), _) => Some(a),
        (None, b) => b.map(str::to_string),
    };
    if !key.permits_model(&served) {
        return Err(ApiError::new(
            ErrorCode::ModelNotAllowed,
            format!(
                "this key may not use model {served:?}; it may use {:?}",
                key.allowed_models()
            ),
        ));
    }
    let Some(head) = head else {
        if choice.scale.is_some() {
            return Err(ApiError::new(
                ErrorCode::ScaleWithoutAdapter,
                "`scale` applies to a LoRA head; name one with `lora` (or model \"base:adapter\")",
            ));
        }
        return Ok(Resolved {
            model: served,
            adapter: None,
        });
    };
    let record = adapters::Model::find_by_name(db, &head)
        .await?
        .filter(|a| a.base_model == served);
    let Some(record) = record else {
        let available: Vec<String> = adapters::Model::list_for_base(db, &served)
            .await?
            .into_iter()
            .map(|a| a.name)
            .filter(|a| key.permits_adapter(a))
            .collect();
        return Err(ApiError::new(
            ErrorCode::AdapterNotFound,
            format!("no LoRA head {head:?} for model {served:?}; available: {available:?}"),
        ));
    };
    if !key.permits_adapter(&record.name) {
        return Err(ApiError::new(
            ErrorCode::AdapterNotAllowed,
            format!(
                "this key may not use the LoRA head {:?}; it may use {:?}",
                record.name,
                key.allowed_adapters()
            ),
        ));
    }
    let scale = snap_scale(adapters::validate_scale(
        choice.scale.unwrap_or(record.default_scale),
    )?);
    let file = record.resolve(adapters_dir).map_err(|e| {
        tracing::error!(adapter = %record.name, error = %e, "registered adapter file unusable");
        ApiError::new(
            ErrorCode::AdapterUnavailable,
            format!(
                "the file of LoRA head {:?} is missing on the server; nothing was charged",
                record.name
            ),
        )
    })?;
    Ok(Resolved {
        model: served,
        adapter: Some(AdapterChoice {
            name: record.name,
            path: file.path,
            scale,
        }),
    })
}

/// Steps a LoRA scale is rounded to. Only jobs with the same head and scale share a batch, so
/// every distinct scale is a group that drains the batch when it comes up: a grid keeps the
/// groups few, whatever scales clients send.
pub const SCALE_STEP: f32 = 0.05;

/// `scale` on the [`SCALE_STEP`] grid.
#[must_use]
pub fn snap_scale(scale: f32) -> f32 {
    (scale / SCALE_STEP).round() * SCALE_STEP
}

/// A request for a model other than the default one: allowed for this key, and without a head.
fn other_model(
    key: &api_keys::Model,
    model: &str,
    served: &str,
    choice: &ModelChoice,
) -> Result<Resolved, ApiError> {
    if !key.permits_model(model) {
        return Err(ApiError::new(
            ErrorCode::ModelNotAllowed,
            format!(
                "this key may not use model {model:?}; it may use {:?}",
                key.allowed_models()
            ),
        ));
    }
    if choice.adapter.is_some() || choice.scale.is_some() {
        return Err(ApiError::new(
            ErrorCode::AdapterNotSupported,
            format!("LoRA heads apply to {served:?} only, not to {model:?}"),
        ));
    }
    Ok(Resolved {
        model: model.to_string(),
        adapter: None,
    })
}

#[cfg(test)]
mod tests {
    use super::snap_scale;

    #[test]
    fn scales_snap_to_a_coarse_grid() {
        for (asked, got) in [
            (0.83, 0.85),
            (0.8, 0.8),
            (0.0, 0.0),
            (1.0, 1.0),
            (0.024, 0.0),
            (3.99, 4.0),
        ] {
            assert!(
                (snap_scale(asked) - got).abs() < 1e-6,
                "{asked} -> {}",
                snap_scale(asked)
            );
        }
    }
}
