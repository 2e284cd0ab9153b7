//! The one request shape every route family converts its wire body into (parse, don't
//! validate: past this point the text and the numbers are trusted).
//!
//! Each wire type (seed 000/001/002/003/004, OpenAI chat/completions/embeddings) has a
//! `TryFrom` into [`GenerationInput`] or [`EmbeddingInput`] next to its route; the rules that
//! all of them share — what a prompt may hold, which chat roles exist, how sampling numbers are
//! bounded — live here, once.

use serde::Deserialize;
use serde_json::Value;

use crate::{
    engine::{
        grammar::{self, FormatError, OutputConstraint, ResponseFormat},
        tools::{Tool, ToolCall, ToolChoice},
        ChatMessage, Prompt, SamplerControls, SamplingParams,
    },
    errors::{ApiError, ErrorCode},
    models::conversations::Owner,
    settings::ApiSettings,
};

/// Most stop strings a request may give, and their longest length.
pub const MAX_STOP_WORDS: usize = 8;
pub const MAX_STOP_LEN: usize = 128;
/// Most inputs one embedding request may carry: OpenAI's own limit (LangChain sends 1,000 texts
/// a request by default). What one call may hold in tokens is bounded separately
/// (`engine.embeddings.max_tokens_per_call`).
pub const MAX_EMBEDDING_INPUTS: usize = 2048;

/// Chat roles, one closed set for every route. `developer` (OpenAI's newer name for
/// instructions from the application) is rendered as `system`.
pub const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

/// A generation request, whatever route it came in on.
#[derive(Debug, Clone)]
pub struct GenerationInput {
    pub prompt: Prompt,
    pub sampling: SamplingInput,
    pub model: ModelChoice,
    /// Seed 002's server-side memory: the stored turns of this conversation are put before
    /// the prompt, and the exchange is stored once the job is done.
    pub memory: Option<Memory>,
    /// Tools offered to the model (OpenAI's `tools` with a `tool_choice` other than `none`);
    /// admission renders them for the resolved model and builds the grammar of its calls.
    pub tools: Option<ToolsInput>,
}

/// Tools as a route received them, their shapes checked.
#[derive(Debug, Clone)]
pub struct ToolsInput {
    pub tools: Vec<Tool>,
    pub choice: ToolChoice,
    pub parallel: bool,
}

impl GenerationInput {
    /// A single user turn.
    ///
    /// # Errors
    /// 422 when `text` is blank or holds NUL characters.
    pub fn user_turn(
        field: &str,
        text: String,
        sampling: SamplingInput,
        model: ModelChoice,
    ) -> Result<Self, ApiError> {
        Ok(Self {
            prompt: user_prompt(field, text)?,
            sampling,
            model,
            memory: None,
            tools: None,
        })
    }
}

/// `text` (the body's field `field`) as a single user turn.
///
/// # Errors
/// 422 when `text` is blank or holds NUL characters.
pub fn user_prompt(field: &str, text: String) -> Result<Prompt, ApiError> {
    prompt_text(field, &text)?;
    Ok(Prompt::chat(vec![ChatMessage::new("user", text)]))
}

/// Which stored conversation a request continues.
#[derive(Debug, Clone, Copy)]
pub struct Memory {
    pub owner: Owner,
    pub number: i64,
}

/// Texts to embed, whatever route they came in on.
#[derive(Debug, Clone)]
pub struct EmbeddingInput {
    pub inputs: Vec<String>,
    pub model: Option<String>,
}

impl EmbeddingInput {
    /// # Errors
    /// 422 when there are no inputs, too many, or one is blank or holds NUL characters.
    pub fn new(inputs: Vec<(String, String)>, model: Option<String>) -> Result<Self, ApiError> {
        if inputs.is_empty() {
            return Err(ApiError::new(
                ErrorCode::EmptyInput,
                "`input` must contain at least one string",
            ));
        }
        if inputs.len() > MAX_EMBEDDING_INPUTS {
            return Err(ApiError::new(
                ErrorCode::TooManyInputs,
                format!("`input` takes at most {MAX_EMBEDDING_INPUTS} strings"),
            ));
        }
        for (field, text) in &inputs {
            if text.trim().is_empty() {
                return Err(ApiError::new(
                    ErrorCode::EmptyInput,
                    format!("`{field}` must not be empty"),
                ));
            }
            if text.contains('\0') {
                return Err(ApiError::new(
                    ErrorCode::InvalidInput,
                    format!("`{field}` must not contain NUL characters"),
                ));
            }
        }
        Ok(Self {
            inputs: inputs.into_iter().map(|(_, t)| t).collect(),
            model,
        })
    }
}

