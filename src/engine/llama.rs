//! The llama.cpp engine: one thread owns the model and its context for the life of the worker.
//!
//! The context borrows the model and is not `Send`, so both live on a dedicated OS thread;
//! requests arrive over a channel, each with its own reply channel. The thread loads the model
//! once and serves every request with it.
//!
//! LoRA heads: a job may name an adapter; the thread applies it with the job's scale to the
//! generation context for that job only and removes it afterwards, so the next job runs on the
//! base model. Loaded adapters stay in a bounded LRU ([`super::lora::AdapterCache`]). Loading one
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
    GenerationRequest, SamplingParams, TokenSink,
};
use crate::settings::{EngineSettings, Pooling};

/// Tokens fed to one `decode` call while reading a prompt.
const PROMPT_BATCH: u32 = 512;

enum Command {
    Generate {
        request: GenerationRequest,
        sink: Option<TokenSink>,
        reply: oneshot::Sender<Result<Generation, EngineError>>,
    },
    Embed {
        request: EmbeddingRequest,
        reply: oneshot::Sender<Result<Embeddings, EngineError>>,
    },
}

impl Command {
    fn fail(self, e: EngineError) {
        match self {
            Self::Generate { reply, .. } => {
                let _ = reply.send(Err(e));
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
        self.submit(request, None).await
    }

    async fn run_streaming(
        &self,
        request: GenerationRequest,
        sink: TokenSink,
    ) -> Result<Generation, EngineError> {
        self.submit(request, Some(sink)).await
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
    ) -> Result<Generation, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Generate {
                request,
                sink,
                reply,
            })
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
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(settings.context_size))
        .with_n_batch(PROMPT_BATCH)
        .with_n_ubatch(PROMPT_BATCH)
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

/// Serves commands with this epoch's contexts until one needs a new adapter or the channel
/// closes.
fn serve<'m>(
    model: &'m LlamaModel,
    contexts: &mut Contexts<'m>,
    cache: &mut AdapterCache,
    rx: &mpsc::Receiver<Command>,
    mut pending: Option<Command>,
    settings: &EngineSettings,
    shared: &Shared,
) -> Next {
    loop {
        let cmd = match pending.take() {
            Some(cmd) => cmd,
            None => match rx.recv() {
                Ok(cmd) => cmd,
                Err(_) => return Next::Stop,
            },
        };
        match cmd {
            Command::Generate {
                request,
                sink,
                reply,
            } => {
                let span = tracing::info_span!("generate", model = %request.display_model());
                let _guard = span.enter();
                let key = match request.adapter.as_ref().map(|a| cache.key_for(a)) {
                    None => None,
                    Some(Ok(key)) => Some(key),
                    Some(Err(e)) => {
                        shared.served.fetch_add(1, Ordering::AcqRel);
                        let _ = reply.send(Err(e));
                        continue;
                    }
                };
                let scale = request.adapter.as_ref().map_or(0.0, |a| a.scale);
                if let Some(key) = &key {
                    // Looking it up also marks it most recently used.
                    if cache.get_mut(key).is_none() {
                        let key = key.clone();
                        let cmd = Command::Generate {
                            request,
                            sink,
                            reply,
                        };
                        return Next::Load(Box::new(cmd), key);
                    }
                    shared.set_adapters(cache.names());
                }
                let adapter = key.as_ref().and_then(|k| cache.get_mut(k));
                let ctx = &mut contexts.generate;
                let (result, clean) = match adapter {
                    None => (run_generate(model, ctx, &request, sink.as_ref()), true),
                    Some(adapter) => match ctx.lora_adapter_set(adapter, scale) {
                        Err(e) => (
                            Err(EngineError::Adapter {
                                name: key.map(|k| k.name).unwrap_or_default(),
                                reason: format!("cannot apply it: {e}"),
                            }),
                            true,
                        ),
                        Ok(()) => {
                            let result = run_generate(model, ctx, &request, sink.as_ref());
                            // The head is for this job only.
                            let clean = ctx.lora_adapter_remove(adapter).is_ok();
                            (result, clean)
                        }
                    },
                };
                shared.served.fetch_add(1, Ordering::AcqRel);
                let _ = reply.send(result);
                if !clean {
                    tracing::error!("LoRA adapter could not be removed; rebuilding contexts");
                    return Next::Rebuild;
                }
            }
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
}

/// One generation; a panic inside llama-cpp-2 must not take the worker down with it.
fn run_generate(
    model: &LlamaModel,
    ctx: &mut LlamaContext<'_>,
    request: &GenerationRequest,
    sink: Option<&TokenSink>,
) -> Result<Generation, EngineError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        generate(model, ctx, request, sink)
    }))
    .unwrap_or_else(|_| Err(EngineError::Decode("engine panicked".into())))
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

