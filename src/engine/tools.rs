//! Tool calling: OpenAI's `tools` and `tool_choice` as a prompt the model understands, a
//! grammar that makes its calls parse and validate against each tool's parameters, and a
//! parser that turns what it wrote back into `tool_calls`.
//!
//! How a model writes a call depends on how it was trained, which its chat template shows:
//!
//! - [`ToolFormat::Hermes`] (Qwen 2.5, Hermes, and other templates that write `<tool_call>`):
//!   the template itself lists the tools and renders earlier calls and results; the model
//!   writes `<tool_call>{"name": …, "arguments": {…}}</tool_call>`. With `tool_choice: "auto"`
//!   the grammar is lazy: free text until the model writes `<tool_call>`, then only a valid call.
//! - [`ToolFormat::Generic`] (every other template, SmolLM2's included): as llama.cpp's server
//!   does for such models, the tools are described in the system turn and the whole answer is
//!   one JSON object, `{"tool_call": …}` / `{"tool_calls": […]}` or (with `auto`)
//!   `{"response": "…"}`; earlier calls and tool results are written into the history as that
//!   same JSON, in turns the template knows (`assistant`, `user`).
//!
//! The grammar is built at admission from the schemas (keywords it cannot enforce are refused
//! by name, as for `response_format`) and travels in the job; the answer keeps the model's raw
//! text and is parsed when it is shaped for the client ([`parse`]).

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::grammar::{self, FormatError, OutputConstraint, ResponseFormat};

/// One function the model may call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tool {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// A JSON Schema for the arguments object.
    pub parameters: Value,
    /// OpenAI's `strict`: the schema is a contract, so a keyword the grammar cannot enforce is
    /// refused. Without it the schema is a hint (as OpenAI treats it): the model reads it all,
    /// and decoding holds the arguments to what the grammar can enforce.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub strict: bool,
}

impl Tool {
    /// The tool as OpenAI's `tools` entry, `{"type": "function", "function": {name,
    /// description, parameters}}`: what upstream servers and chat templates expect.
    #[must_use]
    pub fn openai(&self) -> Value {
        let mut f = Map::new();
        f.insert("name".into(), self.name.clone().into());
        if let Some(d) = &self.description {
            f.insert("description".into(), d.clone().into());
        }
        f.insert("parameters".into(), self.parameters.clone());
        json!({"type": "function", "function": f})
    }
}

/// OpenAI's `tool_choice` once `none` is taken out (with `none` the tools are not offered).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "name", rename_all = "snake_case")]
pub enum ToolChoice {
    /// The model decides whether to call.
    Auto,
    /// At least one call, to any tool.
    Required,
    /// One call to this function.
    Function(String),
}

/// How the model writes calls (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolFormat {
    Hermes,
    Generic,
}

/// Tools offered to one request, as admitted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolUse {
    pub tools: Vec<Tool>,
    pub choice: ToolChoice,
    /// Several calls in one answer (OpenAI's `parallel_tool_calls`, default true).
    pub parallel: bool,
    pub format: ToolFormat,
    /// The JSON Schema a reply that is no call must match: the request's `response_format`
    /// beside its tools (an agent with an output type and tools). Offered in the generic
    /// format, whose envelope can hold it: `{"response": <that value>}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<Value>,
}

/// A call the assistant made earlier in the conversation (`messages[].tool_calls`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as the client holds them: a JSON text.
    pub arguments: String,
}

/// Why the tools cannot be offered as asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ToolError {
    #[error("{0}")]
    Invalid(String),
}

/// The marker Hermes-style templates put around a call.
pub const HERMES_OPEN: &str = "<tool_call>";
pub const HERMES_CLOSE: &str = "</tool_call>";

/// How a template writes calls: Hermes when it writes `<tool_call>`, else the generic JSON.
#[must_use]
pub fn format_of(template_source: Option<&str>) -> ToolFormat {
    match template_source {
        Some(s) if s.contains(HERMES_OPEN) && s.contains("tools") => ToolFormat::Hermes,
        _ => ToolFormat::Generic,
    }
}

/// The tools a choice leaves the model (a named function: that one only), with their index.
fn offered(tools: &ToolUse) -> Vec<(usize, &Tool)> {
    tools
        .tools
        .iter()
        .enumerate()
        .filter(|(_, t)| match &tools.choice {
            ToolChoice::Function(name) => &t.name == name,
            _ => true,
        })
        .collect()
}