/// What is admitted: a generation or an embedding.
#[derive(Debug, Clone)]
pub enum Input {
    Generate(Box<GenerationInput>),
    Embed(EmbeddingInput),
}

impl From<GenerationInput> for Input {
    fn from(g: GenerationInput) -> Self {
        Self::Generate(Box::new(g))
    }
}

impl From<EmbeddingInput> for Input {
    fn from(e: EmbeddingInput) -> Self {
        Self::Embed(e)
    }
}

/// What a request asked for: a model id (`base` or `base:adapter`), a LoRA head named apart
/// from it, and a scale for that head.
#[derive(Debug, Clone, Default)]
pub struct ModelChoice {
    pub model: Option<String>,
    pub adapter: Option<String>,
    pub scale: Option<f64>,
    /// Seed 001 clients name their own deployment's model (its example says "gpt-model"): an
    /// unknown base name is served by the configured model instead of refused.
    pub lenient_base: bool,
}

impl ModelChoice {
    /// Just a model name, as most routes give it.
    #[must_use]
    pub fn named(model: Option<String>) -> Self {
        Self {
            model,
            ..Self::default()
        }
    }
}

/// The model and LoRA head fields a generation request may carry (`model` may be
/// `base:adapter`; `lora`, alias `head`, names the adapter on its own).
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
pub struct HeadInput {
    pub model: Option<String>,
    #[serde(alias = "head")]
    pub lora: Option<String>,
    pub scale: Option<f64>,
}

impl From<HeadInput> for ModelChoice {
    fn from(h: HeadInput) -> Self {
        Self {
            model: h.model,
            adapter: h.lora,
            scale: h.scale,
            lenient_base: false,
        }
    }
}

/// `stop` as clients send it: one string or a list.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum StopWords {
    One(String),
    Many(Vec<String>),
}

impl StopWords {
    #[must_use]
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

/// The sampler controls beyond `temperature`, `top_p`, `seed` and `stop`, under the names
/// every route takes them by (OpenAI's penalties and `logit_bias`, llama.cpp server's and
/// vLLM's `top_k`, `min_p`, `typical_p`, `repeat_penalty`, `repeat_last_n`): one list,
/// flattened into each wire body that has a place for them.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
pub struct SamplerFields {
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub typical_p: Option<f64>,
    pub repeat_penalty: Option<f64>,
    pub repeat_last_n: Option<i64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    /// OpenAI's shape: token id (as a string) → bias from -100 to 100; also llama-server's
    /// list of `[token id, bias]` pairs (`false` for a ban, read as -100), which its clients
    /// send.
    #[serde(default, deserialize_with = "bias_map")]
    #[schema(value_type = Option<Object>)]
    pub logit_bias: Option<std::collections::BTreeMap<String, f64>>,
}

/// `logit_bias` as an object, or as llama-server's `[[id, bias], …]` (`[]` is no bias).
fn bias_map<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<std::collections::BTreeMap<String, f64>>, D::Error> {
    use serde::de::Error;
    let bias = |v: &Value| match v {
        Value::Bool(false) => Ok(-100.0),
        v => v
            .as_f64()
            .ok_or_else(|| D::Error::custom("logit_bias: a bias must be a number (or false)")),
    };
    match Option::<Value>::deserialize(d)? {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(o)) => o
            .iter()
            .map(|(k, v)| Ok((k.clone(), bias(v)?)))
            .collect::<Result<_, _>>()
            .map(Some),
        Some(Value::Array(pairs)) => pairs
            .iter()
            .map(|pair| match pair.as_array().map(Vec::as_slice) {
                Some([Value::Number(id), b]) => Ok((id.to_string(), bias(b)?)),
                Some([Value::String(id), b]) => Ok((id.clone(), bias(b)?)),
                _ => Err(D::Error::custom(
                    "logit_bias: each entry of the list must be [token id, bias]",
                )),
            })
            .collect::<Result<_, _>>()
            .map(Some),
        Some(_) => Err(D::Error::custom(
            "logit_bias must be an object of token id to bias, or a list of [token id, bias]",
        )),
    }
}

