//! Embeddings: a second context on the same model, in embedding mode, made on the first
//! embedding job of an epoch.
//!
//! A job is computed in turns ([`EmbedJob::step`]): each turn embeds whole inputs until about
//! [`TURN_TOKENS`] tokens are done, so the engine loop goes back to its decode steps after at
//! most one input's worth of work (≤ `settings.engine.embeddings.context_size` tokens). Each
//! input is still read alone, in one batch, into a cleared cache, exactly as when a call was
//! embedded in one go: the vectors are the same.

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
        supervisor::Reply,
        tokenizer::{backend, embedding_tokens},
        EmbeddingRequest, Embeddings, EngineError, Lane,
    },
    settings::{EngineSettings, Pooling},
};

/// Tokens one turn of the engine loop embeds at most, unless one input alone is longer (an
/// input is never split). At llama.cpp's prompt speed on two CPU cores (~290 tokens/s) a turn
/// holds the loop for under half a second with short inputs, ~2 s with a 512-token one.
pub(super) const TURN_TOKENS: usize = 128;

/// An embedding call waiting in its lane or being computed, its finished vectors kept here
/// (not in the context), so a new epoch's context carries on where the last one stopped.
pub(super) struct EmbedJob {
    request: EmbeddingRequest,
    pub(super) reply: Reply<Embeddings>,
    pub(super) lane: Lane,
    vectors: Vec<Vec<f32>>,
    tokens: usize,
}

impl EmbedJob {
    pub(super) fn new(request: EmbeddingRequest, reply: Reply<Embeddings>, lane: Lane) -> Self {
        let inputs = request.inputs.len();
        Self {
            request,
            reply,
            lane,
            vectors: Vec::with_capacity(inputs),
            tokens: 0,
        }
    }

    /// One turn: embeds the next inputs, at least one and no more than [`TURN_TOKENS`]
    /// tokens' worth after the first. `Ok(true)` once every input is done.
    pub(super) fn step<'m>(
        &mut self,
        model: &'m LlamaModel,
        slot: &mut Option<LlamaContext<'m>>,
        settings: &EngineSettings,
    ) -> Result<bool, EngineError> {
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
        let mut done = 0usize;
        while let Some(text) = self.request.inputs.get(self.vectors.len()) {
            let tokens = embedding_tokens(model, text);
            if done > 0 && done + tokens.len() > TURN_TOKENS {
                break;
            }
            let vector = embed_input(ctx, self.vectors.len(), &tokens)?;
            self.vectors.push(vector);
            done += tokens.len();
            self.tokens += tokens.len();
        }
        Ok(self.vectors.len() == self.request.inputs.len())
    }

    /// Answers the waiter: the vectors (every input done) or the error.
    pub(super) fn finish(self, result: Result<(), EngineError>) {
        let Self {
            reply,
            vectors,
            tokens,
            ..
        } = self;
        reply.send(result.map(|()| Embeddings {
            vectors,
            prompt_tokens: u32::try_from(tokens).unwrap_or(u32::MAX),
        }));
    }
}

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

/// Embeds input `i` (its `tokens`) alone, in a fresh sequence, then L2-normalises the vector.
fn embed_input(
    ctx: &mut LlamaContext<'_>,
    i: usize,
    tokens: &[llama_cpp_2::token::LlamaToken],
) -> Result<Vec<f32>, EngineError> {
    let n_ctx = ctx.n_ctx() as usize;
    if tokens.is_empty() || tokens.len() > n_ctx {
        return Err(EngineError::Embedding(format!(
            "input {i} has {} tokens; embeddings take 1 to {n_ctx}",
            tokens.len()
        )));
    }
    let err = |e: &dyn std::fmt::Display| EngineError::Embedding(e.to_string());
    let mut batch = LlamaBatch::new(n_ctx, 1);
    ctx.clear_kv_cache();
    for (pos, tok) in tokens.iter().enumerate() {
        batch
            .add(*tok, pos_i32(pos)?, &[0], true)
            .map_err(|e| err(&e))?;
    }
    ctx.decode(&mut batch).map_err(|e| err(&e))?;
    let raw = ctx.embeddings_seq_ith(0).map_err(|e| err(&e))?;
    normalized(raw)
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
