//! Remote models (seed 004's `openai`/`vllm` types, `settings.remote_models`): a front Tollgate
//! serves a model that lives on an upstream — here a second, real Tollgate server on the
//! scripted engine, with a key of its own — behind the front's keys, quotas and budgets.
//!
//! The upstream's key reaches the front only as a secret file (or, in the process test, an
//! environment variable) named by the configuration; the tests check it never lands in the
//! front's database or log.

mod common;

use std::path::{Path, PathBuf};

use common::{code, free_port, issue_key, merge, scratch_dir, ServerProcess, TestApp, TestKey};
use reqwest::Method;
use sea_orm::{Database, EntityTrait};
use serde_json::{json, Value};
use tollgate::models::_entities::{jobs, model_configs};

/// An upstream Tollgate (scripted engine) and a key of its own, written to a secret file.
struct Upstream {
    app: TestApp,
    key: TestKey,
    secrets: PathBuf,
}

impl Upstream {
    async fn start() -> Self {
        let app = TestApp::spawn_scripted(|_| {}).await;
        let key = app.key_with_calls(None).await;
        let secrets = scratch_dir("remote-secrets");
        std::fs::write(secrets.join("upstream.key"), format!("{}\n", key.secret))
            .expect("secret file");
        Self { app, key, secrets }
    }

    fn base_url(&self) -> String {
        format!("{}/v1", self.app.base)
    }

    fn key_file(&self) -> PathBuf {
        self.secrets.join("upstream.key")
    }

    /// What the upstream answers to `body` itself (on its own default model).
    async fn direct(&self, path: &str, body: &Value) -> Value {
        let own = self.app.key_with_calls(None).await;
        let body = merge(body.clone(), &json!({"model": "smollm2"}));
        let (status, answer) = self.app.post(Some(&own), path, &body).await;
        assert_eq!(status, 200, "{answer}");
        answer
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.secrets);
    }
}

/// A front server whose `settings.remote_models` holds one upstream, `cluster`.
async fn front_for(base_url: &str, key_file: &Path, extra: Value) -> TestApp {
    let entry = merge(
        json!({
            "id": "cluster",
            "base_url": base_url,
            "model": "smollm2",
            "api_key_file": key_file,
        }),
        &extra,
    );
    TestApp::spawn_scripted(move |s| s["remote_models"] = json!([entry])).await
}

fn chat(text: &str) -> Value {
    json!({
        "model": "cluster",
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 16,
    })
}

/// A streamed request's status and its `data:` events (without `[DONE]`).
async fn stream(app: &TestApp, key: &TestKey, path: &str, body: &Value) -> (u16, Vec<Value>) {
    let resp = app
        .request(Method::POST, Some(key), path)
        .json(body)
        .send()
        .await
        .expect("request");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    let events = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap_or_else(|_| json!({ "raw": d })))
        .collect();
    (status, events)
}

fn tokens(row: &tollgate::models::_entities::api_keys::Model) -> (i64, i64) {
    (row.prompt_tokens_used, row.gen_tokens_used)
}

fn usage_of(answer: &Value) -> (i64, i64) {
    (
        answer["usage"]["prompt_tokens"].as_i64().expect("usage"),
        answer["usage"]["completion_tokens"]
            .as_i64()
            .expect("usage"),
    )
}

