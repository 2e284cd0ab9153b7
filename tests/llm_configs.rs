//! Seed 004's `/llm/*` routes: configurations persist, load/unload really start and stop an
//! engine thread with its own worker, and inference runs on the loaded model.

mod common;

use common::{code, TestApp, TestKey};
use serde_json::{json, Value};
use tollgate::models::api_keys::{KeyParams, Scope};

const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

async fn admin_key(app: &TestApp) -> TestKey {
    app.issue_key(KeyParams {
        email: "ops@example.com".into(),
        scope: Scope::Admin,
        ..Default::default()
    })
    .await
}

async fn call(
    app: &TestApp,
    key: &TestKey,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = app
        .http
        .request(method, app.url(path))
        .bearer_auth(&key.secret);
    if let Some(b) = body {
        req = req.json(&b);
    }
    common::read(req.send().await.expect("request")).await
}

async fn post(app: &TestApp, key: &TestKey, path: &str, body: Option<Value>) -> (u16, Value) {
    call(app, key, reqwest::Method::POST, path, body).await
}

/// Names of this process's threads (the test server runs in-process).
fn engine_threads() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .filter(|n| n.starts_with("llama-"))
        .collect()
}

async fn wait_for_threads(pred: impl Fn(&[String]) -> bool) -> Vec<String> {
    for _ in 0..100 {
        let threads = engine_threads();
        if pred(&threads) {
            return threads;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    engine_threads()
}

#[tokio::test]
async fn configure_load_infer_unload_delete() {
    let app = TestApp::spawn().await;
    let admin = admin_key(&app).await;

    // The seed's documented request (an OpenAI model) is stored as a configuration...
    let (status, body) = post(
        &app,
        &admin,
        "/llm/configure_model/",
        Some(json!({
            "model_id": "example_model",
            "model_name": "gpt-3",
            "model_type": "openai",
            "model_kwargs": {"temperature": 0.7}
        })),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let remote = body["config_id"].as_str().expect("config_id").to_string();
    // ...but only local GGUF files load: a clear 422 naming what is available.
    let (status, body) = post(&app, &admin, &format!("/llm/load_model/{remote}"), None).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(code(&body), "model_not_loadable");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains(MODEL_FILE),
        "{body}"
    );

    let (status, body) = post(
        &app,
        &admin,
        "/llm/configure_model/",
        Some(json!({
            "model_id": "ex1",
            "model_name": MODEL_FILE,
            "model_type": "llama.cpp",
            "model_kwargs": {"temperature": 0, "max_tokens": 8, "context_size": 1024}
        })),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let config_id = body["config_id"].as_str().expect("config_id").to_string();

    let (status, list) = call(
        &app,
        &admin,
        reqwest::Method::GET,
        "/llm/configurations/",
        None,
    )
    .await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list.as_array().map(Vec::len), Some(2), "{list}");
    let (status, one) = call(
        &app,
        &admin,
        reqwest::Method::GET,
        &format!("/llm/configuration/{config_id}"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{one}");
    assert_eq!(
        one,
        json!({"config_id": config_id, "model_id": "ex1", "model_name": MODEL_FILE,
               "model_type": "llama.cpp",
               "model_kwargs": {"temperature": 0, "max_tokens": 8, "context_size": 1024}})
    );

    let before = engine_threads();
    assert!(!before.iter().any(|t| t == "llama-ex1"), "{before:?}");
    let (status, body) = post(&app, &admin, &format!("/llm/load_model/{config_id}"), None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["message"], "Model loaded successfully");
    let threads = wait_for_threads(|t| t.iter().any(|n| n == "llama-ex1")).await;
    assert!(threads.iter().any(|n| n == "llama-ex1"), "{threads:?}");
    let (_, body) = post(&app, &admin, &format!("/llm/load_model/{config_id}"), None).await;
    assert_eq!(body["message"], "Model already loaded");
    assert_eq!(
        engine_threads()
            .iter()
            .filter(|n| *n == "llama-ex1")
            .count(),
        1,
        "loading twice starts no second engine"
    );

    let (status, loaded) = call(
        &app,
        &admin,
        reqwest::Method::GET,
        "/llm/loaded_models/",
        None,
    )
    .await;
    assert_eq!(status, 200, "{loaded}");
    assert_eq!(loaded, json!(["smollm2", "ex1"]));

    // Inference on the loaded model (greedy from its kwargs) matches the same weights served as
    // the default model.
    let client = app.key_with_calls(Some(5)).await;
    let prompt = "What is the capital of France?";
    let (status, body) = post(
        &app,
        &client,
        "/llm/inference/",
        Some(json!({"model_id": "ex1", "prompt": prompt, "inference_kwargs": {"max_tokens": 8}})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let response = body["response"].as_str().expect("response").to_string();
    assert!(!response.trim().is_empty());
    let (status, base) = post(
        &app,
        &client,
        "/llm/inference/",
        Some(json!({"model_id": "smollm2", "prompt": prompt, "inference_kwargs": {"max_tokens": 8, "temperature": 0}})),
    )
    .await;
    assert_eq!(status, 200, "{base}");
    assert_eq!(base["response"], json!(response));
    assert_eq!(app.calls_used(&client).await, 2);

    // The OpenAI routes serve it too.
    let (_, models) = call(&app, &client, reqwest::Method::GET, "/v1/models", None).await;
    let ids: Vec<&str> = models["data"]
        .as_array()
        .map(|d| d.iter().filter_map(|m| m["id"].as_str()).collect())
        .unwrap_or_default();
    assert!(ids.contains(&"ex1"), "{models}");
    let (status, chat) = post(
        &app,
        &client,
        "/v1/chat/completions",
        Some(json!({"model": "ex1", "messages": [{"role": "user", "content": prompt}], "max_tokens": 8, "temperature": 0})),
    )
    .await;
    assert_eq!(status, 200, "{chat}");
    assert_eq!(chat["model"], "ex1");
    assert_eq!(chat["choices"][0]["message"]["content"], json!(response));
    assert_eq!(app.calls_used(&client).await, 3);

    // A loaded configuration cannot be deleted; unload first.
    let (status, body) = call(
        &app,
        &admin,
        reqwest::Method::DELETE,
        &format!("/llm/configuration/{config_id}"),
        None,
    )
    .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(code(&body), "config_in_use");

    let (status, body) = post(&app, &admin, "/llm/unload_model/ex1", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["message"], "Model unloaded successfully");
    let threads = wait_for_threads(|t| !t.iter().any(|n| n == "llama-ex1")).await;
    assert!(
        !threads.iter().any(|n| n == "llama-ex1"),
        "engine thread still up: {threads:?}"
    );
    let (_, loaded) = call(
        &app,
        &admin,
        reqwest::Method::GET,
        "/llm/loaded_models/",
        None,
    )
    .await;
    assert_eq!(loaded, json!(["smollm2"]));

    let jobs_before = app.job_count().await;
    let (status, body) = post(
        &app,
        &client,
        "/llm/inference/",
        Some(json!({"model_id": "ex1", "prompt": prompt})),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(code(&body), "model_not_found");
    assert_eq!(app.calls_used(&client).await, 3);
    assert_eq!(app.job_count().await, jobs_before);

    let (status, body) = call(
        &app,
        &admin,
        reqwest::Method::DELETE,
        &format!("/llm/configuration/{config_id}"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["detail"], "Configuration deleted successfully");
    let (status, _) = call(
        &app,
        &admin,
        reqwest::Method::GET,
        &format!("/llm/configuration/{config_id}"),
        None,
    )
    .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn management_needs_an_admin_key_and_bad_input_changes_nothing() {
    let app = TestApp::spawn().await;
    let admin = admin_key(&app).await;
    let client = app.key_with_calls(None).await;
    let good = json!({"model_id": "m", "model_name": MODEL_FILE, "model_type": "llama.cpp"});

    let (status, body) = post(&app, &client, "/llm/configure_model/", Some(good.clone())).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(code(&body), "admin_scope_required");
    for path in ["/llm/load_model/x", "/llm/unload_model/x"] {
        let (status, _) = post(&app, &client, path, None).await;
        assert_eq!(status, 403, "{path}");
    }
    let (status, _) = call(
        &app,
        &client,
        reqwest::Method::DELETE,
        "/llm/configuration/x",
        None,
    )
    .await;
    assert_eq!(status, 403);
    // Reading is open to any key.
    let (status, list) = call(
        &app,
        &client,
        reqwest::Method::GET,
        "/llm/configurations/",
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(list, json!([]));

    for (body, expected) in [
        (
            json!({"model_name": MODEL_FILE, "model_type": "llama.cpp"}),
            "invalid_body",
        ),
        (
            json!({"model_id": "a b", "model_name": MODEL_FILE, "model_type": "x"}),
            "invalid_config",
        ),
        (
            json!({"model_id": "m", "model_name": " ", "model_type": "x"}),
            "invalid_config",
        ),
    ] {
        let (status, resp) = post(&app, &admin, "/llm/configure_model/", Some(body)).await;
        assert_eq!(status, 422, "{resp}");
        assert_eq!(code(&resp), expected);
    }
    let (_, list) = call(
        &app,
        &admin,
        reqwest::Method::GET,
        "/llm/configurations/",
        None,
    )
    .await;
    assert_eq!(list, json!([]), "rejected configurations are not stored");

    // A path out of the models directory never loads.
    let (_, body) = post(
        &app,
        &admin,
        "/llm/configure_model/",
        Some(
            json!({"model_id": "escape", "model_name": "../Cargo.toml", "model_type": "llama.cpp"}),
        ),
    )
    .await;
    let escape = body["config_id"].as_str().expect("config_id").to_string();
    let (status, body) = post(&app, &admin, &format!("/llm/load_model/{escape}"), None).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(code(&body), "model_not_loadable");

    let (status, body) = post(&app, &admin, "/llm/load_model/no-such-config", None).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(code(&body), "config_not_found");
    let (status, body) = post(&app, &admin, "/llm/unload_model/smollm2", None).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(code(&body), "model_pinned");
    let (status, body) = post(&app, &admin, "/llm/unload_model/nothing", None).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(code(&body), "model_not_loaded");
    let (_, loaded) = call(
        &app,
        &admin,
        reqwest::Method::GET,
        "/llm/loaded_models/",
        None,
    )
    .await;
    assert_eq!(loaded, json!(["smollm2"]));
}

#[tokio::test]
async fn seed_002_engine_start_and_terminate_load_and_unload() {
    let app = TestApp::spawn().await;
    let admin = admin_key(&app).await;
    let (status, body) = post(
        &app,
        &admin,
        "/vllm_request/start",
        Some(json!({
            "HUGGING_FACE_HUB_TOKEN": "hf_never_used",
            "Model": MODEL_FILE,
            "MAX_MODEL_LEN": 1024,
            "SEED": 7
        })),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "healthy");
    let engine = body["container_id"]
        .as_str()
        .expect("container_id")
        .to_string();
    assert_eq!(engine, "SmolLM2-135M-Instruct.Q4_1");
    let endpoint = body["vLLM_endpoint"].as_str().expect("endpoint");
    assert_eq!(endpoint, format!("{}/v1", app.base));
    let (_, loaded) = call(
        &app,
        &admin,
        reqwest::Method::GET,
        "/llm/loaded_models/",
        None,
    )
    .await;
    assert_eq!(loaded, json!(["smollm2", engine]));
    let (_, configs) = call(
        &app,
        &admin,
        reqwest::Method::GET,
        "/llm/configurations/",
        None,
    )
    .await;
    assert!(
        !configs.to_string().contains("hf_never_used"),
        "the hub token is not stored: {configs}"
    );

    let (status, body) = post(
        &app,
        &admin,
        "/vllm_request/terminate",
        Some(json!({"container_id": engine})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "terminated");
    let (_, loaded) = call(
        &app,
        &admin,
        reqwest::Method::GET,
        "/llm/loaded_models/",
        None,
    )
    .await;
    assert_eq!(loaded, json!(["smollm2"]));
    let (_, configs) = call(
        &app,
        &admin,
        reqwest::Method::GET,
        "/llm/configurations/",
        None,
    )
    .await;
    assert_eq!(configs, json!([]));

    let client = app.key_with_calls(None).await;
    let (status, _) = post(
        &app,
        &client,
        "/vllm_request/start",
        Some(json!({"Model": MODEL_FILE})),
    )
    .await;
    assert_eq!(status, 403);
}
