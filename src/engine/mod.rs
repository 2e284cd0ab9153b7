//! The generation engine behind a small trait.
//!
//! HTTP handlers and the queue worker see only [`Algorithm`] (seed 003's `Algorithm.run(input)`):
//! a validated [`GenerationRequest`] goes in, a [`Generation`] comes out. The shipped
//! implementation is [`llama::LlamaEngine`], which keeps one llama.cpp model resident on its own
//! thread. Another implementation (a different model runtime, a rule-based system) plugs in by
//! implementing the trait and being returned from [`crate::services`].

pub mod gguf;
pub mod llama;
pub mod lora;
pub mod text;
pub mod tokenizer;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// One message of a chat conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// What the model is asked to continue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Prompt {
    /// Rendered with the model's chat template, ending in an open assistant turn.
    Chat { messages: Vec<ChatMessage> },
    /// Continued as-is (completion-style).
    Raw { text: String },
}

impl Prompt {
    /// Every piece of client text in the prompt (for content checks).
    pub fn texts(&self) -> impl Iterator<Item = &str> {
        let (one, many): (Option<&str>, &[ChatMessage]) = match self {
            Self::Raw { text } => (Some(text.as_str()), &[]),
            Self::Chat { messages } => (None, messages.as_slice()),
        };
        one.into_iter()
            .chain(many.iter().map(|m| m.content.as_str()))
    }
}

/// Sampling parameters, already validated and bounded by the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    pub max_tokens: u32,
    /// 0 means greedy decoding.
    pub temperature: f32,
    pub top_p: f32,
    pub seed: Option<u32>,
    /// Generation stops before the first occurrence of any of these strings.
    pub stop: Vec<String>,
}

/// A LoRA head applied to one job, resolved by the API so the worker needs no database.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterChoice {
    /// The registered name (for logs and the engine's status).
    pub name: String,
    /// The adapter file, canonical; the engine still refuses one outside its adapters dir.
    pub path: std::path::PathBuf,
    /// Multiplier of the adapter's update (0 = the base model).
    pub scale: f32,
}

/// A request the engine accepts: only built by the API's validation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationRequest {
    /// The base model's name.
    pub model: String,
    pub prompt: Prompt,
    pub params: SamplingParams,
    /// LoRA head for this job only; absent in jobs queued before heads existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<AdapterChoice>,
}

impl GenerationRequest {
    /// The model as clients name it: `base` or `base:adapter`.
    #[must_use]
    pub fn display_model(&self) -> String {
        match &self.adapter {
            Some(a) => format!("{}:{}", self.model, a.name),
            None => self.model.clone(),
        }
    }
}

/// Texts to embed, each on its own (one vector per input, in order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmbeddingRequest {
    pub model: String,
    pub inputs: Vec<String>,
}

/// L2-normalised vectors, one per input, in input order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Embeddings {
    pub vectors: Vec<Vec<f32>>,
    pub prompt_tokens: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// End-of-generation token or a stop string.
    Stop,
    /// `max_tokens` or the context window reached.
    Length,
}

impl FinishReason {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

/// The engine's answer to one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generation {
    pub text: String,
    pub prompt_tokens: u32,
    pub generated_tokens: u32,
    pub finish_reason: FinishReason,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error("the engine is not running: {0}")]
    Unavailable(String),
    #[error("prompt has {prompt_tokens} tokens; the model's context holds {context_size}")]
    PromptTooLong {
        prompt_tokens: usize,
        context_size: u32,
    },
    #[error("chat template: {0}")]
    Template(String),
    #[error("llama.cpp decode failed: {0}")]
    Decode(String),
    #[error("model load failed: {0}")]
    Load(String),
    #[error("LoRA adapter {name:?}: {reason}")]
    Adapter { name: String, reason: String },
    #[error("embeddings: {0}")]
    Embedding(String),
    #[error("the job ran longer than {0} ms and was stopped")]
    TimedOut(u64),
}

/// Whose job it is, for fair scheduling: the API key, and its weight (priority + 1 turns per
/// round of the lanes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lane {
    pub key: i64,
    pub weight: u32,
}

impl Lane {
    /// The lane of a key with scheduling `priority` (0 = normal).
    #[must_use]
    pub fn new(key: i64, priority: i32) -> Self {
        Self {
            key,
            weight: u32::try_from(priority).unwrap_or(0).saturating_add(1),
        }
    }
}

/// What a worker reports about its engine (for `/ping`, the dashboard and tests).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EngineStatus {
    pub ready: bool,
    pub model: String,
    pub model_path: String,
    /// How many times the model weights were loaded by this engine (1 once ready).
    pub loads: u64,
    pub jobs_served: u64,
    pub context_size: u32,
    pub device: String,
    /// LoRA adapters loaded on this engine now, most recently used first.
    #[serde(default)]
    pub adapters: Vec<String>,
    /// Whether this engine computes embeddings (settings.engine.embeddings.enabled).
    #[serde(default)]
    pub embeddings: bool,
    /// The loaded weights are quantized (e.g. a Q4 GGUF).
    #[serde(default)]
    pub quantized: bool,
    /// When the weights were loaded (RFC 3339).
    #[serde(default)]
    pub loaded_at: Option<String>,
    /// Jobs it decodes together at most (`settings.engine.parallel`).
    #[serde(default)]
    pub parallel: u64,
    /// Decode steps that carried more than one job, and the most jobs one step carried.
    #[serde(default)]
    pub batched_steps: u64,
    #[serde(default)]
    pub max_batch: u64,
}

/// Where an engine sends text as it is generated (for streaming clients).
pub type TokenSink = tokio::sync::mpsc::UnboundedSender<String>;

/// The pluggable algorithm a worker runs for each job.
#[async_trait]
pub trait Algorithm: Send + Sync + 'static {
    /// Runs one request to completion.
    async fn run(&self, request: GenerationRequest) -> Result<Generation, EngineError>;

    /// Runs one request, sending text deltas to `sink` as they are produced. The deltas
    /// concatenate to the returned text. The default sends the whole text at the end.
    async fn run_streaming(
        &self,
        request: GenerationRequest,
        sink: TokenSink,
    ) -> Result<Generation, EngineError> {
        let generation = self.run(request).await?;
        let _ = sink.send(generation.text.clone());
        Ok(generation)
    }

    /// Like [`Self::run_streaming`], in a fairness `lane` (the API key): an engine that runs
    /// several jobs at once takes waiting jobs by weighted round-robin across lanes, so one
    /// key's backlog cannot starve another key's job. The default ignores the lane.
    async fn run_in_lane(
        &self,
        request: GenerationRequest,
        sink: TokenSink,
        lane: Lane,
    ) -> Result<Generation, EngineError> {
        let _ = lane;
        self.run_streaming(request, sink).await
    }

    /// How many jobs this engine runs at once (its worker takes that many, and a few more to
    /// choose from fairly).
    fn parallel(&self) -> usize {
        1
    }

    /// Embeds each input. The default refuses: not every algorithm has vectors to give.
    async fn embed(&self, request: EmbeddingRequest) -> Result<Embeddings, EngineError> {
        let _ = request;
        Err(EngineError::Embedding(
            "this engine does not compute embeddings".into(),
        ))
    }

    /// Current state, cheap to call.
    fn status(&self) -> EngineStatus;
}
