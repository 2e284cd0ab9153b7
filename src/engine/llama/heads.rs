//! LoRA heads on the generation context: applying a job's adapter and taking it off again.
//!
//! The engine thread swaps heads only while no job runs, because an adapter applies to the
//! whole context (every sequence in it).

use llama_cpp_2::context::LlamaContext;

use super::{GenJob, Shared};
use crate::engine::{
    lora::{AdapterCache, AdapterKey},
    EngineError,
};

/// How applying a job's head went.
pub(super) enum Applied {
    /// Applied (`None`: the job runs on the base model).
    Yes(Option<AdapterKey>),
    /// The job cannot run: answer it with this error.
    Failed(EngineError),
    /// The adapter must be loaded first, which ends the epoch.
    NotLoaded(AdapterKey),
}

/// Applies the job's head to the (idle) context.
pub(super) fn apply_head(
    cache: &mut AdapterCache,
    ctx: &mut LlamaContext<'_>,
    job: &GenJob,
    shared: &Shared,
) -> Applied {
    let Some(choice) = job.request.adapter.as_ref() else {
        return Applied::Yes(None);
    };
    let key = match cache.key_for(choice) {
        Ok(key) => key,
        Err(e) => return Applied::Failed(e),
    };
    // Looking it up also marks it most recently used.
    let Some(adapter) = cache.get_mut(&key) else {
        return Applied::NotLoaded(key);
    };
    let applied = ctx.lora_adapter_set(adapter, choice.scale);
    shared.set_adapters(cache.names());
    match applied {
        Ok(()) => Applied::Yes(Some(key)),
        Err(e) => Applied::Failed(EngineError::Adapter {
            name: key.name,
            reason: format!("cannot apply it: {e}"),
        }),
    }
}

/// Takes the adapter `key` off the context; false if that failed.
pub(super) fn remove_head(
    cache: &mut AdapterCache,
    ctx: &mut LlamaContext<'_>,
    key: &AdapterKey,
) -> bool {
    match cache.get_mut(key) {
        Some(adapter) => ctx.lora_adapter_remove(adapter).is_ok(),
        // Evicted while applied cannot happen (loads end the epoch first); be safe anyway.
        None => false,
    }
}
