//! A scripted engine: deterministic replies derived from the prompt, with no model weights.
//!
//! Why it exists: the tests of admission, auth, quotas, validation and routing exercise
//! everything *around* the engine. On this stand-in they need no GGUF file, run in
//! milliseconds on any machine, and can predict every answer to the byte. It is selected with
//! `settings.engine.backend: scripted` (see [`super::start`]); the default, `llama`, loads the
//! real model, and a worker running this one says so in its status (`device: "scripted"`).
//!
//! What it does not prove: that generation works. The tests that run the real model through
//! [`super::llama::LlamaEngine`] (batching, LoRA heads, embeddings, streaming, the seed
//! examples) prove that; nothing here stands in for them.
//!
//! The script: the reply is `echo:` followed by the words of the last user message (the raw
//! text for a completion), prefixed by `[<adapter>]` when the job names a LoRA head. One
//! whitespace-separated word is one token, so `max_tokens` cuts at a word (finish reason
//! `length`), a stop string cuts the text before it (finish reason `stop`, through the same
//! [`OutputDecoder`] the real engine uses), and deltas are sent word by word. A job with a
//! `response_format` answers a small JSON value that format accepts ([`super::grammar::example`]),
//! so tests of structured output around the model can parse it. Asked for log-probabilities,
//! every word is certain (0, itself the only alternative). Embeddings are
//! hashed bags of words of the real model's width, L2-normalised.
//!
//! The script is read on an engine thread run by the same [`supervisor`] as the model's, and a
//! prompt containing [`PANIC_TRIGGER`] makes that thread panic outside any per-job wrapper: the
//! fault the tests inject to watch the engine go down, say why, and come back.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc, Arc, Mutex, PoisonError,
    },
    time::Duration,
};

use async_trait::async_trait;

use super::{
    supervisor::{self, Health, Reply, RestartPolicy},
    text::{count_words, OutputDecoder},
    Algorithm, EmbeddingRequest, Embeddings, EngineError, EngineStatus, FinishReason, Generation,
    GenerationRequest, Lane, Prompt, TokenSink,
};
use crate::settings::EngineSettings;

/// A prompt containing this makes the scripted engine's thread panic, outside any per-job
/// wrapper, with the job in flight. Only the scripted backend (a test stand-in) honours it.
pub const PANIC_TRIGGER: &str = "__tollgate_scripted_engine_panic__";

/// A job's script, asked of the engine thread.
struct ScriptCall {
    request: GenerationRequest,
    reply: Reply<Vec<String>>,
}

/// Width of the scripted vectors: the shipped model's `n_embd`, so dimension checks in the API
/// agree with the real engine.
pub const EMBEDDING_WIDTH: usize = 576;

/// The deterministic stand-in for [`super::llama::LlamaEngine`]; see the module doc.
#[derive(Debug)]
pub struct ScriptedEngine {
    settings: EngineSettings,
    served: AtomicU64,
    /// Heads seen, most recently used first (bounded like the real adapter cache).
    adapters: Mutex<Vec<String>>,
    /// When its thread last started, and how many times it did.
    loaded_at: Arc<Mutex<String>>,
    loads: Arc<AtomicU64>,
    /// Pause after each generated word (zero unless a test asks for slow jobs).
    token_delay: Duration,
    /// The engine thread, under the supervisor.
    tx: mpsc::Sender<ScriptCall>,
    health: Arc<Health>,
}