impl SamplerFields {
    /// Fills fields left out from `fallback`.
    #[must_use]
    fn or(self, fallback: Self) -> Self {
        Self {
            top_k: self.top_k.or(fallback.top_k),
            min_p: self.min_p.or(fallback.min_p),
            typical_p: self.typical_p.or(fallback.typical_p),
            repeat_penalty: self.repeat_penalty.or(fallback.repeat_penalty),
            repeat_last_n: self.repeat_last_n.or(fallback.repeat_last_n),
            presence_penalty: self.presence_penalty.or(fallback.presence_penalty),
            frequency_penalty: self.frequency_penalty.or(fallback.frequency_penalty),
            logit_bias: self.logit_bias.or(fallback.logit_bias),
        }
    }
}

/// Optional sampling fields shared by every generation route, as sent.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
pub struct SamplingInput {
    pub max_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub seed: Option<i64>,
    pub stop: Option<StopWords>,
    #[serde(flatten)]
    pub controls: SamplerFields,
    /// A `max_tokens` above the server's limit is cut to it instead of refused (seed 001's
    /// documented default of 8096 is larger than most contexts).
    #[serde(skip)]
    pub clamp_max_tokens: bool,
    /// OpenAI's `response_format` (`json_object`/`json_schema`; `text` is `None`): turned into
    /// an output grammar here, so a schema the grammar cannot enforce is refused before
    /// anything is charged. Only the OpenAI routes set it.
    #[serde(skip)]
    pub response_format: Option<ResponseFormat>,
    /// Log-probabilities per generated token with this many alternatives (OpenAI's `logprobs`
    /// and `top_logprobs`, bounded by the route). Only the OpenAI routes set it.
    #[serde(skip)]
    pub logprobs: Option<u8>,
    /// Choices to generate (OpenAI's `n`), 1 to `settings.api.max_n`. Only the OpenAI routes
    /// set it.
    #[serde(skip)]
    pub n: Option<i64>,
}

/// `value` of `field` within `range`, as f32, or 422 `code` naming both.
fn bounded(
    field: &str,
    value: Option<f64>,
    range: std::ops::RangeInclusive<f64>,
    code: ErrorCode,
) -> Result<Option<f32>, ApiError> {
    match value {
        None => Ok(None),
        Some(v) if range.contains(&v) => Ok(Some(v as f32)),
        Some(v) => Err(ApiError::new(
            code,
            format!(
                "{field} must be between {} and {}, got {v}",
                range.start(),
                range.end()
            ),
        )),
    }
}

impl SamplingInput {
    /// Fills fields the request left out from `fallback` (a loaded model's own defaults).
    #[must_use]
    pub fn or(self, fallback: Self) -> Self {
        Self {
            max_tokens: self.max_tokens.or(fallback.max_tokens),
            temperature: self.temperature.or(fallback.temperature),
            top_p: self.top_p.or(fallback.top_p),
            seed: self.seed.or(fallback.seed),
            stop: self.stop.or(fallback.stop),
            controls: self.controls.or(fallback.controls),
            clamp_max_tokens: self.clamp_max_tokens,
            response_format: self.response_format.or(fallback.response_format),
            logprobs: self.logprobs.or(fallback.logprobs),
            n: self.n.or(fallback.n),
        }
    }

