//! The real binaries as a user runs them: README's run command (`scripts/serve.sh`) on a
//! scratch data directory, the key tasks, a curl-style call, and a check that no secret ever
//! reaches the logs.

mod common;

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_tollgate-cli");

fn envs(dir: &Path, port: u16) -> Vec<(String, String)> {
    vec![
        ("LOCO_ENV".into(), "development".into()),
        (
            "DATABASE_URL".into(),
            format!("sqlite://{}/tollgate.sqlite?mode=rwc", dir.display()),
        ),
        (
            "TOLLGATE_QUEUE_URL".into(),
            format!("sqlite://{}/queue.sqlite?mode=rwc", dir.display()),
        ),
        ("TOLLGATE_PORT".into(), port.to_string()),
        ("TOLLGATE_BINDING".into(), "127.0.0.1".into()),
        // Log as much as possible: even debug logs must not contain a secret.
        ("TOLLGATE_LOG_LEVEL".into(), "trace".into()),
        ("TOLLGATE_DEFAULT_MAX_TOKENS".into(), "16".into()),
    ]
}

/// Runs `tollgate-cli task <args>` and returns (success, stdout).
fn task(dir: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(BIN)
        .arg("task")
        .args(args)
        .envs(envs(dir, 0))
        .output()
        .expect("run task");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        // serve.sh execs cargo, which runs the server as its child: stop the whole group.
        let _ = Command::new("kill")
            .args(["-s", "TERM", "--", &format!("-{}", self.0.id())])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("kill")
            .args(["-s", "KILL", "--", &format!("-{}", self.0.id())])
            .status();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn readme_run_command_serves_a_key_made_by_the_tasks_and_logs_no_secret() {
    use std::os::unix::process::CommandExt;

    let dir = common::scratch_dir("readme");
    let port = common::free_port();
    let log_path = dir.join("server.log");

    let (ok, out) = task(
        &dir,
        &[
            "admin:create",
            "email=Admin@Example.com",
            "password=correct-horse-battery",
        ],
    );
    assert!(ok, "admin:create failed: {out}");
    let (ok, out) = task(
        &dir,
        &[
            "admin:create",
            "email=admin@example.com",
            "password=another-one",
        ],
    );
    assert!(!ok, "duplicate admin accepted: {out}");

    let (ok, out) = task(
        &dir,
        &[
            "key:create",
            "email=client@example.com",
            "name=readme",
            "calls=2",
            "from=2026-01-01",
            "until=2099-12-31",
        ],
    );
    assert!(ok, "key:create failed: {out}");
    let secret = out
        .lines()
        .find_map(|l| l.strip_prefix("secret (shown once, store it now): "))
        .expect("secret line")
        .trim()
        .to_string();
    let prefix = secret.split('_').nth(1).expect("prefix").to_string();

    let log = std::fs::File::create(&log_path).expect("log file");
    // A user's shell, not the test runner's: cargo/nextest export variables (CARGO_PKG_*,
    // NEXTEST_*, …) that would make serve.sh's own cargo build see a different environment.
    let passthrough = [
        "PATH",
        "HOME",
        "CARGO_HOME",
        "RUSTUP_HOME",
        "CARGO_TARGET_DIR",
        "TMPDIR",
    ];
    let child = Command::new("./scripts/serve.sh")
        .env_clear()
        .envs(
            passthrough
                .iter()
                .filter_map(|k| std::env::var(k).ok().map(|v| (*k, v))),
        )
        .envs(envs(&dir, port))
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .process_group(0)
        .spawn()
        .expect("start serve.sh");
    let server = Server(child);

    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut ping = json!(null);
    while Instant::now() < deadline {
        if let Ok(resp) = http.get(format!("{base}/ping")).send().await {
            ping = resp.json().await.unwrap_or(json!(null));
            if ping["ready"] == true {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        ping["status"],
        "ok",
        "server did not come up: {ping}\n--- serve.sh output (tail) ---\n{}",
        tail(&log_path, 40)
    );

    // The README's curl: no Content-Type header, so curl sends form-urlencoded.
    let resp = http
        .post(format!("{base}/api/"))
        .header("Authorization", format!("Bearer {secret}"))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(r#"{"text":"Is this real?"}"#)
        .send()
        .await
        .expect("request");
    let (status, body) = common::read(resp).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| !m.trim().is_empty()),
        "{body}"
    );

    // A near-miss secret is refused.
    let mut wrong = secret.clone();
    wrong.pop();
    wrong.push('x');
    // `POST /api/` at `url` with `{"text": "hi"}` (and a bearer key, if given): its status.
    let say_hi = |url: String, bearer: Option<String>| {
        let mut req = http.post(url).json(&json!({"text": "hi"}));
        if let Some(b) = bearer {
            req = req.bearer_auth(b);
        }
        async move { req.send().await.expect("request").status().as_u16() }
    };
    assert_eq!(
        say_hi(format!("{base}/api/"), Some(wrong.clone())).await,
        401
    );
    // Also when it rides in the base URL (`/k/<key>/…`): refused, and never logged.
    assert_eq!(say_hi(format!("{base}/k/{wrong}/api/"), None).await, 401);

    let (ok, out) = task(&dir, &["key:list"]);
    assert!(ok, "{out}");
    assert!(out.contains(&prefix) && out.contains("1/2"), "{out}");
    assert!(!out.contains(&secret), "key:list printed a secret");

    let (ok, out) = task(&dir, &["key:revoke", &format!("prefix={prefix}")]);
    assert!(ok, "{out}");
    assert_eq!(
        say_hi(format!("{base}/api/"), Some(secret.clone())).await,
        401
    );

    drop(server);
    let logs = std::fs::read_to_string(&log_path).expect("read log");
    assert!(
        logs.contains("job done"),
        "server log was not captured:\n{logs}"
    );
    let body_part = secret.rsplit('_').next().expect("secret body");
    assert!(
        !logs.contains(body_part),
        "the secret appeared in the server log"
    );
    assert!(
        !logs.contains(&wrong),
        "a presented key appeared in the server log"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The last `n` lines of a file, for failure messages.
fn tail(path: &std::path::Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[tokio::test]
async fn djangollmapi_keys_are_imported_by_hash_and_keep_working() {
    // Two keys as djangollmapi stores them (40 hex characters), exported with a header.
    let old = "66cc3a57c348b6b4947bac1a05916a1dcec060c3";
    let dir = common::scratch_dir("import");
    let file = dir.join("keys.csv");
    std::fs::write(
        &file,
        format!(
            "key,email,first_name,last_name,organization,n_allowed_requests,n_requests,start_date,end_date\n\
             {old},ada@example.com,Ada,Lovelace,ACME,100,7,2024-01-01,2099-12-31\n\
             0123456789abcdef0123456789abcdef01234567,bob@example.com,,,,,,,\n"
        ),
    )
    .expect("write keys");
    let (ok, out) = task(&dir, &["key:import", &format!("file={}", file.display())]);
    assert!(ok, "{out}");
    assert!(out.contains("imported 2 keys"), "{out}");
    assert!(!out.contains(old), "the task printed a secret: {out}");
    // Importing again stores nothing more (and says why).
    let (ok, out) = task(&dir, &["key:import", &format!("file={}", file.display())]);
    assert!(!ok, "a second import must fail: {out}");
    let (ok, list) = task(&dir, &["key:list"]);
    assert!(
        ok && list.contains("66cc3a57") && list.contains("ada@example.com"),
        "{list}"
    );
    let stored = std::fs::read(dir.join("tollgate.sqlite")).expect("database file");
    assert!(
        !stored.windows(old.len()).any(|w| w == old.as_bytes()),
        "the plaintext key reached the database"
    );
    let _ = std::fs::remove_dir_all(&dir);

    // An imported key authenticates, keeps its counters and its limits.
    let app = common::TestApp::spawn_scripted(|_| {}).await;
    tollgate::models::api_keys::ActiveModel::import(
        &app.ctx.db,
        tollgate::models::api_keys::KeyParams {
            email: "ada@example.com".into(),
            max_calls: Some(8),
            ..Default::default()
        },
        old,
        7,
    )
    .await
    .expect("import");
    // Seed 003's client call, with the old key as its bearer.
    let call = || async {
        app.http
            .post(app.url("/api/"))
            .header("Authorization", format!("Bearer {old}"))
            .json(&json!({"text": "Is this real?"}))
            .send()
            .await
            .expect("request")
            .status()
            .as_u16()
    };
    assert_eq!(call().await, 200);
    assert_eq!(call().await, 429, "7 used + 1 = the 8 allowed");
}

/// HOWTO's install: `scripts/install.sh` puts the binary, llama.cpp's libraries and the CPU
/// variants in one folder, and the binary started from there (no build tree on its library
/// path) loads its own copies and the best variant for this CPU.
#[tokio::test]
async fn an_installed_binary_runs_from_its_folder_on_the_best_cpu_variant() {
    use std::os::unix::process::CommandExt;

    let dir = common::scratch_dir("install");
    let dest = dir.join("bin");
    let out = Command::new("bash")
        .arg("scripts/install.sh")
        .args(["--bin", BIN])
        .arg(&dest)
        .output()
        .expect("run install.sh");
    assert!(
        out.status.success(),
        "install.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let variants: Vec<String> = std::fs::read_dir(dest.join("backends"))
        .expect("backends/ installed")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("libggml-cpu-"))
        .collect();
    assert!(
        variants.len() > 1,
        "one binary, several CPU variants: {variants:?}"
    );

    let port = common::free_port();
    let log_path = dir.join("server.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    // No LD_LIBRARY_PATH: what the test runner sets for the build tree must not help.
    let child = Command::new(dest.join("tollgate-cli"))
        .arg("start")
        .env_clear()
        .envs(
            ["PATH", "HOME", "TMPDIR"]
                .iter()
                .filter_map(|k| std::env::var(k).ok().map(|v| (*k, v))),
        )
        .envs(envs(&dir, port))
        .env("TOLLGATE_LOG_LEVEL", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .process_group(0)
        .spawn()
        .expect("start the installed binary");
    let pid = child.id();
    let server = Server(child);
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut ready = false;
    while Instant::now() < deadline && !ready {
        if let Ok(resp) = http
            .get(format!("http://127.0.0.1:{port}/ping"))
            .send()
            .await
        {
            ready = resp
                .json::<serde_json::Value>()
                .await
                .is_ok_and(|p| p["ready"] == true);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        ready,
        "installed binary did not come up:\n{}",
        tail(&log_path, 40)
    );
    // Its llama.cpp libraries and CPU module are the installed copies.
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    let mapped = |name: &str| {
        maps.lines()
            .filter(|l| l.contains(name))
            .map(|l| l.rsplit(' ').next().unwrap_or_default().to_string())
            .collect::<Vec<_>>()
    };
    for lib in ["libllama.so", "libggml-base.so", "libggml-cpu-"] {
        let paths = mapped(lib);
        assert!(
            !paths.is_empty()
                && paths
                    .iter()
                    .all(|p| p.starts_with(&*dest.to_string_lossy())),
            "{lib} should come from {}: {paths:?}",
            dest.display()
        );
    }
    drop(server);
    let logs = std::fs::read_to_string(&log_path).expect("read log");
    let chosen = logs
        .lines()
        .find(|l| l.contains("llama.cpp CPU backend chosen"))
        .unwrap_or_else(|| panic!("no CPU backend line in the log:\n{}", tail(&log_path, 40)));
    assert!(
        chosen.contains("libggml-cpu-")
            && chosen.contains(&*dest.join("backends").to_string_lossy()),
        "{chosen}"
    );
    if std::arch::is_x86_feature_detected!("avx512f") {
        assert!(
            chosen.contains("AVX512"),
            "AVX-512 CPU, variant without it: {chosen}"
        );
    } else if std::arch::is_x86_feature_detected!("avx2") {
        assert!(
            chosen.contains("AVX2"),
            "AVX2 CPU, variant without it: {chosen}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