#[tokio::test]
async fn a_remote_model_answers_every_generation_route_with_the_upstreams_text_and_usage() {
    let upstream = Upstream::start().await;
    let front = front_for(&upstream.base_url(), &upstream.key_file(), json!({})).await;
    let key = front.key_with_calls(None).await;

    // Listed like any model, with its configured context.
    let (status, models) = front.get(Some(&key), "/v1/models/cluster").await;
    assert_eq!(status, 200, "{models}");

    // Chat, not streamed: the upstream's text and usage, on the front's counters.
    let body = chat("tell the remote cluster hello");
    let (status, answer) = front.post(Some(&key), "/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{answer}");
    let direct = upstream.direct("/v1/chat/completions", &body).await;
    let text = direct["choices"][0]["message"]["content"].clone();
    assert!(
        text.as_str().is_some_and(|t| t.contains("hello")),
        "{direct}"
    );
    assert_eq!(answer["choices"][0]["message"]["content"], text);
    assert_eq!(answer["model"], "cluster");
    assert_eq!(answer["usage"], direct["usage"]);
    let (prompt, generated) = usage_of(&answer);
    let row = front.key_row(&key).await;
    assert_eq!(row.calls_used, 1);
    assert_eq!(
        tokens(&row),
        (prompt, generated),
        "settled to the upstream's usage"
    );
    assert_eq!(upstream.app.calls_used(&upstream.key).await, 1);

    // Streamed: the same text, arriving in pieces, and the upstream's usage at the end.
    let streamed = merge(
        body.clone(),
        &json!({"stream": true, "stream_options": {"include_usage": true}}),
    );
    let (status, events) = stream(&front, &key, "/v1/chat/completions", &streamed).await;
    assert_eq!(status, 200, "{events:?}");
    let pieces: Vec<&str> = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .filter(|t| !t.is_empty())
        .collect();
    assert_eq!(Some(pieces.concat().as_str()), text.as_str(), "{events:?}");
    assert!(pieces.len() >= 2, "token by token: {pieces:?}");
    let last = events.last().expect("events");
    assert_eq!(last["usage"], direct["usage"], "{events:?}");
    let row = front.key_row(&key).await;
    assert_eq!(row.calls_used, 2);
    assert_eq!(tokens(&row), (2 * prompt, 2 * generated));

    // A raw completion goes to the upstream's /v1/completions.
    let raw = json!({"model": "cluster", "prompt": "raw words for the cluster", "max_tokens": 8});
    let (status, answer) = front.post(Some(&key), "/v1/completions", &raw).await;
    assert_eq!(status, 200, "{answer}");
    let direct = upstream.direct("/v1/completions", &raw).await;
    assert_eq!(answer["choices"][0]["text"], direct["choices"][0]["text"]);

    // Seed 004's inference route names the model by id.
    let (status, answer) = front
        .post(
            Some(&key),
            "/llm/inference/",
            json!({"model_id": "cluster", "prompt": "tell the remote cluster hello"}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["response"], text);

    // Embeddings are forwarded too: the upstream's vectors, in input order.
    let embed = json!({"model": "cluster", "input": ["a cat", "a dog"]});
    let (status, answer) = front.post(Some(&key), "/v1/embeddings", &embed).await;
    assert_eq!(status, 200, "{answer}");
    let direct = upstream.direct("/v1/embeddings", &embed).await;
    assert_eq!(answer["data"], direct["data"]);
    assert_eq!(front.calls_used(&key).await, 5);
}

#[tokio::test]
async fn tools_and_response_formats_are_forwarded_and_the_upstreams_calls_come_back() {
    let upstream = Upstream::start().await;
    let front = front_for(&upstream.base_url(), &upstream.key_file(), json!({})).await;
    let key = front.key_with_calls(None).await;
    let tools = json!([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}]);
    let named = json!({"type": "function", "function": {"name": "get_weather"}});
    let ask = merge(
        chat("weather in Paris?"),
        &json!({"tools": tools, "tool_choice": named}),
    );

    // The upstream (scripted: a value the grammar accepts) calls the tool; the front shapes
    // the call as its own, whole and streamed.
    let (status, answer) = front.post(Some(&key), "/v1/chat/completions", &ask).await;
    assert_eq!(status, 200, "{answer}");
    let direct = upstream.direct("/v1/chat/completions", &ask).await;
    assert_eq!(
        direct["choices"][0]["finish_reason"], "tool_calls",
        "{direct}"
    );
    let choice = &answer["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{answer}");
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "get_weather", "{answer}");
    let direct_call = &direct["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(
        serde_json::from_str::<Value>(call["function"]["arguments"].as_str().unwrap_or("?"))
            .expect("JSON"),
        serde_json::from_str::<Value>(direct_call["function"]["arguments"].as_str().unwrap_or("?"))
            .expect("JSON"),
    );
    let (status, events) = stream(
        &front,
        &key,
        "/v1/chat/completions",
        &merge(ask.clone(), &json!({"stream": true})),
    )
    .await;
    assert_eq!(status, 200, "{events:?}");
    let streamed_name: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["tool_calls"][0]["function"]["name"].as_str())
        .collect();
    assert_eq!(streamed_name, "get_weather", "{events:?}");

    // The result goes back through the front to the upstream with the call it answers.
    let follow = merge(
        chat("weather in Paris?"),
        &json!({"tools": tools, "messages": [
            {"role": "user", "content": "weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": "sunny"}]}),
    );
    let (status, answer) = front
        .post(Some(&key), "/v1/chat/completions", &follow)
        .await;
    assert_eq!(status, 200, "{answer}");
    // What reached the upstream: the assistant's call (same id, name, arguments) and the
    // tool's result answering that id.
    let received = upstream.app.jobs_of(&upstream.key).await;
    let last = received
        .iter()
        .find(|j| j.request.contains("tool_call_id"))
        .expect("a request with the tool's result reached the upstream");
    let request: Value = serde_json::from_str(&last.request).expect("stored request");
    let messages = request["prompt"]["messages"].as_array().expect("a chat");
    assert_eq!(messages.len(), 3, "{request}");
    let sent_call = &messages[1]["tool_calls"][0];
    assert_eq!(sent_call["id"], call["id"], "{request}");
    assert_eq!(sent_call["name"], "get_weather", "{request}");
    assert_eq!(
        serde_json::from_str::<Value>(sent_call["arguments"].as_str().unwrap_or("?")).ok(),
        serde_json::from_str::<Value>(call["function"]["arguments"].as_str().unwrap_or("?")).ok(),
        "{request}"
    );
    assert_eq!(messages[2]["role"], "tool", "{request}");
    assert_eq!(messages[2]["tool_call_id"], call["id"], "{request}");
    assert_eq!(messages[2]["content"], "sunny", "{request}");

    // response_format is the upstream's to enforce: forwarded, its JSON answer comes back.
    let schema =
        json!({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]});
    let structured = merge(
        chat("a number"),
        &json!({"response_format": {"type": "json_schema",
                                    "json_schema": {"name": "num", "schema": schema}}}),
    );
    let (status, answer) = front
        .post(Some(&key), "/v1/chat/completions", &structured)
        .await;
    assert_eq!(status, 200, "{answer}");
    let content = answer["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default();
    let value: Value = serde_json::from_str(content).unwrap_or_else(|e| panic!("{e}: {answer}"));
    assert!(value["n"].is_i64(), "{answer}");
    assert_eq!(front.calls_used(&key).await, 4);
}

