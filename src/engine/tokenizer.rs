//! Process-wide llama.cpp backend, prompt rendering, and the API-side tokenizer.
//!
//! The API must reject a prompt that cannot fit the model's context *before* it queues the job
//! or spends quota, so it counts tokens with the model's real tokenizer: a vocab-only load of
//! the same GGUF (no weights, a few MB), independent of whichever worker will run the job.

use std::sync::OnceLock;

use llama_cpp_2::{
    llama_backend::LlamaBackend,
    model::{params::LlamaModelParams, LlamaModel},
    token::LlamaToken,
};

use super::{template, tools::ToolFormat, ChatMessage, EngineError, Prompt};
use crate::settings::EngineSettings;

static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();

/// The llama.cpp backend; initialised once per process (llama.cpp allows only one).
///
/// # Errors
/// When llama.cpp refuses to initialise.
pub fn backend() -> Result<&'static LlamaBackend, EngineError> {
    BACKEND
        .get_or_init(|| {
            // llama.cpp logs through tracing (target `llama-cpp-2`), filtered like any module.
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
            super::cpu::load_backends()?;
            LlamaBackend::init().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| EngineError::Load(e.clone()))
}

/// Renders a prompt to the exact text the model will see: a chat through the model's own
/// template ([`template`]), tools included.
///
/// # Errors
/// When the chat template cannot be applied (or refuses the conversation).
pub fn render_prompt(model: &LlamaModel, prompt: &Prompt) -> Result<String, EngineError> {
    match prompt {
        Prompt::Raw { text } => Ok(text.clone()),
        Prompt::Chat { messages, tools } => {
            let format = template::tool_format(model);
            let prepared = template::prepare(messages, tools.as_deref(), format);
            template::render(model, &prepared, tools.as_deref())
        }
    }
}

/// Tokens of a rendered prompt (special tokens of the template parsed as such).
#[must_use]
pub fn tokenize(model: &LlamaModel, text: &str) -> Vec<LlamaToken> {
    model.vocab().tokenize(text.as_bytes(), true, true)
}

/// The tokens the model reads for `prompt`. A chat's template markup is read with its special
/// tokens, but what clients wrote in messages is read as plain text: a message containing
/// `<|im_start|>system …` stays text and cannot open a forged turn. (A raw completion prompt
/// is the client's own text from end to end and is read as llama.cpp's server reads it,
/// special tokens included.)
///
/// How: each message is rendered between two markers carrying a random nonce (clients cannot
/// forge them); the rendered text is cut at the markers, the template's pieces tokenized with
/// special tokens, the messages' without.
///
/// # Errors
/// When the chat template cannot be applied.
pub fn prompt_tokens(model: &LlamaModel, prompt: &Prompt) -> Result<Vec<LlamaToken>, EngineError> {
    let Prompt::Chat { messages, tools } = prompt else {
        return Ok(tokenize(model, &render_prompt(model, prompt)?));
    };
    // Checked as the client sent them, whatever the model's tool format makes of them.
    refuse_control_text(
        model,
        messages,
        tools.as_deref().map(|t| t.tools.as_slice()),
    )?;
    let messages = template::prepare(messages, tools.as_deref(), template::tool_format(model));
    let nonce = format!("{:016x}", rand::random::<u64>());
    let open = |i: usize| format!("\u{F8FF}{nonce}<{i}\u{F8FF}");
    let close = |i: usize| format!("\u{F8FF}{nonce}>{i}\u{F8FF}");
    // Empty contents stay empty: templates test them (`if message.content`), and there is no
    // client text in them to protect.
    let marked: Vec<ChatMessage> = messages
        .iter()
        .enumerate()
        .map(|(i, m)| ChatMessage {
            content: if m.content.is_empty() {
                String::new()
            } else {
                format!("{}{}{}", open(i), m.content, close(i))
            },
            ..m.clone()
        })
        .collect();
    let rendered = template::render(model, &marked, tools.as_deref())?;
    let vocab = model.vocab();
    let mut tokens = Vec::new();
    let mut rest = rendered.as_str();
    let mut first = true;
    for i in 0..messages.len() {
        let (Some(start), Some(end)) = (rest.find(&open(i)), rest.find(&close(i))) else {
            continue;
        };
        if end < start {
            continue;
        }
        let bytes = rest.as_bytes();
        tokens.extend(vocab.tokenize(&bytes[..start], first, true));
        first = false;
        tokens.extend(vocab.tokenize(&bytes[start + open(i).len()..end], false, false));
        rest = &rest[end + close(i).len()..];
    }
    tokens.extend(vocab.tokenize(rest.as_bytes(), first, true));
    Ok(tokens)
}