impl ScriptedEngine {
    /// A ready engine; loads nothing, but starts its (supervised) engine thread.
    ///
    /// # Errors
    /// When the thread cannot be spawned.
    pub fn start(settings: EngineSettings) -> Result<Self, EngineError> {
        let health = Arc::new(Health::default());
        let loaded_at = Arc::new(Mutex::new(String::new()));
        let loads = Arc::new(AtomicU64::new(0));
        let (thread_loaded_at, thread_loads) = (loaded_at.clone(), loads.clone());
        let tx = supervisor::spawn(
            format!("scripted-{}", settings.model_name),
            RestartPolicy::from(&settings.restart),
            health.clone(),
            |call: ScriptCall, e| call.reply.send(Err(e)),
            move |rx: &mpsc::Receiver<ScriptCall>, serving| {
                *thread_loaded_at
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = chrono::Utc::now().to_rfc3339();
                thread_loads.fetch_add(1, Ordering::AcqRel);
                serving.ready();
                while let Ok(call) = rx.recv() {
                    if call
                        .request
                        .prompt
                        .texts()
                        .any(|t| t.contains(PANIC_TRIGGER))
                    {
                        panic!("scripted fault: the prompt asked the engine thread to panic");
                    }
                    let words = Self::script(&call.request);
                    call.reply.send(Ok(words));
                }
                Ok(())
            },
        )?;
        Ok(Self {
            settings,
            served: AtomicU64::new(0),
            adapters: Mutex::new(Vec::new()),
            loaded_at,
            loads,
            token_delay: Duration::ZERO,
            tx,
            health,
        })
    }

    /// The job's words, from the engine thread.
    async fn script_of(&self, request: &GenerationRequest) -> Result<Vec<String>, EngineError> {
        self.health.check()?;
        let (reply, rx) = Reply::new();
        self.tx
            .send(ScriptCall {
                request: request.clone(),
                reply,
            })
            .map_err(|_| EngineError::Unavailable("engine thread has stopped".into()))?;
        rx.await
            .map_err(|_| EngineError::Unavailable("engine thread dropped the request".into()))?
    }

    /// Makes every generated word take `delay` (for tests of jobs that overlap or stream).
    #[must_use]
    pub fn with_token_delay(mut self, delay: Duration) -> Self {
        self.token_delay = delay;
        self
    }

    /// The reply's words, before any limit: `[adapter]`, `echo:`, then the prompt's words; with
    /// a `response_format`, one word instead: a small JSON value it accepts (compact, so it is
    /// one token and parses whole).
    fn script(request: &GenerationRequest) -> Vec<String> {
        if let Some(output) = &request.params.controls.output {
            return vec![super::grammar::example(output).to_string()];
        }
        let source = match &request.prompt {
            Prompt::Raw { text } => text.as_str(),
            Prompt::Chat { messages, .. } => messages
                .iter()
                .rev()
                .find(|m| m.role == "user")
                .or_else(|| messages.last())
                .map_or("", |m| m.content.as_str()),
        };
        let head = request.adapter.as_ref().map(|a| format!("[{}]", a.name));
        head.into_iter()
            .chain(std::iter::once("echo:".to_string()))
            .chain(source.split_whitespace().map(str::to_string))
            .collect()
    }

    fn use_head(&self, request: &GenerationRequest) {
        let Some(adapter) = &request.adapter else {
            return;
        };
        if let Ok(mut list) = self.adapters.lock() {
            list.retain(|n| n != &adapter.name);
            list.insert(0, adapter.name.clone());
            list.truncate(self.settings.adapter_cache_size.max(1));
        }
    }

    async fn generate(
        &self,
        request: &GenerationRequest,
        sink: Option<&TokenSink>,
    ) -> Result<Generation, EngineError> {
        let words: usize = request.prompt.texts().map(count_words).sum();
        let prompt_tokens = words.max(1);
        let context = self.settings.context_size as usize;
        if prompt_tokens >= context {
            return Err(EngineError::PromptTooLong {
                prompt_tokens,
                context_size: self.settings.context_size,
            });
        }
        let script = self.script_of(request).await?;
        self.use_head(request);
        let room = u32::try_from(context - prompt_tokens).unwrap_or(u32::MAX);
        let limit = request.params.max_tokens.max(1).min(room);
        let mut out = OutputDecoder::new(&request.params.stop);
        let send = |text: String| match sink {
            Some(sink) if !text.is_empty() => drop(sink.send(text)),
            _ => {}
        };
        let mut generated = 0u32;
        let top = request.params.controls.logprobs;
        let mut logprobs = Vec::new();
        // Running out of words is the end-of-generation token.
        let mut finish_reason = FinishReason::Stop;
        for (i, word) in script.iter().enumerate() {
            let space = if i == 0 { "" } else { " " };
            generated += 1;
            let piece = format!("{space}{word}");
            if let Some(top) = top {
                logprobs.push(super::logprobs::certain(piece.as_bytes(), top));
            }
            let stopped = out.push(piece.as_bytes());
            send(out.take_delta());
            if stopped {
                break;
            }
            if generated >= limit {
                finish_reason = FinishReason::Length;
                break;
            }
            if !self.token_delay.is_zero() {
                tokio::time::sleep(self.token_delay).await;
            }
        }
        send(out.take_rest());
        let text = out.into_text();
        Ok(Generation {
            logprobs: top.map(|_| super::logprobs::fit_to_text(logprobs, text.len())),
            text,
            prompt_tokens: u32::try_from(prompt_tokens).unwrap_or(u32::MAX),
            // No KV cache here, so nothing is reused (the real engine's reuse is tested with it).
            cached_tokens: 0,
            generated_tokens: generated,
            finish_reason,
            more: Vec::new(),
        })
    }

