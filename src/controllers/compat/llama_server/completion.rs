//! llama.cpp server's own completion route, `POST /completion` (also `/completions`), for the
//! tools and scripts written against llama-server rather than OpenAI's API: `prompt`,
//! `n_predict`, llama.cpp's sampler fields under their names, `json_schema`, `stream`
//! (`data:` chunks `{"content", "stop": false}`, then one with `"stop": true` and the totals;
//! no `[DONE]`, as llama-server does). A thin adapter over the one admission path: charged,
//! queued and batched like every generation.
//!
//! What llama-server offers and this server does not (`grammar`, `n_probs`, another sampler
//! order, `ignore_eos`, mirostat, DRY, XTC, LoRA by id, …) is refused by name unless sent at
//! its neutral value (a sampler's own settings are inert while it is off, and `samplers` in
//! llama-server's default order is this server's chain); `cache_prompt`, `id_slot` and
//! `n_keep` are accepted (prefix reuse is the server's own setting; there are no slots to
//! pick). `logit_bias` may be llama-server's list of `[token id, bias]` pairs.

use axum::{
    extract::State,
    response::{
        sse::{Event, KeepAlive, Sse},
        IntoResponse, Response,
    },
    Json,
};
use futures::StreamExt;
use loco_rs::app::AppContext;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::{
    admission::{
        input::prompt_text, Admitted, Follow, GenerationInput, ModelChoice, SamplerFields,
        SamplingInput, StopWords, Ticket,
    },
    controllers::respond::{accepted, settled},
    engine::{grammar::ResponseFormat, GenerationRequest, Prompt},
    errors::{ApiError, ApiResult, ErrorCode},
    extractors::{JsonBody, MeteredCaller},
    models::jobs,
    notify::{text_updates, TextUpdate},
    services::Services,
};

/// The endpoint recorded with each job.
const ENDPOINT: &str = "/completion";

/// `POST /completion`, as llama.cpp's server documents it (tools/server/README.md).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub(crate) struct CompletionRequest {
    /// The text to continue (or a list holding one text).
    prompt: Value,
    /// Tokens to generate; -1 (llama-server's default) is as many as the server allows.
    n_predict: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    /// -1 (llama-server's default) is a random seed.
    seed: Option<i64>,
    stop: Option<Vec<String>>,
    #[serde(default)]
    stream: bool,
    /// A JSON Schema the answer must match (decoding is constrained by a grammar).
    #[schema(value_type = Option<Object>)]
    json_schema: Option<Value>,
    /// `top_k`, `min_p`, `typical_p`, `repeat_penalty`, `repeat_last_n`, `presence_penalty`,
    /// `frequency_penalty`, `logit_bias`.
    #[serde(flatten)]
    controls: SamplerFields,
    model: Option<String>,
    /// Every other field: refused by name unless it is advisory here or at its neutral value.
    #[serde(flatten)]
    #[schema(ignore)]
    rest: Map<String, Value>,
}

/// The samplers this server runs, in its chain's order, as llama-server names them.
const CHAIN: [&str; 5] = ["top_k", "typ_p", "top_p", "min_p", "temperature"];

/// Whether a `samplers` list asks for what this server's chain does: every sampler of the
/// chain, in its order (llama-server's default order, which SillyTavern and llama.vim send),
/// `penalties` before them, and otherwise only samplers that are off here (DRY, XTC,
/// top-n-sigma: their gates must be at their neutral values, checked on their own).
fn same_chain(samplers: &[Value]) -> bool {
    let mut names = Vec::with_capacity(samplers.len());
    for s in samplers {
        let Some(name) = s.as_str() else { return false };
        let name = match name {
            "typical_p" => "typ_p",
            "top_n_sigma" => "dry", // off here like DRY; the order of what is off is moot
            other => other,
        };
        names.push(name);
    }
    let ours: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| CHAIN.contains(n))
        .collect();
    let first_of_chain = names.iter().position(|n| CHAIN.contains(n));
    let penalties_first = names
        .iter()
        .position(|n| *n == "penalties")
        .is_none_or(|p| first_of_chain.is_some_and(|f| p < f));
    ours == CHAIN
        && penalties_first
        && names
            .iter()
            .all(|n| CHAIN.contains(n) || matches!(*n, "penalties" | "dry" | "xtc"))
}

