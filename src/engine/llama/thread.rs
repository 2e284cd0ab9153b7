//! The engine thread: loads the model, then serves commands epoch by epoch.
//!
//! An epoch is one set of contexts on the model. It ends when a job needs a LoRA adapter that
//! is not loaded (loading needs the model mutably, so no context may be alive), when a head
//! cannot be taken off the context, or when the channel closes.
//!
//! One turn of the loop: take what arrived into the lanes, admit waiting jobs (generations
//! into free sequences, one embedding call into the embedding slot) by weighted round-robin
//! across keys, one decode step for the running generations, then one turn of the running
//! embedding. No single job holds the loop for more than one prompt or one embedding input.

use std::{
    num::NonZeroU32,
    sync::{atomic::Ordering, mpsc},
    thread,
};

use llama_cpp_2::{
    context::{params::LlamaContextParams, LlamaContext},
    llama_batch::LlamaBatch,
    model::{params::LlamaModelParams, LlamaModel},
};

use super::{
    batch::{self, decode_step, finish, free_seq, Ended, Slot, Started},
    embed::EmbedJob,
    heads::{apply_head, remove_head, Applied},
    is_quantized,
    prefix::Sequences,
    Command, Loaded, Shared, PROMPT_BATCH,
};
use crate::{
    engine::{
        lanes::Lanes,
        lora::{AdapterCache, AdapterKey},
        supervisor::{contain, Serving},
        tokenizer::backend,
        EngineError,
    },
    settings::EngineSettings,
};

/// Decoding threads: `settings.threads`, or every core when 0.
pub(super) fn threads(settings: &EngineSettings) -> i32 {
    let n = if settings.threads == 0 {
        thread::available_parallelism().map_or(1, std::num::NonZero::get)
    } else {
        settings.threads as usize
    };
    i32::try_from(n).unwrap_or(1)
}

fn load_model(settings: &EngineSettings, shared: &Shared) -> Result<LlamaModel, EngineError> {
    let backend = backend()?;
    if !settings.model_path.is_file() {
        return Err(EngineError::Load(format!(
            "model file {} not found (run scripts/fetch-model.sh)",
            settings.model_path.display()
        )));
    }
    let params = LlamaModelParams::default()
        .with_n_gpu_layers(settings.n_gpu_layers)
        .with_main_gpu(settings.main_gpu);
    let model = LlamaModel::load_from_file(backend, &settings.model_path, &params)
        .map_err(|e| EngineError::Load(format!("{}: {e}", settings.model_path.display())))?;
    shared.loads.fetch_add(1, Ordering::AcqRel);
    shared.set_loaded(Loaded {
        at: chrono::Utc::now(),
        quantized: is_quantized(&model),
    });
    tracing::info!(
        model = %settings.model_name,
        path = %settings.model_path.display(),
        params = model.n_params(),
        n_gpu_layers = settings.n_gpu_layers,
        "model loaded"
    );
    Ok(model)
}

fn generation_context<'m>(
    model: &'m LlamaModel,
    settings: &EngineSettings,
) -> Result<LlamaContext<'m>, EngineError> {
    let n_threads = threads(settings);
    let parallel = settings.parallel.max(1);
    // One KV cache split evenly: every sequence gets the configured context, in a stream of
    // its own (not unified), so the cache a finished job leaves for prefix reuse never takes
    // room another sequence needs.
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(
            settings.context_size.saturating_mul(parallel),
        ))
        .with_n_seq_max(parallel)
        .with_n_batch(PROMPT_BATCH.max(parallel))
        .with_n_ubatch(PROMPT_BATCH.max(parallel))
        .with_n_threads(n_threads)
        .with_n_threads_batch(n_threads);
    model
        .new_context(backend()?, params)
        .map_err(|e| EngineError::Load(format!("context: {e}")))
}

/// The contexts of one epoch; both borrow the model.
struct Contexts<'m> {
    generate: LlamaContext<'m>,
    embed: Option<LlamaContext<'m>>,
}

/// Why an epoch ended.
enum Next {
    /// The channel closed: the engine is shutting down.
    Stop,
    /// This job needs an adapter that is not loaded.
    Load(Box<Command>, AdapterKey),
    /// An adapter could not be removed from the context: start over with fresh contexts so no
    /// later job runs with it.
    Rebuild,
}

