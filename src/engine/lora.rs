//! LoRA adapters kept loaded by the engine thread: a small LRU keyed by the adapter file.
//!
//! llama.cpp registers an adapter with the model when it loads one, so loading needs the model
//! mutably, and therefore no context alive (contexts borrow the model). The engine thread drops
//! its contexts, calls [`AdapterCache::load`], and builds them again; that only happens on a
//! cache miss. An evicted adapter is freed at that same moment, when the borrow checker
//! guarantees no context can still point at it.

use std::{
    path::{Path, PathBuf},
    time::SystemTime,
};

use llama_cpp_2::model::{LlamaLoraAdapter, LlamaModel};

use super::{AdapterChoice, EngineError};

/// One adapter file as loaded: a file replaced under the same name is loaded anew.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterKey {
    pub name: String,
    pub path: PathBuf,
    modified: Option<SystemTime>,
    len: u64,
}

pub struct AdapterCache {
    dir: PathBuf,
    capacity: usize,
    /// Most recently used first.
    entries: Vec<(AdapterKey, LlamaLoraAdapter)>,
}

impl std::fmt::Debug for AdapterCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdapterCache")
            .field("capacity", &self.capacity)
            .field("loaded", &self.names())
            .finish_non_exhaustive()
    }
}

fn adapter_error(name: &str, reason: impl Into<String>) -> EngineError {
    EngineError::Adapter {
        name: name.to_string(),
        reason: reason.into(),
    }
}

impl AdapterCache {
    #[must_use]
    pub fn new(dir: &Path, capacity: usize) -> Self {
        Self {
            dir: dir.to_path_buf(),
            capacity: capacity.max(1),
            entries: Vec::new(),
        }
    }

    /// Checks a job's adapter against this worker's adapters folder and identifies its file.
    /// The API checked the path already; a worker does not trust a queued path on its own.
    ///
    /// # Errors
    /// When the file is missing, not a regular file, or outside the adapters folder.
    pub fn key_for(&self, choice: &AdapterChoice) -> Result<AdapterKey, EngineError> {
        // Errors reach the job record, which clients read: they name files relative to the
        // adapters folder; the full paths go to this worker's log only.
        let dir = std::fs::canonicalize(&self.dir).map_err(|e| {
            tracing::error!(dir = %self.dir.display(), error = %e, "adapters folder unusable");
            adapter_error(&choice.name, "this worker's adapters folder is unavailable")
        })?;
        let shown = |p: &std::path::Path| {
            p.strip_prefix(&dir)
                .ok()
                .or_else(|| p.file_name().map(std::path::Path::new))
                .map_or_else(String::new, |r| r.display().to_string())
        };
        let path = std::fs::canonicalize(&choice.path).map_err(|e| {
            tracing::warn!(path = %choice.path.display(), error = %e, "adapter file unusable");
            adapter_error(&choice.name, format!("{}: {e}", shown(&choice.path)))
        })?;
        if !path.starts_with(&dir) {
            return Err(adapter_error(
                &choice.name,
                "the file is outside this worker's adapters folder",
            ));
        }
        let meta = std::fs::metadata(&path)
            .map_err(|e| adapter_error(&choice.name, format!("{}: {e}", shown(&path))))?;
        if !meta.is_file() {
            return Err(adapter_error(&choice.name, "not a regular file"));
        }
        Ok(AdapterKey {
            name: choice.name.clone(),
            path,
            modified: meta.modified().ok(),
            len: meta.len(),
        })
    }

    /// The loaded adapter for `key`, marked most recently used; `None` when it must be loaded.
    pub fn get_mut(&mut self, key: &AdapterKey) -> Option<&mut LlamaLoraAdapter> {
        let i = self.entries.iter().position(|(k, _)| k == key)?;
        if i > 0 {
            let entry = self.entries.remove(i);
            self.entries.insert(0, entry);
        }
        self.entries.first_mut().map(|(_, a)| a)
    }

    /// Loads the adapter of `key` (replacing an older file of the same name) and frees the
    /// least recently used ones beyond the capacity.
    ///
    /// # Errors
    /// When llama.cpp cannot load the file for this model (wrong architecture or shapes).
    pub fn load(&mut self, model: &mut LlamaModel, key: AdapterKey) -> Result<(), EngineError> {
        if let Some(i) = self.entries.iter().position(|(k, _)| k.name == key.name) {
            let (old, adapter) = self.entries.remove(i);
            free(adapter);
            tracing::info!(adapter = %old.name, "LoRA adapter file changed; reloading");
        }
        let path = key.path.clone();
        let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            model.lora_adapter_init(&path)
        }))
        .map_err(|_| adapter_error(&key.name, "llama.cpp panicked while loading it"))?
        .map_err(|e| {
            adapter_error(
                &key.name,
                format!("llama.cpp could not load it for this model ({e}; see the log)"),
            )
        })?;
        tracing::info!(adapter = %key.name, path = %key.path.display(), "LoRA adapter loaded");
        self.entries.insert(0, (key, loaded));
        while self.entries.len() > self.capacity {
            if let Some((old, adapter)) = self.entries.pop() {
                free(adapter);
                tracing::info!(adapter = %old.name, "LoRA adapter evicted (least recently used)");
            }
        }
        Ok(())
    }

    /// Names of the loaded adapters, most recently used first.
    #[must_use]
    pub fn names(&self) -> Vec<String> {
        self.entries.iter().map(|(k, _)| k.name.clone()).collect()
    }
}

/// Frees an adapter's tensors now. llama-cpp-2 0.1.160's handle has no `Drop` (llama.cpp frees
/// adapters with their model), so without this an evicted or replaced adapter would stay in
/// memory until the worker exits and the cache would bound nothing.
///
/// Only called from [`AdapterCache::load`], which holds the model mutably: no context exists,
/// so none can still reference the adapter.
fn free(adapter: LlamaLoraAdapter) {
    // SAFETY: `LlamaLoraAdapter` is `#[repr(transparent)]` over `Ptr<llama_adapter_lora>`,
    // itself `#[repr(transparent)]` over `NonNull<llama_adapter_lora>` (llama-cpp-2 is pinned
    // with `=` in Cargo.toml, so that layout cannot change under us). The pointer came from
    // `llama_adapter_lora_init` and is freed exactly once: the handle is consumed here, and
    // `llama_adapter_lora_free` also unregisters it from the model, so the model's destructor
    // will not free it again.
    unsafe {
        let ptr = std::mem::transmute::<LlamaLoraAdapter, *mut llama_cpp_sys_2::llama_adapter_lora>(
            adapter,
        );
        llama_cpp_sys_2::llama_adapter_lora_free(ptr);
    }
}

#[cfg(test)]
mod tests {
    use super::AdapterCache;
    use crate::engine::AdapterChoice;

    #[test]
    fn errors_name_files_relative_to_the_adapters_folder() {
        let dir = std::env::temp_dir().join(format!("tollgate-lora-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("dir");
        let cache = AdapterCache::new(&dir, 2);
        let choice = AdapterChoice {
            name: "gone".into(),
            path: dir.join("sub").join("gone.gguf"),
            scale: 1.0,
        };
        let message = cache
            .key_for(&choice)
            .expect_err("missing file")
            .to_string();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(message.contains("gone.gguf"), "{message}");
        assert!(
            !message.contains(&*dir.to_string_lossy()),
            "an absolute path reached the message: {message}"
        );
    }
}
