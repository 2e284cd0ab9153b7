//! Every route fuzzed from its own OpenAPI document by Schemathesis (pinned in
//! tests/python/requirements.txt), against a real server: `tollgate-cli start` on the embedded
//! default (SQLite database and queue, the worker and the real SmolLM2 model in the process),
//! called with a real admin-scope key and a dashboard session.
//!
//! Schemathesis sends examples, boundary and negative cases (wrong types, missing fields,
//! out-of-range and huge numbers, unicode edge cases) and random ones, to every operation;
//! `tests/python/fuzz_hooks.py` breaks one request in five further (malformed JSON, invalid
//! UTF-8, bodies over the limit, a missing `Authorization`, `Cookie` or `Content-Type`). The
//! run passes when no answer is a 5xx (or no answer at all), the server log holds no panic,
//! every answer has a status, media type and shape the document lists, keyed operations refuse
//! requests without the key, the server is still ready afterwards, and the key's `calls_used`
//! moved by exactly the calls answered 200/202 on the operations that spend one. The number of
//! requests and the run's time are printed; the whole test stays under five minutes (about
//! 200 s measured) on a 2-core machine.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{issue_key, key_row, scratch_dir, ServerProcess, TestKey};
use sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter};
use serde_json::Value;
use tollgate::models::{
    admin_sessions, admins,
    api_keys::{KeyParams, Scope},
    jobs,
};

const SCHEMATHESIS: &str = ".venv/bin/schemathesis";
/// At least this many requests, over every operation of the document.
const MIN_REQUESTS: usize = 2000;
/// A loopback port nothing listens on (discard), as every proxy of the server process.
const DEAD_PROXY: &str = "http://127.0.0.1:9";
/// Seed 001's routes: a retried `job_id` with the same body replays the first job, uncharged.
const IDEMPOTENT: [&str; 2] = ["/generate", "/chat_completion"];

/// `tollgate-cli start` on the embedded default, set up for the fuzz run.
fn start_server(dir: &Path) -> ServerProcess {
    ServerProcess::start(dir, "development", |cmd| {
        cmd.env("TOLLGATE_LOG_LEVEL", "info")
            // Generations stay short, so thousands of requests fit the time budget: 4 tokens by
            // default, 8 at most (larger asks are refused or cut, as each route does),
            .env("TOLLGATE_DEFAULT_MAX_TOKENS", "4")
            .env("TOLLGATE_MAX_TOKENS_LIMIT", "8")
            // and prompts of at most 512 tokens: a longer one is refused (400) before it costs
            // seconds of prompt reading.
            .env("TOLLGATE_CONTEXT_SIZE", "512")
            // Four sign-ins may check passwords at once, as many as the fuzzer sends at once
            // (beyond the bound the server answers 503 `server_busy` by design).
            .env("TOLLGATE_PASSWORD_CHECKS", "4")
            // The fuzzer's own pace is the test; the key's rate limit is tested elsewhere.
            .env("TOLLGATE_RATE_LIMIT_PER_MINUTE", "0")
            .env("TOLLGATE_WAIT_TIMEOUT_MS", "30000")
            // Nothing leaves the machine: a remote model a fuzzed admin configuration might name
            // (`model_type: openai`) would be reached only through this proxy, which is not there.
            .env("HTTP_PROXY", DEAD_PROXY)
            .env("HTTPS_PROXY", DEAD_PROXY)
            .env("ALL_PROXY", DEAD_PROXY)
            .env("http_proxy", DEAD_PROXY)
            .env("https_proxy", DEAD_PROXY)
            .env("all_proxy", DEAD_PROXY)
            .env_remove("NO_PROXY")
            .env_remove("no_proxy");
    })
}

/// One documented operation: its method, path template and who may call it.
struct Operation {
    method: String,
    template: Vec<String>,
    label: String,
    access: String,
}

fn operations(doc: &Value) -> Vec<Operation> {
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("path item") {
            if op.get("responses").is_none() {
                continue;
            }
            ops.push(Operation {
                method: method.to_uppercase(),
                template: path.split('/').map(str::to_string).collect(),
                label: format!("{} {path}", method.to_uppercase()),
                access: op["x-tollgate-access"].as_str().unwrap_or_default().into(),
            });
        }
    }
    ops
}