/// What the engine thread keeps from one epoch to the next (everything but the model, which
/// an adapter load borrows mutably between epochs).
struct Thread<'a> {
    settings: &'a EngineSettings,
    shared: &'a Shared,
    rx: &'a mpsc::Receiver<Command>,
    cache: AdapterCache,
    /// Jobs waiting for a place: generations for a sequence, embeddings for the embedding slot.
    lanes: Lanes<Command>,
    /// The embedding call being computed, a turn at a time between decode steps.
    embedding: Option<EmbedJob>,
}

/// The supervised body: loads the model, says it is ready, then serves until the channel
/// closes (`Ok`). A load or first context that fails returns the error.
pub(super) fn engine_thread(
    settings: &EngineSettings,
    rx: &mpsc::Receiver<Command>,
    serving: &Serving<'_>,
    shared: &Shared,
) -> Result<(), EngineError> {
    // A restart begins with nothing loaded: the adapters come back as jobs ask for them.
    shared.set_adapters(Vec::new());
    let mut model = load_model(settings, shared)?;
    let mut state = Thread {
        settings,
        shared,
        rx,
        cache: AdapterCache::new(&settings.adapters_dir, settings.adapter_cache_size),
        lanes: Lanes::default(),
        embedding: None,
    };
    let mut pending: Option<Command> = None;
    let mut started = false;
    loop {
        let next = {
            let generate = match generation_context(&model, settings) {
                Ok(c) => c,
                Err(e) if !started => return Err(e),
                Err(e) => {
                    tracing::error!(error = %e, "cannot create a context");
                    if let Some(cmd) = pending.take() {
                        cmd.fail(e);
                    }
                    // Try again for the next request, without spinning.
                    match rx.recv() {
                        Ok(cmd) => {
                            pending = Some(cmd);
                            continue;
                        }
                        Err(_) => break,
                    }
                }
            };
            if !started {
                started = true;
                serving.ready();
            }
            let mut contexts = Contexts {
                generate,
                embed: None,
            };
            state.serve(&model, &mut contexts, pending.take())
            // The contexts are dropped here, ending their borrow of the model.
        };
        match next {
            Next::Stop => break,
            Next::Rebuild => {}
            Next::Load(cmd, key) => {
                let name = key.name.clone();
                match state.cache.load(&mut model, key) {
                    Ok(()) => pending = Some(*cmd),
                    Err(e) => {
                        tracing::warn!(adapter = %name, error = %e, "LoRA adapter not loaded");
                        shared.served.fetch_add(1, Ordering::AcqRel);
                        cmd.fail(e);
                    }
                }
                shared.set_adapters(state.cache.names());
            }
        }
    }
    tracing::info!(model = %settings.model_name, "engine thread stopped");
    Ok(())
}