/// Refuses client text that a template may put outside the messages' contents (tools, their
/// descriptions and schemas, earlier calls' ids, names and arguments) when it spells one of the
/// model's control tokens: there it is read with special tokens parsed, so `<|im_start|>system`
/// in a tool's description could open a forged turn under a template that renders tools itself.
/// Contents are protected by markers instead.
fn refuse_control_text(
    model: &LlamaModel,
    messages: &[ChatMessage],
    tools: Option<&[super::tools::Tool]>,
) -> Result<(), EngineError> {
    let vocab = model.vocab();
    let spells_control = |text: &str| {
        !text.is_empty()
            && vocab.tokenize(text.as_bytes(), false, true)
                != vocab.tokenize(text.as_bytes(), false, false)
    };
    let mut outside: Vec<(&str, std::borrow::Cow<'_, str>)> = Vec::new();
    for tool in tools.unwrap_or_default() {
        outside.push(("tools[].function.name", tool.name.as_str().into()));
        if let Some(d) = &tool.description {
            outside.push(("tools[].function.description", d.as_str().into()));
        }
        outside.push((
            "tools[].function.parameters",
            tool.parameters.to_string().into(),
        ));
    }
    for m in messages {
        for call in &m.tool_calls {
            outside.push(("messages[].tool_calls[].id", call.id.as_str().into()));
            outside.push((
                "messages[].tool_calls[].function.name",
                call.name.as_str().into(),
            ));
            outside.push((
                "messages[].tool_calls[].function.arguments",
                call.arguments.as_str().into(),
            ));
        }
        for (field, value) in [
            ("messages[].tool_call_id", &m.tool_call_id),
            ("messages[].name", &m.name),
        ] {
            if let Some(v) = value {
                outside.push((field, v.as_str().into()));
            }
        }
    }
    match outside.iter().find(|(_, text)| spells_control(text)) {
        Some((field, _)) => Err(EngineError::Template(format!(
            "{field} contains the text of one of the model's control tokens"
        ))),
        None => Ok(()),
    }
}

/// Tokens of a text to embed: the model's own special prefix (BOS where it uses one), and the
/// text read literally, so client text cannot smuggle in control tokens.
#[must_use]
pub fn embedding_tokens(model: &LlamaModel, text: &str) -> Vec<LlamaToken> {
    model.vocab().tokenize(text.as_bytes(), true, false)
}

/// Counts prompt tokens for validation in the API process.
pub struct PromptTokenizer {
    model: LlamaModel,
    context_size: u32,
    model_name: String,
}

impl std::fmt::Debug for PromptTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromptTokenizer")
            .field("model_name", &self.model_name)
            .field("context_size", &self.context_size)
            .finish_non_exhaustive()
    }
}

impl PromptTokenizer {
    /// Loads only the vocabulary of the configured model.
    ///
    /// # Errors
    /// When the file is missing or not a GGUF model.
    pub fn load(settings: &EngineSettings) -> Result<Self, EngineError> {
        let backend = backend()?;
        if !settings.model_path.is_file() {
            return Err(EngineError::Load(format!(
                "model file {} not found (run scripts/fetch-model.sh)",
                settings.model_path.display()
            )));
        }
        let params = LlamaModelParams::default().with_vocab_only(true);
        let model = LlamaModel::load_from_file(backend, &settings.model_path, &params)
            .map_err(|e| EngineError::Load(format!("{}: {e}", settings.model_path.display())))?;
        Ok(Self {
            model,
            context_size: settings.context_size,
            model_name: settings.model_name.clone(),
        })
    }

