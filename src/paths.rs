//! Files named by clients (LoRA adapters, model GGUFs) must stay inside the folder an operator
//! configured for them. One check for every such name.

use std::path::{Component, Path, PathBuf};

/// Why a requested file is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Absolute, `..`, a link leading out, not a regular file, or not UTF-8.
    #[error("{0}")]
    Invalid(String),
    /// Nothing there (or the folder itself is missing).
    #[error("{0}")]
    NotFound(String),
}

/// A file inside the folder: its path relative to the folder and its real path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainedFile {
    pub relative: String,
    pub path: PathBuf,
}

/// Resolves `requested`, a path relative to `dir`, to a regular file inside `dir`. `folder`
/// names the folder in messages ("the adapters folder").
///
/// # Errors
/// `Invalid` for absolute paths, `..`, symlinks leading out of the folder or non-files;
/// `NotFound` when nothing is there.
pub fn contained_file(
    dir: &Path,
    requested: &str,
    folder: &str,
) -> Result<ContainedFile, PathError> {
    if requested.trim().is_empty() || requested.contains('\0') {
        return Err(PathError::Invalid(format!(
            "path must name a file in {folder}"
        )));
    }
    let rel = Path::new(requested);
    if rel.is_absolute() || requested.starts_with(['/', '\\']) {
        return Err(PathError::Invalid(format!(
            "path must be relative to {folder}, got the absolute path {requested:?}"
        )));
    }
    for part in rel.components() {
        match part {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(PathError::Invalid(format!(
                    "path must stay inside {folder} (no `..`), got {requested:?}"
                )))
            }
        }
    }
    let base = std::fs::canonicalize(dir).map_err(|_| {
        PathError::NotFound(format!(
            "{folder} {} does not exist on this server",
            dir.display()
        ))
    })?;
    let real = std::fs::canonicalize(base.join(rel))
        .map_err(|_| PathError::NotFound(format!("no file {requested:?} in {folder}")))?;
    if !real.starts_with(&base) {
        return Err(PathError::Invalid(format!(
            "{requested:?} is a link that leads outside {folder}"
        )));
    }
    let meta = std::fs::metadata(&real)
        .map_err(|_| PathError::NotFound(format!("no file {requested:?} in {folder}")))?;
    if !meta.is_file() {
        return Err(PathError::Invalid(format!(
            "{requested:?} is not a regular file"
        )));
    }
    let relative = real
        .strip_prefix(&base)
        .ok()
        .and_then(Path::to_str)
        .map(str::to_string)
        .ok_or_else(|| PathError::Invalid("the file name must be UTF-8".into()))?;
    Ok(ContainedFile {
        relative,
        path: real,
    })
}
