//! The llama.cpp engine: one thread owns the model and its context for the life of the worker.
//!
//! The context borrows the model and is not `Send`, so both live on a dedicated OS thread;
//! requests arrive over a channel, each with its own reply channel. The thread loads the model
//! once and serves every request with it. Requests are decoded as sequences of one context (the
//! loop keeps a list of active sequences), which is where batching several jobs per decode step
//! and per-job LoRA adapters plug in without changing the API around it.

use std::{
    num::NonZeroU32,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc, Arc,
    },
    thread,
};

use async_trait::async_trait;
use llama_cpp_2::{
    context::{params::LlamaContextParams, LlamaContext},
    llama_batch::LlamaBatch,
    model::{params::LlamaModelParams, LlamaModel},
    sampling::LlamaSampler,
};
use tokio::sync::oneshot;

use super::{
    text::OutputDecoder,
    tokenizer::{backend, render_prompt, tokenize},
    Algorithm, EngineError, EngineStatus, FinishReason, Generation, GenerationRequest,
    SamplingParams, TokenSink,
};
use crate::settings::EngineSettings;

/// Tokens fed to one `decode` call while reading a prompt.
const PROMPT_BATCH: u32 = 512;

enum Command {
    Generate {
        request: GenerationRequest,
        sink: Option<TokenSink>,
        reply: oneshot::Sender<Result<Generation, EngineError>>,
    },
}

#[derive(Default)]
struct Shared {
    ready: AtomicBool,
    loads: AtomicU64,
    served: AtomicU64,
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

fn engine_thread(
    settings: &EngineSettings,
    rx: &mpsc::Receiver<Command>,
    ready: &mpsc::Sender<Result<(), EngineError>>,
    shared: &Shared,
) {
    let loaded = (|| {
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
    })();
    let model = match loaded {
        Ok(m) => m,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let n_threads = threads(settings);
    let ctx_params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(settings.context_size))
        .with_n_batch(PROMPT_BATCH)
        .with_n_ubatch(PROMPT_BATCH)
        .with_n_threads(n_threads)
        .with_n_threads_batch(n_threads);
    let backend = match backend() {
        Ok(b) => b,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let mut ctx = match model.new_context(backend, ctx_params) {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.send(Err(EngineError::Load(format!("context: {e}"))));
            return;
        }
    };
    shared.ready.store(true, Ordering::Release);
    let _ = ready.send(Ok(()));

    while let Ok(cmd) = rx.recv() {
        match cmd {
            Command::Generate {
                request,
                sink,
                reply,
            } => {
                let span = tracing::info_span!("generate", model = %request.model);
                let _guard = span.enter();
                // A panic inside llama-cpp-2 must not take the worker down with it.
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    generate(&model, &mut ctx, &request, sink.as_ref())
                }))
                .unwrap_or_else(|_| Err(EngineError::Decode("engine panicked".into())));
                shared.served.fetch_add(1, Ordering::AcqRel);
                let _ = reply.send(result);
            }
        }
    }
    shared.ready.store(false, Ordering::Release);
    tracing::info!(model = %settings.model_name, "engine thread stopped");
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
