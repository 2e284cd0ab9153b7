//! The llama.cpp engine: one thread owns the model and its context for the life of the worker.
//!
//! The context borrows the model and is not `Send`, so both live on a dedicated OS thread;
//! requests arrive over a channel, each with its own reply channel. The thread loads the model
//! once and serves every request with it.
//!
//! Continuous batching: the context holds `settings.parallel` sequences. Every decode step feeds
//! one token of each running job in one batch; a job joins as soon as a sequence is free (its
//! prompt is read into its own sequence) and leaves when it ends, its sequence cleared for the
//! next. Jobs waiting for a sequence sit in one FIFO lane per API key, served by weighted
//! round-robin (a key of priority p takes p + 1 turns per round), so one key's backlog cannot
//! starve another key's job.
//!
//! LoRA heads: a job may name an adapter; the thread applies it with the job's scale to the
//! generation context. An adapter applies to the whole context, so only jobs with the same head
//! and scale share a batch: a job needing another head waits until the running ones finish
//! (nothing new is admitted meanwhile), then the head is swapped. The base model runs with no
//! head applied. Loaded adapters stay in a bounded LRU ([`super::lora::AdapterCache`]). Loading one
//! needs the model mutably, so on a cache miss the thread ends the current *epoch* (drops its
//! contexts), loads, and starts a new epoch with fresh contexts.
//!
//! Embeddings: a second context on the same model, in embedding mode with the configured
//! pooling, created on the first embedding job of an epoch.

use std::{
    num::NonZeroU32,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc, Arc, Mutex,
    },
    thread,
};

use async_trait::async_trait;
use llama_cpp_2::{
    context::{
        params::{LlamaContextParams, LlamaPoolingType},
        LlamaContext,
    },
    llama_batch::LlamaBatch,
    model::{params::LlamaModelParams, LlamaModel},
    sampling::LlamaSampler,
};
use tokio::sync::oneshot;

use super::{
    lora::{AdapterCache, AdapterKey},
    text::OutputDecoder,
    tokenizer::{backend, embedding_tokens, render_prompt, tokenize},
    Algorithm, EmbeddingRequest, Embeddings, EngineError, EngineStatus, FinishReason, Generation,
    GenerationRequest, Lane, SamplingParams, TokenSink,
};
use crate::settings::{EngineSettings, Pooling};

/// Tokens fed to one `decode` call while reading a prompt.
const PROMPT_BATCH: u32 = 512;

enum Command {
    Generate(GenJob),
    Embed {
        request: EmbeddingRequest,
        reply: oneshot::Sender<Result<Embeddings, EngineError>>,
    },
}

/// A generation waiting for, or running on, a sequence.
struct GenJob {
    request: GenerationRequest,
    sink: Option<TokenSink>,
    reply: oneshot::Sender<Result<Generation, EngineError>>,
    /// Fairness lane (the API key and its weight): waiting jobs are taken by weighted
    /// round-robin across lanes.
    lane: Lane,
}

impl GenJob {
    /// The head (adapter and scale) the context must have for this job; `None` = base model.
    fn head(&self) -> Option<(String, u32)> {
        self.request
            .adapter
            .as_ref()
            .map(|a| (a.name.clone(), a.scale.to_bits()))
    }
}

impl Command {
    fn fail(self, e: EngineError) {
        match self {
            Self::Generate(job) => {
                let _ = job.reply.send(Err(e));
            }
            Self::Embed { reply, .. } => {
                let _ = reply.send(Err(e));
            }
        }
    }
}

#[derive(Default)]
struct Shared {
    ready: AtomicBool,
    loads: AtomicU64,
    served: AtomicU64,
    batched_steps: AtomicU64,
    max_batch: AtomicU64,
    /// Names of the loaded LoRA adapters, most recently used first.
    adapters: Mutex<Vec<String>>,
    /// Facts about the loaded weights, set once the model is loaded.
    loaded: std::sync::OnceLock<Loaded>,
}