/// Runs one request on sequence 0 of the context.
fn generate(
    model: &LlamaModel,
    ctx: &mut LlamaContext<'_>,
    request: &GenerationRequest,
    sink: Option<&TokenSink>,
) -> Result<Generation, EngineError> {
    let n_ctx = ctx.n_ctx();
    let text = render_prompt(model, &request.prompt)?;
    let tokens = tokenize(model, &text);
    let prompt_tokens = tokens.len();
    if prompt_tokens == 0 || prompt_tokens >= n_ctx as usize {
        return Err(EngineError::PromptTooLong {
            prompt_tokens,
            context_size: n_ctx,
        });
    }
    ctx.clear_kv_cache();

    let decode_err = |e: &dyn std::fmt::Display| EngineError::Decode(e.to_string());
    let mut batch = LlamaBatch::new(PROMPT_BATCH as usize, 1);
    let last = prompt_tokens - 1;
    for (chunk_index, chunk) in tokens.chunks(PROMPT_BATCH as usize).enumerate() {
        batch.clear();
        for (i, tok) in chunk.iter().enumerate() {
            let pos = chunk_index * PROMPT_BATCH as usize + i;
            batch
                .add(*tok, pos_i32(pos)?, &[0], pos == last)
                .map_err(|e| decode_err(&e))?;
        }
        ctx.decode(&mut batch).map_err(|e| decode_err(&e))?;
    }

    let vocab = model.vocab();
    let mut sampler = sampler(&request.params);
    let mut out = OutputDecoder::new(&request.params.stop);
    let mut n_past = prompt_tokens;
    let mut generated: u32 = 0;
    let finish = loop {
        if generated >= request.params.max_tokens || n_past >= n_ctx as usize {
            break FinishReason::Length;
        }
        let tok = sampler.sample(ctx, batch.n_tokens() - 1);
        if vocab.is_eog(tok) {
            break FinishReason::Stop;
        }
        generated += 1;
        let stopped = out.push(&vocab.token_to_piece(tok, false, None));
        if let Some(sink) = sink {
            let delta = out.take_delta();
            if !delta.is_empty() {
                let _ = sink.send(delta);
            }
        }
        if stopped {
            break FinishReason::Stop;
        }
        batch.clear();
        batch
            .add(tok, pos_i32(n_past)?, &[0], true)
            .map_err(|e| decode_err(&e))?;
        n_past += 1;
        ctx.decode(&mut batch).map_err(|e| decode_err(&e))?;
    };
    if let Some(sink) = sink {
        // Text held back as a possible stop-string prefix is final now.
        let rest = out.take_rest();
        if !rest.is_empty() {
            let _ = sink.send(rest);
        }
    }
    Ok(Generation {
        text: out.into_text(),
        prompt_tokens: u32::try_from(prompt_tokens).unwrap_or(u32::MAX),
        generated_tokens: generated,
        finish_reason: finish,
    })
}

fn pos_i32(pos: usize) -> Result<i32, EngineError> {
    i32::try_from(pos).map_err(|_| EngineError::Decode("position overflow".into()))
}