/// The schema of one call, `{"name": <one of the tools>, "arguments": <its parameters>}`, and
/// the definitions its parameters refer to (each tool's `$defs` moved to the root, renamed
/// `t<i>-<name>`, since the parameters are no longer the root their `$ref`s point into).
///
/// # Errors
/// [`FormatError::Unsupported`] for a `$ref` into a tool's schema other than its `$defs`.
fn call_schema(tools: &[(usize, &Tool)]) -> Result<(Value, Map<String, Value>), FormatError> {
    let mut defs = Map::new();
    let mut calls = Vec::with_capacity(tools.len());
    for (i, t) in tools {
        let mut parameters = t.parameters.clone();
        if let Some(obj) = parameters.as_object_mut() {
            for key in ["$defs", "definitions"] {
                if let Some(Value::Object(own)) = obj.remove(key) {
                    for (name, mut def) in own {
                        retarget_refs(&mut def, *i)?;
                        defs.insert(format!("t{i}-{name}"), def);
                    }
                }
            }
        }
        retarget_refs(&mut parameters, *i)?;
        calls.push(json!({
            "type": "object",
            "properties": {"name": {"const": t.name}, "arguments": parameters},
            "required": ["name", "arguments"],
        }));
    }
    let schema = match <[Value; 1]>::try_from(calls) {
        Ok([one]) => one,
        Err(calls) => json!({"anyOf": calls}),
    };
    Ok((schema, defs))
}

/// Points tool `i`'s `#/$defs/X` (or `#/definitions/X`) references at `#/$defs/t<i>-X`.
fn retarget_refs(v: &mut Value, i: usize) -> Result<(), FormatError> {
    match v {
        Value::Object(obj) => {
            if let Some(Value::String(r)) = obj.get_mut("$ref") {
                let name = r
                    .strip_prefix("#/$defs/")
                    .or_else(|| r.strip_prefix("#/definitions/"))
                    .ok_or_else(|| {
                        FormatError::Unsupported(vec![format!(
                            "tools[{i}].function.parameters: $ref {r:?} (only #/$defs/… in tool parameters)"
                        )])
                    })?;
                *r = format!("#/$defs/t{i}-{name}");
            }
            obj.values_mut().try_for_each(|x| retarget_refs(x, i))
        }
        Value::Array(items) => items.iter_mut().try_for_each(|x| retarget_refs(x, i)),
        _ => Ok(()),
    }
}

/// `schema` with the tools' definitions at its root.
fn with_defs(mut schema: Value, defs: Map<String, Value>) -> Value {
    if !defs.is_empty() {
        schema["$defs"] = Value::Object(defs);
    }
    schema
}