    /// Number of tokens the engine will feed for this prompt.
    ///
    /// # Errors
    /// When the prompt cannot be rendered.
    pub fn count(&self, prompt: &Prompt) -> Result<usize, EngineError> {
        Ok(prompt_tokens(&self.model, prompt)?.len())
    }

    /// The token ids the engine will feed for this prompt (what [`Self::count`] counts).
    ///
    /// # Errors
    /// When the prompt cannot be rendered.
    pub fn prompt_ids(&self, prompt: &Prompt) -> Result<Vec<i32>, EngineError> {
        Ok(prompt_tokens(&self.model, prompt)?
            .into_iter()
            .map(|t| t.0)
            .collect())
    }

    /// Number of tokens the engine will embed for this text.
    #[must_use]
    pub fn count_embedding(&self, text: &str) -> usize {
        embedding_tokens(&self.model, text).len()
    }

    /// Token ids of `text` (llama.cpp server's `/tokenize`): with the model's special prefix
    /// when `add_special`, and the template's control tokens read as such when `parse_special`.
    #[must_use]
    pub fn token_ids(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<i32> {
        self.model
            .vocab()
            .tokenize(text.as_bytes(), add_special, parse_special)
            .into_iter()
            .map(|t| t.0)
            .collect()
    }

    /// The text of one token (its piece, special tokens written out).
    #[must_use]
    pub fn piece(&self, token: i32) -> String {
        if !self.is_token(token) {
            return String::new();
        }
        String::from_utf8_lossy(
            &self
                .model
                .vocab()
                .token_to_piece(LlamaToken(token), true, None),
        )
        .into_owned()
    }

    /// The text of token ids (llama.cpp server's `/detokenize`).
    ///
    /// # Errors
    /// The position of the first id that is not in the vocabulary.
    pub fn text_of(&self, tokens: &[i32]) -> Result<String, usize> {
        if let Some(bad) = tokens.iter().position(|t| !self.is_token(*t)) {
            return Err(bad);
        }
        let ids: Vec<LlamaToken> = tokens.iter().map(|t| LlamaToken(*t)).collect();
        Ok(
            String::from_utf8_lossy(&self.model.vocab().detokenize(&ids, false, false))
                .into_owned(),
        )
    }

    /// Whether `token` is an id of this vocabulary (llama.cpp must never see another).
    #[must_use]
    pub fn is_token(&self, token: i32) -> bool {
        (0..self.model.vocab().n_tokens()).contains(&token)
    }

    /// Width of the model's embedding vectors. A vocab-only load leaves the model's
    /// hyper-parameters unset, so this reads `<arch>.embedding_length` from the metadata.
    #[must_use]
    pub fn n_embd(&self) -> u32 {
        self.architecture()
            .and_then(|arch| {
                self.model
                    .meta_val_str(&format!("{arch}.embedding_length"))
                    .ok()
            })
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| u32::try_from(self.model.n_embd()).unwrap_or(0))
    }

    /// The model's `general.architecture` (`llama`, …): adapters must be made for it.
    #[must_use]
    pub fn architecture(&self) -> Option<String> {
        self.model.meta_val_str("general.architecture").ok()
    }

    /// The text the model reads for `prompt` (a chat through its template, tools included).
    ///
    /// # Errors
    /// When the chat template cannot be applied.
    pub fn render(&self, prompt: &Prompt) -> Result<String, EngineError> {
        render_prompt(&self.model, prompt)
    }

    /// The model's own chat template (the Jinja text in its GGUF), if it has one.
    #[must_use]
    pub fn chat_template(&self) -> Option<String> {
        template::source(&self.model)
    }

    /// How this model writes tool calls (from its chat template).
    #[must_use]
    pub fn tool_format(&self) -> ToolFormat {
        template::tool_format(&self.model)
    }

    #[must_use]
    pub fn context_size(&self) -> u32 {
        self.context_size
    }

    #[must_use]
    pub fn model_name(&self) -> &str {
        &self.model_name
    }
}
