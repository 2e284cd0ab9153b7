//! OpenAI's tool calling on the wire: `tools`, `tool_choice` and `parallel_tool_calls` in (as
//! the admission input's [`ToolsInput`]), `tool_calls` out, whole or as stream deltas. What
//! the model wrote is kept raw with the job and parsed here each time it is shown
//! ([`crate::engine::tools::parse`]), so a poll and the original answer agree, ids included.

use serde::Deserialize;
use serde_json::{json, Value};

use crate::{
    admission::ToolsInput,
    engine::{
        tools::{self, Parsed, Tool, ToolChoice, ToolFormat},
        GenerationRequest,
    },
    errors::{ApiError, ApiResult, ErrorCode},
    models::jobs,
};

/// Most tools one request may offer (OpenAI's own limit).
pub const MAX_TOOLS: usize = 128;

/// One entry of `tools`.
/// Whether `name` is a name OpenAI accepts for a function or a response schema: 1 to 64 of
/// `a-z`, `A-Z`, `0-9`, `_` and `-` (clients validated by OpenAI never send others, so a
/// different one is a mistake worth naming).
pub fn is_openai_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct ToolWire {
    /// Only `function`.
    #[serde(rename = "type")]
    kind: String,
    function: Option<FunctionWire>,
}

/// A function the model may call.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct FunctionWire {
    /// `a-z`, `A-Z`, `0-9`, `_` and `-`, at most 64 characters.
    name: String,
    description: Option<String>,
    /// A JSON Schema for the arguments object; absent means no arguments.
    #[schema(value_type = Option<Object>)]
    parameters: Option<Value>,
    /// `true`: every keyword of `parameters` must be enforced (else 400 `unsupported_schema`);
    /// otherwise the grammar enforces what it can and the model reads the rest.
    strict: Option<bool>,
}

impl ToolWire {
    /// A function tool from its parts (the Responses API's flat `tools` entries).
    #[must_use]
    pub fn function(
        name: String,
        description: Option<String>,
        parameters: Option<Value>,
        strict: Option<bool>,
    ) -> Self {
        Self {
            kind: "function".into(),
            function: Some(FunctionWire {
                name,
                description,
                parameters,
                strict,
            }),
        }
    }
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::InvalidTools, message)
}

/// The tools offered, or `None` when there are none or `tool_choice` is `none`.
///
/// # Errors
/// 400 `invalid_tools` for a tool that is not a function, a bad or repeated name, a
/// `tool_choice` that is none of OpenAI's forms or names no offered tool.
pub fn tools_input(
    tools: Option<Vec<ToolWire>>,
    choice: Option<&Value>,
    parallel: Option<bool>,
) -> ApiResult<Option<ToolsInput>> {
    let tools = tools.unwrap_or_default();
    if tools.len() > MAX_TOOLS {
        return Err(invalid(format!(
            "tools takes at most {MAX_TOOLS} functions"
        )));
    }
    let mut offered: Vec<Tool> = Vec::with_capacity(tools.len());
    for (i, t) in tools.into_iter().enumerate() {
        let Some(f) = t.function.filter(|_| t.kind == "function") else {
            return Err(invalid(format!(
                "tools[{i}]: only tools of type \"function\" with a `function` object are supported"
            )));
        };
        if !is_openai_name(&f.name) {
            return Err(invalid(format!(
                "tools[{i}].function.name must be 1 to 64 of a-z, A-Z, 0-9, _ and -"
            )));
        }
        if offered.iter().any(|o| o.name == f.name) {
            return Err(invalid(format!(
                "tools[{i}].function.name {:?} is offered twice",
                f.name
            )));
        }
        if f.description.as_deref().is_some_and(|d| d.contains('\0')) {
            return Err(invalid(format!(
                "tools[{i}].function.description must not contain NUL characters"
            )));
        }
        offered.push(Tool {
            name: f.name,
            description: f.description.filter(|d| !d.is_empty()),
            parameters: f
                .parameters
                .unwrap_or_else(|| json!({"type": "object", "properties": {}})),
            strict: f.strict == Some(true),
        });
    }
    let choice = match choice {
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => return Ok(None),
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return Err(invalid(format!(
                    "tool_choice must be \"none\", \"auto\", \"required\" or {{\"type\": \"function\", \"function\": {{\"name\": …}}}}, got {other:?}"
                )))
            }
        },
        Some(v) => {
            let name = v
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .filter(|_| v.get("type").and_then(Value::as_str) == Some("function"))
                .ok_or_else(|| {
                    invalid("tool_choice must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": …}}")
                })?;
            if !offered.iter().any(|t| t.name == name) {
                return Err(invalid(format!(
                    "tool_choice names {name:?}, which is not in tools"
                )));
            }
            ToolChoice::Function(name.to_string())
        }
    };
    if offered.is_empty() {
        return match choice {
            ToolChoice::Auto => Ok(None),
            _ => Err(invalid("tool_choice asks for a call but tools is empty")),
        };
    }
    Ok(Some(ToolsInput {
        tools: offered,
        choice,
        parallel: parallel.unwrap_or(true),
    }))
}

