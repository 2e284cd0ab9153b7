//! Seed 004's model configurations: what to load (a GGUF under the models directory), under
//! which id, with which load options and inference defaults. Stored, listed and deleted here;
//! loading is the worker's business (`crate::registry`).

use std::path::{Path, PathBuf};

use sea_orm::{entity::prelude::*, ActiveValue::Set, QueryOrder};
use serde_json::{Map, Value};

pub use super::_entities::model_configs::{self, ActiveModel, Column, Entity, Model};
use super::{now, ModelError};

impl ActiveModelBehavior for ActiveModel {}

/// A configuration as the client sends it.
#[derive(Debug, Clone)]
pub struct NewConfig {
    pub model_id: String,
    pub model_name: String,
    pub model_type: String,
    pub model_kwargs: Map<String, Value>,
}

/// Characters a model id may use: it becomes part of a queue name and of `model` fields.
fn valid_model_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl Model {
    /// The stored `model_kwargs` object.
    #[must_use]
    pub fn kwargs(&self) -> Map<String, Value> {
        serde_json::from_str(&self.model_kwargs).unwrap_or_default()
    }

    /// The configuration in seed 004's response shape.
    #[must_use]
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "config_id": self.config_id,
            "model_id": self.model_id,
            "model_name": self.model_name,
            "model_type": self.model_type,
            "model_kwargs": Value::Object(self.kwargs()),
        })
    }

    /// # Errors
    /// On database errors.
    pub async fn find_by_config_id<C: ConnectionTrait>(
        db: &C,
        config_id: &str,
    ) -> Result<Option<Self>, ModelError> {
        Ok(Entity::find()
            .filter(Column::ConfigId.eq(config_id))
            .one(db)
            .await?)
    }

    /// All configurations, oldest first.
    ///
    /// # Errors
    /// On database errors.
    pub async fn list<C: ConnectionTrait>(db: &C) -> Result<Vec<Self>, ModelError> {
        Ok(Entity::find().order_by_asc(Column::Id).all(db).await?)
    }
}

impl ActiveModel {
    /// Stores a configuration under a new random `config_id`.
    ///
    /// # Errors
    /// `Invalid` for an unusable model id or an empty name/type; database errors.
    pub async fn create<C: ConnectionTrait>(db: &C, new: NewConfig) -> Result<Model, ModelError> {
        let model_id = new.model_id.trim().to_string();
        if !valid_model_id(&model_id) {
            return Err(ModelError::Invalid(format!(
                "model_id {model_id:?} must be 1-64 characters of letters, digits, '-', '_' or '.'"
            )));
        }
        if new.model_name.trim().is_empty() || new.model_type.trim().is_empty() {
            return Err(ModelError::Invalid(
                "model_name and model_type must not be empty".into(),
            ));
        }
        let ts = now();
        Ok(Self {
            config_id: Set(uuid::Uuid::new_v4().to_string()),
            model_id: Set(model_id),
            model_name: Set(new.model_name.trim().to_string()),
            model_type: Set(new.model_type.trim().to_string()),
            model_kwargs: Set(Value::Object(new.model_kwargs).to_string()),
            created_at: Set(ts),
            updated_at: Set(ts),
            ..Default::default()
        }
        .insert(db)
        .await?)
    }
}

/// Deletes a configuration; `false` when there was none.
///
/// # Errors
/// On database errors.
pub async fn delete<C: ConnectionTrait>(db: &C, config_id: &str) -> Result<bool, ModelError> {
    let res = Entity::delete_many()
        .filter(Column::ConfigId.eq(config_id))
        .exec(db)
        .await?;
    Ok(res.rows_affected > 0)
}

/// Resolves `name` to a file inside `dir` (no absolute paths, `..` or symlinks out).
///
/// # Errors
/// `Invalid` naming the problem.
pub fn file_inside(dir: &Path, name: &str) -> Result<PathBuf, ModelError> {
    crate::paths::contained_file(dir, name.trim(), "the models directory")
        .map(|f| f.path)
        .map_err(|e| ModelError::Invalid(e.to_string()))
}

/// The `.gguf` files directly in `dir`, by name (for error messages).
#[must_use]
pub fn gguf_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.ends_with(".gguf"))
        .collect();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_must_stay_inside_the_directory() {
        let dir = std::env::temp_dir().join(format!("tg-models-{}", uuid::Uuid::new_v4()));
        let outside = std::env::temp_dir().join(format!("tg-outside-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(&outside, b"x").expect("outside file");
        std::fs::write(dir.join("m.gguf"), b"x").expect("file");
        #[cfg(unix)]
        std::os::unix::fs::symlink(&outside, dir.join("link.gguf")).expect("symlink");

        assert!(file_inside(&dir, "m.gguf").is_ok());
        for bad in [
            "../m.gguf",
            "/etc/passwd",
            "",
            "a/../../m.gguf",
            "missing.gguf",
        ] {
            assert!(file_inside(&dir, bad).is_err(), "{bad:?} accepted");
        }
        #[cfg(unix)]
        assert!(
            file_inside(&dir, "link.gguf").is_err(),
            "symlink out accepted"
        );
        assert_eq!(gguf_files(&dir), vec!["link.gguf", "m.gguf"]);
        std::fs::remove_dir_all(&dir).ok();
        std::fs::remove_file(&outside).ok();
    }

    #[test]
    fn model_ids_are_restricted() {
        assert!(valid_model_id("example_model"));
        assert!(valid_model_id("smol-2.v1"));
        assert!(!valid_model_id(""));
        assert!(!valid_model_id("a b"));
        assert!(!valid_model_id("x/y"));
    }
}