#[tokio::test]
async fn an_api_process_without_a_worker_serves_a_remote_model_over_the_redis_queue() {
    // Production's shape: no engine in the API process, jobs and events through Redis.
    let redis =
        std::env::var("TOLLGATE_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let upstream = Upstream::start().await;
    let entry = json!({
        "id": "cluster",
        "base_url": upstream.base_url(),
        "model": "smollm2",
        "api_key_file": upstream.key_file(),
    });
    let prefix = format!("tgremote{}", uuid::Uuid::new_v4().simple());
    let front = TestApp::spawn_scripted(move |s| {
        s["queue"]["url"] = json!(redis);
        s["queue"]["prefix"] = json!(prefix);
        s["queue"]["embedded_worker"] = json!(false);
        s["remote_models"] = json!([entry]);
    })
    .await;
    let key = front.key_with_calls(None).await;

    let body = chat("across the redis queue");
    let (status, answer) = front.post(Some(&key), "/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{answer}");
    let direct = upstream.direct("/v1/chat/completions", &body).await;
    assert_eq!(
        answer["choices"][0]["message"]["content"],
        direct["choices"][0]["message"]["content"]
    );
    let streamed = merge(body, &json!({"stream": true}));
    let (status, events) = stream(&front, &key, "/v1/chat/completions", &streamed).await;
    assert_eq!(status, 200);
    let text: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        Some(text.as_str()),
        direct["choices"][0]["message"]["content"].as_str()
    );
    assert_eq!(front.calls_used(&key).await, 2);
}

