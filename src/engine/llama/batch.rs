//! Jobs running in sequences of the shared generation context: reading a prompt into a
//! sequence, one decode step for every running job, sampling, and answering the waiter.

use std::sync::atomic::Ordering;

use llama_cpp_2::{
    context::LlamaContext,
    llama_batch::LlamaBatch,
    model::LlamaModel,
    sampling::LlamaSampler,
    token::{
        data::LlamaTokenData, data_array::LlamaTokenDataArray, logit_bias::LlamaLogitBias,
        LlamaToken,
    },
};

use super::{
    pos_i32,
    prefix::{Head, Placement, Sequences},
    GenJob, Shared, PROMPT_BATCH,
};
use crate::engine::{
    logprobs, text::OutputDecoder, tokenizer::prompt_tokens, EngineError, FinishReason, Generation,
    SamplingParams, TokenLogprob, TopLogprob,
};

/// A generation running on one sequence of the shared context.
pub(super) struct Slot {
    pub(super) seq: i32,
    pub(super) job: GenJob,
    sampler: LlamaSampler,
    /// The output grammar (structured output), kept apart from the chain: see
    /// [`sample_constrained`].
    grammar: Option<LlamaSampler>,
    out: OutputDecoder,
    /// Per generated token, when the job asked for log-probabilities.
    logprobs: Vec<TokenLogprob>,
    prompt_tokens: usize,
    /// Prompt tokens that were already in the sequence's cache (not read again).
    cached: usize,
    /// The tokens in the sequence's KV cache, in position order: the prompt, then each token
    /// fed since (kept for the next job when it ends, see [`super::prefix`]).
    tokens: Vec<LlamaToken>,
    /// Positions of this sequence in the KV cache.
    n_past: usize,
    /// While its prompt is still being read a chunk per decode step (beside the running
    /// generations' tokens): the next prompt position to read. `None` once generating.
    reading: Option<usize>,
    generated: u32,
    /// The token to feed at the next step.
    next: llama_cpp_2::token::LlamaToken,
    /// When it must have ended (`settings.engine.job_timeout_ms` after its start); checked
    /// between decode steps.
    pub(super) deadline: std::time::Instant,
}

/// How starting a job went.
pub(super) enum Started {
    /// Prompt read and first token taken, or (read in chunks) its prompt's first chunk goes with
    /// the next decode step; decode steps follow.
    Running(Box<Slot>),
    /// Already answered (an error, or finished on its first token); what its sequence's cache
    /// holds now, `None` when unknown (an error).
    Done(Option<Kept>),
}

/// What a sequence's KV cache holds once its job ended: its tokens and their head.
pub(super) type Kept = (Vec<LlamaToken>, Head);

/// Hands sequence `seq` back: its cache stays for prefix reuse when what it holds is known and
/// reuse is on; else it is cleared.
pub(super) fn free_seq(
    ctx: &mut LlamaContext<'_>,
    seqs: &mut Sequences,
    seq: i32,
    kept: Option<Kept>,
) {
    match kept {
        Some((tokens, head)) if seqs.reuse() => seqs.release(seq, tokens, head),
        _ => {
            if let Ok(id) = u32::try_from(seq) {
                let _ = ctx.clear_kv_cache_seq(Some(id), None, None);
            }
            seqs.clear(seq);
        }
    }
}

/// A job's prompt as tokens, refused when it is empty or leaves no room in a sequence.
pub(super) fn prompt_of(
    model: &LlamaModel,
    job: &GenJob,
    n_ctx_seq: usize,
) -> Result<Vec<LlamaToken>, EngineError> {
    let tokens = prompt_tokens(model, &job.request.prompt)?;
    if tokens.is_empty() || tokens.len() >= n_ctx_seq {
        return Err(EngineError::PromptTooLong {
            prompt_tokens: tokens.len(),
            context_size: u32::try_from(n_ctx_seq).unwrap_or(u32::MAX),
        });
    }
    Ok(tokens)
}