    /// Applies defaults and bounds.
    ///
    /// # Errors
    /// 422 naming the field and its allowed range.
    pub fn into_params(self, api: &ApiSettings) -> Result<SamplingParams, ApiError> {
        let limit = i64::from(api.max_tokens_limit);
        let max_tokens = match self.max_tokens {
            None => api.default_max_tokens,
            Some(n) if n > limit && self.clamp_max_tokens => api.max_tokens_limit,
            Some(n) if n >= 1 && n <= i64::from(api.max_tokens_limit) => {
                u32::try_from(n).unwrap_or(api.max_tokens_limit)
            }
            Some(n) => {
                return Err(ApiError::new(
                    ErrorCode::InvalidMaxTokens,
                    format!(
                        "max_tokens must be between 1 and {}, got {n}",
                        api.max_tokens_limit
                    ),
                ))
            }
        };
        let temperature = match self.temperature {
            None => api.default_temperature,
            Some(t) if (0.0..=2.0).contains(&t) => t as f32,
            Some(t) => {
                return Err(ApiError::new(
                    ErrorCode::InvalidTemperature,
                    format!("temperature must be between 0 and 2, got {t}"),
                ))
            }
        };
        let top_p = match self.top_p {
            None => 1.0,
            Some(p) if p > 0.0 && p <= 1.0 => p as f32,
            Some(p) => {
                return Err(ApiError::new(
                    ErrorCode::InvalidTopP,
                    format!("top_p must be in (0, 1], got {p}"),
                ))
            }
        };
        let seed = match self.seed {
            // -1 is "random" to llama-server and the front ends written for it.
            None | Some(-1) => None,
            Some(s) => Some(u32::try_from(s).map_err(|_| {
                ApiError::new(
                    ErrorCode::InvalidSeed,
                    format!("seed must be between 0 and {}, got {s}", u32::MAX),
                )
            })?),
        };
        let stop = self.stop.map(StopWords::into_vec).unwrap_or_default();
        if stop.len() > MAX_STOP_WORDS || stop.iter().any(|s| s.len() > MAX_STOP_LEN) {
            return Err(ApiError::new(
                ErrorCode::InvalidStop,
                format!(
                    "stop accepts at most {MAX_STOP_WORDS} strings of at most {MAX_STOP_LEN} bytes"
                ),
            ));
        }
        let controls = SamplerControls {
            top_k: match self.controls.top_k {
                None => None,
                Some(k) if (0..=100_000).contains(&k) => i32::try_from(k).ok(),
                Some(k) => {
                    return Err(ApiError::new(
                        ErrorCode::InvalidSampling,
                        format!("top_k must be between 0 and 100000, got {k}"),
                    ))
                }
            },
            min_p: bounded("min_p", self.controls.min_p, 0.0..=1.0, ErrorCode::InvalidSampling)?,
            typical_p: bounded("typical_p", self.controls.typical_p, 0.0..=1.0, ErrorCode::InvalidSampling)?,
            repeat_penalty: bounded(
                "repeat_penalty",
                self.controls.repeat_penalty,
                0.0..=10.0,
                ErrorCode::InvalidSampling,
            )?
            .filter(|p| *p > 0.0),
            repeat_last_n: match self.controls.repeat_last_n {
                None => None,
                Some(n) if (0..=65_536).contains(&n) => i32::try_from(n).ok(),
                Some(n) => {
                    return Err(ApiError::new(
                        ErrorCode::InvalidSampling,
                        format!("repeat_last_n must be between 0 and 65536, got {n}"),
                    ))
                }
            },
            presence_penalty: bounded(
                "presence_penalty",
                self.controls.presence_penalty,
                -2.0..=2.0,
                ErrorCode::InvalidSampling,
            )?,
            frequency_penalty: bounded(
                "frequency_penalty",
                self.controls.frequency_penalty,
                -2.0..=2.0,
                ErrorCode::InvalidSampling,
            )?,
            logit_bias: self
                .controls
                .logit_bias
                .unwrap_or_default()
                .into_iter()
                .map(|(token, bias)| {
                    let id = token.trim().parse::<i32>().ok().filter(|t| *t >= 0);
                    match (id, (-100.0..=100.0).contains(&bias)) {
                        (Some(id), true) => Ok((id, bias as f32)),
                        _ => Err(ApiError::new(
                            ErrorCode::InvalidSampling,
                            format!(
                                "logit_bias maps token ids to biases from -100 to 100; got {token:?}: {bias}"
                            ),
                        )),
                    }
                })
                .collect::<Result<_, _>>()?,
            output: self
                .response_format
                .map(output_constraint)
                .transpose()?
                .map(Box::new),
            logprobs: self.logprobs.map(|n| n.min(crate::engine::MAX_TOP_LOGPROBS)),
            n: match self.n {
                None | Some(1) => None,
                Some(n) if (1..=i64::from(api.max_n)).contains(&n) => u8::try_from(n).ok(),
                Some(n) => {
                    return Err(ApiError::new(
                        ErrorCode::InvalidN,
                        format!("n must be between 1 and {}, got {n}", api.max_n),
                    ))
                }
            },
        };
        if controls.logit_bias.len() > 1024 {
            return Err(ApiError::new(
                ErrorCode::InvalidSampling,
                "logit_bias takes at most 1024 tokens",
            ));
        }
        Ok(SamplingParams {
            max_tokens,
            temperature,
            top_p,
            seed,
            stop: stop.into_iter().filter(|s| !s.is_empty()).collect(),
            controls,
        })
    }
}