impl Thread<'_> {
    /// Serves commands with this epoch's contexts until a job needs an adapter that is not
    /// loaded (with no job running) or the channel closes.
    fn serve<'m>(
        &mut self,
        model: &'m LlamaModel,
        contexts: &mut Contexts<'m>,
        pending: Option<Command>,
    ) -> Next {
        let (settings, shared) = (self.settings, self.shared);
        let parallel = settings.parallel.max(1) as usize;
        let n_ctx_seq = settings.context_size as usize;
        let timeout = std::time::Duration::from_millis(settings.job_timeout_ms.max(1));
        let mut slots: Vec<Slot> = Vec::with_capacity(parallel);
        // Fresh contexts: every sequence free, its cache empty.
        let mut seqs = Sequences::new(parallel, settings.prefix_reuse, n_ctx_seq);
        // The head applied to the generation context now, and its loaded adapter.
        let mut head: Option<(String, u32)> = None;
        let mut applied: Option<AdapterKey> = None;
        // A step's generating jobs' tokens and prompt chunks: at most the context's batch.
        let mut step = LlamaBatch::new(PROMPT_BATCH.max(settings.parallel.max(1)) as usize, 1);
        let mut closed = false;
        if let Some(cmd) = pending {
            self.lanes.push_first(cmd);
        }
        loop {
            // Take what has arrived; block only when there is nothing else to do.
            if slots.is_empty() && self.lanes.is_empty() && self.embedding.is_none() {
                if closed {
                    return Next::Stop;
                }
                match self.rx.recv() {
                    Ok(cmd) => self.lanes.push(cmd),
                    Err(_) => return Next::Stop,
                }
            }
            loop {
                match self.rx.try_recv() {
                    Ok(cmd) => self.lanes.push(cmd),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        closed = true;
                        break;
                    }
                }
            }

            // Admit waiting jobs, by turns across keys: an embedding into the embedding slot
            // when it is free; a generation into a free sequence, with the same head as the
            // running ones only, and none at all while a generation for another head waits
            // (it goes next, once these finish).
            loop {
                let gen_open = seqs.has_free()
                    && (slots.is_empty() || !self.lanes.any_head(|c| c.wants_other_head(&head)));
                let embed_open = self.embedding.is_none();
                if !gen_open && !embed_open {
                    break;
                }
                let Some(cmd) = self.lanes.take_next(|c| match c {
                    Command::Generate(job) => gen_open && (slots.is_empty() || job.head() == head),
                    Command::Embed(_) => embed_open,
                }) else {
                    break;
                };
                let job = match cmd {
                    Command::Embed(job) => {
                        self.embedding = Some(*job);
                        continue;
                    }
                    Command::Generate(job) => *job,
                };
                if job.reply.is_closed() {
                    // Its waiter left while it waited (its job was cancelled, or its worker
                    // stopped): nothing to read or answer.
                    continue;
                }
                if job.head() != head {
                    // Nothing runs now (only then may a job with another head be taken): swap
                    // heads.
                    if let Some(key) = applied.take() {
                        if !remove_head(&mut self.cache, &mut contexts.generate, &key) {
                            tracing::error!(
                                "LoRA adapter could not be removed; rebuilding contexts"
                            );
                            self.lanes.push_first(Command::Generate(Box::new(job)));
                            return Next::Rebuild;
                        }
                    }
                    head = None;
                    match apply_head(&mut self.cache, &mut contexts.generate, &job, shared) {
                        Applied::Yes(key) => {
                            head = job.head();
                            applied = key;
                        }
                        Applied::Failed(e) => {
                            shared.served.fetch_add(1, Ordering::AcqRel);
                            job.reply.send(Err(e));
                            continue;
                        }
                        Applied::NotLoaded(key) => {
                            return Next::Load(Box::new(Command::Generate(Box::new(job))), key);
                        }
                    }
                }
                // Tokens first: they decide the sequence (the one whose cache holds most of them).
                let tokens = match contain(|| batch::prompt_of(model, &job, n_ctx_seq)) {
                    Ok(Ok(tokens)) => tokens,
                    Ok(Err(e)) => {
                        shared.served.fetch_add(1, Ordering::AcqRel);
                        job.reply.send(Err(e));
                        continue;
                    }
                    Err(_) => {
                        // Dropping the job drops its reply: its waiter hears the engine failed.
                        shared.served.fetch_add(1, Ordering::AcqRel);
                        continue;
                    }
                };
                // Prompts are read a chunk per decode step beside running generations, but a
                // job under a LoRA head reads its own whole at once (so that a seeded request
                // repeats exactly under a head; see `prefix`), as every job does with
                // `prompt_chunk: 0`.
                let whole = head.is_some() || settings.prompt_chunk == 0;
                if !whole && seqs.awaits_donor(&tokens, &head) {
                    // Another sequence is reading what this prompt starts with: copied from
                    // there once read, it is not read twice.
                    self.lanes.push_first(Command::Generate(Box::new(job)));
                    break;
                }
                let Some(at) = seqs.place(&tokens, &head) else {
                    // Not reached (a generation is taken only with a sequence free); put it
                    // back should that change.
                    self.lanes.push_first(Command::Generate(Box::new(job)));
                    break;
                };
                let started = contain(|| {
                    batch::start(
                        model,
                        &mut contexts.generate,
                        job,
                        tokens,
                        at,
                        whole,
                        n_ctx_seq,
                        timeout,
                        shared,
                    )
                });
                match started {
                    Ok(Started::Running(slot)) => {
                        seqs.mark_read(at.seq, slot.prompt_read());
                        slots.push(*slot);
                    }
                    Ok(Started::Done(kept)) => {
                        free_seq(&mut contexts.generate, &mut seqs, at.seq, kept);
                    }
                    Err(_) => {
                        // The job's reply was dropped with it: its waiter hears the engine
                        // failed on it.
                        shared.served.fetch_add(1, Ordering::AcqRel);
                        free_seq(&mut contexts.generate, &mut seqs, at.seq, None);
                    }
                }
            }

            if !slots.is_empty() {
                self.generation_turn(model, contexts, &mut step, &mut slots, &mut seqs, timeout);
            }
            self.embedding_turn(model, contexts);
        }
    }

    /// Ends the generations past their deadline or whose waiter has gone, then one decode
    /// step: one token of every running job.
    fn generation_turn<'m>(
        &self,
        model: &'m LlamaModel,
        contexts: &mut Contexts<'m>,
        step: &mut LlamaBatch,
        slots: &mut Vec<Slot>,
        seqs: &mut Sequences,
        timeout: std::time::Duration,
    ) {
        let shared = self.shared;
        let n_ctx_seq = self.settings.context_size as usize;
        let now = std::time::Instant::now();
        let mut i = 0;
        while i < slots.len() {
            let expired = slots[i].deadline <= now;
            if expired || slots[i].job.reply.is_closed() {
                let slot = slots.swap_remove(i);
                let seq = slot.seq;
                tracing::warn!(seq, expired, "generation stopped before its end");
                let kept = finish(
                    slot,
                    Err(EngineError::TimedOut(
                        u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                    )),
                    shared,
                );
                free_seq(&mut contexts.generate, seqs, seq, kept);
            } else {
                i += 1;
            }
        }
        if slots.is_empty() {
            return;
        }
        let width = slots.len() as u64;
        if width > 1 {
            shared.batched_steps.fetch_add(1, Ordering::AcqRel);
        }
        shared.max_batch.fetch_max(width, Ordering::AcqRel);
        // While jobs generate, a prompt being read adds at most `prompt_chunk` tokens to their
        // step; with none generating, prompts are read as fast as a batch takes them.
        let generating = slots.iter().filter(|s| !s.is_reading()).count();
        let batch_room = (PROMPT_BATCH as usize).max(slots.len());
        let budget = if generating == 0 {
            batch_room
        } else {
            (self.settings.prompt_chunk as usize).min(batch_room - generating)
        };
        let stepped = contain(|| {
            decode_step(
                model,
                &mut contexts.generate,
                step,
                slots,
                n_ctx_seq,
                budget,
            )
        });
        let finished: Vec<Ended> = match stepped {
            Ok(Ok((finished, fed))) => {
                if fed > 0 && generating > 0 {
                    shared.mixed_steps.fetch_add(1, Ordering::AcqRel);
                }
                for slot in slots.iter() {
                    seqs.mark_read(slot.seq, slot.prompt_read());
                }
                finished
            }
            Ok(Err(e)) => (0..slots.len()).map(|i| (i, Err(e.clone()))).collect(),
            Err(_) => (0..slots.len())
                .map(|i| (i, Err(EngineError::Decode("engine panicked".into()))))
                .collect(),
        };
        // Highest index first, so removals do not shift the ones still to remove.
        for (i, result) in finished.into_iter().rev() {
            let slot = slots.swap_remove(i);
            let seq = slot.seq;
            let kept = finish(slot, result, shared);
            free_seq(&mut contexts.generate, seqs, seq, kept);
        }
    }

    /// One turn of the running embedding call (a few inputs); answers it once it is done,
    /// failed, or its waiter has gone.
    fn embedding_turn<'m>(&mut self, model: &'m LlamaModel, contexts: &mut Contexts<'m>) {
        let Some(job) = self.embedding.as_mut() else {
            return;
        };
        let result = if job.reply.is_closed() {
            Err(EngineError::Embedding("the caller has gone".into()))
        } else {
            let span = tracing::debug_span!("embed_turn");
            let _guard = span.enter();
            contain(|| job.step(model, &mut contexts.embed, self.settings))
                .unwrap_or_else(|_| Err(EngineError::Embedding("engine panicked".into())))
        };
        let ended = match result {
            Ok(false) => return,
            Ok(true) => Ok(()),
            Err(e) => Err(e),
        };
        if let Some(job) = self.embedding.take() {
            self.shared.served.fetch_add(1, Ordering::AcqRel);
            job.finish(ended);
        }
    }
}