#[tokio::test]
async fn a_front_key_over_its_quota_is_refused_without_calling_the_upstream() {
    let upstream = Upstream::start().await;
    let front = front_for(&upstream.base_url(), &upstream.key_file(), json!({})).await;
    let key = front.key_with_calls(Some(1)).await;

    let (status, answer) = front
        .post(Some(&key), "/v1/chat/completions", chat("first"))
        .await;
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = front
        .post(Some(&key), "/v1/chat/completions", chat("second"))
        .await;
    assert_eq!(status, 429, "{answer}");
    assert_eq!(code(&answer), "quota_exceeded");
    assert_eq!(upstream.app.calls_used(&upstream.key).await, 1);
    assert_eq!(upstream.app.job_count().await, 1);
}

#[tokio::test]
async fn an_upstream_that_is_down_gives_a_502_and_the_call_is_refunded() {
    let secrets = scratch_dir("remote-down");
    let key_file = secrets.join("k");
    std::fs::write(&key_file, "tg_not_used").expect("secret");
    let down = format!("http://127.0.0.1:{}/v1", free_port());
    let front = front_for(&down, &key_file, json!({})).await;
    let key = front.key_with_calls(Some(5)).await;

    let (status, answer) = front
        .post(Some(&key), "/v1/chat/completions", chat("anyone there"))
        .await;
    assert_eq!(status, 502, "{answer}");
    assert_eq!(code(&answer), "upstream_error");
    assert_eq!(answer["error"]["type"], "server_error");
    assert!(
        answer["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("cannot connect") && m.contains("refunded")),
        "{answer}"
    );

    // A streamed request ends with the same code in its error event.
    let streamed = merge(chat("anyone there"), &json!({"stream": true}));
    let (status, events) = stream(&front, &key, "/v1/chat/completions", &streamed).await;
    assert_eq!(status, 200);
    assert!(
        events.iter().any(|e| code(e) == "upstream_error"),
        "{events:?}"
    );

    let row = front.key_row(&key).await;
    assert_eq!(row.calls_used, 0, "both calls refunded");
    assert_eq!(tokens(&row), (0, 0), "reservations given back");
    let _ = std::fs::remove_dir_all(&secrets);
}

#[tokio::test]
async fn an_upstream_that_does_not_answer_in_time_gives_a_504() {
    // Accepts connections and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = silent.local_addr().expect("addr");
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            open.push(socket);
        }
    });
    let secrets = scratch_dir("remote-silent");
    let key_file = secrets.join("k");
    std::fs::write(&key_file, "tg_not_used").expect("secret");
    let front = front_for(
        &format!("http://{addr}/v1"),
        &key_file,
        json!({"timeout_seconds": 1}),
    )
    .await;
    let key = front.key_with_calls(None).await;

    let (status, answer) = front
        .post(Some(&key), "/v1/chat/completions", chat("hello?"))
        .await;
    assert_eq!(status, 504, "{answer}");
    assert_eq!(code(&answer), "upstream_timeout");
    assert_eq!(front.calls_used(&key).await, 0);
    held.abort();
    let _ = std::fs::remove_dir_all(&secrets);
}

