//! Registered LoRA heads (seed 000's `/attach-head`): names clients use, each pointing at a GGUF
//! LoRA adapter file inside the configured adapters folder.
//!
//! A registration is checked completely before it is stored: a safe name, a path that stays
//! inside the folder (no `..`, no absolute path, no symlink leading out), an existing regular
//! file, and a GGUF header saying it is a LoRA adapter for the served model's architecture.
//! Paths are checked again whenever a job uses the adapter, since files can change.

use std::path::{Path, PathBuf};

use sea_orm::{entity::prelude::*, ActiveValue::Set, QueryOrder, SqlErr};

pub use super::_entities::adapters::{self, ActiveModel, Column, Entity, Model};
use super::now;
use crate::engine::gguf;

impl ActiveModelBehavior for ActiveModel {}

pub const MAX_NAME_LEN: usize = 64;
/// Accepted adapter scales (0 = the base model; above 1 exaggerates the adapter).
pub const MIN_SCALE: f64 = 0.0;
pub const MAX_SCALE: f64 = 4.0;

/// Why an adapter cannot be registered or used. Every variant but `Db` is the client's to fix.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("{0}")]
    InvalidName(String),
    #[error("{0}")]
    InvalidPath(String),
    #[error("{0}")]
    FileNotFound(String),
    #[error("{0}")]
    NotLora(String),
    #[error("{0}")]
    InvalidScale(String),
    #[error("an adapter named {0:?} already exists")]
    Exists(String),
    #[error("database: {0}")]
    Db(#[from] DbErr),
}

/// Names are what clients put after `base:` in a model id, so no `:` and nothing a URL or a
/// shell would need quoting for.
///
/// # Errors
/// `InvalidName` describing the rule.
pub fn validate_name(name: &str) -> Result<(), AdapterError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(AdapterError::InvalidName(format!(
            "adapter names are 1 to {MAX_NAME_LEN} characters: letters, digits, `-`, `_`, `.`, \
             starting with a letter or digit; got {name:?}"
        )))
    }
}

/// A scale as applied by the engine.
///
/// # Errors
/// `InvalidScale` outside [`MIN_SCALE`]..=[`MAX_SCALE`] or not a number.
pub fn validate_scale(scale: f64) -> Result<f32, AdapterError> {
    if scale.is_finite() && (MIN_SCALE..=MAX_SCALE).contains(&scale) {
        Ok(scale as f32)
    } else {
        Err(AdapterError::InvalidScale(format!(
            "scale must be between {MIN_SCALE} and {MAX_SCALE}, got {scale}"
        )))
    }
}

/// An adapter file that passed the location checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterFile {
    /// Relative to the adapters folder, symlinks resolved (what is stored).
    pub relative: String,
    /// Canonical absolute path (what a job carries).
    pub path: PathBuf,
}

/// Resolves `requested`, a path relative to `dir`, to a regular file inside `dir`.
///
/// # Errors
/// `InvalidPath` for absolute paths, `..`, symlinks leading out of the folder or non-files;
/// `FileNotFound` when nothing is there.
pub fn resolve_file(dir: &Path, requested: &str) -> Result<AdapterFile, AdapterError> {
    let file = crate::paths::contained_file(dir, requested, "the adapters folder").map_err(
        |e| match e {
            crate::paths::PathError::Invalid(m) => AdapterError::InvalidPath(m),
            crate::paths::PathError::NotFound(m) => AdapterError::FileNotFound(m),
        },
    )?;
    Ok(AdapterFile {
        relative: file.relative,
        path: file.path,
    })
}

/// Checks the file's GGUF header: a LoRA adapter, made for `base_arch` when that is known.
///
/// # Errors
/// `NotLora` saying what the file is instead.
pub fn check_lora(path: &Path, base_arch: Option<&str>) -> Result<(), AdapterError> {
    let meta = gguf::read_metadata(path)
        .map_err(|e| AdapterError::NotLora(format!("not a GGUF LoRA adapter: {e}")))?;
    let general_type = meta.get("general.type").unwrap_or_default();
    if general_type != "adapter" {
        return Err(AdapterError::NotLora(format!(
            "not a LoRA adapter: its GGUF general.type is {general_type:?}, not \"adapter\""
        )));
    }
    let adapter_type = meta.get("adapter.type").unwrap_or_default();
    if adapter_type != "lora" {
        return Err(AdapterError::NotLora(format!(
            "not a LoRA adapter: its adapter.type is {adapter_type:?}, not \"lora\""
        )));
    }
    if let Some(arch) = base_arch {
        let made_for = meta.get("general.architecture").unwrap_or_default();
        if made_for != arch {
            return Err(AdapterError::NotLora(format!(
                "the adapter is for the {made_for:?} architecture; the base model is {arch:?}"
            )));
        }
    }
    Ok(())
}

