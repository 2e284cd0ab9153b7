//! The model's own chat template (the Jinja text in its GGUF's `tokenizer.chat_template`),
//! rendered as Hugging Face's `apply_chat_template` renders it: `trim_blocks`,
//! `lstrip_blocks`, Python's string methods, `tojson` written like Python's `json.dumps`,
//! `raise_exception` and `strftime_now`. llama.cpp's own engine only recognises a list of
//! known templates and knows nothing of tools; a model without a template, or one minijinja
//! cannot compile, falls back to it.
//!
//! Compiled templates are kept per template text (at most [`MAX_COMPILED`]).

use std::{
    collections::HashMap,
    fmt::Write as _,
    hash::{Hash, Hasher},
    sync::{Arc, Mutex},
};

use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use minijinja::{value::Kwargs, Environment, Error, ErrorKind, Value as JinjaValue};
use serde_json::{json, Value};

use super::{
    tools::{self, ToolFormat, ToolUse},
    ChatMessage, EngineError,
};

/// Most compiled templates kept (one per distinct template text; a server holds a few models).
const MAX_COMPILED: usize = 16;

static COMPILED: Mutex<Option<HashMap<u64, Arc<Environment<'static>>>>> = Mutex::new(None);

const NAME: &str = "chat";

/// The model's template text, if its GGUF has one.
#[must_use]
pub fn source(model: &LlamaModel) -> Option<String> {
    model
        .chat_template(None)
        .ok()
        .and_then(|t| t.to_string().ok())
}

/// How the model writes tool calls (from its template).
#[must_use]
pub fn tool_format(model: &LlamaModel) -> ToolFormat {
    tools::format_of(source(model).as_deref())
}

/// The text of a special token (empty when the model has none).
fn token_text(model: &LlamaModel, token: llama_cpp_2::token::LlamaToken) -> String {
    if token.0 < 0 || token.0 >= model.vocab().n_tokens() {
        return String::new();
    }
    String::from_utf8_lossy(&model.vocab().token_to_piece(token, true, None)).into_owned()
}

/// Renders `messages` (and, for a template that writes calls itself, `tools`) to the text the
/// model reads, ending in an open assistant turn. The messages must already be prepared
/// ([`prepare`]).
///
/// # Errors
/// [`EngineError::Template`] when the template refuses the conversation (its own
/// `raise_exception`, e.g. roles that do not alternate) or cannot be applied.
pub fn render(
    model: &LlamaModel,
    messages: &[ChatMessage],
    tools: Option<&ToolUse>,
) -> Result<String, EngineError> {
    let Some(source) = source(model) else {
        return fallback(model, messages);
    };
    let bos = token_text(model, model.vocab().bos());
    let eos = token_text(model, model.vocab().eos());
    let Some(env) = compiled(&source, &bos, &eos) else {
        return fallback(model, messages);
    };
    let template = env
        .get_template(NAME)
        .map_err(|e| EngineError::Template(e.to_string()))?;
    let native_tools = tools
        .filter(|t| t.format == ToolFormat::Hermes)
        .map(|t| t.tools.iter().map(tools::Tool::openai).collect::<Vec<_>>());
    let ctx = json!({
        "messages": messages.iter().map(message_value).collect::<Vec<_>>(),
        "tools": native_tools,
        "add_generation_prompt": true,
        "bos_token": bos,
        "eos_token": eos,
    });
    let rendered = template
        .render(JinjaValue::from_serialize(&ctx))
        .map_err(|e| EngineError::Template(template_error(&e)))?;
    // Templates that write `{{ bos_token }}` would get a second one from the tokenizer, which
    // adds it itself for models that want one (as llama.cpp's server strips it too).
    Ok(match rendered.strip_prefix(&bos) {
        Some(rest) if !bos.is_empty() && model.vocab().should_add_bos() => rest.to_string(),
        _ => rendered,
    })
}

/// A template error's message, without minijinja's source excerpt.
fn template_error(e: &Error) -> String {
    match e.detail() {
        Some(d) => d.to_string(),
        None => e.to_string(),
    }
}

/// One message as Hugging Face templates read it.
fn message_value(m: &ChatMessage) -> Value {
    let mut v = json!({"role": m.role, "content": m.content});
    if !m.tool_calls.is_empty() {
        v["tool_calls"] = m
            .tool_calls
            .iter()
            .map(|c| {
                json!({
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": tools::arguments_value(&c.arguments)},
                })
            })
            .collect();
    }
    if let Some(id) = &m.tool_call_id {
        v["tool_call_id"] = json!(id);
    }
    if let Some(n) = &m.name {
        v["name"] = json!(n);
    }
    v
}