/// The operation a request was sent to: same method, same number of segments, every literal
/// segment equal (a trailing slash is the same route).
fn operation_of<'a>(ops: &'a [Operation], method: &str, url: &str) -> Option<&'a Operation> {
    let path = url
        .split_once("://")
        .and_then(|(_, rest)| rest.find('/').map(|i| &rest[i..]))
        .unwrap_or(url);
    let path = path.split(['?', '#']).next().unwrap_or(path);
    let path = if path.len() > 1 {
        path.trim_end_matches('/')
    } else {
        path
    };
    let segments: Vec<&str> = path.split('/').collect();
    ops.iter()
        .filter(|op| op.method == method && op.template.len() == segments.len())
        .find(|op| {
            op.template
                .iter()
                .zip(&segments)
                .all(|(t, s)| t.starts_with('{') || t == s)
        })
}

/// One request of the run as the HAR report recorded it.
struct Exchange {
    method: String,
    url: String,
    body: String,
    status: u16,
    answer: String,
}

fn exchanges(har: &Value) -> Vec<Exchange> {
    har["log"]["entries"]
        .as_array()
        .expect("HAR entries")
        .iter()
        .map(|e| Exchange {
            method: e["request"]["method"].as_str().unwrap_or_default().into(),
            url: e["request"]["url"].as_str().unwrap_or_default().into(),
            body: e["request"]["postData"]["text"]
                .as_str()
                .unwrap_or_default()
                .into(),
            status: e["response"]["status"]
                .as_u64()
                .and_then(|s| u16::try_from(s).ok())
                .unwrap_or(0),
            answer: e["response"]["content"]["text"]
                .as_str()
                .unwrap_or_default()
                .into(),
        })
        .collect()
}

fn clip(text: &str, n: usize) -> String {
    let mut out: String = text.chars().take(n).collect();
    if out.len() < text.len() {
        out.push('…');
    }
    out
}

/// Waits until no job of the database is queued or running (bounded), then returns them all.
async fn settled_jobs(db: &DatabaseConnection) -> Vec<jobs::Model> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let all = jobs::Entity::find().all(db).await.expect("jobs");
        let open = all
            .iter()
            .filter(|j| j.status == jobs::QUEUED || j.status == jobs::RUNNING)
            .count();
        if open == 0 {
            return all;
        }
        assert!(
            Instant::now() < deadline,
            "{open} jobs still open 90 s after the run"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn admin_session(db: &DatabaseConnection) -> String {
    let person = admins::ActiveModel::create(db, "fuzz@example.com", "a long fuzz password")
        .await
        .expect("admin");
    let (token, _) = admin_sessions::start(db, person.id, chrono::Duration::hours(1))
        .await
        .expect("session");
    token
}

/// Runs Schemathesis against the server; whether it found nothing, and what it printed.
fn run_schemathesis(
    server: &ServerProcess,
    key: &TestKey,
    session: &str,
    har: &Path,
) -> (bool, String) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // Run from the scratch folder: Schemathesis keeps its caches in the working directory.
    let out = Command::new(root.join(SCHEMATHESIS))
        .current_dir(&server.dir)
        .env("SCHEMATHESIS_HOOKS", "fuzz_hooks")
        .env("PYTHONPATH", root.join("tests/python"))
        .args(["run", &server.url("/openapi.json")])
        .args(["--header", &format!("Authorization: Bearer {}", key.secret)])
        .args(["--header", &format!("Cookie: tg_admin={session}")])
        .args(["--phases", "examples,coverage,fuzzing,stateful"])
        .args(["--mode", "all"])
        .args(["--max-examples", "15"])
        // Beyond 5xx: keyed operations refuse requests without the key, and every answer has a
        // documented status, media type and shape (so the document stays true to the handlers).
        .args([
            "--checks",
            "not_a_server_error,ignored_auth,status_code_conformance,\
             content_type_conformance,response_schema_conformance",
        ])
        .args(["--seed", "20261130"])
        .args(["--workers", "4"])
        .args(["--request-timeout", "60"])
        .args(["--generation-database", "none"])
        .args(["--suppress-health-check", "all"])
        .args(["--report", "har"])
        .arg("--report-har-path")
        .arg(har)
        .args(["--no-color", "--warnings", "off"])
        .stdin(Stdio::null())
        .output()
        .expect("run schemathesis (.venv: ./scripts/test.sh installs it)");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), printed)
}