/// The grammar for a `response_format`.
///
/// # Errors
/// 400 `unsupported_schema` naming every keyword the grammar cannot enforce, 400
/// `invalid_response_format` for a schema that is not usable.
fn output_constraint(format: ResponseFormat) -> Result<OutputConstraint, ApiError> {
    grammar::constrain(format).map_err(|e| match e {
        FormatError::Unsupported(_) => ApiError::new(
            ErrorCode::UnsupportedSchema,
            format!("response_format.json_schema.schema: {e}; remove or rewrite those keywords"),
        ),
        FormatError::Invalid(why) => ApiError::new(
            ErrorCode::InvalidResponseFormat,
            format!("response_format.json_schema.schema: {why}"),
        ),
    })
}

/// A prompt text field: present, a string, not blank, no NUL bytes.
///
/// # Errors
/// 422 naming the field.
pub fn prompt_text(field: &str, text: &str) -> Result<(), ApiError> {
    if text.trim().is_empty() {
        return Err(ApiError::new(
            ErrorCode::EmptyPrompt,
            format!("`{field}` must not be empty"),
        ));
    }
    if text.contains('\0') {
        return Err(ApiError::new(
            ErrorCode::InvalidPrompt,
            format!("`{field}` must not contain NUL characters"),
        ));
    }
    Ok(())
}

/// Message content as clients send it: a string, or OpenAI's list of content parts (text
/// parts only).
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

/// One chat message as any route receives it.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
pub struct WireMessage {
    #[schema(schema_with = crate::openapi::schemas::chat_role)]
    pub role: String,
    pub content: Option<Content>,
    /// Calls an assistant turn made (sent back with the tools' results).
    #[serde(default)]
    pub tool_calls: Option<Vec<WireToolCall>>,
    /// A `tool` turn: the call it answers.
    #[serde(default)]
    pub tool_call_id: Option<String>,
    /// The tool's (or participant's) name.
    #[serde(default)]
    pub name: Option<String>,
}

/// An earlier call in OpenAI's shape.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
pub struct WireToolCall {
    pub id: Option<String>,
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub function: WireFunctionCall,
}

#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
pub struct WireFunctionCall {
    pub name: String,
    /// The arguments as a JSON text (an object is accepted too).
    #[schema(value_type = String)]
    pub arguments: Option<serde_json::Value>,
}

/// The one rule set for chat messages on every route: at least one message, roles from
/// [`ROLES`], text content only, no NUL characters.
///
/// # Errors
/// 422 naming the message at fault.
pub fn chat_messages(wire: Vec<WireMessage>) -> Result<Vec<ChatMessage>, ApiError> {
    if wire.is_empty() {
        return Err(ApiError::new(
            ErrorCode::InvalidMessages,
            "`messages` must contain at least one message",
        ));
    }
    wire.into_iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m.role.trim();
            if !ROLES.contains(&role) {
                return Err(ApiError::new(
                    ErrorCode::InvalidRole,
                    format!(
                        "messages[{i}].role must be one of {ROLES:?}, got {:?}",
                        m.role
                    ),
                ));
            }
            let role = if role == "developer" { "system" } else { role };
            let content = match m.content {
                None => String::new(),
                Some(Content::Text(t)) => t,
                Some(Content::Parts(parts)) => {
                    if let Some(p) = parts.iter().find(|p| p.kind != "text") {
                        return Err(ApiError::new(
                            ErrorCode::UnsupportedContent,
                            format!(
                                "messages[{i}]: content parts of type {:?} are not supported",
                                p.kind
                            ),
                        ));
                    }
                    parts
                        .into_iter()
                        .filter_map(|p| p.text)
                        .collect::<Vec<_>>()
                        .join("")
                }
            };
            if content.contains('\0') {
                return Err(ApiError::new(
                    ErrorCode::InvalidPrompt,
                    format!("messages[{i}].content must not contain NUL characters"),
                ));
            }
            let tool_calls = match m.tool_calls {
                Some(calls) if !calls.is_empty() && role != "assistant" => {
                    return Err(ApiError::new(
                        ErrorCode::InvalidMessages,
                        format!("messages[{i}]: only assistant messages carry tool_calls"),
                    ))
                }
                Some(calls) => calls
                    .into_iter()
                    .enumerate()
                    .map(|(j, c)| history_call(i, j, c))
                    .collect::<Result<Vec<_>, _>>()?,
                None => Vec::new(),
            };
            Ok(ChatMessage {
                role: role.to_string(),
                content,
                tool_calls,
                tool_call_id: m.tool_call_id.filter(|_| role == "tool"),
                name: m.name.filter(|n| !n.is_empty() && role == "tool"),
            })
        })
        .collect()
}

