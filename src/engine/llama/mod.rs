//! The llama.cpp engine: one thread owns the model and its context for the life of the worker.
//!
//! The context borrows the model and is not `Send`, so both live on a dedicated OS thread;
//! requests arrive over a channel, each with its own reply channel. The thread loads the model
//! once and serves every request with it.
//!
//! Continuous batching: the context holds `settings.parallel` sequences. Every decode step feeds
//! one token of each running job in one batch; a job joins as soon as a sequence is free and
//! leaves when it ends. Its prompt is read into its own sequence in chunks of at most
//! `settings.prompt_chunk` tokens, in the same steps as the running jobs' tokens (chunked
//! prefill), so a long prompt holds running streams back by one chunk per step, not by its
//! whole read. Prefix reuse
//! (`settings.prefix_reuse`, `prefix.rs`): a sequence keeps its KV cache after its job, and a new
//! job goes to the free sequence whose cache shares the longest start with its prompt and reads
//! only the rest — a conversation's next turn does not read its history again — or, when
//! another sequence (running or not) holds more of the prompt, starts from a copy of that
//! sequence's cache. Jobs waiting
//! for a sequence sit in one FIFO lane per API key, served by weighted round-robin
//! ([`super::lanes`]), so one key's backlog cannot starve another key's job.
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
//! pooling, created on the first embedding job of an epoch. An embedding job waits in its key's
//! lane like a generation and, once taken, is computed a few inputs per turn of the loop,
//! between decode steps, so a large call cannot stall the running streams.
//!
//! The thread runs under [`super::supervisor`]: if its loop dies (a panic anywhere), the engine
//! reports itself down with the reason, the jobs it held fail, and it loads the model again.
//!
//! Rooms: `thread` runs the loop (epochs, contexts, admission), `batch` runs jobs in sequences
//! (prompt, decode steps, sampling, answers), `prefix` places jobs on sequences by what their
//! caches hold, `heads` swaps LoRA heads and `embed` computes vectors.

mod batch;
mod embed;
mod heads;
mod prefix;
mod thread;

use std::sync::{
    atomic::{AtomicU64, Ordering},
    mpsc, Arc, Mutex, PoisonError,
};

use async_trait::async_trait;
use llama_cpp_2::model::LlamaModel;

use super::{
    lanes::Laned,
    supervisor::{self, Health, Reply, RestartPolicy},
    tokenizer::backend,
    Algorithm, EmbeddingRequest, Embeddings, EngineError, EngineStatus, Generation,
    GenerationRequest, Lane, TokenSink,
};
use crate::settings::EngineSettings;

/// Tokens fed to one `decode` call while reading a prompt.
const PROMPT_BATCH: u32 = 512;

/// A job for the engine thread; both kinds wait in their key's lane until taken.
enum Command {
    Generate(Box<GenJob>),
    Embed(Box<embed::EmbedJob>),
}

/// A generation waiting for, or running on, a sequence.
struct GenJob {
    request: GenerationRequest,
    sink: Option<TokenSink>,
    reply: Reply<Generation>,
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

impl Laned for GenJob {
    fn lane(&self) -> Lane {
        self.lane
    }
}

impl Laned for Command {
    fn lane(&self) -> Lane {
        match self {
            Self::Generate(job) => job.lane,
            Self::Embed(job) => job.lane,
        }
    }
}

impl Command {
    fn fail(self, e: EngineError) {
        match self {
            Self::Generate(job) => job.reply.send(Err(e)),
            Self::Embed(job) => job.reply.send(Err(e)),
        }
    }

    /// Whether this is a generation that needs another head than `head` (embeddings use their
    /// own context, which no head touches).
    fn wants_other_head(&self, head: &Option<(String, u32)>) -> bool {
        matches!(self, Self::Generate(job) if job.head() != *head)
    }
}

/// What the engine thread tells the handles (for [`Algorithm::status`]); readiness is in
/// [`Health`], kept by the supervisor.
#[derive(Default)]
struct Shared {
    loads: AtomicU64,
    served: AtomicU64,
    batched_steps: AtomicU64,
    max_batch: AtomicU64,
    prefix_copies: AtomicU64,
    mixed_steps: AtomicU64,
    /// Names of the loaded LoRA adapters, most recently used first.
    adapters: Mutex<Vec<String>>,
    /// Facts about the loaded weights, set each time the model is loaded.
    loaded: Mutex<Option<Loaded>>,
}

#[derive(Clone, Copy)]
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
    /// Poisoning is ignored: a panic the supervisor caught must not blank the status for good.
    fn set_adapters(&self, names: Vec<String>) {
        *self.adapters.lock().unwrap_or_else(PoisonError::into_inner) = names;
    }

