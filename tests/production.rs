//! The production topology, as separate processes on loopback: API instances and worker
//! processes (`task worker`) sharing nothing but Postgres (a fresh database per test) and Redis
//! (a unique key prefix per test, or a private `redis-server` where the test restarts it).
//! Workers are killed, stopped and restarted under load; nothing may be lost or charged twice.

mod common;

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use common::{
    admin_params, code, create_database, drop_database, free_port, header, ids, issue_key, jobs_of,
    key_row, pg_server, read, scratch_dir, TestKey,
};
use sea_orm::{DatabaseConnection, EntityTrait};
use serde_json::{json, Value};
use tollgate::models::{
    _entities::jobs,
    api_keys::KeyParams,
    workers::{self, WorkerState},
};

const BIN: &str = env!("CARGO_BIN_EXE_tollgate-cli");
/// A prompt the small model answers at length (greedy), so a job runs for seconds.
const LONG: &str = "Write a very long story about a dragon, a knight and a village.";

/// Redis of this machine, or the test's own server.
struct Redis {
    url: String,
    own: Option<(Child, u16)>,
}

impl Redis {
    fn shared() -> Self {
        Self {
            url: std::env::var("TOLLGATE_TEST_REDIS")
                .unwrap_or_else(|_| "redis://127.0.0.1:6379".into()),
            own: None,
        }
    }

    /// A private `redis-server` (no persistence, like the machine's), free to be restarted.
    fn private() -> Self {
        let port = free_port();
        let child = start_redis(port);
        Self {
            url: format!("redis://127.0.0.1:{port}"),
            own: Some((child, port)),
        }
    }

