//! LoRA heads end to end with the real model: a deterministic adapter written by
//! scripts/make-lora.py into a scratch adapters folder, registered over HTTP, applied per job.

mod common;

use std::path::PathBuf;

use common::{code, ids, make_adapter, merge, python, scratch_dir, TestApp, TestKey};
use sea_orm::{EntityTrait, PaginatorTrait};
use serde_json::{json, Value};
use tollgate::models::{_entities::adapters, api_keys::KeyParams};

const PROMPT: &str = "Write one sentence about the sea.";

/// A scratch folder holding `adapters/` (the configured adapters folder) and files outside it.
struct Scratch {
    root: PathBuf,
}

impl Scratch {
    fn new() -> Self {
        let root = scratch_dir("lora");
        std::fs::create_dir_all(root.join("adapters")).expect("mkdir adapters");
        Self { root }
    }

    fn adapters(&self) -> PathBuf {
        self.root.join("adapters")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

async fn spawn(scratch: &Scratch, cache_size: Option<usize>) -> TestApp {
    let dir = scratch.adapters().display().to_string();
    TestApp::spawn_with(move |s| {
        s["engine"]["adapters_dir"] = json!(dir);
        if let Some(n) = cache_size {
            s["engine"]["adapter_cache_size"] = json!(n);
        }
    })
    .await
}

async fn attach(app: &TestApp, admin: &TestKey, name: &str, path: &str) -> (u16, Value) {
    app.post(
        Some(admin),
        "/attach-head",
        json!({"name": name, "path": path, "scale": 1.0}),
    )
    .await
}

async fn adapter_rows(app: &TestApp) -> u64 {
    adapters::Entity::find()
        .count(&app.ctx.db)
        .await
        .expect("db")
}

/// Greedy `POST /generate` (seed 001 shape) with extra top-level fields; returns the content.
async fn generate(app: &TestApp, key: &TestKey, extra: Value) -> String {
    let body = merge(
        json!({"content": PROMPT, "meta": {"temperature": 0, "tokens_limit": 24}}),
        &extra,
    );
    let (status, out) = app.post(Some(key), "/generate", body).await;
    assert_eq!(status, 200, "{out}");
    out["content"].as_str().expect("content").to_string()
}

#[tokio::test]
async fn a_head_changes_greedy_output_for_its_own_job_only() {
    let scratch = Scratch::new();
    make_adapter(&scratch.adapters().join("demo.gguf"), 1234);
    let app = spawn(&scratch, None).await;
    let admin = app.admin_key().await;
    let (status, body) = attach(&app, &admin, "demo", "demo.gguf").await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["model"], "smollm2:demo");
    assert_eq!(body["file"], "demo.gguf");
    assert_eq!(body["default_scale"], 1.0);

    let key = app.key_with_calls(Some(10)).await;
    let base = generate(&app, &key, json!({})).await;
    let with_head = generate(&app, &key, json!({"lora": "demo"})).await;
    assert_ne!(with_head, base, "the adapter did not change greedy output");
    let zero = generate(
        &app,
        &key,
        json!({"meta": {"temperature": 0, "tokens_limit": 24, "lora": "demo", "scale": 0.0}}),
    )
    .await;
    assert_eq!(zero, base, "scale 0 must be the base model");
    let base_again = generate(&app, &key, json!({})).await;
    assert_eq!(base_again, base, "the head leaked into the next job");

    // Seed 000's field names: `prompt` for the text, `head` for the adapter.
    let seed0_body = json!({"prompt": PROMPT, "head": "demo", "scale": 1,
                            "meta": {"temperature": 0, "tokens_limit": 24}});
    let (status, seed0) = app.post(Some(&key), "/generate", seed0_body).await;
    assert_eq!(status, 200, "{seed0}");
    assert_eq!(seed0["content"], with_head.as_str());
    assert_eq!(app.calls_used(&key).await, 5);

    // The engine reports what it holds, and the admin list says where.
    let (_, ping) = app.get(Some(&app.admin_key().await), "/ping").await;
    assert_eq!(
        ping["worker"]["engine"]["adapters"],
        json!(["demo"]),
        "{ping}"
    );
    let (status, list) = app.get(Some(&admin), "/api/adapters").await;
    assert_eq!(status, 200, "{list}");
    let loaded_on = list["adapters"][0]["loaded_on"]
        .as_array()
        .expect("loaded_on");
    assert_eq!(loaded_on.len(), 1, "{list}");
    assert_eq!(list["adapters"][0]["base_model"], "smollm2");
}

#[tokio::test]
async fn the_openai_routes_select_a_head_with_base_colon_adapter() {
    let scratch = Scratch::new();
    make_adapter(&scratch.adapters().join("demo.gguf"), 1234);
    let app = spawn(&scratch, None).await;
    let admin = app.admin_key().await;
    assert_eq!(attach(&app, &admin, "demo", "demo.gguf").await.0, 201);
    let key = app.key_with_calls(None).await;

    let (status, models) = app.get(Some(&key), "/v1/models").await;
    assert_eq!(status, 200, "{models}");
    assert_eq!(ids(&models["data"]), ["smollm2", "smollm2:demo"]);

    let chat = |model: &str| {
        json!({
            "model": model,
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": 24,
            "temperature": 0
        })
    };
    let (s1, base) = app
        .post(Some(&key), "/v1/chat/completions", &chat("smollm2"))
        .await;
    let (s2, head) = app
        .post(Some(&key), "/v1/chat/completions", &chat("smollm2:demo"))
        .await;
    assert_eq!((s1, s2), (200, 200), "{base} {head}");
    assert_eq!(head["model"], "smollm2:demo");
    assert_ne!(
        head["choices"][0]["message"]["content"],
        base["choices"][0]["message"]["content"]
    );

    let completion = |model: &str| json!({"model": model, "prompt": "The sea is", "max_tokens": 12, "temperature": 0});
    let (s1, base) = app
        .post(Some(&key), "/v1/completions", &completion("smollm2"))
        .await;
    let (s2, head) = app
        .post(Some(&key), "/v1/completions", &completion("smollm2:demo"))
        .await;
    assert_eq!((s1, s2), (200, 200), "{base} {head}");
    assert_ne!(head["choices"][0]["text"], base["choices"][0]["text"]);
}

#[tokio::test]
async fn registration_refuses_files_outside_the_adapters_folder_and_stores_nothing() {
    let scratch = Scratch::new();
    let dir = scratch.adapters();
    make_adapter(&dir.join("demo.gguf"), 1234);
    // A valid adapter, but outside the folder, reached directly and through a symlink.
    std::fs::copy(dir.join("demo.gguf"), scratch.root.join("outside.gguf")).expect("copy");
    std::os::unix::fs::symlink(scratch.root.join("outside.gguf"), dir.join("escape.gguf"))
        .expect("symlink");
    std::fs::write(dir.join("notes.txt"), "not a model").expect("write");
    std::fs::create_dir_all(dir.join("sub")).expect("mkdir");
    // A well-formed GGUF that is a model header, not an adapter.
    let out = std::process::Command::new(python())
        .arg("-c")
        .arg(
            "import gguf,sys; w=gguf.GGUFWriter(sys.argv[1],'llama'); w.add_type('model'); \
             w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()",
        )
        .arg(dir.join("model.gguf"))
        .output()
        .expect("python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let app = spawn(&scratch, None).await;
    let admin = app.admin_key().await;
    let outside = scratch.root.join("outside.gguf").display().to_string();
    for (path, expected) in [
        ("../outside.gguf", "invalid_adapter_path"),
        ("sub/../../outside.gguf", "invalid_adapter_path"),
        ("/etc/passwd", "invalid_adapter_path"),
        (outside.as_str(), "invalid_adapter_path"),
        ("escape.gguf", "invalid_adapter_path"),
        ("sub", "invalid_adapter_path"),
        ("missing.gguf", "adapter_file_not_found"),
        ("notes.txt", "not_a_lora_adapter"),
        ("model.gguf", "not_a_lora_adapter"),
    ] {
        let (status, body) = attach(&app, &admin, "head", path).await;
        assert_eq!(status, 422, "{path}: {body}");
        assert_eq!(code(&body), expected, "{path}: {body}");
    }
    for bad_name in ["a:b", "../x", ""] {
        let (status, body) = attach(&app, &admin, bad_name, "demo.gguf").await;
        assert_eq!(
            (status, code(&body)),
            (422, "invalid_adapter_name"),
            "{body}"
        );
    }
    let (status, body) = app
        .post(
            Some(&admin),
            "/attach-head",
            &json!({"name": "head", "path": "demo.gguf", "scale": 9}),
        )
        .await;
    assert_eq!((status, code(&body)), (422, "invalid_scale"), "{body}");
    assert_eq!(
        adapter_rows(&app).await,
        0,
        "a refused registration was stored"
    );

    // A link that stays inside the folder is fine; what is stored is the real file.
    std::os::unix::fs::symlink(dir.join("demo.gguf"), dir.join("alias.gguf")).expect("symlink");
    let (status, body) = attach(&app, &admin, "head", "alias.gguf").await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["file"], "demo.gguf");
    // Named as seed 000's generation fields name it (`head`), with no path: `<name>.gguf`.
    let (status, body) = app
        .post(Some(&admin), "/attach-head", &json!({"head": "demo"}))
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        (body["name"].as_str(), body["file"].as_str()),
        (Some("demo"), Some("demo.gguf")),
        "{body}"
    );
}

