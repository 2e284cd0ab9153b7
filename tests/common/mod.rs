//! Test harness: a real Tollgate server per test (own SQLite database and queue files, the real
//! model, a real TCP port) and helpers that read like the scenarios they check. Every helper
//! lives here once; each test file is its own crate (`mod common;`) and uses what it needs.
//!
//! - [`http`]: requests to a [`TestApp`] and reading their answers.
//! - [`keys`]: issuing keys and reading their rows and jobs.
//! - [`engines`]: stand-in engines and workers for the worker's own step.
//! - [`postgres`]: a fresh Postgres database per test.
//! - [`processes`]: ports, scripts and the demo LoRA adapter.
//!
//! Each crate uses only some helpers, so unused ones and unused re-exports are allowed here.
#![allow(dead_code, unused_imports)]

pub mod engines;
pub mod http;
pub mod keys;
pub mod postgres;
pub mod processes;

use std::path::{Path, PathBuf};

use loco_rs::{
    app::{AppContext, Hooks},
    boot::StartMode,
    config::Config,
    environment::Environment,
};
use serde_json::{json, Value};
use tollgate::app::{into_service, App};

pub use engines::{greedy, queued_job, worker_on, FailingEngine};
pub use http::{
    admitted_exactly_the_rest_over_budget, code, concurrent_calls, header,
    hot_key_bursts_share_commits_exactly, ids, keys_of_a_user_with_gen_budget,
    many_keys_bursts_share_commits_exactly, merge, metric, metric_in, poll_job, post_stream, read,
    retry_after, scrape, shared_commits, sse_data, streamed_chat_text,
    two_keys_at_their_users_budget_edge_admit_exactly_what_fits,
};
pub use keys::{
    admin_params, charge_many_is_all_or_none_per_key_and_concurrent_batches_do_not_deadlock,
    issue_key, jobs_of, key_of, key_row, TestKey,
};
pub use postgres::{create_database, drop_database, pg_server};
pub use processes::{free_port, make_adapter, python, run_checks, ServerProcess};

pub struct TestApp {
    pub base: String,
    pub ctx: AppContext,
    pub http: reqwest::Client,
    dir: PathBuf,
    /// A Postgres database created for this test, dropped with it.
    pg_database: Option<String>,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Some(db) = &self.pg_database {
            drop_database(db);
        }
    }
}

pub fn scratch_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tollgate-{tag}-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// The test config with its state in `dir` (SQLite), or in the Postgres database `pg_database`
/// with the queue still in `dir`, after `patch` edits its `settings:` JSON.
pub async fn test_config(
    dir: &Path,
    pg_database: Option<&str>,
    patch: impl FnOnce(&mut Value),
) -> Config {
    let mut config = App::load_config(&Environment::Test)
        .await
        .expect("load test config");
    config.database.uri = match pg_database {
        Some(db) => format!("{}/{db}", pg_server()),
        None => format!("sqlite://{}/db.sqlite?mode=rwc", dir.display()),
    };
    let mut settings = config.settings.clone().unwrap_or_else(|| json!({}));
    settings["queue"]["url"] = json!(format!("sqlite://{}/queue.sqlite?mode=rwc", dir.display()));
    patch(&mut settings);
    config.settings = Some(settings);
    config
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

    /// Starts a server on the scripted engine (no model weights; replies are echoes), for tests
    /// of what happens around generation: auth, admission, validation, routing. `patch` edits
    /// the `settings:` JSON further.
    pub async fn spawn_scripted(patch: impl FnOnce(&mut Value)) -> Self {
        Self::spawn_full(None, |s| {
            s["engine"]["backend"] = serde_json::json!("scripted");
            patch(s);
        })
        .await
    }

    /// Starts a server whose state lives in a fresh, uniquely named Postgres database.
    pub async fn spawn_on_postgres() -> Self {
        let name = create_database("tollgate_test").await;
        Self::spawn_full(Some(name), |_| {}).await
    }

    async fn spawn_full(pg_database: Option<String>, patch: impl FnOnce(&mut Value)) -> Self {
        let dir = scratch_dir("app");
        let config = test_config(&dir, pg_database.as_deref(), patch).await;
        let boot = App::boot(StartMode::ServerOnly, &Environment::Test, config)
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
}