    /// Answers a generation, counted as served before its caller hears of it.
    async fn answer(
        &self,
        request: &GenerationRequest,
        sink: Option<&TokenSink>,
    ) -> Result<Generation, EngineError> {
        // `n` choices: the script is the same for each (only the first streams).
        let mut parts = Vec::new();
        for (i, part) in request.clone().fan_out().iter().enumerate() {
            parts.push(self.generate(part, sink.filter(|_| i == 0)).await);
        }
        self.served.fetch_add(1, Ordering::AcqRel);
        Generation::merge(parts.into_iter().collect::<Result<Vec<_>, _>>()?)
            .ok_or_else(|| EngineError::Decode("no choice was generated".into()))
    }

    fn vectors(&self, request: &EmbeddingRequest) -> Result<Embeddings, EngineError> {
        if !self.settings.embeddings.enabled {
            return Err(EngineError::Embedding(
                "embeddings are disabled on this worker".into(),
            ));
        }
        let n_ctx = self.settings.embeddings.context_size.max(8) as usize;
        let mut vectors = Vec::with_capacity(request.inputs.len());
        let mut total = 0usize;
        for (i, text) in request.inputs.iter().enumerate() {
            let tokens = count_words(text).max(1);
            if tokens > n_ctx {
                return Err(EngineError::Embedding(format!(
                    "input {i} has {tokens} tokens; embeddings take 1 to {n_ctx}"
                )));
            }
            vectors.push(hashed_vector(text));
            total += tokens;
        }
        Ok(Embeddings {
            vectors,
            prompt_tokens: u32::try_from(total).unwrap_or(u32::MAX),
        })
    }
}

#[async_trait]
impl Algorithm for ScriptedEngine {
    async fn run(&self, request: GenerationRequest) -> Result<Generation, EngineError> {
        self.answer(&request, None).await
    }

    async fn run_streaming(
        &self,
        request: GenerationRequest,
        sink: TokenSink,
    ) -> Result<Generation, EngineError> {
        self.answer(&request, Some(&sink)).await
    }

    /// Every job runs at once, so lanes have nothing to order.
    async fn run_in_lane(
        &self,
        request: GenerationRequest,
        sink: TokenSink,
        _lane: Lane,
    ) -> Result<Generation, EngineError> {
        self.answer(&request, Some(&sink)).await
    }

    fn parallel(&self) -> usize {
        self.settings.parallel.max(1) as usize
    }

    async fn embed(&self, request: EmbeddingRequest) -> Result<Embeddings, EngineError> {
        let result = self.health.check().and_then(|()| self.vectors(&request));
        self.served.fetch_add(1, Ordering::AcqRel);
        result
    }

    fn status(&self) -> EngineStatus {
        EngineStatus {
            ready: self.health.ready(),
            reason: self.health.reason(),
            restarts: self.health.restarts(),
            model: self.settings.model_name.clone(),
            model_path: self.settings.model_path.display().to_string(),
            loads: self.loads.load(Ordering::Acquire),
            jobs_served: self.served.load(Ordering::Acquire),
            context_size: self.settings.context_size,
            device: "scripted".into(),
            adapters: self.adapters.lock().map(|l| l.clone()).unwrap_or_default(),
            embeddings: self.settings.embeddings.enabled,
            quantized: false,
            loaded_at: Some(
                self.loaded_at
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone(),
            ),
            parallel: u64::from(self.settings.parallel.max(1)),
            batched_steps: 0,
            max_batch: 0,
            prefix_copies: 0,
            mixed_steps: 0,
        }
    }
}

