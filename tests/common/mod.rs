//! Test harness: a real Tollgate server per test (own SQLite database and queue files, the real
//! model, a real TCP port) and helpers that read like the scenarios they check.
#![allow(dead_code)]

use std::path::PathBuf;

use loco_rs::{
    app::{AppContext, Hooks},
    boot::StartMode,
    environment::Environment,
};
use sea_orm::{EntityTrait, PaginatorTrait};
use serde_json::{json, Value};
use tollgate::{
    app::{into_service, App},
    models::{
        _entities::{api_keys, jobs},
        api_keys::{ActiveModel as KeyActive, KeyParams},
    },
};

pub struct TestApp {
    pub base: String,
    pub ctx: AppContext,
    pub http: reqwest::Client,
    dir: PathBuf,
    /// A Postgres database created for this test, dropped with it.
    pg_database: Option<String>,
}

/// Server of the test Postgres (trust auth on this machine kind; override for elsewhere).
pub fn pg_server() -> String {
    std::env::var("TOLLGATE_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

impl Drop for TestApp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Some(db) = &self.pg_database {
            let _ = std::process::Command::new("psql")
                .arg(format!("{}/postgres", pg_server()))
                .args([
                    "-q",
                    "-c",
                    &format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
                ])
                .status();
        }
    }
}

/// A key issued for a test, with its plain secret.
pub struct TestKey {
    pub id: i32,
    pub prefix: String,
    pub secret: String,
}

pub fn scratch_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tollgate-{tag}-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

impl TestApp {
    /// Starts a server with the test config.
    pub async fn spawn() -> Self {
        Self::spawn_with(|_| {}).await
    }

    /// Starts a server after `patch` edits the `settings:` JSON of the test config.
    pub async fn spawn_with(patch: impl FnOnce(&mut Value)) -> Self {
        Self::spawn_full(None, patch).await
    }

    /// Starts a server whose state lives in a fresh, uniquely named Postgres database.
    pub async fn spawn_on_postgres() -> Self {
        use sea_orm::ConnectionTrait;
        let name = format!("tollgate_test_{}", uuid::Uuid::new_v4().simple());
        let admin = sea_orm::Database::connect(format!("{}/postgres", pg_server()))
            .await
            .expect("connect to the test Postgres");
        admin
            .execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create test database");
        admin.close().await.ok();
        Self::spawn_full(Some(name), |_| {}).await
    }

    async fn spawn_full(pg_database: Option<String>, patch: impl FnOnce(&mut Value)) -> Self {
        let env = Environment::Test;
        let mut config = App::load_config(&env).await.expect("load test config");
        let dir = scratch_dir("app");
        config.database.uri = match &pg_database {
            Some(db) => format!("{}/{db}", pg_server()),
            None => format!("sqlite://{}/db.sqlite?mode=rwc", dir.display()),
        };
        let mut settings = config.settings.clone().unwrap_or_else(|| json!({}));
        settings["queue"]["url"] =
            json!(format!("sqlite://{}/queue.sqlite?mode=rwc", dir.display()));
        patch(&mut settings);
        config.settings = Some(settings);
        let boot = App::boot(StartMode::ServerOnly, &env, config)
            .await
            .expect("boot app");
        let router = boot.router.expect("router");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            axum::serve(listener, into_service(router)).await.ok();
        });
        Self {
            base: format!("http://{addr}"),
            ctx: boot.app_context,
            http: reqwest::Client::new(),
            dir,
            pg_database,
        }
    }

    pub async fn issue_key(&self, params: KeyParams) -> TestKey {
        let issued = KeyActive::issue(&self.ctx.db, params)
            .await
            .expect("issue key");
        TestKey {
            id: issued.key.id,
            prefix: issued.key.prefix,
            secret: issued.secret,
        }
    }

    pub async fn key_with_calls(&self, max_calls: Option<i64>) -> TestKey {
        self.issue_key(KeyParams {
            name: "test".into(),
            email: "client@example.com".into(),
            max_calls,
            ..Default::default()
        })
        .await
    }

    pub async fn key_row(&self, key: &TestKey) -> api_keys::Model {
        api_keys::Entity::find_by_id(key.id)
            .one(&self.ctx.db)
            .await
            .expect("db")
            .expect("key row")
    }

    pub async fn calls_used(&self, key: &TestKey) -> i64 {
        self.key_row(key).await.calls_used
    }

    pub async fn key_count(&self) -> u64 {
        use sea_orm::{EntityTrait, PaginatorTrait};
        api_keys::Entity::find()
            .count(&self.ctx.db)
            .await
            .expect("count keys")
    }

    pub async fn job_count(&self) -> u64 {
        jobs::Entity::find().count(&self.ctx.db).await.expect("db")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `POST /api/` with a JSON body and a bearer key.
    pub async fn post_api(&self, key: &TestKey, body: Value) -> (u16, Value) {
        let resp = self
            .http
            .post(self.url("/api/"))
            .bearer_auth(&key.secret)
            .json(&body)
            .send()
            .await
            .expect("request");
        read(resp).await
    }

    pub async fn get(&self, key: Option<&TestKey>, path: &str) -> (u16, Value) {
        let mut req = self.http.get(self.url(path));
        if let Some(k) = key {
            req = req.bearer_auth(&k.secret);
        }
        read(req.send().await.expect("request")).await
    }
}