#[tokio::test]
async fn upstream_refusals_come_back_as_502_naming_the_cause_but_never_the_key() {
    let upstream = Upstream::start().await;
    let wrong = upstream.secrets.join("wrong.key");
    let bogus = format!("tg_wrong_{}", "ab".repeat(32));
    std::fs::write(&wrong, &bogus).expect("secret");
    let front = front_for(&upstream.base_url(), &wrong, json!({})).await;
    let key = front.key_with_calls(None).await;
    let (status, answer) = front
        .post(Some(&key), "/v1/chat/completions", chat("hi"))
        .await;
    assert_eq!(status, 502, "{answer}");
    assert_eq!(code(&answer), "upstream_error");
    let message = answer["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("credential"), "{answer}");
    assert!(!message.contains(&bogus), "{answer}");

    // A model the upstream does not have: its own message comes through.
    let front = front_for(
        &upstream.base_url(),
        &upstream.key_file(),
        json!({"model": "no-such-model"}),
    )
    .await;
    let key = front.key_with_calls(None).await;
    let (status, answer) = front
        .post(Some(&key), "/v1/chat/completions", chat("hi"))
        .await;
    assert_eq!(status, 502, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("404") && m.contains("no-such-model")),
        "{answer}"
    );
    assert_eq!(front.calls_used(&key).await, 0);
}

