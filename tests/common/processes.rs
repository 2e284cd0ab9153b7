//! Other processes a test needs: a free port, a real `tollgate-cli start` process, the test
//! virtualenv's Python and the checks scripts run with it, and the demo LoRA adapter written by
//! scripts/make-lora.py.

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

/// A loopback TCP port that is free now (for a process the test starts).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// `tollgate-cli start` in its own folder (SQLite database and queue there, a free port, its
/// log in `server.log` there), stopped with SIGTERM (then killed) when dropped.
pub struct ServerProcess {
    child: Child,
    pub port: u16,
    pub dir: PathBuf,
}

impl ServerProcess {
    /// Starts the server in `env` (`LOCO_ENV`) with `configure` adding its own variables.
    pub fn start(dir: &Path, env: &str, configure: impl FnOnce(&mut Command)) -> Self {
        let port = free_port();
        let log = std::fs::File::create(dir.join("server.log")).expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate-cli"));
        cmd.arg("start")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("LOCO_ENV", env)
            .env(
                "DATABASE_URL",
                format!("sqlite://{}/tollgate.sqlite?mode=rwc", dir.display()),
            )
            .env(
                "TOLLGATE_QUEUE_URL",
                format!("sqlite://{}/queue.sqlite?mode=rwc", dir.display()),
            )
            .env("TOLLGATE_PORT", port.to_string())
            .env("TOLLGATE_BINDING", "127.0.0.1");
        configure(&mut cmd);
        let child = cmd
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start tollgate-cli");
        Self {
            child,
            port,
            dir: dir.to_path_buf(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// Waits until `GET /ping` says ready (bounded: a cold model load takes seconds).
    pub async fn wait_ready(&mut self, http: &reqwest::Client) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the server exited ({status}):\n{}", self.log());
            }
            if let Ok(resp) = http.get(self.url("/ping")).send().await {
                if let Ok(body) = resp.json::<serde_json::Value>().await {
                    if body["ready"] == true {
                        return;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("the server was not ready in 120 s:\n{}", self.log());
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-s", "TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The test virtualenv's Python (gguf, numpy and the openai SDK installed).
pub fn python() -> &'static Path {
    let python = Path::new(".venv/bin/python");
    assert!(
        python.exists(),
        "missing .venv with gguf/numpy/openai: run ./scripts/test.sh (it creates it)"
    );
    python
}

/// Runs a checks script (`program args…`) and asserts that it succeeded and printed `passed`;
/// `what` names it in the failure message.
pub async fn run_checks(program: impl AsRef<OsStr>, args: &[&str], what: &str, passed: &str) {
    let out = tokio::process::Command::new(program)
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("run the {what}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{what} failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains(passed), "{stdout}");
}

/// Writes the demo adapter for `seed` to `path` with scripts/make-lora.py. The script is
/// deterministic and slowish (it parses the whole base model), so its output is kept in a cache
/// keyed by the script's content, the base model's size and the seed, and copied from there.
pub fn make_adapter(path: &Path, seed: u32) {
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