/// Cuts sequence `seq`'s cache to its first `keep` positions and returns how many it holds
/// then: `keep`, or 0 (cleared) when the cut failed or the cache does not hold positions
/// `0..keep` (a model whose cache cannot be cut, or one that dropped old positions), so that a
/// prompt is never read on top of a cache other than the one it was matched against.
fn cut_cache(ctx: &mut LlamaContext<'_>, seq: i32, keep: usize) -> Result<usize, EngineError> {
    let id = u32::try_from(seq).map_err(|_| EngineError::Decode("sequence id".into()))?;
    let cut = ctx
        .clear_kv_cache_seq(Some(id), u32::try_from(keep).ok(), None)
        .unwrap_or(false);
    let intact = keep == 0
        || (cut
            && ctx.kv_cache_seq_pos_min(seq) == 0
            && ctx.kv_cache_seq_pos_max(seq) == pos_i32(keep - 1)?);
    if intact {
        return Ok(keep);
    }
    let _ = ctx.clear_kv_cache_seq(Some(id), None, None);
    Ok(0)
}

/// Readies a job's sequence: the cache it starts from (copied, cut to what the prompt shares),
/// its sampler and grammar. With `whole`, then reads its prompt `tokens` — only those past the
/// start its cache already holds — and takes its first token; else its prompt is read by the
/// decode steps that follow, a chunk at a time ([`decode_step`]).
#[allow(clippy::too_many_arguments)]
pub(super) fn start(
    model: &LlamaModel,
    ctx: &mut LlamaContext<'_>,
    job: GenJob,
    tokens: Vec<LlamaToken>,
    at: Placement,
    whole: bool,
    n_ctx_seq: usize,
    timeout: std::time::Duration,
    shared: &Shared,
) -> Started {
    let seq = at.seq;
    let prepared = (|| {
        let sampler = sampler(&job.request.params, model.n_vocab());
        let grammar = match &job.request.params.controls.output {
            Some(output) if output.triggers.is_empty() => Some(
                LlamaSampler::grammar(model, &output.grammar, "root")
                    .map_err(|e| EngineError::Decode(format!("output grammar: {e}")))?,
            ),
            // Free text until a trigger word (a tool call's marker), then the grammar.
            Some(output) => Some(
                LlamaSampler::grammar_lazy(model, &output.grammar, "root", &output.triggers, &[])
                    .map_err(|e| EngineError::Decode(format!("output grammar: {e}")))?,
            ),
            None => None,
        };
        if let Some(from) = at.from {
            // The whole stream, copied at the next decode (this prompt's own), before it is
            // computed; `cut_cache` then keeps the shared start and checks it is there.
            ctx.copy_kv_cache_seq(from, seq, None, None)
                .map_err(|e| EngineError::Decode(format!("copying a cached prefix: {e}")))?;
            shared.prefix_copies.fetch_add(1, Ordering::AcqRel);
        }
        let keep = cut_cache(ctx, seq, at.keep.min(tokens.len().saturating_sub(1)))?;
        if !whole {
            return Ok((keep, None, sampler, grammar));
        }
        let mut batch = LlamaBatch::new(PROMPT_BATCH as usize, 1);
        let last = tokens.len() - 1;
        for (chunk_index, chunk) in tokens[keep..].chunks(PROMPT_BATCH as usize).enumerate() {
            batch.clear();
            for (i, tok) in chunk.iter().enumerate() {
                let pos = keep + chunk_index * PROMPT_BATCH as usize + i;
                batch
                    .add(*tok, pos_i32(pos)?, &[seq], pos == last)
                    .map_err(|e| EngineError::Decode(e.to_string()))?;
            }
            ctx.decode(&mut batch)
                .map_err(|e| EngineError::Decode(e.to_string()))?;
        }
        Ok((keep, Some(batch.n_tokens() - 1), sampler, grammar))
    })();
    let (cached, logits_at, sampler, grammar) = match prepared {
        Ok(p) => p,
        Err(e) => {
            shared.served.fetch_add(1, Ordering::AcqRel);
            job.reply.send(Err(e));
            return Started::Done(None);
        }
    };
    let prompt_tokens = tokens.len();
    let mut slot = Slot {
        seq,
        sampler,
        grammar,
        logprobs: Vec::new(),
        out: OutputDecoder::new(&job.request.params.stop),
        job,
        prompt_tokens,
        cached,
        tokens,
        n_past: cached,
        reading: Some(cached),
        generated: 0,
        next: llama_cpp_2::token::LlamaToken(0),
        deadline: std::time::Instant::now() + timeout,
    };
    let Some(logits_at) = logits_at else {
        return Started::Running(Box::new(slot));
    };
    slot.n_past = prompt_tokens;
    slot.reading = None;
    match take_token(model, ctx, &mut slot, logits_at, n_ctx_seq) {
        None => Started::Running(Box::new(slot)),
        Some(finish_reason) => Started::Done(finish(slot, Ok(finish_reason), shared)),
    }
}

