//! Embeddings: a second context on the same model, in embedding mode, made on the first
//! embedding job of an epoch.

use std::num::NonZeroU32;

use llama_cpp_2::{
    context::{
        params::{LlamaContextParams, LlamaPoolingType},
        LlamaContext,
    },
    llama_batch::LlamaBatch,
    model::LlamaModel,
};

use super::{pos_i32, thread::threads};
use crate::{
    engine::{
        tokenizer::{backend, embedding_tokens},
        EmbeddingRequest, Embeddings, EngineError,
    },
    settings::{EngineSettings, Pooling},
};

/// A context in embedding mode. Pooling happens per micro-batch, so a whole input must fit in
/// one: batch and micro-batch are the full (small) embedding context.
fn embedding_context<'m>(
    model: &'m LlamaModel,
    settings: &EngineSettings,
) -> Result<LlamaContext<'m>, EngineError> {
    let n_threads = threads(settings);
    let n = settings.embeddings.context_size.max(8);
    let pooling = match settings.embeddings.pooling {
        Pooling::Mean => LlamaPoolingType::Mean,
        Pooling::Cls => LlamaPoolingType::Cls,
        Pooling::Last => LlamaPoolingType::Last,
    };
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(n))
        .with_n_batch(n)
        .with_n_ubatch(n)
        .with_n_threads(n_threads)
        .with_n_threads_batch(n_threads)
        .with_embeddings(true)
        .with_pooling_type(pooling);
    let ctx = model
        .new_context(backend()?, params)
        .map_err(|e| EngineError::Embedding(format!("context: {e}")))?;
    tracing::info!(context = n, pooling = ?settings.embeddings.pooling, "embedding context ready");
    Ok(ctx)
}

/// Embeds each input on its own (a fresh sequence each), then L2-normalises the vector.
pub(super) fn embed<'m>(
    model: &'m LlamaModel,
    slot: &mut Option<LlamaContext<'m>>,
    settings: &EngineSettings,
    request: &EmbeddingRequest,
) -> Result<Embeddings, EngineError> {
    if !settings.embeddings.enabled {
        return Err(EngineError::Embedding(
            "embeddings are disabled on this worker".into(),
        ));
    }
    if slot.is_none() {
        *slot = Some(embedding_context(model, settings)?);
    }
    let ctx = slot
        .as_mut()
        .ok_or_else(|| EngineError::Embedding("no embedding context".into()))?;
    let n_ctx = ctx.n_ctx() as usize;
    let err = |e: &dyn std::fmt::Display| EngineError::Embedding(e.to_string());
    let mut batch = LlamaBatch::new(n_ctx, 1);
    let mut vectors = Vec::with_capacity(request.inputs.len());
    let mut total = 0usize;
    for (i, text) in request.inputs.iter().enumerate() {
        let tokens = embedding_tokens(model, text);
        if tokens.is_empty() || tokens.len() > n_ctx {
            return Err(EngineError::Embedding(format!(
                "input {i} has {} tokens; embeddings take 1 to {n_ctx}",
                tokens.len()
            )));
        }
        ctx.clear_kv_cache();
        batch.clear();
        for (pos, tok) in tokens.iter().enumerate() {
            batch
                .add(*tok, pos_i32(pos)?, &[0], true)
                .map_err(|e| err(&e))?;
        }
        ctx.decode(&mut batch).map_err(|e| err(&e))?;
        let raw = ctx.embeddings_seq_ith(0).map_err(|e| err(&e))?;
        vectors.push(normalized(raw)?);
        total += tokens.len();
    }
    Ok(Embeddings {
        vectors,
        prompt_tokens: u32::try_from(total).unwrap_or(u32::MAX),
    })
}

/// The vector scaled to unit length (cosine similarity becomes a dot product).
fn normalized(v: &[f32]) -> Result<Vec<f32>, EngineError> {
    let norm = v
        .iter()
        .map(|x| f64::from(*x) * f64::from(*x))
        .sum::<f64>()
        .sqrt();
    if !norm.is_finite() || norm == 0.0 {
        return Err(EngineError::Embedding(
            "the model produced a zero or non-finite vector".into(),
        ));
    }
    Ok(v.iter().map(|x| (f64::from(*x) / norm) as f32).collect())
}