#[tokio::test]
async fn a_seed_004_configuration_loads_an_upstream_named_by_a_secret_file_only() {
    let upstream = Upstream::start().await;
    let secrets = upstream.secrets.clone();
    let front = TestApp::spawn_scripted(move |s| {
        s["remote_credentials"] = json!({"env": [], "dir": secrets});
    })
    .await;
    let admin = front.admin_key().await;
    let client = front.key_with_calls(None).await;

    // A key in model_kwargs is refused before anything is stored.
    let (status, answer) = front
        .post(
            Some(&admin),
            "/llm/configure_model/",
            json!({"model_id": "leaky", "model_name": "smollm2", "model_type": "vllm",
                   "model_kwargs": {"base_url": upstream.base_url(), "api_key": upstream.key.secret}}),
        )
        .await;
    assert_eq!(status, 422, "{answer}");
    assert_eq!(code(&answer), "invalid_model_kwargs");
    assert!(!answer.to_string().contains(&upstream.key.secret));

    // A variable the operator did not allow cannot be sent to an upstream.
    let (status, answer) = front
        .post(
            Some(&admin),
            "/llm/configure_model/",
            json!({"model_id": "env", "model_name": "smollm2", "model_type": "vllm",
                   "model_kwargs": {"base_url": upstream.base_url(), "api_key_env": "DATABASE_URL"}}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let env_config = answer["config_id"].as_str().expect("config_id").to_string();
    let (status, answer) = front
        .post_empty(Some(&admin), &format!("/llm/load_model/{env_config}"))
        .await;
    assert_eq!(status, 422, "{answer}");
    assert_eq!(code(&answer), "model_not_loadable");
    assert!(
        answer.to_string().contains("remote_credentials"),
        "{answer}"
    );

    // The secret file, named relative to the secrets folder.
    let (status, answer) = front
        .post(
            Some(&admin),
            "/llm/configure_model/",
            json!({"model_id": "remote-smol", "model_name": "smollm2", "model_type": "vllm",
                   "model_kwargs": {"base_url": upstream.base_url(), "api_key_file": "upstream.key",
                                    "timeout_seconds": 30, "temperature": 0}}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let config_id = answer["config_id"].as_str().expect("config_id").to_string();
    let (status, answer) = front
        .post_empty(Some(&admin), &format!("/llm/load_model/{config_id}"))
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["message"], "Model loaded successfully");
    let (_, loaded) = front.get(Some(&client), "/llm/loaded_models/").await;
    assert!(
        loaded
            .as_array()
            .is_some_and(|l| l.contains(&json!("remote-smol"))),
        "{loaded}"
    );

    let (status, answer) = front
        .post(
            Some(&client),
            "/llm/inference/",
            json!({"model_id": "remote-smol", "prompt": "What is the capital of France?"}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert!(
        answer["response"]
            .as_str()
            .is_some_and(|r| r.contains("France")),
        "{answer}"
    );
    assert_eq!(upstream.app.calls_used(&upstream.key).await, 1);

    // Nothing the front stored holds the key.
    let configs = model_configs::Entity::find()
        .all(&front.ctx.db)
        .await
        .expect("configs");
    assert!(configs.len() >= 2);
    let jobs = jobs::Entity::find().all(&front.ctx.db).await.expect("jobs");
    let stored = format!("{configs:?} {jobs:?}");
    assert!(!stored.contains(&upstream.key.secret), "the key was stored");

    let (status, _) = front
        .post_empty(Some(&admin), "/llm/unload_model/remote-smol")
        .await;
    assert_eq!(status, 200);
    let (status, answer) = front
        .post(
            Some(&client),
            "/llm/inference/",
            json!({"model_id": "remote-smol", "prompt": "again"}),
        )
        .await;
    assert_eq!(status, 404, "{answer}");
}

/// `tollgate-cli start` (test config) with trace logs into a file and `upstream_key` in
/// `OPENAI_API_KEY`.
fn start_front(dir: &Path, upstream_key: &str) -> ServerProcess {
    ServerProcess::start(dir, "test", |cmd| {
        cmd
            // As much as can be logged: not even trace logs may carry the key.
            .env("TOLLGATE_LOG_LEVEL", "trace")
            .env("RUST_LOG", "trace")
            .env("OPENAI_API_KEY", upstream_key);
    })
}

#[tokio::test]
async fn the_upstream_key_from_an_environment_variable_never_reaches_the_database_or_the_log() {
    let upstream = Upstream::start().await;
    let dir = scratch_dir("remote-front");
    let mut front = start_front(&dir, &upstream.key.secret);
    let http = reqwest::Client::new();
    front.wait_ready(&http).await;
    let db = Database::connect(format!("sqlite://{}/tollgate.sqlite", dir.display()))
        .await
        .expect("front database");
    let admin = issue_key(&db, common::admin_params()).await;
    let post = |path: &str, body: Value| {
        http.post(front.url(path))
            .bearer_auth(&admin.secret)
            .json(&body)
            .send()
    };

    // Seed 004's own shape, pointed at the upstream; the key is OPENAI_API_KEY's.
    let resp = post(
        "/llm/configure_model/",
        json!({"model_id": "example_model", "model_name": "smollm2", "model_type": "openai",
               "model_kwargs": {"base_url": upstream.base_url(), "api_key_env": "OPENAI_API_KEY",
                                "temperature": 0.7}}),
    )
    .await
    .expect("configure");
    let (status, answer) = common::read(resp).await;
    assert_eq!(status, 200, "{answer}");
    let config_id = answer["config_id"].as_str().expect("config_id").to_string();
    let resp = post(&format!("/llm/load_model/{config_id}"), json!({}))
        .await
        .expect("load");
    let (status, answer) = common::read(resp).await;
    assert_eq!(status, 200, "{answer}");

    for (path, body) in [
        (
            "/llm/inference/",
            json!({"model_id": "example_model", "prompt": "What is the capital of France?",
                   "inference_kwargs": {"max_tokens": 50}}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "example_model", "stream": true,
                   "messages": [{"role": "user", "content": "stream through the front"}]}),
        ),
    ] {
        let resp = post(path, body).await.expect("generate");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        assert_eq!(status, 200, "{text}");
        assert!(text.contains("echo"), "{text}");
    }
    assert_eq!(upstream.app.calls_used(&upstream.key).await, 2);

    let configs = model_configs::Entity::find()
        .all(&db)
        .await
        .expect("configs");
    let jobs = jobs::Entity::find().all(&db).await.expect("jobs");
    assert_eq!(configs.len(), 1);
    let stored = format!("{configs:?} {jobs:?}");
    assert!(stored.contains("OPENAI_API_KEY"), "{stored}");
    assert!(!stored.contains(&upstream.key.secret), "the key was stored");
    let log = front.log();
    assert!(log.contains("remote model loaded"), "{log}");
    assert!(log.contains("TRACE"), "the log was not at trace level");
    assert!(
        !log.contains(&upstream.key.secret),
        "the upstream key reached the log"
    );
    drop(db);
    drop(front);
    let _ = std::fs::remove_dir_all(&dir);
}