struct Loaded {
    at: chrono::DateTime<chrono::Utc>,
    quantized: bool,
}
/// Whether the weights are quantized: GGUF's `general.file_type` names the dominant tensor
/// type (0 = F32, 1 = F16, 32 = BF16 are the unquantized ones); without it, fewer than ~15 bits
/// per parameter means quantized.
fn is_quantized(model: &LlamaModel) -> bool {
    match model
        .meta_val_str("general.file_type")
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok())
    {
        Some(file_type) => !matches!(file_type, 0 | 1 | 32),
        None => {
            let params = model.n_params().max(1);
            model.size().saturating_mul(8) / params < 15
        }
    }
}

impl Shared {
    fn set_adapters(&self, names: Vec<String>) {
        if let Ok(mut list) = self.adapters.lock() {
            *list = names;
        }
    }
}

/// Handle to the engine thread. Dropping the last handle closes the channel and the thread
/// exits after its current request.
pub struct LlamaEngine {
    tx: mpsc::Sender<Command>,
    shared: Arc<Shared>,
    settings: EngineSettings,
    device: String,
}

impl std::fmt::Debug for LlamaEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlamaEngine")
            .field("model", &self.settings.model_name)
            .finish_non_exhaustive()
    }
}

impl LlamaEngine {
    /// Starts the engine thread and waits until the model is loaded (or failed to load).
    ///
    /// Blocking: call from `spawn_blocking` in async code.
    ///
    /// # Errors
    /// When the model cannot be loaded or the context cannot be created.
    pub fn start(settings: EngineSettings) -> Result<Self, EngineError> {
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let shared = Arc::new(Shared::default());
        let thread_shared = shared.clone();
        let thread_settings = settings.clone();
        thread::Builder::new()
            .name(format!("llama-{}", settings.model_name))
            .spawn(move || engine_thread(&thread_settings, &rx, &ready_tx, &thread_shared))
            .map_err(|e| EngineError::Load(format!("cannot spawn engine thread: {e}")))?;
        ready_rx
            .recv()
            .map_err(|_| EngineError::Load("engine thread exited during load".into()))??;
        let device = if settings.n_gpu_layers > 0 && backend()?.supports_gpu_offload() {
            format!(
                "gpu:{} ({} layers)",
                settings.main_gpu, settings.n_gpu_layers
            )
        } else {
            "cpu".to_string()
        };
        Ok(Self {
            tx,
            shared,
            settings,
            device,
        })
    }
}

#[async_trait]
impl Algorithm for LlamaEngine {
    async fn run(&self, request: GenerationRequest) -> Result<Generation, EngineError> {
        self.submit(request, None, Lane::new(0, 0)).await
    }

    async fn run_streaming(
        &self,
        request: GenerationRequest,
        sink: TokenSink,
    ) -> Result<Generation, EngineError> {
        self.submit(request, Some(sink), Lane::new(0, 0)).await
    }

    async fn run_in_lane(
        &self,
        request: GenerationRequest,
        sink: TokenSink,
        lane: Lane,
    ) -> Result<Generation, EngineError> {
        self.submit(request, Some(sink), lane).await
    }

    fn parallel(&self) -> usize {
        self.settings.parallel.max(1) as usize
    }

    async fn embed(&self, request: EmbeddingRequest) -> Result<Embeddings, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Embed { request, reply })
            .map_err(|_| EngineError::Unavailable("engine thread has stopped".into()))?;
        rx.await
            .map_err(|_| EngineError::Unavailable("engine thread dropped the request".into()))?
    }

    fn status(&self) -> EngineStatus {
        self.snapshot()
    }
}

impl LlamaEngine {
    async fn submit(
        &self,
        request: GenerationRequest,
        sink: Option<TokenSink>,
        lane: Lane,
    ) -> Result<Generation, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Generate(GenJob {
                request,
                sink,
                reply,
                lane,
            }))
            .map_err(|_| EngineError::Unavailable("engine thread has stopped".into()))?;
        rx.await
            .map_err(|_| EngineError::Unavailable("engine thread dropped the request".into()))?
    }

    fn snapshot(&self) -> EngineStatus {
        EngineStatus {
            ready: self.shared.ready.load(Ordering::Acquire),
            model: self.settings.model_name.clone(),
            model_path: self.settings.model_path.display().to_string(),
            loads: self.shared.loads.load(Ordering::Acquire),
            jobs_served: self.shared.served.load(Ordering::Acquire),
            context_size: self.settings.context_size,
            device: self.device.clone(),
            adapters: self
                .shared
                .adapters
                .lock()
                .map(|l| l.clone())
                .unwrap_or_default(),
            embeddings: self.settings.embeddings.enabled,
            quantized: self.shared.loaded.get().is_some_and(|l| l.quantized),
            loaded_at: self.shared.loaded.get().map(|l| l.at.to_rfc3339()),
            parallel: u64::from(self.settings.parallel.max(1)),
            batched_steps: self.shared.batched_steps.load(Ordering::Acquire),
            max_batch: self.shared.max_batch.load(Ordering::Acquire),
        }
    }
}