impl Slot {
    /// How much of its prompt the sequence's cache holds now (another job may copy it).
    pub(super) fn prompt_read(&self) -> usize {
        self.reading.unwrap_or(self.prompt_tokens)
    }

    /// Its prompt is still being read.
    pub(super) fn is_reading(&self) -> bool {
        self.reading.is_some()
    }
}

/// Samples the slot's next token from the logits at batch index `idx` and adds it to the
/// output; `Some` when the job ends with it (end of generation, stop string, a limit).
fn take_token(
    model: &LlamaModel,
    ctx: &LlamaContext<'_>,
    slot: &mut Slot,
    idx: i32,
    n_ctx_seq: usize,
) -> Option<FinishReason> {
    let vocab = model.vocab();
    let tok = match slot.grammar.as_mut() {
        None => slot.sampler.sample(ctx, idx),
        Some(grammar) => sample_constrained(ctx, idx, &mut slot.sampler, grammar, &vocab),
    };
    if vocab.is_eog(tok) {
        return Some(FinishReason::Stop);
    }
    slot.generated += 1;
    let piece = vocab.token_to_piece(tok, false, None);
    if let Some(top) = slot.job.request.params.controls.logprobs {
        let entry = token_logprob(&vocab, ctx.get_logits_ith(idx), tok, &piece, top);
        slot.logprobs.push(entry);
    }
    let stopped = slot.out.push(&piece);
    if let Some(sink) = &slot.job.sink {
        let delta = slot.out.take_delta();
        if !delta.is_empty() {
            let _ = sink.send(delta);
        }
    }
    if stopped {
        return Some(FinishReason::Stop);
    }
    if slot.generated >= slot.job.request.params.max_tokens || slot.n_past >= n_ctx_seq {
        return Some(FinishReason::Length);
    }
    slot.next = tok;
    None
}

/// A running job that ended in a step: its index in the slots and how it ended.
pub(super) type Ended = (usize, Result<FinishReason, EngineError>);