/// A unit vector from the text's words: each word adds ±1 at four hashed positions, so equal
/// texts give equal vectors and texts sharing words point the same way.
fn hashed_vector(text: &str) -> Vec<f32> {
    let mut v = vec![0f64; EMBEDDING_WIDTH];
    let mut words: Vec<&str> = text.split_whitespace().collect();
    if words.is_empty() {
        words.push(text);
    }
    let width = EMBEDDING_WIDTH as u64;
    for word in words {
        let mut h = fnv1a(word.as_bytes());
        for _ in 0..4 {
            h = splitmix64(h);
            let at = usize::try_from(h % width).unwrap_or(0);
            v[at] += if h >> 63 == 0 { 1.0 } else { -1.0 };
        }
    }
    let mut norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    if norm == 0.0 {
        // Every hit cancelled out: any fixed unit vector will do.
        v[usize::try_from(fnv1a(text.as_bytes()) % width).unwrap_or(0)] = 1.0;
        norm = 1.0;
    }
    v.iter().map(|x| (x / norm) as f32).collect()
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::AdapterChoice;

    fn engine() -> ScriptedEngine {
        ScriptedEngine::start(EngineSettings::default()).unwrap()
    }

    fn chat(text: &str, max_tokens: u32, stop: &[&str]) -> GenerationRequest {
        let messages = [("system", "Be brief."), ("user", text)]
            .map(|(role, content)| serde_json::json!({"role": role, "content": content}));
        serde_json::from_value(serde_json::json!({
            "model": "smollm2",
            "prompt": {"kind": "chat", "messages": messages},
            "params": {"max_tokens": max_tokens, "temperature": 0.7, "top_p": 0.9, "stop": stop},
        }))
        .unwrap()
    }

    async fn reply(text: &str, max_tokens: u32, stop: &[&str]) -> Generation {
        engine().run(chat(text, max_tokens, stop)).await.unwrap()
    }

    #[tokio::test]
    async fn the_reply_echoes_the_last_user_message_the_same_every_time() {
        let e = engine();
        let first = e.run(chat("hello  there\nworld", 16, &[])).await.unwrap();
        let again = e.run(chat("hello  there\nworld", 16, &[])).await.unwrap();
        assert_eq!(first, again);
        assert_eq!(first.text, "echo: hello there world");
        assert_eq!(first.generated_tokens, 4);
        assert_eq!(first.finish_reason, FinishReason::Stop);
        // "Be brief." and the user's three words.
        assert_eq!(first.prompt_tokens, 5);
        assert_eq!(e.status().jobs_served, 2);
    }

    #[tokio::test]
    async fn n_choices_and_logprobs_come_back_merged() {
        let mut request = chat("one two", 16, &[]);
        request.params.controls.n = Some(3);
        request.params.controls.logprobs = Some(1);
        let g = engine().run(request).await.unwrap();
        assert_eq!(g.more.len(), 2);
        assert!(g.more.iter().all(|c| c.text == g.text));
        assert_eq!(g.generated_tokens, 9, "three choices of three words");
        let logprobs = g.logprobs.expect("asked");
        assert_eq!(logprobs.len(), 3);
        assert!(logprobs
            .iter()
            .all(|t| t.logprob == 0.0 && t.top.len() == 1));
    }

    #[tokio::test]
    async fn max_tokens_cuts_at_a_word_with_length() {
        let g = reply("one two three four", 3, &[]).await;
        assert_eq!(g.text, "echo: one two");
        assert_eq!(g.generated_tokens, 3);
        assert_eq!(g.finish_reason, FinishReason::Length);
    }

    #[tokio::test]
    async fn a_stop_string_cuts_before_it_with_stop() {
        let g = reply("one two three four", 16, &["thr"]).await;
        assert_eq!(g.text, "echo: one two ");
        assert_eq!(g.finish_reason, FinishReason::Stop);
    }

    #[tokio::test]
    async fn deltas_concatenate_to_the_text() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let g = engine()
            .run_in_lane(chat("a bb ccc dddd", 16, &["cc"]), tx, Lane::new(1, 0))
            .await
            .unwrap();
        let mut deltas = Vec::new();
        while let Ok(d) = rx.try_recv() {
            deltas.push(d);
        }
        assert!(deltas.len() > 1, "sent word by word: {deltas:?}");
        assert_eq!(deltas.concat(), g.text);
        assert_eq!(g.text, "echo: a bb ");
    }

    #[tokio::test]
    async fn an_adapter_prefixes_the_reply_and_shows_in_the_status() {
        let e = engine();
        let mut request = chat("hi", 16, &[]);
        request.adapter = Some(AdapterChoice {
            name: "pirate".into(),
            path: "models/adapters/pirate.gguf".into(),
            scale: 1.0,
        });
        let g = e.run(request).await.unwrap();
        assert_eq!(g.text, "[pirate] echo: hi");
        let status = e.status();
        assert_eq!(status.adapters, vec!["pirate".to_string()]);
        assert!(status.ready);
        assert_eq!(status.device, "scripted");
    }

    #[tokio::test]
    async fn a_prompt_that_fills_the_context_is_refused() {
        let e = ScriptedEngine::start(EngineSettings {
            context_size: 4,
            ..EngineSettings::default()
        })
        .unwrap();
        let err = e.run(chat("a b c", 16, &[])).await.unwrap_err();
        assert!(matches!(err, EngineError::PromptTooLong { .. }), "{err}");
        assert_eq!(e.status().jobs_served, 1);
    }

    #[test]
    fn the_factory_makes_a_scripted_engine_without_weights() {
        let settings = EngineSettings {
            backend: crate::settings::EngineBackend::Scripted,
            model_path: "no/such/file.gguf".into(),
            ..EngineSettings::default()
        };
        let status = crate::engine::start(&settings).unwrap().status();
        assert!(status.ready);
        assert_eq!(status.device, "scripted");
        assert_eq!(status.loads, 1);
    }

    #[tokio::test]
    async fn the_panic_trigger_takes_the_thread_down_and_the_supervisor_brings_it_back() {
        let mut settings = EngineSettings::default();
        settings.restart.backoff_ms = 500;
        let e = ScriptedEngine::start(settings).unwrap();
        let err = e
            .run(chat(&format!("x {PANIC_TRIGGER}"), 16, &[]))
            .await
            .unwrap_err();
        assert!(matches!(err, EngineError::Unavailable(_)), "{err}");
        assert!(err.to_string().contains("panicked"), "{err}");
        let status = e.status();
        assert!(!status.ready);
        assert!(status.reason.is_some_and(|r| r.contains("panicked")));
        let refused = e.run(chat("hi", 16, &[])).await.unwrap_err();
        assert!(matches!(refused, EngineError::Unavailable(_)), "{refused}");
        for _ in 0..500 {
            if e.status().ready {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let status = e.status();
        assert!(status.ready, "{:?}", status.reason);
        assert_eq!((status.restarts, status.loads), (1, 2));
        assert_eq!(e.run(chat("hi", 16, &[])).await.unwrap().text, "echo: hi");
    }

    #[tokio::test]
    async fn embeddings_are_unit_vectors_and_deterministic() {
        let e = engine();
        let request = EmbeddingRequest {
            model: "smollm2".into(),
            inputs: vec!["the sea is wide".into(), "a cat".into(), String::new()],
        };
        let first = e.embed(request.clone()).await.unwrap();
        let again = e.embed(request).await.unwrap();
        assert_eq!(first, again);
        assert_eq!(first.vectors.len(), 3);
        assert_eq!(first.prompt_tokens, 4 + 2 + 1);
        for v in &first.vectors {
            assert_eq!(v.len(), EMBEDDING_WIDTH);
            let norm: f64 = v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
            assert!((norm - 1.0).abs() < 1e-5, "norm {norm}");
        }
        assert_ne!(first.vectors[0], first.vectors[1]);
        assert_eq!(e.status().jobs_served, 2);
    }
}