fn threads(settings: &EngineSettings) -> i32 {
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

fn engine_thread(
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
    let mut cache = AdapterCache::new(&settings.adapters_dir, settings.adapter_cache_size);
    let mut lanes = Lanes::default();
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
            serve(
                &model,
                &mut contexts,
                &mut cache,
                &mut lanes,
                rx,
                pending.take(),
                settings,
                shared,
            )
            // The contexts are dropped here, ending their borrow of the model.
        };
        match next {
            Next::Stop => break,
            Next::Rebuild => {}
            Next::Load(cmd, key) => {
                let name = key.name.clone();
                match cache.load(&mut model, key) {
                    Ok(()) => pending = Some(*cmd),
                    Err(e) => {
                        tracing::warn!(adapter = %name, error = %e, "LoRA adapter not loaded");
                        shared.served.fetch_add(1, Ordering::AcqRel);
                        cmd.fail(e);
                    }
                }
                shared.set_adapters(cache.names());
            }
        }
    }
    shared.ready.store(false, Ordering::Release);
    tracing::info!(model = %settings.model_name, "engine thread stopped");
}

/// Generation jobs waiting for a sequence: one FIFO lane per key, taken by weighted
/// round-robin (a lane of weight w takes up to w jobs in a row before the next lane's turn).
#[derive(Default)]
struct Lanes {
    lanes: std::collections::VecDeque<LaneQueue>,
}

struct LaneQueue {
    key: i64,
    weight: u32,
    /// Turns left in this lane's current round.
    turns: u32,
    jobs: std::collections::VecDeque<GenJob>,
}

impl LaneQueue {
    fn new(job: GenJob) -> Self {
        Self {
            key: job.lane.key,
            weight: job.lane.weight.max(1),
            turns: job.lane.weight.max(1),
            jobs: std::collections::VecDeque::from([job]),
        }
    }
}

impl Lanes {
    fn push(&mut self, job: GenJob) {
        match self.lanes.iter_mut().find(|l| l.key == job.lane.key) {
            Some(lane) => {
                // The key's latest priority applies from its next round.
                lane.weight = job.lane.weight.max(1);
                lane.jobs.push_back(job);
            }
            None => self.lanes.push_back(LaneQueue::new(job)),
        }
    }

    /// Puts a job that was already chosen back at the head of the line.
    fn push_first(&mut self, job: GenJob) {
        match self.lanes.iter().position(|l| l.key == job.lane.key) {
            Some(i) => {
                if let Some(mut lane) = self.lanes.remove(i) {
                    lane.jobs.push_front(job);
                    self.lanes.push_front(lane);
                }
            }
            None => self.lanes.push_front(LaneQueue::new(job)),
        }
    }

    fn is_empty(&self) -> bool {
        self.lanes.is_empty()
    }

    /// Whether the job at the head of some lane satisfies `pred`.
    fn any_head(&self, pred: impl Fn(&GenJob) -> bool) -> bool {
        self.lanes.iter().any(|l| l.jobs.front().is_some_and(&pred))
    }

