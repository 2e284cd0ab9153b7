//! The engine thread: loads the model, then serves commands epoch by epoch.
//!
//! An epoch is one set of contexts on the model. It ends when a job needs a LoRA adapter that
//! is not loaded (loading needs the model mutably, so no context may be alive), when a head
//! cannot be taken off the context, or when the channel closes.

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
    embed::embed,
    heads::{apply_head, remove_head, Applied},
    is_quantized, Command, GenJob, Loaded, Shared, PROMPT_BATCH,
};
use crate::{
    engine::{
        lanes::Lanes,
        lora::{AdapterCache, AdapterKey},
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
    let _ = shared.loaded.set(Loaded {
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
    // One KV cache split evenly: every sequence gets the configured context.
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
    /// Generation jobs waiting for a sequence.
    lanes: Lanes<GenJob>,
}

pub(super) fn engine_thread(
    settings: &EngineSettings,
    rx: &mpsc::Receiver<Command>,
    ready: &mpsc::Sender<Result<(), EngineError>>,
    shared: &Shared,
) {
    let mut model = match load_model(settings, shared) {
        Ok(m) => m,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let mut state = Thread {
        settings,
        shared,
        rx,
        cache: AdapterCache::new(&settings.adapters_dir, settings.adapter_cache_size),
        lanes: Lanes::default(),
    };
    let mut pending: Option<Command> = None;
    let mut started = false;
    loop {
        let next = {
            let generate = match generation_context(&model, settings) {
                Ok(c) => c,
                Err(e) if !started => {
                    let _ = ready.send(Err(e));
                    return;
                }
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
                shared.ready.store(true, Ordering::Release);
                let _ = ready.send(Ok(()));
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
    shared.ready.store(false, Ordering::Release);
    tracing::info!(model = %settings.model_name, "engine thread stopped");
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
        let mut free: Vec<i32> = (0..i32::try_from(parallel).unwrap_or(1)).rev().collect();
        // The head applied to the generation context now, and its loaded adapter.
        let mut head: Option<(String, u32)> = None;
        let mut applied: Option<AdapterKey> = None;
        let mut step = LlamaBatch::new(parallel, 1);
        let mut closed = false;
        if let Some(cmd) = pending {
            match cmd {
                Command::Generate(job) => self.lanes.push_first(*job),
                other => other.fail(EngineError::Unavailable("unexpected command".into())),
            }
        }
        loop {
            // Take what has arrived; block only when there is nothing else to do.
            if slots.is_empty() && self.lanes.is_empty() {
                if closed {
                    return Next::Stop;
                }
                match self.rx.recv() {
                    Ok(cmd) => self.intake(cmd, model, contexts),
                    Err(_) => return Next::Stop,
                }
            }
            loop {
                match self.rx.try_recv() {
                    Ok(cmd) => self.intake(cmd, model, contexts),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        closed = true;
                        break;
                    }
                }
            }

            // Admit waiting jobs into free sequences: the same head as the running ones only,
            // and none at all while a job for another head waits (it goes next, once these
            // finish).
            while let Some(&seq) = free.last() {
                if !slots.is_empty() && self.lanes.any_head(|j| j.head() != head) {
                    break;
                }
                let Some(job) = self
                    .lanes
                    .take_next(|j| slots.is_empty() || j.head() == head)
                else {
                    break;
                };
                if job.head() != head {
                    // Nothing runs now (only then may a job with another head be taken): swap
                    // heads.
                    if let Some(key) = applied.take() {
                        if !remove_head(&mut self.cache, &mut contexts.generate, &key) {
                            tracing::error!(
                                "LoRA adapter could not be removed; rebuilding contexts"
                            );
                            self.lanes.push_first(job);
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
                            let _ = job.reply.send(Err(e));
                            continue;
                        }
                        Applied::NotLoaded(key) => {
                            return Next::Load(Box::new(Command::Generate(Box::new(job))), key);
                        }
                    }
                }
                free.pop();
                let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    batch::start(
                        model,
                        &mut contexts.generate,
                        job,
                        seq,
                        n_ctx_seq,
                        timeout,
                        shared,
                    )
                }));
                match started {
                    Ok(Started::Running(slot)) => slots.push(*slot),
                    Ok(Started::Done) => free_seq(&mut contexts.generate, &mut free, seq),
                    Err(_) => {
                        // The job's reply was dropped with it: its waiter sees the engine error.
                        shared.served.fetch_add(1, Ordering::AcqRel);
                        free_seq(&mut contexts.generate, &mut free, seq);
                    }
                }
            }
            if slots.is_empty() {
                continue;
            }

            // Jobs past their deadline, or whose waiter has gone, end here and free their
            // sequence.
            let now = std::time::Instant::now();
            let mut i = 0;
            while i < slots.len() {
                let expired = slots[i].deadline <= now;
                if expired || slots[i].job.reply.is_closed() {
                    let slot = slots.swap_remove(i);
                    let seq = slot.seq;
                    tracing::warn!(seq, expired, "generation stopped before its end");
                    finish(
                        slot,
                        Err(EngineError::TimedOut(
                            u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                        )),
                        shared,
                    );
                    free_seq(&mut contexts.generate, &mut free, seq);
                } else {
                    i += 1;
                }
            }
            if slots.is_empty() {
                continue;
            }

            // One decode step: one token of every running job.
            let width = slots.len() as u64;
            if width > 1 {
                shared.batched_steps.fetch_add(1, Ordering::AcqRel);
            }
            shared.max_batch.fetch_max(width, Ordering::AcqRel);
            let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                decode_step(
                    model,
                    &mut contexts.generate,
                    &mut step,
                    &mut slots,
                    n_ctx_seq,
                )
            }));
            let finished: Vec<Ended> = match stepped {
                Ok(Ok(finished)) => finished,
                Ok(Err(e)) => (0..slots.len()).map(|i| (i, Err(e.clone()))).collect(),
                Err(_) => (0..slots.len())
                    .map(|i| (i, Err(EngineError::Decode("engine panicked".into()))))
                    .collect(),
            };
            // Highest index first, so removals do not shift the ones still to remove.
            for (i, result) in finished.into_iter().rev() {
                let slot = slots.swap_remove(i);
                let seq = slot.seq;
                finish(slot, result, shared);
                free_seq(&mut contexts.generate, &mut free, seq);
            }
        }
    }

    /// A new command: embeddings run at once (their own context); generations wait in their
    /// lane.
    fn intake<'m>(&mut self, cmd: Command, model: &'m LlamaModel, contexts: &mut Contexts<'m>) {
        match cmd {
            Command::Generate(job) => self.lanes.push(*job),
            Command::Embed { request, reply } => {
                let span = tracing::info_span!("embed", inputs = request.inputs.len());
                let _guard = span.enter();
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    embed(model, &mut contexts.embed, self.settings, &request)
                }))
                .unwrap_or_else(|_| Err(EngineError::Embedding("engine panicked".into())));
                self.shared.served.fetch_add(1, Ordering::AcqRel);
                let _ = reply.send(result);
            }
        }
    }
}