pub async fn read(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    let value = serde_json::from_str(&text).unwrap_or_else(|_| json!({ "raw": text }));
    (status, value)
}

/// The `error.code` of an error response.
pub fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("<no error code>")
}

/// Fires `n` concurrent one-token `POST /api/` calls with `key`; returns (admitted, 429s) and
/// fails on any other status. Admitted means charged and queued: 200, or 202 when a loaded
/// machine makes the job outlast the request's wait.
pub async fn concurrent_calls(app: &TestApp, key: &TestKey, n: usize) -> (usize, usize) {
    let mut tasks = Vec::new();
    for i in 0..n {
        let http = app.http.clone();
        let url = app.url("/api/");
        let secret = key.secret.clone();
        tasks.push(tokio::spawn(async move {
            http.post(url)
                .bearer_auth(secret)
                .json(&json!({"text": format!("Number {i}"), "max_tokens": 1}))
                .send()
                .await
                .expect("request")
                .status()
                .as_u16()
        }));
    }
    let (mut ok, mut limited) = (0, 0);
    for t in tasks {
        match t.await.expect("task") {
            200 | 202 => ok += 1,
            429 => limited += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    (ok, limited)
}

/// Polls `GET /api/jobs/{id}` until the job is settled (bounded: 180 s, generous for a loaded
/// machine; a bound, not a timing check) and returns it.
pub async fn poll_job(app: &TestApp, key: &TestKey, job_id: &str) -> Value {
    for _ in 0..1800 {
        let (status, job) = app.get(Some(key), &format!("/api/jobs/{job_id}")).await;
        assert_eq!(status, 200, "{job}");
        if job["status"] == "done" || job["status"] == "failed" {
            return job;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("job {job_id} did not settle in 180 s");
}

pub fn python() -> &'static std::path::Path {
    let python = std::path::Path::new(".venv/bin/python");
    assert!(
        python.exists(),
        "missing .venv with gguf/numpy: run ./scripts/test.sh (it creates it)"
    );
    python
}

/// Writes the demo adapter for `seed` to `path` with scripts/make-lora.py. The script is
/// deterministic and slowish (it parses the whole base model), so its output is kept in a cache
/// keyed by the script's content, the base model's size and the seed, and copied from there.
pub fn make_adapter(path: &std::path::Path, seed: u32) {
    use sha2::{Digest, Sha256};
    let script = std::fs::read("scripts/make-lora.py").expect("read make-lora.py");
    let model_len = std::fs::metadata("models/SmolLM2-135M-Instruct.Q4_1.gguf")
        .map(|m| m.len())
        .unwrap_or_default();
    let digest = hex::encode(Sha256::digest(&script));
    let cache = std::env::temp_dir().join("tollgate-make-lora-cache");
    std::fs::create_dir_all(&cache).expect("cache dir");
    let cached = cache.join(format!("{}-{model_len}-{seed}.gguf", &digest[..16]));
    if !cached.is_file() {
        // Written under a unique name, then renamed: concurrent tests never see half a file.
        let partial = cache.join(format!("{}.partial", uuid::Uuid::new_v4()));
        let out = std::process::Command::new(python())
            .args(["scripts/make-lora.py", "--seed", &seed.to_string(), "--out"])
            .arg(&partial)
            .output()
            .expect("run make-lora.py");
        assert!(
            out.status.success(),
            "make-lora.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::rename(&partial, &cached).expect("store the adapter");
    }
    std::fs::copy(&cached, path).expect("copy the adapter");
}