#[tokio::test]
async fn only_admin_keys_manage_heads_and_names_are_unique() {
    let scratch = Scratch::new();
    make_adapter(&scratch.adapters().join("demo.gguf"), 1234);
    let app = spawn(&scratch, None).await;
    let admin = app.admin_key().await;
    let client = app.key_with_calls(Some(5)).await;

    let (status, body) = attach(&app, &client, "demo", "demo.gguf").await;
    assert_eq!(
        (status, code(&body)),
        (403, "admin_scope_required"),
        "{body}"
    );
    let (status, _) = app.get(Some(&client), "/api/adapters").await;
    assert_eq!(status, 403);
    let (status, _) = app.delete(Some(&client), "/api/adapters/demo").await;
    assert_eq!(status, 403);
    let (status, _) = app.get(None, "/api/adapters").await;
    assert_eq!(status, 401);
    assert_eq!(adapter_rows(&app).await, 0);
    assert_eq!(app.calls_used(&client).await, 0);

    assert_eq!(attach(&app, &admin, "demo", "demo.gguf").await.0, 201);
    let (status, body) = attach(&app, &admin, "demo", "demo.gguf").await;
    assert_eq!((status, code(&body)), (409, "adapter_exists"), "{body}");
    assert_eq!(adapter_rows(&app).await, 1);

    let (status, body) = app.get(Some(&admin), "/api/adapters/demo").await;
    assert_eq!(
        (status, body["name"].as_str()),
        (200, Some("demo")),
        "{body}"
    );
    let (status, body) = app.delete(Some(&admin), "/api/adapters/demo").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["deleted"]["name"], "demo");
    let (status, body) = app.delete(Some(&admin), "/api/adapters/demo").await;
    assert_eq!((status, code(&body)), (404, "adapter_not_found"), "{body}");
    assert_eq!(adapter_rows(&app).await, 0);
    assert!(
        scratch.adapters().join("demo.gguf").exists(),
        "unregistering must not delete the file"
    );

    let (status, body) = app
        .post(
            Some(&client),
            "/generate",
            &json!({"content": PROMPT, "lora": "demo"}),
        )
        .await;
    assert_eq!((status, code(&body)), (404, "adapter_not_found"), "{body}");
}