/// Refuses, by name, every other field llama-server would honour and this server cannot.
/// A sampler's settings are inert while the sampler is off (`dry_base` with no
/// `dry_multiplier`, `mirostat_tau` with no `mirostat`, …), as in llama-server.
fn check_rest(rest: &Map<String, Value>) -> ApiResult<()> {
    let zero = |v: &Value| v.is_null() || v.as_f64() == Some(0.0);
    let off = |v: &Value| v.is_null() || v == &Value::Bool(false);
    let gate_off = |gate: &str| rest.get(gate).is_none_or(zero);
    let refused: Vec<&str> = rest
        .iter()
        .filter(|(name, v)| {
            let inert = match name.as_str() {
                // Prefix reuse is the server's setting; there are no slots to pick or keep.
                "cache_prompt" | "id_slot" | "n_keep" => true,
                // llama-server reads it and does nothing with it (a to-do in its source).
                "t_max_prompt_ms" => true,
                "grammar" => v.is_null() || v.as_str() == Some(""),
                "n_probs" | "mirostat" | "dynatemp_range" | "xtc_probability"
                | "dry_multiplier" | "t_max_predict_ms" | "n_indent" | "min_keep" => zero(v),
                "dry_base"
                | "dry_allowed_length"
                | "dry_penalty_last_n"
                | "dry_sequence_breakers" => gate_off("dry_multiplier"),
                "mirostat_tau" | "mirostat_eta" => gate_off("mirostat"),
                "xtc_threshold" => gate_off("xtc_probability"),
                "dynatemp_exponent" => gate_off("dynatemp_range"),
                // -1 is llama-server's "off".
                "top_n_sigma" => v.is_null() || v.as_f64().is_some_and(|x| x < 0.0),
                "ignore_eos" | "return_tokens" | "post_sampling_probs" => off(v),
                "samplers" => {
                    v.is_null() || v.as_array().is_some_and(|s| s.is_empty() || same_chain(s))
                }
                "lora" | "response_fields" => {
                    v.is_null() || v.as_array().is_some_and(Vec::is_empty)
                }
                _ => false,
            };
            !inert
        })
        .map(|(k, _)| k.as_str())
        .collect();
    if refused.is_empty() {
        return Ok(());
    }
    Err(ApiError::unsupported_fields(&refused))
}

impl TryFrom<CompletionRequest> for GenerationInput {
    type Error = ApiError;

    fn try_from(body: CompletionRequest) -> Result<Self, ApiError> {
        check_rest(&body.rest)?;
        let prompt = match body.prompt {
            Value::String(text) => text,
            Value::Array(mut parts) if parts.len() == 1 && parts[0].is_string() => {
                match parts.pop() {
                    Some(Value::String(text)) => text,
                    _ => String::new(),
                }
            }
            _ => {
                return Err(ApiError::new(
                    ErrorCode::InvalidPrompt,
                    "`prompt` must be a text (or a list holding one text); token ids are not taken here",
                ))
            }
        };
        prompt_text("prompt", &prompt)?;
        let max_tokens = match body.n_predict {
            None | Some(-1) => Some(i64::MAX),
            Some(n) if n >= 1 => Some(n),
            Some(n) => {
                return Err(ApiError::new(
                    ErrorCode::InvalidMaxTokens,
                    format!("n_predict must be -1 (as many as allowed) or at least 1, got {n}"),
                ))
            }
        };
        Ok(Self {
            prompt: Prompt::Raw { text: prompt },
            sampling: SamplingInput {
                max_tokens,
                temperature: body.temperature,
                top_p: body.top_p,
                seed: body.seed.filter(|s| *s != -1),
                stop: body.stop.map(StopWords::Many),
                controls: body.controls,
                // `n_predict` is cut to what the context and the server's limit allow, as
                // llama-server stops at the context's end.
                clamp_max_tokens: true,
                response_format: body.json_schema.map(|schema| ResponseFormat::JsonSchema {
                    name: "json_schema".into(),
                    schema,
                    strict: true,
                }),
                logprobs: None,
                n: None,
            },
            model: ModelChoice::named(body.model),
            memory: None,
            tools: None,
        })
    }
}