/// How a job's calls are written, when it offered tools.
#[must_use]
pub fn format_of(job: &jobs::Model) -> Option<ToolFormat> {
    stored_format(&job.request)
}

/// [`format_in`] of a stored request (its JSON), reading nothing else of it.
fn stored_format(request: &str) -> Option<ToolFormat> {
    /// The one field wanted from the stored request: serde skips the rest (messages, tool
    /// schemas) without building them, so a poll of a long conversation stays cheap.
    #[derive(Deserialize)]
    struct Stored {
        prompt: StoredPrompt,
    }
    #[derive(Deserialize)]
    struct StoredPrompt {
        tools: Option<StoredTools>,
    }
    #[derive(Deserialize)]
    struct StoredTools {
        format: ToolFormat,
    }
    let stored: Stored = serde_json::from_str(request).ok()?;
    stored.prompt.tools.map(|t| t.format)
}

/// How calls are written for `request`, when it offered tools.
#[must_use]
pub fn format_in(request: &GenerationRequest) -> Option<ToolFormat> {
    request.prompt.tools().map(|t| t.format)
}

/// A chat choice's `message` and `finish_reason`: the text as it is, or, for a job that
/// offered tools, the calls the model made (`finish_reason: "tool_calls"`) and any other text.
#[must_use]
pub fn message(
    job_id: &str,
    choice: usize,
    text: &str,
    finish: Option<&str>,
    format: Option<ToolFormat>,
) -> (Value, Option<String>) {
    let Some(format) = format else {
        return (
            json!({"role": "assistant", "content": text}),
            finish.map(str::to_string),
        );
    };
    let Parsed { content, calls } = tools::parse(format, text);
    if calls.is_empty() {
        return (
            json!({"role": "assistant", "content": content.unwrap_or_default()}),
            finish.map(str::to_string),
        );
    }
    let calls: Vec<Value> = calls
        .iter()
        .enumerate()
        .map(|(i, c)| {
            json!({
                "id": tools::call_id(job_id, choice, i),
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments},
            })
        })
        .collect();
    (
        json!({"role": "assistant", "content": content, "tool_calls": calls}),
        Some("tool_calls".to_string()),
    )
}