#[tokio::test]
async fn unknown_heads_and_bad_head_fields_cost_nothing() {
    let scratch = Scratch::new();
    make_adapter(&scratch.adapters().join("demo.gguf"), 1234);
    let app = spawn(&scratch, None).await;
    let admin = app.admin_key().await;
    assert_eq!(attach(&app, &admin, "demo", "demo.gguf").await.0, 201);
    let key = app.key_with_calls(Some(5)).await;

    let (status, body) = app
        .post(
            Some(&key),
            "/generate",
            &json!({"content": PROMPT, "lora": "nope"}),
        )
        .await;
    assert_eq!((status, code(&body)), (404, "adapter_not_found"), "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("\"demo\""),
        "names the available heads: {message}"
    );

    let chat =
        |model: &str| json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
    let (status, body) = app
        .post(Some(&key), "/v1/chat/completions", &chat("smollm2:nope"))
        .await;
    assert_eq!((status, code(&body)), (404, "adapter_not_found"), "{body}");
    let (status, body) = app
        .post(Some(&key), "/v1/chat/completions", &chat("gpt-4"))
        .await;
    assert_eq!((status, code(&body)), (404, "model_not_found"), "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("smollm2:demo"), "{message}");

    for (extra, expected) in [
        (json!({"scale": 0.5}), "scale_without_adapter"),
        (json!({"lora": "demo", "scale": 9}), "invalid_scale"),
        (
            json!({"lora": "demo", "meta": {"lora": "other"}}),
            "conflicting_adapter",
        ),
    ] {
        let body = merge(json!({"content": PROMPT}), &extra);
        let (status, out) = app.post(Some(&key), "/generate", &body).await;
        assert_eq!((status, code(&out)), (422, expected), "{body} -> {out}");
    }
    assert_eq!(
        app.calls_used(&key).await,
        0,
        "a refused request was charged"
    );
    assert_eq!(app.job_count().await, 0, "a refused request was queued");
}