/// Checks every tool's parameters and builds the grammar its calls are decoded with.
///
/// # Errors
/// [`FormatError::Unsupported`] naming each keyword (as `tools[i].function.parameters…`) the
/// grammar would drop; [`FormatError::Invalid`] for a schema that is not usable; a named
/// `tool_choice` that names no tool.
pub fn constrain(tools: &ToolUse) -> Result<OutputConstraint, FormatError> {
    let mut unsupported = Vec::new();
    // Each tool's parameters as decoding holds them: whole for a strict tool (checked, every
    // keyword enforced), else without what the grammar cannot enforce.
    let mut held = tools.tools.clone();
    for (i, t) in held.iter_mut().enumerate() {
        let checked = if t.strict {
            grammar::constrain(ResponseFormat::JsonSchema {
                name: t.name.clone(),
                schema: t.parameters.clone(),
                strict: false,
            })
            .map(|_| ())
        } else {
            grammar::relaxed(&t.parameters).map(|relaxed| t.parameters = relaxed)
        };
        match checked {
            Ok(()) => {}
            Err(FormatError::Unsupported(what)) => unsupported.extend(what.into_iter().map(|w| {
                format!(
                    "tools[{i}].function.parameters{}",
                    w.strip_prefix('#').unwrap_or(&w)
                )
            })),
            Err(FormatError::Invalid(why)) => {
                return Err(FormatError::Invalid(format!(
                    "tools[{i}].function.parameters: {why}"
                )))
            }
        }
    }
    if !unsupported.is_empty() {
        return Err(FormatError::Unsupported(unsupported));
    }
    let held = ToolUse {
        tools: held,
        ..tools.clone()
    };
    let offered = offered(&held);
    if offered.is_empty() {
        return Err(FormatError::Invalid(
            "tool_choice names a function that is not in tools".into(),
        ));
    }
    let (call, mut defs) = call_schema(&offered)?;
    // The reply's schema, its definitions moved beside the tools' (as one more "tool").
    let reply = match &tools.answer {
        None => json!({"type": "string"}),
        Some(schema) => {
            let mut schema = schema.clone();
            let i = tools.tools.len();
            if let Some(obj) = schema.as_object_mut() {
                for key in ["$defs", "definitions"] {
                    if let Some(Value::Object(own)) = obj.remove(key) {
                        for (name, mut def) in own {
                            retarget_refs(&mut def, i)?;
                            defs.insert(format!("t{i}-{name}"), def);
                        }
                    }
                }
            }
            retarget_refs(&mut schema, i)?;
            schema
        }
    };
    match tools.format {
        ToolFormat::Generic => {
            let calls = if tools.parallel {
                json!({
                    "type": "object",
                    "properties": {"tool_calls": {"type": "array", "items": call, "minItems": 1}},
                    "required": ["tool_calls"],
                })
            } else {
                json!({"type": "object", "properties": {"tool_call": call}, "required": ["tool_call"]})
            };
            let schema = if tools.choice == ToolChoice::Auto {
                json!({"anyOf": [calls, {
                    "type": "object",
                    "properties": {"response": reply},
                    "required": ["response"],
                }]})
            } else {
                calls
            };
            grammar::constrain(ResponseFormat::JsonSchema {
                name: "tool_calls".into(),
                schema: with_defs(schema, defs),
                strict: true,
            })
        }
        ToolFormat::Hermes => {
            let call = with_defs(call, defs);
            let body = grammar::constrain(ResponseFormat::JsonSchema {
                name: "tool_call".into(),
                schema: call.clone(),
                strict: true,
            })?;
            // The converter's `root` becomes one call's body, wrapped in the markers.
            let rules: Vec<String> = body
                .grammar
                .lines()
                .map(|l| match l.strip_prefix("root ::=") {
                    Some(rest) => format!("tollgate-call-body ::={rest}"),
                    None => l.to_string(),
                })
                .collect();
            let block = format!(
                "tollgate-call ::= \"{HERMES_OPEN}\" [ \\n]* tollgate-call-body [ \\n]* \"{HERMES_CLOSE}\""
            );
            let root = if tools.parallel {
                "root ::= tollgate-call ([ \\n]* tollgate-call)*"
            } else {
                "root ::= tollgate-call"
            };
            Ok(OutputConstraint {
                format: ResponseFormat::JsonSchema {
                    name: "tool_call".into(),
                    schema: call,
                    strict: true,
                },
                grammar: format!("{root}\n{block}\n{}\n", rules.join("\n")),
                triggers: if tools.choice == ToolChoice::Auto {
                    vec![HERMES_OPEN.to_string()]
                } else {
                    Vec::new()
                },
            })
        }
    }
}