/// A checked registration about to be stored.
#[derive(Debug, Clone)]
pub struct NewAdapter {
    pub name: String,
    /// Relative to the adapters folder.
    pub file: String,
    pub base_model: String,
    pub default_scale: f64,
}

impl Model {
    /// # Errors
    /// On database errors.
    pub async fn find_by_name<C: ConnectionTrait>(
        db: &C,
        name: &str,
    ) -> Result<Option<Self>, AdapterError> {
        Ok(Entity::find().filter(Column::Name.eq(name)).one(db).await?)
    }

    /// Every registration, by name.
    ///
    /// # Errors
    /// On database errors.
    pub async fn list<C: ConnectionTrait>(db: &C) -> Result<Vec<Self>, AdapterError> {
        Ok(Entity::find().order_by_asc(Column::Name).all(db).await?)
    }

    /// Registrations for one base model, by name.
    ///
    /// # Errors
    /// On database errors.
    pub async fn list_for_base<C: ConnectionTrait>(
        db: &C,
        base_model: &str,
    ) -> Result<Vec<Self>, AdapterError> {
        Ok(Entity::find()
            .filter(Column::BaseModel.eq(base_model))
            .order_by_asc(Column::Name)
            .all(db)
            .await?)
    }

    /// The adapter's file now, checked again (it may have been removed or replaced).
    ///
    /// # Errors
    /// As [`resolve_file`].
    pub fn resolve(&self, dir: &Path) -> Result<AdapterFile, AdapterError> {
        resolve_file(dir, &self.file)
    }
}

impl ActiveModel {
    /// Stores a registration; the name must be new.
    ///
    /// # Errors
    /// `Exists` for a taken name (also when a concurrent registration wins the insert).
    pub async fn register<C: ConnectionTrait>(
        db: &C,
        new: NewAdapter,
    ) -> Result<Model, AdapterError> {
        if Model::find_by_name(db, &new.name).await?.is_some() {
            return Err(AdapterError::Exists(new.name));
        }
        let ts = now();
        let inserted = Self {
            name: Set(new.name.clone()),
            file: Set(new.file),
            base_model: Set(new.base_model),
            default_scale: Set(new.default_scale),
            created_at: Set(ts),
            updated_at: Set(ts),
            ..Default::default()
        }
        .insert(db)
        .await;
        match inserted {
            Ok(model) => Ok(model),
            Err(e) if matches!(e.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))) => {
                Err(AdapterError::Exists(new.name))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Removes a registration (never the file); `None` when no adapter has that name.
    ///
    /// # Errors
    /// On database errors.
    pub async fn remove<C: ConnectionTrait>(
        db: &C,
        name: &str,
    ) -> Result<Option<Model>, AdapterError> {
        let Some(found) = Model::find_by_name(db, name).await? else {
            return Ok(None);
        };
        Entity::delete_by_id(found.id).exec(db).await?;
        Ok(Some(found))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_model_id_safe() {
        for good in ["pirate", "v2.1", "my_head-3"] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in ["", "a:b", "../x", "-x", "sp ace", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn scales_are_bounded() {
        assert_eq!(validate_scale(0.0).ok(), Some(0.0));
        assert_eq!(validate_scale(1.5).ok(), Some(1.5));
        for bad in [-0.1, 4.1, f64::NAN, f64::INFINITY] {
            assert!(validate_scale(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn paths_stay_inside_the_folder() {
        let root = std::env::temp_dir().join(format!("tollgate-adapters-{}", std::process::id()));
        let dir = root.join("adapters");
        std::fs::create_dir_all(dir.join("sub")).expect("mkdir");
        std::fs::write(dir.join("sub/a.gguf"), b"x").expect("write");
        std::fs::write(root.join("outside.gguf"), b"x").expect("write");
        let found = resolve_file(&dir, "./sub/a.gguf").expect("inside");
        assert_eq!(found.relative, "sub/a.gguf");
        for (bad, why) in [
            ("../outside.gguf", "parent"),
            ("sub/../../outside.gguf", "parent"),
            ("/etc/passwd", "absolute"),
            ("", "empty"),
            ("sub", "directory"),
            ("missing.gguf", "missing"),
        ] {
            assert!(resolve_file(&dir, bad).is_err(), "{why}: {bad}");
        }
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(root.join("outside.gguf"), dir.join("link.gguf"))
                .expect("symlink");
            assert!(matches!(
                resolve_file(&dir, "link.gguf"),
                Err(AdapterError::InvalidPath(_))
            ));
        }
        std::fs::remove_dir_all(&root).ok();
    }
}