/// The stream deltas of a finished answer that offered tools: its text (if any), then each
/// call as OpenAI streams one (a first delta with its id and name, then its arguments), and
/// the `finish_reason` to close with.
#[must_use]
pub fn deltas(
    job_id: &str,
    choice: usize,
    text: &str,
    finish: &str,
    format: ToolFormat,
) -> (Vec<Value>, String) {
    let Parsed { content, calls } = tools::parse(format, text);
    let mut out = Vec::new();
    if let Some(c) = content.filter(|c| !c.is_empty()) {
        out.push(json!({"content": c}));
    }
    for (i, c) in calls.iter().enumerate() {
        out.push(json!({"tool_calls": [{
            "index": i,
            "id": tools::call_id(job_id, choice, i),
            "type": "function",
            "function": {"name": c.name, "arguments": ""},
        }]}));
        out.push(json!({"tool_calls": [{"index": i, "function": {"arguments": c.arguments}}]}));
    }
    let finish = if calls.is_empty() {
        finish.to_string()
    } else {
        "tool_calls".to_string()
    };
    (out, finish)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(name: &str) -> ToolWire {
        ToolWire {
            kind: "function".into(),
            function: Some(FunctionWire {
                name: name.into(),
                description: None,
                parameters: None,
                strict: None,
            }),
        }
    }

    #[test]
    fn a_stored_requests_tool_format_is_read_as_the_whole_request_would_give_it() {
        use crate::engine::{ChatMessage, Prompt, SamplingParams};
        let request = |tools: Option<Box<tools::ToolUse>>| GenerationRequest {
            model: "m".into(),
            prompt: Prompt::Chat {
                messages: vec![ChatMessage {
                    role: "user".into(),
                    content: "hi".into(),
                    ..Default::default()
                }],
                tools,
            },
            params: SamplingParams::greedy(1),
            adapter: None,
        };
        for format in [ToolFormat::Hermes, ToolFormat::Generic] {
            let offered = tools_input(Some(vec![wire("a")]), None, None)
                .expect("valid")
                .map(|t| {
                    Box::new(tools::ToolUse {
                        tools: t.tools,
                        choice: t.choice,
                        parallel: t.parallel,
                        format,
                        answer: None,
                    })
                });
            let with = request(offered);
            let json = serde_json::to_string(&with).expect("serializes");
            assert_eq!(stored_format(&json), Some(format));
            assert_eq!(stored_format(&json), format_in(&with));
        }
        let without = serde_json::to_string(&request(None)).expect("serializes");
        assert_eq!(stored_format(&without), None);
        let raw = serde_json::to_string(&GenerationRequest {
            prompt: Prompt::Raw { text: "x".into() },
            ..request(None)
        })
        .expect("serializes");
        assert_eq!(stored_format(&raw), None);
        assert_eq!(stored_format("not json"), None);
    }

    #[test]
    fn tool_choice_forms_and_refusals() {
        let named = json!({"type": "function", "function": {"name": "b"}});
        let t = tools_input(Some(vec![wire("a"), wire("b")]), Some(&named), None)
            .expect("valid")
            .expect("offered");
        assert_eq!(t.choice, ToolChoice::Function("b".into()));
        assert!(t.parallel);
        assert!(
            tools_input(Some(vec![wire("a")]), Some(&json!("none")), None)
                .expect("valid")
                .is_none()
        );
        assert!(tools_input(None, None, None).expect("valid").is_none());
        for (tools, choice) in [
            (
                vec![wire("a")],
                json!({"type": "function", "function": {"name": "zz"}}),
            ),
            (vec![wire("a")], json!("sometimes")),
            (vec![wire("a"), wire("a")], json!("auto")),
            (vec![wire("bad name")], json!("auto")),
            (vec![], json!("required")),
        ] {
            let err = tools_input(Some(tools), Some(&choice), None).expect_err("refused");
            assert_eq!(err.code.as_str(), "invalid_tools", "{choice}");
        }
    }

    #[test]
    fn calls_become_messages_and_deltas_with_the_same_ids() {
        let text = r#"{"tool_call": {"name": "a", "arguments": {"x": 1}}}"#;
        let (msg, finish) = message("job-1", 0, text, Some("stop"), Some(ToolFormat::Generic));
        assert_eq!(finish.as_deref(), Some("tool_calls"));
        assert_eq!(msg["content"], Value::Null);
        assert_eq!(msg["tool_calls"][0]["function"]["arguments"], r#"{"x":1}"#);
        let (deltas, finish) = deltas("job-1", 0, text, "stop", ToolFormat::Generic);
        assert_eq!(finish, "tool_calls");
        assert_eq!(deltas[0]["tool_calls"][0]["id"], msg["tool_calls"][0]["id"]);
        assert_eq!(
            deltas[1]["tool_calls"][0]["function"]["arguments"],
            r#"{"x":1}"#
        );
        let (plain, finish) = message("job-1", 0, "hi", Some("stop"), None);
        assert_eq!(plain["content"], "hi");
        assert_eq!(finish.as_deref(), Some("stop"));
    }
}