/// The system-turn text that offers the tools to a model without its own tool format (as
/// llama.cpp's server words it for such models).
#[must_use]
pub fn generic_instructions(tools: &ToolUse) -> String {
    let list: Vec<Value> = offered(tools).iter().map(|(_, t)| t.openai()).collect();
    let example_call = json!({"name": "tool_name", "arguments": {"arg1": "some_value"}});
    let example = if tools.parallel {
        json!({"tool_calls": [example_call]})
    } else {
        json!({"tool_call": example_call})
    };
    let key = if tools.parallel {
        "`tool_calls` (a request to call tools)"
    } else {
        "`tool_call` (a request to call a tool)"
    };
    let respond = match (&tools.answer, tools.choice == ToolChoice::Auto) {
        (Some(schema), true) => format!(
            "Respond in JSON format, either with {key} or with `response` reply to the user's request, a JSON value matching this schema: {}",
            pretty(schema)
        ),
        (None, true) => format!("Respond in JSON format, either with {key} or with `response` reply to the user's request"),
        _ => format!("Respond in JSON format with {key}"),
    };
    format!(
        "You can call any of the following tools to satisfy the user's requests: {}\n\nExample tool call syntax:\n\n{}\n\n{respond}",
        pretty(&Value::Array(list)),
        pretty(&example),
    )
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

/// Earlier calls as the generic format writes them, for an assistant turn of the history.
#[must_use]
pub fn generic_calls_text(calls: &[ToolCall]) -> String {
    let calls: Vec<Value> = calls
        .iter()
        .map(|c| json!({"name": c.name, "arguments": arguments_value(&c.arguments), "id": c.id}))
        .collect();
    pretty(&json!({"tool_calls": calls}))
}

/// A tool's result as the generic format writes it, for a `user` turn of the history.
#[must_use]
pub fn generic_result_text(name: Option<&str>, call_id: Option<&str>, content: &str) -> String {
    let mut response = Map::new();
    if let Some(n) = name {
        response.insert("tool".into(), n.into());
    }
    response.insert("content".into(), content.into());
    if let Some(id) = call_id {
        response.insert("tool_call_id".into(), id.into());
    }
    pretty(&json!({"tool_response": response}))
}

/// An upstream's calls (name, arguments text) and text, written as the generic format so the
/// answer is shaped like any other (remote models are offered tools in that format).
#[must_use]
pub fn generic_answer(calls: &[(String, String)], content: &str) -> String {
    let calls: Vec<Value> = calls
        .iter()
        .map(|(name, args)| json!({"name": name, "arguments": arguments_value(args)}))
        .collect();
    let mut v = json!({"tool_calls": calls});
    if !content.is_empty() {
        v["content"] = json!(content);
    }
    v.to_string()
}

/// Arguments as an object where the text is one (templates expect a mapping), else the text.
#[must_use]
pub fn arguments_value(arguments: &str) -> Value {
    serde_json::from_str::<Value>(arguments)
        .ok()
        .filter(Value::is_object)
        .unwrap_or_else(|| Value::String(arguments.to_string()))
}

/// A call the model made, parsed from its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedCall {
    pub name: String,
    /// The arguments object as compact JSON text (OpenAI's `function.arguments`).
    pub arguments: String,
}

/// What the model wrote: text for the client and the calls it made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub content: Option<String>,
    pub calls: Vec<ParsedCall>,
}

impl Parsed {
    fn text(text: &str) -> Self {
        Self {
            content: Some(text.to_string()),
            calls: Vec::new(),
        }
    }
}

/// One `{"name": …, "arguments": …}` object as a call (`parameters` is accepted for
/// `arguments`, as some models write it).
fn call_of(v: &Value) -> Option<ParsedCall> {
    let name = v.get("name")?.as_str()?.to_string();
    let args = v.get("arguments").or_else(|| v.get("parameters"));
    let arguments = match args {
        None => "{}".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    };
    Some(ParsedCall { name, arguments })
}

/// The calls in a model's answer (text that is no call stays content). An answer cut short
/// (`max_tokens`) whose call does not parse is returned as text.
#[must_use]
pub fn parse(format: ToolFormat, text: &str) -> Parsed {
    match format {
        ToolFormat::Generic => parse_generic(text),
        ToolFormat::Hermes => parse_hermes(text),
    }
}

fn parse_generic(text: &str) -> Parsed {
    let Ok(Value::Object(v)) = serde_json::from_str::<Value>(text.trim()) else {
        return Parsed::text(text);
    };
    if let Some(call) = v.get("tool_call").and_then(call_of) {
        return Parsed {
            content: None,
            calls: vec![call],
        };
    }
    if let Some(calls) = v.get("tool_calls").and_then(Value::as_array) {
        let calls: Option<Vec<ParsedCall>> = calls.iter().map(call_of).collect();
        if let Some(calls) = calls.filter(|c| !c.is_empty()) {
            return Parsed {
                // An upstream's text beside its calls ([`generic_answer`]).
                content: v.get("content").and_then(Value::as_str).map(str::to_string),
                calls,
            };
        }
    }
    match v.get("response") {
        Some(Value::String(s)) => Parsed::text(s),
        // A reply held to the request's response format: its JSON is the content.
        Some(reply @ (Value::Object(_) | Value::Array(_))) => Parsed::text(&reply.to_string()),
        _ => Parsed::text(text),
    }
}