#[tokio::test]
async fn allow_lists_limit_heads_and_models_and_filter_the_model_list() {
    let scratch = Scratch::new();
    make_adapter(&scratch.adapters().join("demo.gguf"), 1234);
    make_adapter(&scratch.adapters().join("other.gguf"), 99);
    let app = spawn(&scratch, None).await;
    let admin = app.admin_key().await;
    assert_eq!(attach(&app, &admin, "demo", "demo.gguf").await.0, 201);
    assert_eq!(attach(&app, &admin, "other", "other.gguf").await.0, 201);

    let only_demo = app
        .issue_key(KeyParams {
            email: "a@example.com".into(),
            max_calls: Some(5),
            allowed_adapters: vec!["demo".into()],
            ..Default::default()
        })
        .await;
    let (_, models) = app.get(Some(&only_demo), "/v1/models").await;
    assert_eq!(ids(&models["data"]), ["smollm2", "smollm2:demo"]);
    let (status, body) = app
        .post(
            Some(&only_demo),
            "/generate",
            &json!({"content": PROMPT, "lora": "other"}),
        )
        .await;
    assert_eq!(
        (status, code(&body)),
        (403, "adapter_not_allowed"),
        "{body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("\"demo\"")),
        "{body}"
    );

    let other_model = app
        .issue_key(KeyParams {
            email: "b@example.com".into(),
            max_calls: Some(5),
            allowed_models: vec!["some-other-model".into()],
            ..Default::default()
        })
        .await;
    let (_, models) = app.get(Some(&other_model), "/v1/models").await;
    assert_eq!(models["data"], json!([]), "{models}");
    let (status, body) = app
        .post(
            Some(&other_model),
            "/v1/chat/completions",
            &json!({"model": "smollm2", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!((status, code(&body)), (403, "model_not_allowed"), "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("some-other-model")),
        "{body}"
    );
    let (status, body) = app.post_api(&other_model, json!({"text": PROMPT})).await;
    assert_eq!((status, code(&body)), (403, "model_not_allowed"), "{body}");

    assert_eq!(app.calls_used(&only_demo).await, 0);
    assert_eq!(app.calls_used(&other_model).await, 0);
    assert_eq!(app.job_count().await, 0);
}

#[tokio::test]
async fn a_cache_of_one_swaps_heads_and_each_still_gives_its_own_output() {
    let scratch = Scratch::new();
    make_adapter(&scratch.adapters().join("demo.gguf"), 1234);
    make_adapter(&scratch.adapters().join("other.gguf"), 99);
    let app = spawn(&scratch, Some(1)).await;
    let admin = app.admin_key().await;
    assert_eq!(attach(&app, &admin, "demo", "demo.gguf").await.0, 201);
    assert_eq!(attach(&app, &admin, "other", "other.gguf").await.0, 201);
    let key = app.key_with_calls(None).await;

    let demo = generate(&app, &key, json!({"lora": "demo"})).await;
    let other = generate(&app, &key, json!({"lora": "other"})).await;
    assert_ne!(demo, other, "two different adapters gave the same output");
    let (_, ping) = app.get(Some(&app.admin_key().await), "/ping").await;
    assert_eq!(
        ping["worker"]["engine"]["adapters"],
        json!(["other"]),
        "{ping}"
    );
    // `demo` was evicted (and freed); loading it again gives the same output as before.
    let demo_again = generate(&app, &key, json!({"lora": "demo"})).await;
    assert_eq!(demo_again, demo);
    let (_, ping) = app.get(Some(&app.admin_key().await), "/ping").await;
    assert_eq!(
        ping["worker"]["engine"]["adapters"],
        json!(["demo"]),
        "{ping}"
    );
}