    /// The head job of the lane whose turn it is and that `fits`. A lane keeps the turn until
    /// it has taken `weight` jobs (or cannot take one now), then goes to the back.
    fn take_next(&mut self, fits: impl Fn(&GenJob) -> bool) -> Option<GenJob> {
        for _ in 0..self.lanes.len() {
            let mut lane = self.lanes.pop_front()?;
            if lane.jobs.front().is_some_and(&fits) {
                let job = lane.jobs.pop_front();
                lane.turns = lane.turns.saturating_sub(1);
                if !lane.jobs.is_empty() {
                    if lane.turns == 0 {
                        lane.turns = lane.weight;
                        self.lanes.push_back(lane);
                    } else {
                        self.lanes.push_front(lane);
                    }
                }
                return job;
            }
            lane.turns = lane.weight;
            self.lanes.push_back(lane);
        }
        None
    }
}

/// A generation running on one sequence of the shared context.
struct Slot {
    seq: i32,
    job: GenJob,
    sampler: LlamaSampler,
    out: OutputDecoder,
    prompt_tokens: usize,
    /// Positions of this sequence in the KV cache.
    n_past: usize,
    generated: u32,
    /// The token to feed at the next step.
    next: llama_cpp_2::token::LlamaToken,
    /// When it must have ended (`settings.engine.job_timeout_ms` after its start); checked
    /// between decode steps.
    deadline: std::time::Instant,
}

/// Serves commands with this epoch's contexts until a job needs an adapter that is not loaded
/// (with no job running) or the channel closes.
#[allow(clippy::too_many_arguments)]
fn serve<'m>(
    model: &'m LlamaModel,
    contexts: &mut Contexts<'m>,
    cache: &mut AdapterCache,
    lanes: &mut Lanes,
    rx: &mpsc::Receiver<Command>,
    pending: Option<Command>,
    settings: &EngineSettings,
    shared: &Shared,
) -> Next {
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
            Command::Generate(job) => lanes.push_first(job),
            other => other.fail(EngineError::Unavailable("unexpected command".into())),
        }
    }
    loop {
        // Take what has arrived; block only when there is nothing else to do.
        if slots.is_empty() && lanes.is_empty() {
            if closed {
                return Next::Stop;
            }
            match rx.recv() {
                Ok(cmd) => intake(cmd, model, contexts, lanes, settings, shared),
                Err(_) => return Next::Stop,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(cmd) => intake(cmd, model, contexts, lanes, settings, shared),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }

        // Admit waiting jobs into free sequences: the same head as the running ones only, and
        // none at all while a job for another head waits (it goes next, once these finish).
        while let Some(&seq) = free.last() {
            if !slots.is_empty() && lanes.any_head(|j| j.head() != head) {
                break;
            }
            let Some(job) = lanes.take_next(|j| slots.is_empty() || j.head() == head) else {
                break;
            };
            if job.head() != head {
                // Nothing runs now (only then may a job with another head be taken): swap heads.
                if let Some(key) = applied.take() {
                    if !remove_head(cache, &mut contexts.generate, &key) {
                        tracing::error!("LoRA adapter could not be removed; rebuilding contexts");
                        lanes.push_first(job);
                        return Next::Rebuild;
                    }
                }
                head = None;
                match apply_head(cache, &mut contexts.generate, &job, shared) {
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
                        return Next::Load(Box::new(Command::Generate(job)), key);
                    }
                }
            }
            free.pop();
            let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                start(
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

        // Jobs past their deadline, or whose waiter has gone, end here and free their sequence.
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

/// A new command: embeddings run at once (their own context); generations wait in their lane.
fn intake<'m>(
    cmd: Command,
    model: &'m LlamaModel,
    contexts: &mut Contexts<'m>,
    lanes: &mut Lanes,
    settings: &EngineSettings,
    shared: &Shared,
) {
    match cmd {
        Command::Generate(job) => lanes.push(job),
        Command::Embed { request, reply } => {
            let span = tracing::info_span!("embed", inputs = request.inputs.len());
            let _guard = span.enter();
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                embed(model, &mut contexts.embed, settings, &request)
            }))
            .unwrap_or_else(|_| Err(EngineError::Embedding("engine panicked".into())));
            shared.served.fetch_add(1, Ordering::AcqRel);
            let _ = reply.send(result);
        }
    }
}

enum Applied {
    Yes(Option<AdapterKey>),
    Failed(EngineError),
    NotLoaded(AdapterKey),
}