/// One call of an assistant turn in the history, its arguments as JSON text.
fn history_call(i: usize, j: usize, c: WireToolCall) -> Result<ToolCall, ApiError> {
    let at = format!("messages[{i}].tool_calls[{j}]");
    if c.kind.as_deref().is_some_and(|k| k != "function") {
        return Err(ApiError::new(
            ErrorCode::InvalidMessages,
            format!("{at}.type must be \"function\""),
        ));
    }
    let arguments = match c.function.arguments {
        None | Some(serde_json::Value::Null) => "{}".to_string(),
        Some(serde_json::Value::String(s)) => s,
        Some(v @ serde_json::Value::Object(_)) => v.to_string(),
        Some(_) => {
            return Err(ApiError::new(
                ErrorCode::InvalidMessages,
                format!("{at}.function.arguments must be a JSON text"),
            ))
        }
    };
    if c.function.name.contains('\0') || arguments.contains('\0') {
        return Err(ApiError::new(
            ErrorCode::InvalidPrompt,
            format!("{at} must not contain NUL characters"),
        ));
    }
    Ok(ToolCall {
        id: c.id.unwrap_or_default(),
        name: c.function.name,
        arguments,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_missing_fields_and_bounds_reject_out_of_range() {
        let api = ApiSettings::default();
        let p = SamplingInput::default()
            .into_params(&api)
            .expect("defaults");
        assert_eq!(p.max_tokens, api.default_max_tokens);
        assert!(p.stop.is_empty());
        for bad in [
            SamplingInput {
                max_tokens: Some(0),
                ..Default::default()
            },
            SamplingInput {
                max_tokens: Some(i64::from(api.max_tokens_limit) + 1),
                ..Default::default()
            },
            SamplingInput {
                temperature: Some(2.5),
                ..Default::default()
            },
            SamplingInput {
                temperature: Some(-0.1),
                ..Default::default()
            },
            SamplingInput {
                top_p: Some(0.0),
                ..Default::default()
            },
            SamplingInput {
                seed: Some(-2),
                ..Default::default()
            },
        ] {
            let err = bad.into_params(&api).expect_err("out of range");
            assert_eq!(err.status().as_u16(), 422, "{err}");
        }
    }

    fn message(role: &str, content: &str) -> WireMessage {
        WireMessage {
            role: role.into(),
            content: Some(Content::Text(content.into())),
            tool_calls: None,
            tool_call_id: None,
            name: None,
        }
    }

    #[test]
    fn one_role_set_for_every_route_and_developer_is_a_system_turn() {
        let ok = chat_messages(vec![
            message("developer", "be brief"),
            message("user", "hi"),
        ])
        .expect("valid roles");
        assert_eq!(ok[0].role, "system");
        for bad in ["", "narrator", "System", "<|im_start|>system"] {
            let err = chat_messages(vec![message(bad, "x")]).expect_err("closed set");
            assert_eq!(err.code.as_str(), "invalid_role", "{bad:?}");
        }
        assert_eq!(
            chat_messages(vec![])
                .expect_err("no messages")
                .code
                .as_str(),
            "invalid_messages"
        );
    }
}