/// Feeds every generating job's last token and, after them, up to `prompt_budget` tokens of the
/// prompts still being read (in the order their jobs started), in one batch; then takes the
/// next token of each generating job and of each whose prompt that batch finished. A long
/// prompt thus holds running streams back by one chunk per step, not by its whole read.
/// Returns the jobs that ended (by index into `slots`, ascending) and the prompt tokens fed.
pub(super) fn decode_step(
    model: &LlamaModel,
    ctx: &mut LlamaContext<'_>,
    batch: &mut LlamaBatch,
    slots: &mut [Slot],
    n_ctx_seq: usize,
    prompt_budget: usize,
) -> Result<(Vec<Ended>, usize), EngineError> {
    batch.clear();
    // Per slot: its batch index to sample from (if any), and the prompt tokens it was fed.
    let mut plan: Vec<(Option<i32>, usize)> = vec![(None, 0); slots.len()];
    for (slot, planned) in slots.iter().zip(plan.iter_mut()) {
        if !slot.is_reading() {
            planned.0 = Some(add(batch, slot.next, slot.n_past, slot.seq, true)?);
        }
    }
    let mut budget = prompt_budget;
    for (slot, planned) in slots.iter().zip(plan.iter_mut()) {
        let Some(from) = slot.reading else {
            continue;
        };
        let take = budget.min(slot.tokens.len() - from);
        let last = slot.tokens.len() - 1;
        for (pos, tok) in slot.tokens.iter().enumerate().skip(from).take(take) {
            let index = add(batch, *tok, pos, slot.seq, pos == last)?;
            if pos == last {
                planned.0 = Some(index);
            }
        }
        planned.1 = take;
        budget -= take;
    }
    ctx.decode(batch)
        .map_err(|e| EngineError::Decode(e.to_string()))?;
    let mut finished = Vec::new();
    let mut fed = 0;
    for (i, (slot, (index, read))) in slots.iter_mut().zip(plan).enumerate() {
        match slot.reading {
            Some(from) => {
                fed += read;
                slot.n_past = from + read;
                slot.reading = (slot.n_past < slot.tokens.len()).then_some(slot.n_past);
            }
            None => {
                slot.n_past += 1;
                slot.tokens.push(slot.next);
            }
        }
        // A generating job, or one whose prompt this step finished: its next token.
        if let Some(index) = index {
            if let Some(reason) = take_token(model, ctx, slot, index, n_ctx_seq) {
                finished.push((i, Ok(reason)));
            }
        }
    }
    Ok((finished, fed))
}

/// Adds one token to `batch`; its index there.
fn add(
    batch: &mut LlamaBatch,
    tok: LlamaToken,
    pos: usize,
    seq: i32,
    logits: bool,
) -> Result<i32, EngineError> {
    batch
        .add(tok, pos_i32(pos)?, &[seq], logits)
        .map_err(|e| EngineError::Decode(e.to_string()))?;
    Ok(batch.n_tokens() - 1)
}

/// Answers a job: its text (the rest held back for stop strings is final now) or its error.
/// It counts as served before its waiter hears of it. Returns what its sequence's cache holds
/// when the job ended well (`None` after an error: the cache is then cleared).
pub(super) fn finish(
    mut slot: Slot,
    result: Result<FinishReason, EngineError>,
    shared: &Shared,
) -> Option<Kept> {
    shared.served.fetch_add(1, Ordering::AcqRel);
    let kept = result
        .is_ok()
        .then(|| (std::mem::take(&mut slot.tokens), slot.job.head()));
    let reply =
        match result {
            Ok(finish_reason) => {
                if let Some(sink) = &slot.job.sink {
                    let rest = slot.out.take_rest();
                    if !rest.is_empty() {
                        let _ = sink.send(rest);
                    }
                }
                let text = slot.out.into_text();
                let logprobs =
                    slot.job.request.params.controls.logprobs.map(|_| {
                        logprobs::fit_to_text(std::mem::take(&mut slot.logprobs), text.len())
                    });
                Ok(Generation {
                    text,
                    prompt_tokens: u32::try_from(slot.prompt_tokens).unwrap_or(u32::MAX),
                    cached_tokens: u32::try_from(slot.cached).unwrap_or(u32::MAX),
                    generated_tokens: slot.generated,
                    finish_reason,
                    logprobs,
                    more: Vec::new(),
                })
            }
            Err(e) => Err(e),
        };
    slot.job.reply.send(reply);
    kept
}

/// The chosen token's log-probability under the model at this step and the `top` most likely
/// tokens' ([`logprobs::at_step`]: from the raw logits, before the sampler chain).
fn token_logprob(
    vocab: &llama_cpp_2::vocab::LlamaVocab<'_>,
    logits: &[f32],
    tok: LlamaToken,
    piece: &[u8],
    top: u8,
) -> TokenLogprob {
    let chosen = usize::try_from(tok.0).unwrap_or(usize::MAX);
    let (logprob, best) = logprobs::at_step(logits, chosen, usize::from(top));
    TokenLogprob {
        bytes: piece.to_vec(),
        logprob,
        top: best
            .into_iter()
            .map(|(id, logprob)| TopLogprob {
                bytes: vocab.token_to_piece(
                    LlamaToken(i32::try_from(id).unwrap_or_default()),
                    false,
                    None,
                ),
                logprob,
            })
            .collect(),
    }
}