    fn adapters(&self) -> Vec<String> {
        self.adapters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set_loaded(&self, loaded: Loaded) {
        *self.loaded.lock().unwrap_or_else(PoisonError::into_inner) = Some(loaded);
    }

    fn loaded(&self) -> Option<Loaded> {
        *self.loaded.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Handle to the engine thread. Dropping the last handle closes the channel and the thread
/// exits after its current request.
pub struct LlamaEngine {
    tx: mpsc::Sender<Command>,
    shared: Arc<Shared>,
    health: Arc<Health>,
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
    /// Starts the engine thread (under the supervisor) and waits until the model is loaded
    /// (or failed to load).
    ///
    /// Blocking: call from `spawn_blocking` in async code.
    ///
    /// # Errors
    /// When the model cannot be loaded or the context cannot be created.
    pub fn start(settings: EngineSettings) -> Result<Self, EngineError> {
        let shared = Arc::new(Shared::default());
        let health = Arc::new(Health::default());
        let thread_shared = shared.clone();
        let thread_settings = settings.clone();
        let tx = supervisor::spawn(
            format!("llama-{}", settings.model_name),
            RestartPolicy::from(&settings.restart),
            health.clone(),
            Command::fail,
            move |rx, serving| thread::engine_thread(&thread_settings, rx, serving, &thread_shared),
        )?;
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
            health,
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
        self.embed_in_lane(request, Lane::new(0, 0)).await
    }

    async fn embed_in_lane(
        &self,
        request: EmbeddingRequest,
        lane: Lane,
    ) -> Result<Embeddings, EngineError> {
        self.health.check()?;
        let (reply, rx) = Reply::new();
        self.tx
            .send(Command::Embed(Box::new(embed::EmbedJob::new(
                request, reply, lane,
            ))))
            .map_err(|_| EngineError::Unavailable("engine thread has stopped".into()))?;
        rx.await
            .map_err(|_| EngineError::Unavailable("engine thread dropped the request".into()))?
    }

    fn status(&self) -> EngineStatus {
        self.snapshot()
    }
}

impl LlamaEngine {
    /// Runs a request; one for `n` choices runs as `n` jobs in the same lane, on their own
    /// sequences (decoded in the same batch when sequences are free), and is answered once all
    /// are done. Only the first choice streams (the API refuses streaming with `n` > 1).
    async fn submit(
        &self,
        request: GenerationRequest,
        sink: Option<TokenSink>,
        lane: Lane,
    ) -> Result<Generation, EngineError> {
        let mut parts = request.fan_out();
        if parts.len() > 1 {
            let runs = parts
                .drain(..)
                .enumerate()
                .map(|(i, part)| self.submit_one(part, sink.clone().filter(|_| i == 0), lane));
            let done = futures::future::join_all(runs)
                .await
                .into_iter()
                .collect::<Result<Vec<_>, _>>()?;
            return Generation::merge(done)
                .ok_or_else(|| EngineError::Decode("no choice was generated".into()));
        }
        let Some(one) = parts.pop() else {
            return Err(EngineError::Decode("no choice was generated".into()));
        };
        self.submit_one(one, sink, lane).await
    }

    async fn submit_one(
        &self,
        request: GenerationRequest,
        sink: Option<TokenSink>,
        lane: Lane,
    ) -> Result<Generation, EngineError> {
        self.health.check()?;
        let (reply, rx) = Reply::new();
        self.tx
            .send(Command::Generate(Box::new(GenJob {
                request,
                sink,
                reply,
                lane,
            })))
            .map_err(|_| EngineError::Unavailable("engine thread has stopped".into()))?;
        rx.await
            .map_err(|_| EngineError::Unavailable("engine thread dropped the request".into()))?
    }

    fn snapshot(&self) -> EngineStatus {
        let loaded = self.shared.loaded();
        EngineStatus {
            ready: self.health.ready(),
            reason: self.health.reason(),
            restarts: self.health.restarts(),
            model: self.settings.model_name.clone(),
            model_path: self.settings.model_path.display().to_string(),
            loads: self.shared.loads.load(Ordering::Acquire),
            jobs_served: self.shared.served.load(Ordering::Acquire),
            context_size: self.settings.context_size,
            device: self.device.clone(),
            adapters: self.shared.adapters(),
            embeddings: self.settings.embeddings.enabled,
            quantized: loaded.is_some_and(|l| l.quantized),
            loaded_at: loaded.map(|l| l.at.to_rfc3339()),
            parallel: u64::from(self.settings.parallel.max(1)),
            batched_steps: self.shared.batched_steps.load(Ordering::Acquire),
            max_batch: self.shared.max_batch.load(Ordering::Acquire),
            prefix_copies: self.shared.prefix_copies.load(Ordering::Acquire),
            mixed_steps: self.shared.mixed_steps.load(Ordering::Acquire),
        }
    }
}

fn pos_i32(pos: usize) -> Result<i32, EngineError> {
    i32::try_from(pos).map_err(|_| EngineError::Decode("position overflow".into()))
}