/// The final object of a completion: its text and llama-server's totals.
fn final_json(job: &jobs::Model, content: &str) -> Value {
    let asked = serde_json::from_str::<GenerationRequest>(&job.request).ok();
    let prompt = match asked.as_ref().map(|r| &r.prompt) {
        Some(Prompt::Raw { text }) => text.clone(),
        _ => String::new(),
    };
    let run_ms = match (job.started_at, job.finished_at) {
        (Some(a), Some(b)) => (b - a).num_milliseconds(),
        _ => 0,
    };
    let per_second = if run_ms > 0 {
        f64::from(job.generated_tokens) * 1000.0 / run_ms as f64
    } else {
        0.0
    };
    let limited = job.finish_reason.as_deref() == Some("length");
    json!({
        "index": 0,
        "content": content,
        "tokens": [],
        "id_slot": 0,
        "stop": true,
        "model": job.model,
        "tokens_predicted": job.generated_tokens,
        "tokens_evaluated": job.prompt_tokens,
        "tokens_cached": job.cached_tokens,
        "prompt": prompt,
        "has_new_line": job.result.as_deref().unwrap_or_default().contains('\n'),
        "truncated": false,
        // The engine records that it stopped, not whether at the end token or a stop word.
        "stop_type": if limited { "limit" } else { "eos" },
        "stopping_word": "",
        "generation_settings": asked.map(|r| json!({
            "n_predict": r.params.max_tokens,
            "temperature": r.params.temperature,
            "top_p": r.params.top_p,
            "seed": r.params.seed,
            "stop": r.params.stop,
        })),
        "timings": {
            "prompt_n": job.prompt_tokens - job.cached_tokens,
            "predicted_n": job.generated_tokens,
            "predicted_ms": run_ms,
            "predicted_per_second": per_second,
        },
    })
}

#[tracing::instrument(skip_all, fields(api_key))]
pub(super) async fn completion(
    State(ctx): State<AppContext>,
    MeteredCaller(key): MeteredCaller,
    body: Result<JsonBody<CompletionRequest>, ApiError>,
) -> ApiResult<Response> {
    let JsonBody(body) = body?;
    let streaming = body.stream;
    let input = GenerationInput::try_from(body)?;
    let services = Services::from_ctx(&ctx)?;
    let follow = if streaming {
        Follow::Updates
    } else {
        Follow::Settled
    };
    let ticket = Ticket::wait(ENDPOINT).follow(follow);
    match services.admission.admit(&key, input, ticket).await? {
        Admitted::Streaming(js) => Ok(stream(js)),
        Admitted::Finished(job) => {
            let job = settled(job)?;
            let content = job.result.clone().unwrap_or_default();
            Ok(Json(final_json(&job, &content)).into_response())
        }
        Admitted::Pending(job) => Ok(accepted(&job)),
    }
}

fn chunk(content: &str) -> Event {
    Event::default().data(
        json!({"index": 0, "content": content, "tokens": [], "stop": false, "id_slot": 0})
            .to_string(),
    )
}

/// Streams the job as llama-server does: a chunk per piece of text, then the final object
/// (`"stop": true`, with any text the client missed). A failed job ends with an error object.
fn stream(js: crate::admission::JobStream) -> Response {
    let job_id = js.job.id.clone();
    let body = text_updates(js.deltas, js.done, false).map(move |update| {
        Ok::<Event, std::convert::Infallible>(match update {
            TextUpdate::Piece(text) => chunk(&text),
            TextUpdate::Settled(job, rest) => match settled(*job) {
                Ok(job) => Event::default().data(final_json(&job, &rest).to_string()),
                Err(e) => error_event(&e),
            },
            TextUpdate::Ended => error_event(&ApiError::new(
                ErrorCode::GenerationFailed,
                format!("the stream ended early; the result will be at GET /api/jobs/{job_id}"),
            )),
        })
    });
    Sse::new(body)
        .keep_alive(KeepAlive::default())
        .into_response()
}