/// Applies the job's head to the (idle) context.
fn apply_head(
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
fn remove_head(cache: &mut AdapterCache, ctx: &mut LlamaContext<'_>, key: &AdapterKey) -> bool {
    match cache.get_mut(key) {
        Some(adapter) => ctx.lora_adapter_remove(adapter).is_ok(),
        // Evicted while applied cannot happen (loads end the epoch first); be safe anyway.
        None => false,
    }
}

fn free_seq(ctx: &mut LlamaContext<'_>, free: &mut Vec<i32>, seq: i32) {
    let _ = ctx.clear_kv_cache_seq(u32::try_from(seq).ok(), None, None);
    free.push(seq);
}

/// How starting a job went.
enum Started {
    /// Prompt read, first token taken; decode steps follow.
    Running(Box<Slot>),
    /// Already answered (an error, or finished on its first token).
    Done,
}

/// Reads a job's prompt into sequence `seq` and takes its first token.
fn start(
    model: &LlamaModel,
    ctx: &mut LlamaContext<'_>,
    job: GenJob,
    seq: i32,
    n_ctx_seq: usize,
    timeout: std::time::Duration,
    shared: &Shared,
) -> Started {
    let prepared = (|| {
        let text = render_prompt(model, &job.request.prompt)?;
        let tokens = tokenize(model, &text);
        let prompt_tokens = tokens.len();
        if prompt_tokens == 0 || prompt_tokens >= n_ctx_seq {
            return Err(EngineError::PromptTooLong {
                prompt_tokens,
                context_size: u32::try_from(n_ctx_seq).unwrap_or(u32::MAX),
            });
        }
        let _ = ctx.clear_kv_cache_seq(u32::try_from(seq).ok(), None, None);
        let mut batch = LlamaBatch::new(PROMPT_BATCH as usize, 1);
        let last = prompt_tokens - 1;
        for (chunk_index, chunk) in tokens.chunks(PROMPT_BATCH as usize).enumerate() {
            batch.clear();
            for (i, tok) in chunk.iter().enumerate() {
                let pos = chunk_index * PROMPT_BATCH as usize + i;
                batch
                    .add(*tok, pos_i32(pos)?, &[seq], pos == last)
                    .map_err(|e| EngineError::Decode(e.to_string()))?;
            }
            ctx.decode(&mut batch)
                .map_err(|e| EngineError::Decode(e.to_string()))?;
        }
        Ok((prompt_tokens, batch.n_tokens() - 1))
    })();
    let (prompt_tokens, logits_at) = match prepared {
        Ok(p) => p,
        Err(e) => {
            shared.served.fetch_add(1, Ordering::AcqRel);
            let _ = job.reply.send(Err(e));
            return Started::Done;
        }
    };
    let mut slot = Slot {
        seq,
        sampler: sampler(&job.request.params),
        out: OutputDecoder::new(&job.request.params.stop),
        job,
        prompt_tokens,
        n_past: prompt_tokens,
        generated: 0,
        next: llama_cpp_2::token::LlamaToken(0),
        deadline: std::time::Instant::now() + timeout,
    };
    match take_token(model, ctx, &mut slot, logits_at, n_ctx_seq) {
        None => Started::Running(Box::new(slot)),
        Some(finish_reason) => {
            finish(slot, Ok(finish_reason), shared);
            Started::Done
        }
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
    let tok = slot.sampler.sample(ctx, idx);
    if vocab.is_eog(tok) {
        return Some(FinishReason::Stop);
    }
    slot.generated += 1;
    let stopped = slot.out.push(&vocab.token_to_piece(tok, false, None));
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
type Ended = (usize, Result<FinishReason, EngineError>);

/// Feeds every running job's last token in one batch, then takes each one's next token.
/// Returns the jobs that ended (by index into `slots`, ascending).
fn decode_step(
    model: &LlamaModel,
    ctx: &mut LlamaContext<'_>,
    batch: &mut LlamaBatch,
    slots: &mut [Slot],
    n_ctx_seq: usize,
) -> Result<Vec<Ended>, EngineError> {
    batch.clear();
    for slot in slots.iter() {
        batch
            .add(slot.next, pos_i32(slot.n_past)?, &[slot.seq], true)
            .map_err(|e| EngineError::Decode(e.to_string()))?;
    }
    ctx.decode(batch)
        .map_err(|e| EngineError::Decode(e.to_string()))?;
    let mut finished = Vec::new();
    for (i, slot) in slots.iter_mut().enumerate() {
        slot.n_past += 1;
        let idx = i32::try_from(i).map_err(|_| EngineError::Decode("batch index".into()))?;
        if let Some(reason) = take_token(model, ctx, slot, idx, n_ctx_seq) {
            finished.push((i, Ok(reason)));
        }
    }
    Ok(finished)
}

/// Answers a job: its text (the rest held back for stop strings is final now) or its error.
/// It counts as served before its waiter hears of it.
fn finish(mut slot: Slot, result: Result<FinishReason, EngineError>, shared: &Shared) {
    shared.served.fetch_add(1, Ordering::AcqRel);
    let reply = match result {
        Ok(finish_reason) => {
            if let Some(sink) = &slot.job.sink {
                let rest = slot.out.take_rest();
                if !rest.is_empty() {
                    let _ = sink.send(rest);
                }
            }
            Ok(Generation {
                text: slot.out.into_text(),
                prompt_tokens: u32::try_from(slot.prompt_tokens).unwrap_or(u32::MAX),
                generated_tokens: slot.generated,
                finish_reason,
            })
        }
        Err(e) => Err(e),
    };
    let _ = slot.job.reply.send(reply);
}

/// Embeds each input on its own (a fresh sequence each), then L2-normalises the vector.
fn embed<'m>(
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

fn sampler(params: &SamplingParams) -> LlamaSampler {
    if params.temperature <= 0.0 {
        return LlamaSampler::greedy();
    }
    let seed = params.seed.unwrap_or_else(rand::random);
    LlamaSampler::chain_simple([
        LlamaSampler::top_k(40),
        LlamaSampler::top_p(params.top_p, 1),
        LlamaSampler::temp(params.temperature),
        LlamaSampler::dist(seed),
    ])
}

fn pos_i32(pos: usize) -> Result<i32, EngineError> {
    i32::try_from(pos).map_err(|_| EngineError::Decode("position overflow".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Prompt;

    fn job(key: i64, priority: i32, n: usize) -> GenJob {
        let (reply, _) = oneshot::channel();
        GenJob {
            request: GenerationRequest {
                model: "m".into(),
                prompt: Prompt::Raw {
                    text: format!("{key}-{n}"),
                },
                params: SamplingParams {
                    max_tokens: 1,
                    temperature: 0.0,
                    top_p: 1.0,
                    seed: None,
                    stop: vec![],
                },
                adapter: None,
            },
            sink: None,
            reply,
            lane: Lane::new(key, priority),
        }
    }

    fn order(lanes: &mut Lanes) -> Vec<i64> {
        std::iter::from_fn(|| lanes.take_next(|_| true))
            .map(|j| j.lane.key)
            .collect()
    }

    #[test]
    fn a_backlog_takes_turns_with_a_late_single_job() {
        let mut lanes = Lanes::default();
        for n in 0..5 {
            lanes.push(job(1, 0, n));
        }
        lanes.push(job(2, 0, 0));
        assert_eq!(order(&mut lanes), vec![1, 2, 1, 1, 1, 1]);
    }

    #[test]
    fn priority_buys_turns_in_proportion_and_starves_nobody() {
        let mut lanes = Lanes::default();
        for n in 0..4 {
            lanes.push(job(1, 0, n));
        }
        for n in 0..8 {
            lanes.push(job(2, 2, n));
        }
        // Key 2 (priority 2) takes three jobs for each of key 1's.
        assert_eq!(order(&mut lanes), vec![1, 2, 2, 2, 1, 2, 2, 2, 1, 2, 2, 1]);
    }

    #[test]
    fn a_lane_whose_head_does_not_fit_keeps_its_place_in_line() {
        let mut lanes = Lanes::default();
        lanes.push(job(1, 0, 0));
        lanes.push(job(2, 0, 0));
        let second = lanes.take_next(|j| j.lane.key == 2).map(|j| j.lane.key);
        assert_eq!(second, Some(2));
        assert_eq!(order(&mut lanes), vec![1]);
    }
}