/// The conversation as the template will see it. A template that writes calls itself gets
/// the messages as they are; for any other, the tools are described in the system turn,
/// earlier calls are written as the generic JSON into their assistant turns, and tool results
/// become user turns (the roles such a template knows), as llama.cpp's server does.
#[must_use]
pub fn prepare(
    messages: &[ChatMessage],
    tools: Option<&ToolUse>,
    format: ToolFormat,
) -> Vec<ChatMessage> {
    if format == ToolFormat::Hermes {
        return messages.to_vec();
    }
    let mut out: Vec<ChatMessage> = messages
        .iter()
        .map(|m| {
            if m.role == "tool" {
                return ChatMessage::new(
                    "user",
                    tools::generic_result_text(
                        m.name.as_deref(),
                        m.tool_call_id.as_deref(),
                        &m.content,
                    ),
                );
            }
            if m.tool_calls.is_empty() {
                return ChatMessage::new(m.role.clone(), m.content.clone());
            }
            let calls = tools::generic_calls_text(&m.tool_calls);
            let content = if m.content.is_empty() {
                calls
            } else {
                format!("{}\n{calls}", m.content)
            };
            ChatMessage::new(m.role.clone(), content)
        })
        .collect();
    if let Some(tools) = tools {
        let offer = tools::generic_instructions(tools);
        match out.first_mut() {
            Some(first) if first.role == "system" => {
                first.content = format!("{offer}\n\n{}", first.content);
            }
            _ => out.insert(0, ChatMessage::new("system", offer)),
        }
    }
    out
}

/// llama.cpp's built-in template engine (it recognises the template by its text), or ChatML.
fn fallback(model: &LlamaModel, messages: &[ChatMessage]) -> Result<String, EngineError> {
    let template = model.chat_template(None).or_else(|_| {
        LlamaChatTemplate::new("chatml").map_err(|e| EngineError::Template(e.to_string()))
    })?;
    let chat = messages
        .iter()
        .map(|m| LlamaChatMessage::new(m.role.clone(), m.content.clone()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| EngineError::Template(e.to_string()))?;
    model
        .apply_chat_template(&template, &chat, true)
        .map_err(|e| EngineError::Template(e.to_string()))
}

/// The compiled template for this text, compiling it on first use; `None` when minijinja
/// cannot compile it.
fn compiled(source: &str, bos: &str, eos: &str) -> Option<Arc<Environment<'static>>> {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (source, bos, eos).hash(&mut h);
    let key = h.finish();
    let mut cache = COMPILED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let cache = cache.get_or_insert_with(HashMap::new);
    if let Some(env) = cache.get(&key) {
        return Some(env.clone());
    }
    let env = match environment(source.to_string()) {
        Ok(env) => Arc::new(env),
        Err(e) => {
            tracing::warn!(error = %e, "the model's chat template does not compile; using llama.cpp's built-in templates");
            return None;
        }
    };
    if cache.len() >= MAX_COMPILED {
        cache.clear();
    }
    cache.insert(key, env.clone());
    Some(env)
}

fn environment(source: String) -> Result<Environment<'static>, Error> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, msg))
    });
    env.add_function("strftime_now", |format: String| {
        chrono::Local::now().format(&format).to_string()
    });
    env.add_filter("tojson", tojson);
    env.add_template_owned(NAME, source)?;
    Ok(env)
}

/// `tojson` as Hugging Face defines it for chat templates: Python's `json.dumps` (separators
/// `", "` and `": "`, or `indent`), non-ASCII kept.
fn tojson(value: &JinjaValue, kwargs: Kwargs) -> Result<String, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let mut v = serde_json::to_value(value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    if sort_keys == Some(true) {
        sort(&mut v);
    }
    let mut out = String::new();
    python_json(&v, indent, 0, &mut out);
    Ok(out)
}