fn error_event(e: &ApiError) -> Event {
    Event::default().data(
        json!({"error": {"code": e.status().as_u16(), "message": e.message, "type": e.code.kind()}})
            .to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(body: Value) -> ApiResult<GenerationInput> {
        let body: CompletionRequest = serde_json::from_value(body).expect("a request body");
        GenerationInput::try_from(body)
    }

    #[test]
    fn llama_server_fields_map_to_the_one_input() {
        let i = input(json!({
            "prompt": ["Once"], "n_predict": -1, "seed": -1, "stop": ["\n"], "top_k": 5,
            "cache_prompt": true, "id_slot": -1, "n_probs": 0, "samplers": [],
            "json_schema": {"type": "object"},
        }))
        .expect("valid");
        assert!(matches!(i.prompt, Prompt::Raw { ref text } if text == "Once"));
        assert_eq!(i.sampling.max_tokens, Some(i64::MAX));
        assert!(i.sampling.clamp_max_tokens);
        assert_eq!(i.sampling.seed, None);
        assert_eq!(i.sampling.controls.top_k, Some(5));
        assert!(matches!(
            i.sampling.response_format,
            Some(ResponseFormat::JsonSchema { .. })
        ));
        let i = input(json!({"prompt": "x", "n_predict": 7, "seed": 3})).expect("valid");
        assert_eq!((i.sampling.max_tokens, i.sampling.seed), (Some(7), Some(3)));
        // What SillyTavern and llama.vim send: llama-server's default sampler order, the
        // settings of samplers that are off, `logit_bias` as llama-server's pairs.
        let i = input(json!({
            "prompt": "x", "t_max_prompt_ms": 500,
            "samplers": ["penalties", "dry", "top_k", "typ_p", "top_p", "min_p", "xtc", "temperature"],
            "dry_multiplier": 0, "dry_base": 1.75, "dry_allowed_length": 2,
            "dry_sequence_breakers": ["\n"], "mirostat": 0, "mirostat_tau": 5, "mirostat_eta": 0.1,
            "xtc_probability": 0, "xtc_threshold": 0.1, "dynatemp_range": 0,
            "dynatemp_exponent": 1, "top_n_sigma": -1, "logit_bias": [[15, -2.5], [16, false]],
        }))
        .expect("valid");
        let bias = i.sampling.controls.logit_bias.expect("a bias");
        assert_eq!((bias["15"], bias["16"]), (-2.5, -100.0));
        assert!(input(json!({"prompt": "x", "logit_bias": []})).is_ok());
    }

    #[test]
    fn what_it_cannot_honour_is_refused_by_name() {
        for (field, value, code) in [
            ("grammar", json!("root ::= \"a\""), "unsupported_parameter"),
            ("n_probs", json!(3), "unsupported_parameter"),
            ("samplers", json!(["top_k"]), "unsupported_parameter"),
            (
                "samplers",
                json!(["temperature", "top_k", "typ_p", "top_p", "min_p"]),
                "unsupported_parameter",
            ),
            ("dry_multiplier", json!(0.8), "unsupported_parameter"),
            ("ignore_eos", json!(true), "unsupported_parameter"),
            ("mirostat", json!(2), "unsupported_parameter"),
            ("n_predict", json!(0), "invalid_max_tokens"),
            ("prompt", json!([1, 2, 3]), "invalid_prompt"),
            ("prompt", json!(" "), "empty_prompt"),
        ] {
            let mut body = json!({"prompt": "x"});
            body[field] = value.clone();
            let err = input(body).expect_err("refused");
            assert_eq!(err.code.as_str(), code, "{field}: {value}");
            assert!(err.message.contains(field), "{}", err.message);
        }
    }
}