#[tokio::test]
async fn fuzzing_every_route_finds_no_server_error_or_panic_and_charges_only_answered_calls() {
    assert!(
        Path::new(SCHEMATHESIS).exists(),
        "missing {SCHEMATHESIS}: run ./scripts/test.sh (it installs tests/python/requirements.txt)"
    );
    let started = Instant::now();
    let dir = scratch_dir("fuzz");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client");
    let mut server = start_server(&dir);
    server.wait_ready(&http).await;
    let db = sea_orm::Database::connect(format!(
        "sqlite://{}/tollgate.sqlite?mode=rwc",
        dir.display()
    ))
    .await
    .expect("the server's database");
    let key = issue_key(
        &db,
        KeyParams {
            name: "fuzz".into(),
            email: "fuzz@example.com".into(),
            scope: Scope::Admin,
            ..Default::default()
        },
    )
    .await;
    let session = admin_session(&db).await;
    let doc: Value = http
        .get(server.url("/openapi.json"))
        .send()
        .await
        .expect("document")
        .json()
        .await
        .expect("JSON document");
    let ops = operations(&doc);

    let fuzz_started = Instant::now();
    let har_path = dir.join("fuzz.har");
    let (clean, output) = run_schemathesis(&server, &key, &session, &har_path);
    let fuzz_time = fuzz_started.elapsed();
    let har: Value = serde_json::from_str(
        &std::fs::read_to_string(&har_path)
            .unwrap_or_else(|e| panic!("no HAR report ({e}); schemathesis said:\n{output}")),
    )
    .expect("HAR is JSON");
    let sent = exchanges(&har);

    // Every answer, by operation.
    let mut per_op: BTreeMap<&str, usize> = BTreeMap::new();
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    let mut server_errors = Vec::new();
    let mut unmatched = BTreeSet::new();
    let (mut charged_answers, mut replayable, mut other_methods) = (0_i64, 0_i64, 0_usize);
    for x in &sent {
        *statuses.entry(x.status).or_default() += 1;
        if x.status >= 500 || x.status == 0 {
            server_errors.push(format!(
                "{} {} -> {}\n  body: {}\n  answer: {}",
                x.method,
                x.url,
                x.status,
                clip(&x.body, 300),
                clip(&x.answer, 300)
            ));
        }
        let Some(op) = operation_of(&ops, &x.method, &x.url) else {
            // Schemathesis also tries the methods a path does not document: those must be 405,
            // but OPTIONS, which the CORS layer answers for every path (a browser's preflight).
            let documented_path = ops
                .iter()
                .any(|op| operation_of(std::slice::from_ref(op), &op.method, &x.url).is_some());
            let preflight = x.method == "OPTIONS" && x.status == 200;
            if documented_path && (x.status == 405 || preflight) {
                other_methods += 1;
            } else {
                unmatched.insert(format!(
                    "{} {} -> {}",
                    x.method,
                    clip(&x.url, 120),
                    x.status
                ));
            }
            continue;
        };
        *per_op.entry(&op.label).or_default() += 1;
        // Ollama's load request (no prompt or messages) is answered without generating or
        // charging anything (`"done_reason": "load"`).
        let load = serde_json::from_str::<Value>(&x.answer)
            .is_ok_and(|a| a.get("done_reason").is_some_and(|r| r == "load"));
        if op.access == "metered" && matches!(x.status, 200 | 202) && !load {
            charged_answers += 1;
            let path = op.template.join("/");
            if IDEMPOTENT.contains(&path.as_str())
                && serde_json::from_str::<Value>(&x.body)
                    .is_ok_and(|b| b.get("job_id").is_some_and(|id| !id.is_null()))
            {
                replayable += 1;
            }
        }
    }
    // Schemathesis reads the document before the run rather than fuzzing it; so did this test.
    *per_op.entry("GET /openapi.json").or_default() += 1;
    let untouched: Vec<&str> = ops
        .iter()
        .map(|op| op.label.as_str())
        .filter(|label| !per_op.contains_key(label))
        .collect();
    println!(
        "fuzz: {} requests in {:.0} s to {} operations ({other_methods} of them with methods \
         the path does not document, all 405); statuses {statuses:?}; {} answered calls on \
         metered operations",
        sent.len(),
        fuzz_time.as_secs_f64(),
        per_op.len(),
        charged_answers
    );

    let summary = output
        .find("SUMMARY")
        .map_or(output.as_str(), |i| &output[i..]);
    println!("schemathesis {}", clip(summary, 4000));
    assert!(
        !output.contains("Hook Error"),
        "tests/python/fuzz_hooks.py failed:\n{}",
        clip(&output, 20_000)
    );
    assert!(
        server_errors.is_empty(),
        "{} answers were 5xx or none at all (report and server log in {}):\n{}\n\nschemathesis:\n{}",
        server_errors.len(),
        dir.display(),
        server_errors.join("\n"),
        clip(&output, 20_000)
    );
    let log = server.log();
    let panics: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("panicked at") || l.contains("server_panic"))
        .collect();
    assert!(
        panics.is_empty(),
        "the server panicked:\n{}",
        panics.join("\n")
    );
    assert!(
        clean,
        "schemathesis found failures (report in {}):\n{}",
        dir.display(),
        clip(&output, 20_000)
    );
    assert!(
        sent.len() >= MIN_REQUESTS,
        "only {} requests (want {MIN_REQUESTS}); schemathesis said:\n{}",
        sent.len(),
        clip(&output, 20_000)
    );
    assert!(
        untouched.is_empty(),
        "operations the run never called: {untouched:?}"
    );
    assert!(
        unmatched.is_empty(),
        "requests to no documented operation (or not refused with 405): {unmatched:#?}"
    );

    // Still serving, and the model still ready.
    let ping: Value = http
        .get(server.url("/ping"))
        .send()
        .await
        .expect("ping after the run")
        .json()
        .await
        .expect("ping JSON");
    assert_eq!(ping["ready"], true, "not ready after the run: {ping}");

    // Each call charged has its job, and each job is an answer 200/202 on a metered route; a
    // seed 001 answer that carried a `job_id` may be a replay of an earlier job (not charged).
    let all_jobs = settled_jobs(&db).await;
    let failed: Vec<String> = all_jobs
        .iter()
        .filter(|j| j.status == jobs::FAILED)
        .map(|j| {
            format!(
                "{} {}: {}",
                j.endpoint,
                clip(&j.request, 200),
                j.error.clone().unwrap_or_default()
            )
        })
        .collect();
    assert!(
        failed.is_empty(),
        "jobs failed (refunded):\n{}",
        failed.join("\n")
    );
    let calls_used = key_row(&db, &key).await.calls_used;
    let key_jobs = jobs::Entity::find()
        .filter(jobs::Column::ApiKeyId.eq(key.id))
        .all(&db)
        .await
        .expect("jobs");
    let jobs_count = i64::try_from(key_jobs.len()).expect("count");
    assert_eq!(
        calls_used, jobs_count,
        "calls used and jobs of the key differ"
    );
    assert!(
        (charged_answers - replayable..=charged_answers).contains(&calls_used),
        "calls_used is {calls_used}, but {charged_answers} answers on metered operations were \
         200/202 ({replayable} of them seed 001 retries that may replay an earlier job)"
    );
    println!(
        "fuzz: calls_used {calls_used} for {charged_answers} answered calls ({replayable} \
         replayable); whole test {:.0} s",
        started.elapsed().as_secs_f64()
    );
    drop(server);
    // Kept when an assertion fails (the report, the server log and its database tell why).
    let _ = std::fs::remove_dir_all(&dir);
}