/// The job's sampler chain, in llama.cpp server's order: logit biases, penalties, then greedy
/// at temperature 0, else top-k, typical, top-p, min-p, temperature and a seeded draw. (The
/// output grammar, when there is one, is applied around it by [`sample_constrained`].)
fn sampler(params: &SamplingParams, n_vocab: i32) -> LlamaSampler {
    let c = &params.controls;
    let mut chain = Vec::new();
    if !c.logit_bias.is_empty() {
        let biases: Vec<LlamaLogitBias> = c
            .logit_bias
            .iter()
            .filter(|(token, _)| (0..n_vocab).contains(token))
            .map(|(token, bias)| LlamaLogitBias::new(LlamaToken(*token), *bias))
            .collect();
        chain.push(LlamaSampler::logit_bias(n_vocab, &biases));
    }
    let repeat = c.repeat_penalty.unwrap_or(1.0);
    let frequency = c.frequency_penalty.unwrap_or(0.0);
    let presence = c.presence_penalty.unwrap_or(0.0);
    if (repeat - 1.0).abs() > f32::EPSILON || frequency != 0.0 || presence != 0.0 {
        let last_n = c.repeat_last_n.unwrap_or(64);
        chain.push(LlamaSampler::penalties(
            n_vocab, last_n, repeat, frequency, presence,
        ));
    }
    if params.temperature <= 0.0 {
        chain.push(LlamaSampler::greedy());
    } else {
        chain.push(LlamaSampler::top_k(c.top_k.unwrap_or(40)));
        if let Some(p) = c.typical_p.filter(|p| *p < 1.0) {
            chain.push(LlamaSampler::typical(p, 1));
        }
        chain.push(LlamaSampler::top_p(params.top_p, 1));
        if let Some(p) = c.min_p.filter(|p| *p > 0.0) {
            chain.push(LlamaSampler::min_p(p, 1));
        }
        chain.push(LlamaSampler::temp(params.temperature));
        chain.push(LlamaSampler::dist(params.seed.unwrap_or_else(rand::random)));
    }
    if chain.len() == 1 {
        return chain.remove(0);
    }
    LlamaSampler::chain_simple(chain)
}

/// Draws a token the output grammar allows, as llama.cpp's common sampler does: the chain
/// draws from the whole vocabulary first and only that token is checked against the grammar
/// (cheap); only when the grammar refuses it is every token masked by the grammar and the
/// chain draws again. Masking all ~50k tokens at every step instead makes an open grammar
/// (any JSON object) many times slower. Both samplers then accept the token (the grammar
/// advances; penalties see it).
fn sample_constrained(
    ctx: &LlamaContext<'_>,
    idx: i32,
    chain: &mut LlamaSampler,
    grammar: &mut LlamaSampler,
    vocab: &llama_cpp_2::vocab::LlamaVocab<'_>,
) -> LlamaToken {
    let mut all = LlamaTokenDataArray::from_iter(ctx.candidates_ith(idx), false);
    all.apply_sampler(chain);
    let first = all.selected_token();
    let allowed = first.is_some_and(|tok| {
        let mut one = LlamaTokenDataArray::new(vec![LlamaTokenData::new(tok, 1.0, 0.0)], false);
        one.apply_sampler(grammar);
        one.data.first().is_some_and(|d| d.logit().is_finite())
    });
    let tok = match first {
        Some(tok) if allowed => tok,
        _ => {
            let mut all = LlamaTokenDataArray::from_iter(ctx.candidates_ith(idx), false);
            all.apply_sampler(grammar);
            all.apply_sampler(chain);
            // The grammar always allows some token (end of generation once it is complete).
            all.selected_token().unwrap_or_else(|| vocab.eos())
        }
    };
    grammar.accept(tok);
    chain.accept(tok);
    tok
}