fn sort(v: &mut Value) {
    match v {
        Value::Object(map) => {
            let mut entries: Vec<(String, Value)> = std::mem::take(map).into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            for (k, mut val) in entries {
                sort(&mut val);
                map.insert(k, val);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(sort),
        _ => {}
    }
}

/// Writes `v` as Python's `json.dumps(v, ensure_ascii=False, indent=indent)` does.
fn python_json(v: &Value, indent: Option<usize>, depth: usize, out: &mut String) {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v {
        Value::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                python_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        Value::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                let _ = write!(out, "{}: ", Value::String(k.clone()));
                python_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        other => {
            let _ = write!(out, "{other}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render_source(source: &str, messages: &[ChatMessage], tools: Option<&ToolUse>) -> String {
        let env = environment(source.to_string()).expect("compiles");
        let native = tools.map(|t| {
            t.tools
                .iter()
                .map(|tool| json!({"type": "function", "function": {"name": tool.name, "parameters": tool.parameters}}))
                .collect::<Vec<_>>()
        });
        env.get_template(NAME)
            .expect("template")
            .render(JinjaValue::from_serialize(json!({
                "messages": messages.iter().map(message_value).collect::<Vec<_>>(),
                "tools": native,
                "add_generation_prompt": true,
                "bos_token": "<s>",
                "eos_token": "</s>",
            })))
            .expect("renders")
    }

    #[test]
    fn tojson_writes_like_python() {
        let v = JinjaValue::from_serialize(json!({"b": [1, "é"], "a": {}}));
        let compact = tojson(
            &v,
            Kwargs::from_iter(std::iter::empty::<(&str, JinjaValue)>()),
        )
        .expect("json");
        assert_eq!(compact, r#"{"b": [1, "é"], "a": {}}"#);
        let indented =
            tojson(&v, Kwargs::from_iter([("indent", JinjaValue::from(2))])).expect("json");
        assert_eq!(
            indented,
            "{\n  \"b\": [\n    1,\n    \"é\"\n  ],\n  \"a\": {}\n}"
        );
    }

    #[test]
    fn a_hermes_template_renders_tools_calls_and_results_itself() {
        // The tool parts of Qwen 2.5's template, shortened.
        let source = r#"{%- if tools %}<|im_start|>system
# Tools
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
For each function call, return a json object within <tool_call></tool_call> XML tags.<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}<|im_start|>assistant
{%- for tool_call in message.tool_calls %}
<tool_call>
{"name": "{{ tool_call.function.name }}", "arguments": {{ tool_call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"#;
        assert_eq!(tools::format_of(Some(source)), ToolFormat::Hermes);
        let tools = ToolUse {
            tools: vec![tools::Tool {
                name: "get_weather".into(),
                description: None,
                parameters: json!({"type": "object", "properties": {"city": {"type": "string"}}}),
                strict: false,
            }],
            choice: tools::ToolChoice::Auto,
            parallel: true,
            format: ToolFormat::Hermes,
            answer: None,
        };
        let messages = vec![
            ChatMessage::new("user", "Weather in Paris?"),
            ChatMessage {
                role: "assistant".into(),
                tool_calls: vec![tools::ToolCall {
                    id: "call_1".into(),
                    name: "get_weather".into(),
                    arguments: r#"{"city":"Paris"}"#.into(),
                }],
                ..ChatMessage::default()
            },
            ChatMessage {
                role: "tool".into(),
                content: "18 C".into(),
                tool_call_id: Some("call_1".into()),
                ..ChatMessage::default()
            },
        ];
        let prepared = prepare(&messages, Some(&tools), ToolFormat::Hermes);
        let text = render_source(source, &prepared, Some(&tools));
        assert!(
            text.contains(r#"{"type": "function", "function": {"name": "get_weather""#),
            "{text}"
        );
        assert!(
            text.contains(r#"{"name": "get_weather", "arguments": {"city": "Paris"}}"#),
            "{text}"
        );
        assert!(
            text.contains("<tool_response>\n18 C\n</tool_response>"),
            "{text}"
        );
        assert!(text.ends_with("<|im_start|>assistant\n"), "{text}");
    }

    #[test]
    fn a_template_without_tools_gets_them_in_the_system_turn_and_history_as_json() {
        let tools = ToolUse {
            tools: vec![tools::Tool {
                name: "get_time".into(),
                description: Some("Current time".into()),
                parameters: json!({"type": "object", "properties": {}}),
                strict: false,
            }],
            choice: tools::ToolChoice::Required,
            parallel: false,
            format: ToolFormat::Generic,
            answer: None,
        };
        let messages = vec![
            ChatMessage::new("user", "What time is it?"),
            ChatMessage {
                role: "assistant".into(),
                tool_calls: vec![tools::ToolCall {
                    id: "call_9".into(),
                    name: "get_time".into(),
                    arguments: "{}".into(),
                }],
                ..ChatMessage::default()
            },
            ChatMessage {
                role: "tool".into(),
                content: "12:00".into(),
                tool_call_id: Some("call_9".into()),
                name: Some("get_time".into()),
                ..ChatMessage::default()
            },
        ];
        let prepared = prepare(&messages, Some(&tools), ToolFormat::Generic);
        assert_eq!(prepared[0].role, "system");
        assert!(
            prepared[0].content.contains("\"get_time\""),
            "{}",
            prepared[0].content
        );
        assert!(prepared[0].content.contains("`tool_call`"));
        assert!(prepared[2].content.contains("\"tool_calls\""));
        assert_eq!(prepared[3].role, "user");
        assert!(prepared[3].content.contains("\"tool_response\""));
        assert!(prepared.iter().all(|m| m.tool_calls.is_empty()));
    }
}