fn parse_hermes(text: &str) -> Parsed {
    let mut calls = Vec::new();
    let mut content = String::new();
    let mut rest = text;
    while let Some(start) = rest.find(HERMES_OPEN) {
        let after = &rest[start + HERMES_OPEN.len()..];
        let Some(end) = after.find(HERMES_CLOSE) else {
            break;
        };
        let Some(call) = serde_json::from_str::<Value>(after[..end].trim())
            .ok()
            .as_ref()
            .and_then(call_of)
        else {
            break;
        };
        content.push_str(&rest[..start]);
        calls.push(call);
        rest = &after[end + HERMES_CLOSE.len()..];
    }
    content.push_str(rest);
    if calls.is_empty() {
        // A model (or a stand-in) that wrote the call's JSON without the markers.
        if let Ok(v) = serde_json::from_str::<Value>(text.trim()) {
            if let Some(call) = call_of(&v) {
                return Parsed {
                    content: None,
                    calls: vec![call],
                };
            }
        }
        return Parsed::text(text);
    }
    let content = content.trim();
    Parsed {
        content: (!content.is_empty()).then(|| content.to_string()),
        calls,
    }
}

/// The id of a call in an answer: stable for the job (the same on every read of it), unique
/// per choice and call.
#[must_use]
pub fn call_id(job_id: &str, choice: usize, index: usize) -> String {
    let short: String = job_id
        .chars()
        .filter(char::is_ascii_hexdigit)
        .take(20)
        .collect();
    format!("call_{short}_{choice}_{index}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather(format: ToolFormat, choice: ToolChoice, parallel: bool) -> ToolUse {
        ToolUse {
            tools: vec![
                Tool {
                    name: "get_weather".into(),
                    description: Some("Weather in a city".into()),
                    parameters: json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
                    strict: false,
                },
                Tool {
                    name: "get_time".into(),
                    description: None,
                    parameters: json!({"type": "object", "properties": {}}),
                    strict: false,
                },
            ],
            choice,
            parallel,
            format,
            answer: None,
        }
    }

    #[test]
    fn a_response_format_beside_tools_holds_the_reply_in_the_envelope() {
        let mut tools = weather(ToolFormat::Generic, ToolChoice::Auto, true);
        tools.answer = Some(json!({
            "type": "object",
            "properties": {"summary": {"$ref": "#/$defs/text"}},
            "required": ["summary"],
            "$defs": {"text": {"type": "string", "maxLength": 40}},
        }));
        let constraint = constrain(&tools).expect("a grammar");
        let ResponseFormat::JsonSchema { schema, .. } = &constraint.format else {
            panic!("a schema");
        };
        let reply = &schema["anyOf"][1]["properties"]["response"];
        assert_eq!(reply["required"], json!(["summary"]), "{schema}");
        // Its definitions sit beside the tools', its references pointing at them.
        assert_eq!(
            reply["properties"]["summary"]["$ref"], "#/$defs/t2-text",
            "{schema}"
        );
        assert_eq!(schema["$defs"]["t2-text"]["maxLength"], 40, "{schema}");
        assert!(generic_instructions(&tools).contains("\"summary\""));
        // Without a format the reply is free text.
        tools.answer = None;
        let constraint = constrain(&tools).expect("a grammar");
        let ResponseFormat::JsonSchema { schema, .. } = &constraint.format else {
            panic!("a schema");
        };
        assert_eq!(
            schema["anyOf"][1]["properties"]["response"],
            json!({"type": "string"})
        );
    }

    #[test]
    fn generic_answers_parse_into_calls_or_text() {
        let one = parse(
            ToolFormat::Generic,
            r#"{"tool_call": {"name": "get_weather", "arguments": {"city": "Paris"}}}"#,
        );
        assert_eq!(one.content, None);
        assert_eq!(
            one.calls,
            vec![ParsedCall {
                name: "get_weather".into(),
                arguments: r#"{"city":"Paris"}"#.into()
            }]
        );
        let many = parse(
            ToolFormat::Generic,
            r#"{"tool_calls": [{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "Oslo"}}]}"#,
        );
        assert_eq!(many.calls.len(), 2);
        let reply = parse(ToolFormat::Generic, r#"{"response": "Hello"}"#);
        assert_eq!(reply.content.as_deref(), Some("Hello"));
        assert!(reply.calls.is_empty());
        // A reply held to a response format: its JSON is the content.
        let typed = parse(
            ToolFormat::Generic,
            r#"{"response": {"city": "Oslo", "n": 2}}"#,
        );
        assert_eq!(typed.content.as_deref(), Some(r#"{"city":"Oslo","n":2}"#));
        assert!(typed.calls.is_empty());
        let cut = parse(ToolFormat::Generic, r#"{"tool_call": {"name": "get_we"#);
        assert_eq!(
            cut.content.as_deref(),
            Some(r#"{"tool_call": {"name": "get_we"#)
        );
    }

    #[test]
    fn hermes_answers_keep_text_around_calls() {
        let p = parse(
            ToolFormat::Hermes,
            "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}\n</tool_call>",
        );
        assert_eq!(p.content.as_deref(), Some("Let me check."));
        assert_eq!(p.calls[0].name, "get_weather");
        assert_eq!(p.calls[0].arguments, r#"{"city":"Rome"}"#);
        let plain = parse(ToolFormat::Hermes, "No tools needed.");
        assert_eq!(plain.content.as_deref(), Some("No tools needed."));
        assert!(plain.calls.is_empty());
    }

    #[test]
    fn grammars_build_for_every_choice_and_a_lost_keyword_is_named() {
        for format in [ToolFormat::Generic, ToolFormat::Hermes] {
            for choice in [
                ToolChoice::Auto,
                ToolChoice::Required,
                ToolChoice::Function("get_time".into()),
            ] {
                for parallel in [false, true] {
                    let tools = weather(format, choice.clone(), parallel);
                    let c = constrain(&tools).expect("grammar");
                    assert!(c.grammar.contains("root ::="), "{}", c.grammar);
                    assert_eq!(
                        c.triggers.is_empty(),
                        !(format == ToolFormat::Hermes && choice == ToolChoice::Auto)
                    );
                }
            }
        }
        let mut bad = weather(ToolFormat::Generic, ToolChoice::Auto, true);
        bad.tools[0].parameters["properties"]["city"]["format"] = json!("email");
        bad.tools[0].parameters["properties"]["city"]["maxLength"] = json!(30);
        // Without `strict` the schema is a hint: decoding holds to what can be enforced (the
        // lost keyword, and the bound beside it, out of the grammar's schema only).
        let held = constrain(&bad).expect("a hint's unenforceable keywords are left out");
        let ResponseFormat::JsonSchema { schema, .. } = &held.format else {
            panic!("a schema");
        };
        assert!(!schema.to_string().contains("email"), "{schema}");
        assert!(
            schema.to_string().contains("\"maxLength\":30"),
            "the bound holds once the format is gone: {schema}"
        );
        assert_eq!(
            bad.tools[0].parameters["properties"]["city"]["format"],
            "email"
        );
        // With it, a contract: refused, the keyword named.
        bad.tools[0].strict = true;
        let err = constrain(&bad).expect_err("email format is not enforced");
        assert!(
            err.to_string()
                .contains("tools[0].function.parameters/properties/city/format"),
            "{err}"
        );
        // What no keyword's removal fixes is refused either way.
        bad.tools[0].strict = false;
        bad.tools[0].parameters["properties"]["city"] = json!(true);
        let err = constrain(&bad).expect_err("a boolean schema");
        assert!(err.to_string().contains("boolean schema"), "{err}");
        let missing = weather(
            ToolFormat::Generic,
            ToolChoice::Function("nope".into()),
            false,
        );
        assert!(constrain(&missing).is_err());
    }

    #[test]
    fn definitions_of_each_tool_move_to_the_root_under_their_own_names() {
        let mut tools = weather(ToolFormat::Generic, ToolChoice::Required, false);
        for t in &mut tools.tools {
            t.parameters = json!({
                "type": "object",
                "properties": {"place": {"$ref": "#/$defs/Place"}},
                "required": ["place"],
                "$defs": {"Place": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
            });
        }
        let c = constrain(&tools).expect("grammar");
        let ResponseFormat::JsonSchema { schema, .. } = &c.format else {
            panic!("a schema");
        };
        assert!(schema["$defs"]["t0-Place"].is_object(), "{schema}");
        assert!(schema["$defs"]["t1-Place"].is_object(), "{schema}");
        assert!(schema.to_string().contains("#/$defs/t1-Place"), "{schema}");
        tools.tools[0].parameters["properties"]["place"]["$ref"] = json!("#/properties/x");
        assert!(constrain(&tools).is_err());
    }

    #[test]
    fn call_ids_are_stable_and_distinct() {
        let job = "0b7c2a9e-1111-4222-8333-444455556666";
        assert_eq!(call_id(job, 0, 1), call_id(job, 0, 1));
        assert_ne!(call_id(job, 0, 0), call_id(job, 0, 1));
        assert_ne!(call_id(job, 1, 0), call_id(job, 0, 1));
        assert!(call_id(job, 0, 0).starts_with("call_"));
    }
}
