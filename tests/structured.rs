//! Structured output (`response_format`) on the OpenAI routes: answers constrained by a
//! grammar parse, and with a schema they validate; schemas the grammar cannot enforce are
//! refused by name before anything is spent.

mod common;

use common::{code, TestApp};
use serde_json::{json, Value};

/// A small person record: short enough to finish well inside 48 tokens.
fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "cat": {"type": "boolean"}
        },
        "required": ["name", "age", "cat"],
        "additionalProperties": false
    })
}

/// The checks [`person_schema`] makes, written out.
fn assert_person(text: &str) {
    let value: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    let obj = value
        .as_object()
        .unwrap_or_else(|| panic!("an object: {text}"));
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["age", "cat", "name"], "{text}");
    let name = obj["name"]
        .as_str()
        .unwrap_or_else(|| panic!("name: {text}"));
    assert!((1..=12).contains(&name.chars().count()), "{text}");
    let age = obj["age"].as_i64().unwrap_or_else(|| panic!("age: {text}"));
    assert!((0..=120).contains(&age), "{text}");
    assert!(obj["cat"].is_boolean(), "{text}");
}

fn person_format() -> Value {
    json!({"type": "json_schema",
           "json_schema": {"name": "person", "strict": true, "schema": person_schema()}})
}

#[tokio::test]
async fn json_schema_answers_parse_and_validate_on_both_routes() {
    let app = TestApp::spawn().await;
    let key = app.key_with_calls(None).await;
    let prompt = "Invent a person. Give a name, an age and whether they have a cat, as JSON.";
    for (temperature, seed) in [(0.0, 0), (0.8, 7)] {
        let (status, body) = app
            .post(
                Some(&key),
                "/v1/chat/completions",
                json!({"messages": [{"role": "user", "content": prompt}],
                       "response_format": person_format(), "max_tokens": 48,
                       "temperature": temperature, "seed": seed}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["choices"][0]["finish_reason"], "stop", "{body}");
        assert_person(
            body["choices"][0]["message"]["content"]
                .as_str()
                .unwrap_or_default(),
        );
    }
    let (status, body) = app
        .post(
            Some(&key),
            "/v1/completions",
            json!({"prompt": format!("{prompt}\n"), "response_format": person_format(),
                   "max_tokens": 48, "temperature": 0}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["finish_reason"], "stop", "{body}");
    assert_person(body["choices"][0]["text"].as_str().unwrap_or_default());
}

#[tokio::test]
async fn json_object_answers_are_one_object_streamed_or_not() {
    let app = TestApp::spawn().await;
    let key = app.key_with_calls(None).await;
    let request = json!({
        "messages": [{"role": "user", "content": "What is 2+2? Answer as JSON like {\"answer\": 0}."}],
        "response_format": {"type": "json_object"}, "max_tokens": 48, "temperature": 0
    });
    let (status, plain) = app
        .post(Some(&key), "/v1/chat/completions", request.clone())
        .await;
    assert_eq!(status, 200, "{plain}");
    let text = plain["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default();
    assert_eq!(plain["choices"][0]["finish_reason"], "stop", "{plain}");
    let value: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    assert!(value.is_object(), "{text}");

    let mut streamed = request;
    streamed["stream"] = json!(true);
    let resp = app
        .request(reqwest::Method::POST, Some(&key), "/v1/chat/completions")
        .json(&streamed)
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status().as_u16(), 200);
    let body = resp.text().await.expect("body");
    let pieces = common::streamed_chat_text(&body);
    assert_eq!(
        pieces, text,
        "greedy: the stream adds up to the same object"
    );
}

#[tokio::test]
async fn schemas_the_grammar_cannot_enforce_are_refused_by_name_and_spend_nothing() {
    let app = TestApp::spawn_scripted(|_| {}).await;
    let key = app.key_with_calls(Some(3)).await;
    let with_schema = |schema: Value| {
        json!({"messages": [{"role": "user", "content": "hi"}],
               "response_format": {"type": "json_schema",
                                   "json_schema": {"name": "x", "schema": schema}}})
    };
    let cases = [
        (
            with_schema(json!({"type": "object",
                               "properties": {"mail": {"type": "string", "format": "email"},
                                              "score": {"type": "number", "maximum": 1}},
                               "required": ["mail", "score"]})),
            "unsupported_schema",
            vec![
                "#/properties/mail/format",
                "email",
                "#/properties/score/maximum",
            ],
        ),
        (
            with_schema(json!({"$ref": "https://example.com/person.json"})),
            "unsupported_schema",
            vec!["$ref", "https://example.com/person.json"],
        ),
        (
            with_schema(json!({"type": "array", "items": {"type": "string"}, "uniqueItems": true})),
            "unsupported_schema",
            vec!["#/uniqueItems"],
        ),
        (
            with_schema(json!({"$ref": "#/$defs/missing"})),
            "invalid_response_format",
            vec!["#/$defs/missing"],
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}],
                   "response_format": {"type": "json_schema",
                                       "json_schema": {"name": "no spaces please", "schema": {}}}}),
            "invalid_response_format",
            vec!["name"],
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}],
                   "response_format": {"type": "yaml"}}),
            "invalid_body",
            vec!["yaml"],
        ),
    ];
    for (body, expected, named) in cases {
        let (status, resp) = app.post(Some(&key), "/v1/chat/completions", &body).await;
        assert_eq!(code(&resp), expected, "{body}: {resp}");
        assert_eq!(
            status,
            if expected == "invalid_body" { 422 } else { 400 },
            "{resp}"
        );
        let message = resp["error"]["message"].as_str().unwrap_or_default();
        for part in named {
            assert!(message.contains(part), "{part} in {message}");
        }
    }
    assert_eq!(app.calls_used(&key).await, 0);
    assert_eq!(app.job_count().await, 0);
}

#[tokio::test]
async fn the_scripted_engine_answers_a_value_the_schema_accepts() {
    let app = TestApp::spawn_scripted(|_| {}).await;
    let key = app.key_with_calls(None).await;
    let (status, body) = app
        .post(
            Some(&key),
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "anything"}],
                   "response_format": person_format()}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let text = body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default();
    let value: Value = serde_json::from_str(text).expect("JSON");
    assert_eq!(value, json!({"name": "a", "age": 0, "cat": false}));
    // The job carries the grammar, so a worker elsewhere needs nothing else.
    let job = &app.jobs_of(&key).await[0];
    let request: Value = serde_json::from_str(&job.request).expect("request");
    let output = &request["params"]["controls"]["output"];
    assert_eq!(output["format"]["type"], "json_schema");
    assert!(output["grammar"]
        .as_str()
        .is_some_and(|g| g.contains("root ::=")));
}