    fn kill(&mut self) {
        if let Some((child, _)) = &mut self.own {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn restart(&mut self) {
        if let Some((child, port)) = &mut self.own {
            *child = start_redis(*port);
        }
    }
}

fn start_redis(port: u16) -> Child {
    let mut child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server (installed on this machine kind)");
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return child;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("redis-server did not start on port {port}");
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One deployment: a Postgres database, a Redis namespace, and the processes started on them.
struct Cluster {
    db: DatabaseConnection,
    database: String,
    redis: Redis,
    prefix: String,
    dir: PathBuf,
    apis: Vec<(Child, u16)>,
    workers: Vec<(Child, String)>,
    http: reqwest::Client,
    max_attempts: u32,
}

impl Cluster {
    async fn new(redis: Redis) -> Self {
        Self::with_attempts(redis, 3).await
    }

    async fn with_attempts(redis: Redis, max_attempts: u32) -> Self {
        let database = create_database("tollgate_prod").await;
        let mut cluster = Self {
            db: sea_orm::Database::connect(format!("{}/{database}", pg_server()))
                .await
                .expect("connect to the test database"),
            database,
            redis,
            prefix: format!("tgtest{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
            dir: scratch_dir("prod"),
            apis: Vec::new(),
            workers: Vec::new(),
            http: reqwest::Client::new(),
            max_attempts,
        };
        // Migrations run once, as HOWTO.md has operators do it, not from every process.
        let out = cluster
            .command(&["db", "migrate"])
            .output()
            .expect("run db migrate");
        assert!(
            out.status.success(),
            "db migrate: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.http = reqwest::Client::builder()
            .timeout(Duration::from_secs(180))
            .build()
            .expect("client");
        cluster
    }

    fn command(&self, args: &[&str]) -> Command {
        let root = env!("CARGO_MANIFEST_DIR");
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .current_dir(root)
            .env("LOCO_ENV", "production")
            .env("DATABASE_URL", format!("{}/{}", pg_server(), self.database))
            .env("REDIS_URL", &self.redis.url)
            .env("TOLLGATE_QUEUE_PREFIX", &self.prefix)
            .env("TOLLGATE_HEARTBEAT_SECONDS", "1")
            .env("TOLLGATE_MISSED_HEARTBEATS", "3")
            .env("TOLLGATE_MAX_ATTEMPTS", self.max_attempts.to_string())
            .env("TOLLGATE_LOG_FORMAT", "json")
            .env("TOLLGATE_LOG_LEVEL", "info")
            .env("TOLLGATE_THREADS", "1")
            .env("TOLLGATE_DEFAULT_TEMPERATURE", "0")
            .env("TOLLGATE_WAIT_TIMEOUT_MS", "150000");
        cmd
    }

    fn log(&self, name: &str) -> std::fs::File {
        std::fs::File::create(self.dir.join(format!("{name}.log"))).expect("log file")
    }

    /// Starts an API instance (no worker inside) and waits until it answers.
    async fn start_api(&mut self, port: u16) -> usize {
        let log = self.log(&format!("api-{port}"));
        let child = self
            .command(&["start"])
            .env("TOLLGATE_PORT", port.to_string())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start api");
        self.apis.push((child, port));
        let url = format!("http://127.0.0.1:{port}/_ping");
        for _ in 0..600 {
            if let Ok(r) = self.http.get(&url).send().await {
                if r.status().is_success() {
                    return self.apis.len() - 1;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "api on {port} did not start: {}",
            self.read_log(&format!("api-{port}"))
        );
    }

    /// Starts a worker process and waits until its heartbeat is in the registry.
    async fn start_worker(&mut self, name: &str) {
        self.start_worker_with(name, &[]).await;
    }

    async fn start_worker_with(&mut self, name: &str, extra: &[&str]) {
        self.start_worker_env(name, extra, &[]).await;
    }

    async fn start_worker_env(&mut self, name: &str, extra: &[&str], env: &[(&str, &str)]) {
        let log = self.log(&format!("worker-{name}-{}", self.workers.len()));
        let name_arg = format!("name={name}");
        let mut args = vec!["task", "worker", name_arg.as_str()];
        args.extend_from_slice(extra);
        let mut cmd = self.command(&args);
        cmd.envs(env.iter().copied());
        let child = cmd
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start worker");
        self.workers.push((child, name.to_string()));
        for _ in 0..600 {
            if let Some(w) = self.worker_row(name).await {
                if w.stopped_at.is_none() && w.heartbeat_age() < Duration::from_secs(2) {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("worker {name} did not start");
    }

    fn read_log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    async fn worker_row(&self, name: &str) -> Option<workers::Model> {
        workers::list(&self.db)
            .await
            .expect("workers")
            .into_iter()
            .find(|w| w.id == name)
    }

    fn worker_child(&mut self, name: &str) -> &mut Child {
        &mut self
            .workers
            .iter_mut()
            .rev()
            .find(|(_, n)| n == name)
            .expect("worker started")
            .0
    }

    fn url(&self, api: usize, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.apis[api].1)
    }

    async fn key(&self, max_calls: Option<i64>) -> TestKey {
        let params = KeyParams {
            name: "prod".into(),
            email: "ops@example.com".into(),
            max_calls,
            rate_limit_per_minute: Some(100_000),
            rate_limit_burst: Some(1000),
            ..Default::default()
        };
        issue_key(&self.db, params).await
    }

    async fn calls_used(&self, key: &TestKey) -> i64 {
        key_row(&self.db, key).await.calls_used
    }

    async fn jobs_of(&self, key: &TestKey) -> Vec<jobs::Model> {
        jobs_of(&self.db, key).await
    }

    async fn post(&self, api: usize, key: &TestKey, path: &str, body: Value) -> (u16, Value) {
        let resp = self
            .http
            .post(self.url(api, path))
            .bearer_auth(&key.secret)
            .json(&body)
            .send()
            .await
            .expect("request");
        read(resp).await
    }

    /// `POST /api/jobs`: asserts that the job was accepted (202) and returns its id.
    async fn submit(&self, api: usize, key: &TestKey, body: Value) -> String {
        let (status, body) = self.post(api, key, "/api/jobs", body).await;
        assert_eq!(status, 202, "{body}");
        body["job_id"].as_str().expect("job id").to_string()
    }

    /// `GET` with a bearer key (`None`: without one).
    async fn get(&self, api: usize, secret: Option<&str>, path: &str) -> (u16, Value) {
        let mut req = self.http.get(self.url(api, path));
        if let Some(secret) = secret {
            req = req.bearer_auth(secret);
        }
        read(req.send().await.expect("request")).await
    }

    /// The Prometheus text of one API instance.
    async fn metrics(&self, api: usize) -> String {
        self.http
            .get(self.url(api, "/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    }

    /// `POST /api/` in the background, for a client that waits while the test acts.
    fn ask_later(
        &self,
        api: usize,
        key: &TestKey,
        body: Value,
    ) -> tokio::task::JoinHandle<(u16, Value)> {
        let req = self
            .http
            .post(self.url(api, "/api/"))
            .bearer_auth(&key.secret)
            .json(&body);
        tokio::spawn(async move { read(req.send().await.expect("request")).await })
    }

    /// The job of `key` that a worker is running now (polled; bounded).
    async fn running_job(&self, key: &TestKey) -> jobs::Model {
        for _ in 0..1200 {
            if let Some(j) = self
                .jobs_of(key)
                .await
                .into_iter()
                .find(|j| j.status == "running")
            {
                return j;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no job of the key started running");
    }

    /// Polls the job record until it is settled (bounded: 180 s).
    async fn settled(&self, id: &str) -> jobs::Model {
        for _ in 0..1800 {
            let job = jobs::Entity::find_by_id(id.to_string())
                .one(&self.db)
                .await
                .expect("db")
                .expect("job");
            if job.status == "done" || job.status == "failed" {
                return job;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("job {id} did not settle");
    }

    fn signal(child: &Child, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }
}

/// Waits (bounded) for a child process to exit and returns its status.
fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "process did not exit within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let apis = self.apis.iter_mut().map(|(c, _)| c);
        for child in apis.chain(self.workers.iter_mut().map(|(c, _)| c)) {
            let _ = child.kill();
            let _ = child.wait();
        }
        if self.redis.own.is_none() {
            // Shared Redis: remove this test's keys.
            let _ = Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "redis-cli -u {} --scan --pattern '*{}*' | xargs -r redis-cli -u {} del >/dev/null",
                    self.redis.url, self.prefix, self.redis.url
                ))
                .status();
        }
        drop_database(&self.database);
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("process logs kept in {}", self.dir.display());
        }
    }
}

/// `n` requests at once with `secret`, spread over the API instances, at `path` with `body(i)`;
/// the answers in order, each with whether it carried `Retry-After`.
async fn at_once(
    c: &std::sync::Arc<Cluster>,
    secret: &str,
    n: usize,
    path: &'static str,
    body: impl Fn(usize) -> Value,
) -> Vec<(u16, Value, bool)> {
    let mut tasks = Vec::new();
    for i in 0..n {
        let (c, secret, body) = (c.clone(), secret.to_string(), body(i));
        tasks.push(tokio::spawn(async move {
            let resp = c
                .http
                .post(c.url(i % c.apis.len(), path))
                .bearer_auth(secret)
                .json(&body)
                .send()
                .await
                .expect("request");
            let retry_after = header(&resp, "retry-after").is_some();
            let (status, body) = read(resp).await;
            (status, body, retry_after)
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("task"));
    }
    out
}

#[tokio::test]
async fn two_apis_and_two_workers_serve_everything_and_count_quota_exactly() {
    let mut c = Cluster::new(Redis::shared()).await;
    c.start_api(free_port()).await;
    c.start_api(free_port()).await;
    // Four sequences and no jobs held in waiting: eight requests at once are more than one
    // worker takes, so both must serve (holding 8 + 8, an idle worker may take a whole round
    // before the other polls).
    let four = [("TOLLGATE_PARALLEL", "4"), ("TOLLGATE_LOOKAHEAD", "0")];
    c.start_worker_env("w1", &[], &four).await;
    c.start_worker_env("w2", &[], &four).await;

    // 40 requests spread over both APIs, 8 at a time: every one answered.
    let key = c.key(None).await;
    let c = std::sync::Arc::new(c);
    let mut answered = 0;
    for round in 0..5 {
        let answers = at_once(
            &c,
            &key.secret,
            8,
            "/api/",
            |i| json!({"text": format!("Say the number {round}{i}."), "max_tokens": 6}),
        )
        .await;
        for (status, body, _) in answers {
            assert_eq!(status, 200, "{body}");
            assert!(
                !body["message"].as_str().unwrap_or_default().is_empty(),
                "{body}"
            );
            answered += 1;
        }
    }
    assert_eq!(answered, 40);
    let jobs = c.jobs_of(&key).await;
    assert_eq!(jobs.len(), 40);
    assert!(jobs.iter().all(|j| j.status == "done"));
    for w in ["w1", "w2"] {
        let served = jobs
            .iter()
            .filter(|j| j.worker.as_deref() == Some(w))
            .count();
        assert!(served > 0, "worker {w} served none of the 40 jobs");
    }
    assert_eq!(c.calls_used(&key).await, 40);

    // Finished tasks leave Redis (their payloads hold prompts); the jobs table keeps them.
    let data_key = format!("{}.generate.smollm2:data", c.prefix);
    let mut left = -1;
    for _ in 0..300 {
        let out = Command::new("redis-cli")
            .args(["-u", &c.redis.url, "HLEN", &data_key])
            .output()
            .expect("redis-cli");
        left = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(-1);
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(left, 0, "finished tasks still in {data_key}");

    // A token stream crosses processes: API 1 streams what a worker elsewhere generates.
    let resp = c
        .http
        .post(c.url(1, "/v1/chat/completions"))
        .bearer_auth(&key.secret)
        .json(&json!({
            "model": "smollm2",
            "messages": [{"role": "user", "content": "Name three colours."}],
            "max_tokens": 12,
            "stream": true
        }))
        .send()
        .await
        .expect("stream");
    assert_eq!(resp.status().as_u16(), 200);
    let text = resp.text().await.expect("sse");
    let chunks = text.lines().filter(|l| l.starts_with("data: {")).count();
    assert!(chunks >= 3, "expected several streamed chunks: {text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");

    // The registry lists both workers as alive, with what they hold.
    let gone_after = Duration::from_secs(3);
    let rows = workers::list(&c.db).await.expect("workers");
    for w in ["w1", "w2"] {
        let row = rows.iter().find(|r| r.id == w).expect("worker row");
        assert_ne!(row.state(gone_after), WorkerState::Gone, "{row:?}");
        assert_eq!(row.model_list(), vec!["smollm2".to_string()]);
        assert!(row.jobs_served > 0, "{row:?}");
    }

    // Quota across two instances: 60 concurrent submissions on 25 calls, split over both APIs,
    // admit exactly 25.
    let limited = c.key(Some(25)).await;
    let small = |i: usize| json!({"text": format!("Hi {i}"), "max_tokens": 1});
    let (mut accepted, mut refused) = (0, 0);
    for (status, body, _) in at_once(&c, &limited.secret, 60, "/api/jobs", small).await {
        match status {
            202 => accepted += 1,
            429 => {
                assert_eq!(code(&body), "quota_exceeded", "{body}");
                refused += 1;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!((accepted, refused), (25, 35));
    assert_eq!(c.calls_used(&limited).await, 25);
    assert_eq!(c.jobs_of(&limited).await.len(), 25);

    // Rate limits hold across instances too (state in Redis): at 6 per minute with a burst of
    // 4, ten concurrent requests split over both APIs let exactly 4 through.
    let slow = KeyParams {
        name: "slow".into(),
        email: "slow@example.com".into(),
        rate_limit_per_minute: Some(6),
        rate_limit_burst: Some(4),
        ..Default::default()
    };
    let slow = issue_key(&c.db, slow).await;
    let (mut passed, mut limited_rate) = (0, 0);
    for (status, body, retry_after) in at_once(&c, &slow.secret, 10, "/api/jobs", small).await {
        match status {
            202 => passed += 1,
            429 => {
                assert_eq!(code(&body), "rate_limited", "{body}");
                assert!(retry_after, "429 without Retry-After");
                limited_rate += 1;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!((passed, limited_rate), (4, 6));

    // Operations: Prometheus metrics of the deployment, from either instance.
    let metrics = c.metrics(0).await;
    for line in [
        "tollgate_worker_up{worker=\"w1\",device=\"cpu\"} 1",
        "tollgate_worker_up{worker=\"w2\",device=\"cpu\"} 1",
        "tollgate_keys_near_quota 1",
        "tollgate_queue_depth{model=\"smollm2\"}",
        "tollgate_http_requests_total{route=\"/api/jobs\",method=\"POST\",status=\"429\"}",
        "tollgate_http_request_duration_seconds_bucket{route=\"/api\",le=\"+Inf\"}",
        "tollgate_worker_tokens_per_second{worker=\"w1\"}",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in:\n{metrics}");
    }
    let done: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tollgate_jobs{status=\"done\"} "))
        .and_then(|n| n.parse().ok())
        .expect("done jobs");
    assert!(done >= 41, "{metrics}");
    let generated: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tollgate_generated_tokens_total "))
        .and_then(|n| n.parse().ok())
        .expect("generated tokens");
    assert!(generated >= 40, "{metrics}");

    // The worker registry over the API: admin keys only.
    let (status, _) = c.get(1, Some(&key.secret), "/api/workers").await;
    assert_eq!(status, 403);
    let admin = issue_key(&c.db, admin_params()).await;
    let (status, listed) = c.get(1, Some(&admin.secret), "/api/workers").await;
    assert_eq!(status, 200, "{listed}");
    let ids = ids(&listed["data"]);
    assert!(ids.contains(&"w1") && ids.contains(&"w2"), "{listed}");

    // Logs: JSON lines; the worker's line for a job names the request that queued it (the id
    // the client got in `x-request-id`), and no secret appears anywhere.
    let resp = c
        .http
        .post(c.url(0, "/api/"))
        .bearer_auth(&key.secret)
        .json(&json!({"text": "One more.", "max_tokens": 3}))
        .send()
        .await
        .expect("request");
    let request_id = header(&resp, "x-request-id").expect("x-request-id");
    let (status, body) = read(resp).await;
    assert_eq!(status, 200, "{body}");
    let job_id = body["job_id"].as_str().expect("job id").to_string();
    let mut seen = false;
    let mut logs = String::new();
    for entry in std::fs::read_dir(&c.dir).expect("logs") {
        let text = std::fs::read_to_string(entry.expect("entry").path()).expect("log");
        for line in text.lines().filter(|l| l.starts_with('{')) {
            let v: Value = serde_json::from_str(line).expect("every log line is JSON");
            if v["fields"]["message"] == "job done" && v["span"]["job_id"] == job_id.as_str() {
                assert_eq!(v["span"]["request_id"], request_id.as_str(), "{line}");
                seen = true;
            }
        }
        logs.push_str(&text);
    }
    assert!(seen, "no worker log line for job {job_id}");
    for secret in [&key.secret, &limited.secret, &admin.secret] {
        assert!(!logs.contains(secret.as_str()), "a key reached the logs");
    }
}

#[tokio::test]
async fn a_worker_killed_mid_job_loses_nothing_and_charges_once() {
    let mut c = Cluster::new(Redis::shared()).await;
    c.start_api(free_port()).await;
    c.start_worker("a").await;
    c.start_worker("b").await;
    let key = c.key(Some(10)).await;

    // A client waits on a long job; the worker running it is SIGKILLed.
    let waiting = c.ask_later(0, &key, json!({"text": LONG, "max_tokens": 300}));
    let running = c.running_job(&key).await;
    let victim = running.worker.clone().expect("running job has a worker");
    c.worker_child(&victim).kill().expect("SIGKILL worker");

    // The other worker picks it up; the waiting client gets the answer.
    let (status, body) = waiting.await.expect("client");
    assert_eq!(status, 200, "{body}");
    assert!(
        !body["message"].as_str().unwrap_or_default().is_empty(),
        "{body}"
    );
    let job = c.settled(&running.id).await;
    assert_eq!(job.status, "done");
    assert_eq!(job.attempts, 2, "{job:?}");
    assert_ne!(job.worker.as_deref(), Some(victim.as_str()), "{job:?}");
    assert_eq!(c.calls_used(&key).await, 1, "charged once");
    assert_eq!(c.jobs_of(&key).await.len(), 1);

    // The registry shows the killed worker as gone, the other as alive.
    let gone_after = Duration::from_secs(3);
    let mut victim_state = WorkerState::Idle;
    for _ in 0..100 {
        victim_state = c.worker_row(&victim).await.expect("row").state(gone_after);
        if victim_state == WorkerState::Gone {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(victim_state, WorkerState::Gone);
    let survivor = if victim == "a" { "b" } else { "a" };
    assert_ne!(
        c.worker_row(survivor).await.expect("row").state(gone_after),
        WorkerState::Gone
    );
}

#[tokio::test]
async fn a_job_whose_workers_keep_dying_fails_with_a_reason_after_its_attempts() {
    let mut c = Cluster::with_attempts(Redis::shared(), 1).await;
    c.start_api(free_port()).await;
    c.start_worker("solo").await;
    let key = c.key(Some(10)).await;
    let id = c
        .submit(0, &key, json!({"text": LONG, "max_tokens": 300}))
        .await;
    let running = c.running_job(&key).await;
    assert_eq!(running.id, id);
    c.worker_child("solo").kill().expect("SIGKILL worker");
    let _ = c.worker_child("solo").wait();

    // The same worker restarted finds its orphaned job: one attempt allowed, so it is failed
    // with a reason, not lost and not left `running`; the call is refunded.
    c.start_worker("solo").await;
    let job = c.settled(&id).await;
    assert_eq!(job.status, "failed", "{job:?}");
    let reason = job.error.clone().unwrap_or_default();
    assert!(reason.contains("worker stopped"), "{reason}");
    let (status, body) = c
        .get(0, Some(&key.secret), &format!("/api/jobs/{id}"))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "failed", "{body}");
    assert_eq!(c.calls_used(&key).await, 0, "a failed job is not charged");
}

#[tokio::test]
async fn sigterm_lets_a_worker_finish_its_job_and_an_api_drain_and_restart() {
    let mut c = Cluster::new(Redis::shared()).await;
    let port = free_port();
    c.start_api(port).await;
    c.start_worker("only").await;
    let key = c.key(None).await;

    // A client waits on a long job; both its API and its worker get SIGTERM mid-job.
    let waiting = c.ask_later(0, &key, json!({"text": LONG, "max_tokens": 200}));
    let running = c.running_job(&key).await;
    Cluster::signal(c.worker_child("only"), "-TERM");
    Cluster::signal(&c.apis[0].0, "-TERM");
    // The worker finishes the job it holds, then exits cleanly; the API drains the request.
    let (status, body) = waiting.await.expect("client");
    assert_eq!(status, 200, "{body}");
    let exit = wait_exit(c.worker_child("only"), Duration::from_secs(120));
    assert!(exit.success(), "worker exit: {exit:?}");
    assert_eq!(c.settled(&running.id).await.status, "done");
    let exit = wait_exit(&mut c.apis[0].0, Duration::from_secs(60));
    assert!(exit.success(), "api exit: {exit:?}");
    let row = c.worker_row("only").await.expect("row");
    assert_eq!(row.state(Duration::from_secs(3)), WorkerState::Stopped);

    // With no worker, an async job waits in the queue, and the job queued there survives the
    // API's restart.
    c.apis.clear();
    c.start_api(port).await;
    let queued = c
        .submit(0, &key, json!({"text": "Say hello.", "max_tokens": 8}))
        .await;
    let (_, status_body) = c
        .get(0, Some(&key.secret), &format!("/api/jobs/{queued}"))
        .await;
    assert_eq!(status_body["status"], "queued", "{status_body}");
    let metrics = c.metrics(0).await;
    assert!(
        metrics.contains("tollgate_queue_depth{model=\"smollm2\"} 1"),
        "the waiting job counts in the queue depth: {metrics}"
    );

    // A worker comes back and runs it; then an async job is running when its API restarts:
    // after the restart the result is retrievable by id.
    c.start_worker("only").await;
    assert_eq!(c.settled(&queued).await.status, "done");
    let id = c
        .submit(0, &key, json!({"text": LONG, "max_tokens": 200}))
        .await;
    assert_eq!(c.running_job(&key).await.id, id);
    Cluster::signal(&c.apis[0].0, "-TERM");
    let _ = wait_exit(&mut c.apis[0].0, Duration::from_secs(60));
    c.apis.clear();
    c.start_api(port).await;
    let mut body = Value::Null;
    for _ in 0..1800 {
        let (status, polled) = c
            .get(0, Some(&key.secret), &format!("/api/jobs/{id}"))
            .await;
        assert_eq!(status, 200, "{polled}");
        body = polled;
        if body["status"] == "done" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(body["status"], "done", "{body}");
    assert!(
        !body["message"].as_str().unwrap_or_default().is_empty(),
        "{body}"
    );
}

#[tokio::test]
async fn redis_restart_fails_requests_fast_and_free_then_everything_reconnects() {
    let mut c = Cluster::new(Redis::private()).await;
    c.start_api(free_port()).await;
    c.start_worker("r").await;
    let key = c.key(Some(50)).await;
    let body = json!({"text": "Say yes.", "max_tokens": 4});
    let (status, answer) = c.post(0, &key, "/api/", body.clone()).await;
    assert_eq!(status, 200, "{answer}");

    c.redis.kill();
    for _ in 0..3 {
        let (status, answer) = c.post(0, &key, "/api/", body.clone()).await;
        assert_eq!(status, 503, "{answer}");
        assert_eq!(code(&answer), "queue_unavailable", "{answer}");
    }
    assert_eq!(
        c.calls_used(&key).await,
        1,
        "nothing spent during the outage"
    );
    assert_eq!(
        c.jobs_of(&key).await.len(),
        1,
        "nothing queued during the outage"
    );

    // Same port, empty Redis: no process is restarted, and the very next request succeeds.
    c.redis.restart();
    let (status, answer) = c.post(0, &key, "/api/", body.clone()).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(c.calls_used(&key).await, 2);
}

#[tokio::test]
async fn each_worker_serves_only_the_models_it_holds() {
    let mut c = Cluster::new(Redis::shared()).await;
    c.start_api(free_port()).await;
    c.start_worker("d").await;
    // A second model on its own worker (the same weights under another name keep CI light).
    c.start_worker_with(
        "b",
        &[
            "model=smollm2-b",
            "path=models/SmolLM2-135M-Instruct.Q4_1.gguf",
        ],
    )
    .await;
    let key = c.key(None).await;
    let get = |path: &'static str| c.get(0, Some(&key.secret), path);
    let (status, models) = get("/v1/models").await;
    assert_eq!(status, 200, "{models}");
    let ids = ids(&models["data"]);
    assert!(
        ids.contains(&"smollm2") && ids.contains(&"smollm2-b"),
        "{models}"
    );
    let (_, loaded) = get("/llm/loaded_models").await;
    let mut loaded: Vec<&str> = loaded
        .as_array()
        .expect("list")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    loaded.sort_unstable();
    assert_eq!(
        loaded,
        ["smollm2", "smollm2-b"],
        "models held by worker processes"
    );
    let (_, ping) = get("/ping").await;
    assert_eq!(ping["ready"], true, "{ping}");
    let mut served = ping["models"].as_array().cloned().unwrap_or_default();
    served.sort_by_key(ToString::to_string);
    assert_eq!(served, vec![json!("smollm2"), json!("smollm2-b")], "{ping}");
    let admin = issue_key(&c.db, admin_params()).await;
    let (_, ping) = c.get(0, Some(&admin.secret), "/ping").await;
    assert_eq!(ping["workers"].as_array().map(Vec::len), Some(2), "{ping}");

    let c = std::sync::Arc::new(c);
    let chat = |i: usize| {
        let model = if i.is_multiple_of(2) {
            "smollm2"
        } else {
            "smollm2-b"
        };
        json!({
            "model": model,
            "messages": [{"role": "user", "content": format!("Count to {i}.")}],
            "max_tokens": 5
        })
    };
    for (status, body, _) in at_once(&c, &key.secret, 8, "/v1/chat/completions", chat).await {
        assert_eq!(status, 200, "{body}");
    }
    let jobs = c.jobs_of(&key).await;
    assert_eq!(jobs.len(), 8);
    for j in &jobs {
        let expected = if j.model == "smollm2-b" { "b" } else { "d" };
        assert_eq!(j.worker.as_deref(), Some(expected), "{j:?}");
    }
    assert_eq!(jobs.iter().filter(|j| j.model == "smollm2-b").count(), 4);
    let metrics = c.metrics(0).await;
    assert!(
        metrics.contains("tollgate_queue_depth{model=\"smollm2-b\"} 0"),
        "{metrics}"
    );

    let chat = json!({"model": "nobody-has-it", "messages": [{"role": "user", "content": "Hi"}]});
    let (status, body) = c.post(0, &key, "/v1/chat/completions", chat).await;
    assert_eq!(status, 404, "{body}");
    assert!(
        body.to_string().contains("smollm2-b"),
        "names what is available: {body}"
    );
}

#[tokio::test]
async fn load_model_in_production_has_a_worker_load_it_and_unload_model_stops_it() {
    let mut c = Cluster::new(Redis::shared()).await;
    let api = c.start_api(free_port()).await;
    // `d` serves the default model only; `l` also takes models asked for at run time.
    c.start_worker("d").await;
    c.start_worker_with("l", &["accept_loads=true"]).await;
    let admin = issue_key(&c.db, admin_params()).await;
    let key = c.key(None).await;

    // Seed 004's own flow: store a configuration, load it, use it, unload it.
    let config = json!({"model_id": "placed", "model_type": "llama_cpp",
                        "model_name": "SmolLM2-135M-Instruct.Q4_1.gguf", "model_kwargs": {}});
    let (status, body) = c.post(api, &admin, "/llm/configure_model/", config).await;
    assert_eq!(status, 200, "{body}");
    let config_id = body["config_id"].as_str().expect("config id").to_string();
    let (status, body) = c
        .post(
            api,
            &admin,
            &format!("/llm/load_model/{config_id}"),
            json!({}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["message"], "Model loaded successfully", "{body}");
    let (_, loaded) = c.get(api, Some(&key.secret), "/llm/loaded_models").await;
    assert!(
        loaded
            .as_array()
            .is_some_and(|l| l.contains(&json!("placed"))),
        "{loaded}"
    );
    let chat = json!({"model": "placed", "max_tokens": 4,
                      "messages": [{"role": "user", "content": "Say hi."}]});
    let (status, body) = c
        .post(api, &key, "/v1/chat/completions", chat.clone())
        .await;
    assert_eq!(status, 200, "{body}");
    let jobs = c.jobs_of(&key).await;
    assert!(
        jobs[0]
            .worker
            .as_deref()
            .is_some_and(|w| w.ends_with("-placed")),
        "served by the model loaded on worker l: {jobs:?}"
    );
    // Loading it again is a no-op; its configuration cannot be deleted while it is wanted.
    let (status, body) = c
        .post(
            api,
            &admin,
            &format!("/llm/load_model/{config_id}"),
            json!({}),
        )
        .await;
    assert_eq!(
        (status, body["message"].clone()),
        (200, json!("Model already loaded"))
    );
    let resp = c
        .http
        .delete(c.url(api, &format!("/llm/configuration/{config_id}")))
        .bearer_auth(&admin.secret)
        .send()
        .await
        .expect("delete");
    assert_eq!(resp.status().as_u16(), 409);

    let (status, body) = c
        .post(api, &admin, "/llm/unload_model/placed", json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, loaded) = c.get(api, Some(&key.secret), "/llm/loaded_models").await;
    assert!(
        loaded
            .as_array()
            .is_some_and(|l| !l.contains(&json!("placed"))),
        "{loaded}"
    );
    let (status, body) = c.post(api, &key, "/v1/chat/completions", chat).await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = c
        .post(api, &admin, "/llm/unload_model/placed", json!({}))
        .await;
    assert_eq!(status, 404, "{body}");

    // A file no worker can load: the worker's reason comes back, nothing is left wanted.
    let bad = json!({"model_id": "broken", "model_type": "llama_cpp",
                     "model_name": "missing.gguf", "model_kwargs": {}});
    let (status, body) = c.post(api, &admin, "/llm/configure_model/", bad).await;
    assert_eq!(status, 200, "{body}");
    let bad_id = body["config_id"].as_str().expect("config id").to_string();
    let (status, body) = c
        .post(api, &admin, &format!("/llm/load_model/{bad_id}"), json!({}))
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("missing.gguf")),
        "{body}"
    );
}

#[tokio::test]
async fn a_worker_whose_engine_died_is_reported_and_its_model_refused_with_503() {
    let mut c = Cluster::new(Redis::shared()).await;
    let api = c.start_api(free_port()).await;
    // A worker on the scripted engine (no weights), whose restart waits long enough to look.
    let env = [
        ("TOLLGATE_ENGINE_BACKEND", "scripted"),
        ("TOLLGATE_ENGINE_RESTART_BACKOFF_MS", "600000"),
    ];
    c.start_worker_env("s", &[], &env).await;
    let key = c.key(None).await;
    let (status, body) = c.post(api, &key, "/api/", json!({"text": "hello"})).await;
    assert_eq!(status, 200, "{body}");

    // A prompt the scripted engine panics on, outside any job's own guard: its thread dies.
    let panic = json!({"text": tollgate::engine::scripted::PANIC_TRIGGER});
    let (status, body) = c.post(api, &key, "/api/", panic).await;
    assert!(status >= 500, "{status} {body}");
    // The worker's next heartbeat says its engine is down: the API's /ping says so (503).
    let mut ping = (0, Value::Null);
    for _ in 0..100 {
        ping = c.get(api, None, "/ping").await;
        if ping.0 == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ping.0, 503, "{}", ping.1);
    assert_eq!(ping.1["ready"], false, "{}", ping.1);
    assert!(
        ping.1["reason"]
            .as_str()
            .is_some_and(|r| r.contains("panicked")),
        "{}",
        ping.1
    );
    // Requests for its model are refused, with the reason, and spend nothing (admission reads
    // the worker registry at most once a second: past that, at once).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let before = c.calls_used(&key).await;
    let (status, body) = c
        .post(api, &key, "/api/", json!({"text": "hello again"}))
        .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(code(&body), "model_unavailable", "{body}");
    assert_eq!(c.calls_used(&key).await, before);
    let metrics = c.metrics(api).await;
    assert!(
        metrics.contains("tollgate_worker_engine_ready{worker=\"s\"} 0"),
        "{metrics}"
    );
}
