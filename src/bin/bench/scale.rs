//! Part 7, on its own (`--only scale`): what a deployment's history costs (issue 16, item 5).
//!
//! A server on the scripted engine (the figures are the database's and the web layer's, not the
//! model's) is measured on an empty database, filled with `--scale-jobs` finished jobs (with
//! their usage rows and running totals) spread over 90 days and `--scale-keys` keys, and
//! measured again with the same requests: a `/metrics` scrape, the dashboard's keys list (first
//! page, a deep page, a search), one key's page, the jobs list (unfiltered and by model, key and
//! status), the overview, and seed 003's `/usage/`. Admission is compared differently: after
//! the fill, request by request in turn with a second server whose database stays empty, since
//! on a shared 2-core machine the load moves by more than 10 % between two moments. On SQLite
//! files, then on fresh Postgres databases (dropped afterwards). The job queue is a SQLite file
//! in both: it holds no history, so it is not what this part measures.
//!
//! The fill is SQL generating its own rows (a recursive CTE on SQLite, `generate_series` on
//! Postgres) in statements of 50,000 rows, so a million jobs take seconds to minutes, not the
//! hours a million admissions would.

use std::{
    fmt::Write as _,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _};
use loco_rs::app::AppContext;
use reqwest::header;
use sea_orm::{ConnectionTrait, DatabaseBackend, Statement};
use serde_json::{json, Value};
use tollgate::models::api_keys::Scope;

use super::{issue_key_secret, machine, ms, percentile, Args, Server};

/// Timed requests behind each page or scrape figure (after a few untimed ones).
const PAGE_REQUESTS: usize = 30;
/// Timed admissions (and `/api/` round trips) behind the admission figures.
const ADMISSIONS: usize = 100;
/// Untimed requests before each figure: connections, caches, the first render of a template.
const WARM_UP: usize = 3;
/// Rows per fill statement: short enough that the server's own writes (worker heartbeats) get
/// their turn on SQLite.
const FILL_CHUNK: u64 = 50_000;
/// Days the filled jobs are spread over.
const HISTORY_DAYS: f64 = 90.0;
/// One in this many filled jobs belongs to the key the bench measures (`/usage/`, its page).
const HEAVY_KEY_SHARE: u64 = 10;
/// The dashboard admin the bench signs in as.
const ADMIN: (&str, &str) = ("scale-bench@example.com", "scale-bench-password");

/// Which database a run is on.
#[derive(Clone, Copy)]
enum Store {
    Sqlite,
    Postgres,
}

impl Store {
    fn name(self) -> &'static str {
        match self {
            Self::Sqlite => "SQLite",
            Self::Postgres => "Postgres",
        }
    }
}

/// How a probe authenticates.
#[derive(Clone, Copy)]
enum Auth {
    /// The dashboard session cookie.
    Session,
    /// The measured key's bearer secret.
    Key,
    /// Nothing (`/metrics` without a token configured).
    Open,
}

/// One GET measured before and after the fill.
struct Probe {
    label: String,
    path: String,
    auth: Auth,
    /// The issue's ceiling for the filled database, in ms.
    ceiling_ms: Option<f64>,
}

/// p50 and p90 of one figure, in ms.
#[derive(Clone, Copy)]
struct Timing {
    p50: f64,
    p90: f64,
}

impl Timing {
    fn of(values: &[f64]) -> Self {
        Self {
            p50: percentile(values, 50.0),
            p90: percentile(values, 90.0),
        }
    }
}

/// Everything one store's run measured.
struct Measured {
    store: Store,
    fill: FillReport,
    /// `(label, empty, filled, ceiling)`; the first two rows are admission and round trip.
    rows: Vec<(String, Timing, Timing, Option<f64>)>,
}

struct FillReport {
    keys: u64,
    jobs: u64,
    usage_rows: u64,
    took: Duration,
}

/// The signed-in client: cookie for the dashboard, secret for the API.
struct Client {
    http: reqwest::Client,
    base: String,
    cookie: String,
    secret: String,
}

impl Client {
    /// One GET, timed from sending to the last byte of the body; anything but 2xx is an error.
    async fn get_ms(&self, path: &str, auth: Auth) -> anyhow::Result<f64> {
        let mut req = self.http.get(format!("{}{path}", self.base));
        req = match auth {
            Auth::Session => req.header(header::COOKIE, &self.cookie),
            Auth::Key => req.bearer_auth(&self.secret),
            Auth::Open => req,
        };
        let start = Instant::now();
        let resp = req.send().await?;
        let status = resp.status();
        let body = resp.bytes().await?;
        let took = ms(start.elapsed());
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
            bail!("GET {path} answered {status}: {text}");
        }
        Ok(took)
    }

    /// One admission through `POST /api/jobs` (202 as soon as the job is charged, recorded and
    /// queued), timed; then, untimed, the wait for the job to settle, so the worker's writes
    /// do not overlap the next request.
    async fn admit(&self, i: usize) -> anyhow::Result<f64> {
        let start = Instant::now();
        let resp = self
            .http
            .post(format!("{}/api/jobs", self.base))
            .bearer_auth(&self.secret)
            .json(&json!({"text": format!("scale probe {i}"), "max_tokens": 1}))
            .send()
            .await?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        let took = ms(start.elapsed());
        if status != reqwest::StatusCode::ACCEPTED {
            bail!("POST /api/jobs answered {status}: {body}");
        }
        let id = body["job_id"]
            .as_str()
            .ok_or_else(|| anyhow!("no job_id in {body}"))?;
        self.wait_settled(id).await?;
        Ok(took)
    }

    /// One 1-token `POST /api/`, timed to its answer (charge, record, queue, the scripted
    /// worker's run and the settling transaction).
    async fn round_trip(&self, i: usize) -> anyhow::Result<f64> {
        let start = Instant::now();
        let resp = self
            .http
            .post(format!("{}/api/", self.base))
            .bearer_auth(&self.secret)
            .json(&json!({"text": format!("scale round trip {i}"), "max_tokens": 1}))
            .send()
            .await?;
        let status = resp.status();
        resp.bytes().await?;
        let took = ms(start.elapsed());
        if !status.is_success() {
            bail!("POST /api/ answered {status}");
        }
        Ok(took)
    }

    async fn wait_settled(&self, id: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let job: Value = self
                .http
                .get(format!("{}/api/jobs/{id}", self.base))
                .bearer_auth(&self.secret)
                .send()
                .await?
                .json()
                .await?;
            if matches!(job["status"].as_str(), Some("done" | "failed")) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        bail!("job {id} did not settle within 30 s")
    }
}

/// The timing of every probe, in order (the same order before and after the fill).
async fn measure_probes(client: &Client, probes: &[Probe]) -> anyhow::Result<Vec<Timing>> {
    let mut out = Vec::with_capacity(probes.len());
    for p in probes {
        let mut times = Vec::with_capacity(PAGE_REQUESTS);
        for i in 0..PAGE_REQUESTS + WARM_UP {
            let t = client.get_ms(&p.path, p.auth).await?;
            if i >= WARM_UP {
                times.push(t);
            }
        }
        let timing = Timing::of(&times);
        eprintln!("    {:<44} p50 {:>8.2} ms", p.label, timing.p50);
        out.push(timing);
    }
    Ok(out)
}

/// The development config on database `db`, on the scripted engine, with its queue in `dir`
/// and no per-key rate limit, served on a free port.
async fn serve(dir: PathBuf, db: String) -> anyhow::Result<Server> {
    let queue = json!({"url": format!("sqlite://{}/queue.sqlite?mode=rwc", dir.display())});
    Ok(super::serve_in_process(dir, db, queue, true).await?.0)
}

/// The first `name=value` of a response's `Set-Cookie`.
fn set_cookie(resp: &reqwest::Response) -> Option<String> {
    let value = resp.headers().get(header::SET_COOKIE)?.to_str().ok()?;
    value.split(';').next().map(str::to_string)
}

/// Creates the bench's admin and signs in as a browser does (the sign-in page's cookie and CSRF
/// field, then the form); returns the session cookie.
async fn sign_in(http: &reqwest::Client, server: &Server) -> anyhow::Result<String> {
    tollgate::models::admins::ActiveModel::create(&server.ctx.db, ADMIN.0, ADMIN.1).await?;
    let page = http
        .get(format!("{}/admin/login", server.base))
        .send()
        .await?;
    let login_cookie = set_cookie(&page).ok_or_else(|| anyhow!("no sign-in cookie"))?;
    let html = page.text().await?;
    let marker = r#"name="csrf" value=""#;
    let at = html
        .find(marker)
        .ok_or_else(|| anyhow!("no CSRF field on the sign-in page"))?
        + marker.len();
    let csrf: String = html[at..].chars().take_while(|c| *c != '"').collect();
    let resp = http
        .post(format!("{}/admin/login", server.base))
        .header(header::COOKIE, login_cookie)
        .form(&[("email", ADMIN.0), ("password", ADMIN.1), ("csrf", &csrf)])
        .send()
        .await?;
    set_cookie(&resp)
        .filter(|c| c.starts_with("tg_admin="))
        .ok_or_else(|| anyhow!("sign-in gave no session ({})", resp.status()))
}

// ---------------------------------------------------------------------------------------------
// The fill

/// SQL fragments that differ between the two databases. Times are Unix seconds (`t`) turned
/// into each database's timestamp: RFC 3339 text on SQLite, as sqlx writes it; `timestamptz`
/// on Postgres.
struct Dialect {
    backend: DatabaseBackend,
}

impl Dialect {
    fn ts(&self, secs: &str) -> String {
        match self.backend {
            DatabaseBackend::Sqlite => {
                format!("strftime('%Y-%m-%dT%H:%M:%f+00:00', {secs}, 'unixepoch')")
            }
            _ => format!("to_timestamp({secs})"),
        }
    }

    /// `SELECT … FROM` a numbered row source `s(i, t)` for `lo..=hi`, `t` = `time_of_i`.
    fn series(&self, lo: u64, hi: u64, time_of_i: &str) -> (String, String) {
        match self.backend {
            DatabaseBackend::Sqlite => (
                format!(
                    "WITH RECURSIVE n(i) AS (SELECT {lo} UNION ALL SELECT i + 1 FROM n \
                     WHERE i < {hi}), s AS (SELECT i, {time_of_i} AS t FROM n) "
                ),
                "s".to_string(),
            ),
            _ => (
                String::new(),
                format!(
                    "(SELECT i, ({time_of_i})::double precision AS t \
                     FROM generate_series({lo}::bigint, {hi}::bigint) AS i) AS s"
                ),
            ),
        }
    }

    fn padded(&self, width: usize) -> String {
        match self.backend {
            DatabaseBackend::Sqlite => format!("printf('%0{width}d', i)"),
            _ => format!("lpad(i::text, {width}, '0')"),
        }
    }

    fn day_of(&self, column: &str) -> String {
        match self.backend {
            DatabaseBackend::Sqlite => format!("substr({column}, 1, 10)"),
            _ => format!("({column} AT TIME ZONE 'UTC')::date"),
        }
    }
}

/// The id of filled job `i`: a UUID's shape, ordered by `i`.
fn job_id(i: u64) -> String {
    format!("00000000-0000-4000-8000-{i:012}")
}
const JOB_ID_PREFIX: &str = "'00000000-0000-4000-8000-' || ";

async fn exec(db: &sea_orm::DatabaseConnection, sql: &str) -> anyhow::Result<u64> {
    let res = db
        .execute_unprepared(sql)
        .await
        .with_context(|| format!("fill statement failed: {}", &sql[..sql.len().min(240)]))?;
    Ok(res.rows_affected())
}

async fn scalar(db: &sea_orm::DatabaseConnection, sql: &str, column: &str) -> anyhow::Result<i64> {
    let rows = db
        .query_all_raw(Statement::from_string(
            db.get_database_backend(),
            sql.to_string(),
        ))
        .await?;
    rows.first()
        .and_then(|r| r.try_get::<i64>("", column).ok())
        .ok_or_else(|| anyhow!("no {column} from {sql}"))
}

/// Fills keys, jobs, usage rows and the running totals.
async fn fill(ctx: &AppContext, args: &Args, heavy_key: i32) -> anyhow::Result<FillReport> {
    let db = &ctx.db;
    let d = Dialect {
        backend: db.get_database_backend(),
    };
    let start = Instant::now();
    #[allow(clippy::cast_precision_loss)]
    let now = chrono::Utc::now().timestamp_millis() as f64 / 1000.0;
    let day = 86_400.0;

    // Keys: created over the 100 days before now, a tenth with a call quota, one in fifty
    // revoked. Their prefixes (`s` + 7 digits) cannot meet an issued key's hex prefix.
    let keys = args.scale_keys;
    #[allow(clippy::cast_precision_loss)]
    let key_step = 100.0 * day / keys as f64;
    for lo in (1..=keys).step_by(FILL_CHUNK as usize) {
        let hi = (lo + FILL_CHUNK - 1).min(keys);
        let (with, from) = d.series(lo, hi, &format!("{now} - ({keys} - i) * {key_step}"));
        let sql = format!(
            "{with}INSERT INTO api_keys (created_at, updated_at, name, email, organization, \
             prefix, secret_hash, max_calls, calls_used, revoked_at, last_used_at, scope) \
             SELECT {t}, {t}, 'customer ' || i, 'user' || i || '@example.com', \
             CASE WHEN i % 3 = 0 THEN 'org ' || (i % 500) END, 's' || {prefix}, \
             'scale-' || i, CASE WHEN i % 10 = 0 THEN 1000 END, i % 900, \
             CASE WHEN i % 50 = 0 THEN {revoked} END, {used}, 'client' FROM {from}",
            t = d.ts("t"),
            prefix = d.padded(7),
            revoked = d.ts("t + 3600"),
            used = d.ts("t + 60"),
        );
        exec(db, &sql).await?;
    }
    let klo = scalar(
        db,
        "SELECT CAST(MIN(id) AS BIGINT) AS n FROM api_keys WHERE prefix >= 's' AND prefix < 't'",
        "n",
    )
    .await?;
    let khi = scalar(
        db,
        "SELECT CAST(MAX(id) AS BIGINT) AS n FROM api_keys WHERE prefix >= 's' AND prefix < 't'",
        "n",
    )
    .await?;
    if u64::try_from(khi - klo + 1).ok() != Some(keys) {
        bail!("filled key ids are not contiguous ({klo}..={khi} for {keys} keys)");
    }
    eprintln!("    {keys} keys in {:.1} s", start.elapsed().as_secs_f64());

    // Jobs: newest first over HISTORY_DAYS, one in HEAVY_KEY_SHARE the measured key's, the
    // rest spread over the filled keys; 96 % done, 4 % failed (refunded); four models, four
    // routes; a ~200-byte request and ~300-byte result.
    let jobs = args.scale_jobs;
    #[allow(clippy::cast_precision_loss)]
    let job_step = HISTORY_DAYS * day / jobs as f64;
    let request =
        "'{\"messages\":[{\"role\":\"user\",\"content\":\"Summarise support ticket ' || i || \
                   ' and suggest a reply: the customer reports that the nightly export stalls at \
                   80 percent since the last upgrade.\"}]}'";
    let result = "'The customer''s nightly export stops at 80 percent because the upgrade \
                  changed the default batch size. Suggested reply: thank them for the report, \
                  ask them to set the batch size back to 500 in the export settings, and offer \
                  to schedule a call if the export still stalls after the next nightly run.'";
    let mut usage_rows = 0;
    for lo in (1..=jobs).step_by(FILL_CHUNK as usize) {
        let hi = (lo + FILL_CHUNK - 1).min(jobs);
        let (with, from) = d.series(lo, hi, &format!("{now} - i * {job_step}"));
        let sql = format!(
            "{with}INSERT INTO jobs (created_at, updated_at, id, api_key_id, status, endpoint, \
             model, request, result, error, prompt_tokens, generated_tokens, finish_reason, \
             attempts, refunded, worker, queued_at, started_at, finished_at) \
             SELECT {t_end}, {t_end}, {JOB_ID_PREFIX}{id}, \
             CASE WHEN i % {HEAVY_KEY_SHARE} = 0 THEN {heavy_key} \
             ELSE {klo} + (i * 7919) % {keys} END, \
             CASE WHEN i % 25 = 0 THEN 'failed' ELSE 'done' END, \
             CASE i % 10 WHEN 0 THEN '/api/' WHEN 1 THEN '/api/' WHEN 2 THEN '/generate' \
             WHEN 3 THEN '/v1/embeddings' ELSE '/v1/chat/completions' END, \
             CASE i % 10 WHEN 7 THEN 'qwen2.5-0.5b' WHEN 8 THEN 'llama3.2-1b' \
             WHEN 9 THEN 'smollm2:support' ELSE 'smollm2' END, \
             {request}, CASE WHEN i % 25 <> 0 THEN {result} END, \
             CASE WHEN i % 25 = 0 THEN 'engine_failed: the generation failed' END, \
             20 + i % 200, CASE WHEN i % 25 = 0 THEN 0 ELSE 16 + i % 240 END, \
             CASE WHEN i % 25 <> 0 THEN 'stop' END, 1, (i % 25 = 0), 'embedded-scale', \
             {t}, {t_start}, {t_end} FROM {from}",
            t = d.ts("t"),
            t_start = d.ts("t + 0.02"),
            t_end = d.ts("t + 0.52"),
            id = d.padded(12),
        );
        exec(db, &sql).await?;
        // One usage row per finished job, as the completion writes it.
        usage_rows += exec(
            db,
            &format!(
                "INSERT INTO usage_records (created_at, updated_at, api_key_id, job_id, day, \
                 prompt_tokens, generated_tokens, words, input_words) \
                 SELECT finished_at, finished_at, api_key_id, id, {day}, prompt_tokens, \
                 generated_tokens, generated_tokens * 3 / 4, prompt_tokens * 3 / 4 FROM jobs \
                 WHERE id >= '{lo_id}' AND id <= '{hi_id}' AND status = 'done'",
                day = d.day_of("queued_at"),
                lo_id = job_id(lo),
                hi_id = job_id(hi),
            ),
        )
        .await?;
        eprintln!(
            "    {hi} / {jobs} jobs, {:.1} s",
            start.elapsed().as_secs_f64()
        );
    }
    // The running totals `/metrics` reads, as the settling transactions would have left them.
    exec(
        db,
        "INSERT INTO job_totals (outcome, jobs, prompt_tokens, generated_tokens) \
         SELECT status, COUNT(*), SUM(prompt_tokens), SUM(generated_tokens) FROM jobs \
         WHERE id >= '00000000-0000-4000-8000-' AND id < '00000000-0000-4000-8001' \
         GROUP BY status ON CONFLICT (outcome) DO UPDATE SET jobs = job_totals.jobs + \
         excluded.jobs, prompt_tokens = job_totals.prompt_tokens + excluded.prompt_tokens, \
         generated_tokens = job_totals.generated_tokens + excluded.generated_tokens",
    )
    .await?;
    // The measured key has existed as long as its history, so `/usage/` (default: since the
    // key was created) covers all of it.
    exec(
        db,
        &format!(
            "UPDATE api_keys SET created_at = {} WHERE id = {heavy_key}",
            d.ts(&format!("{now} - 100 * {day}"))
        ),
    )
    .await?;
    // A database that grew over months is not mid-way through writing out a bulk load: the
    // fill's write-ahead log is checkpointed, so the first admissions after it do not pay for
    // it. On Postgres also what autovacuum does after such a load (statistics, and the
    // visibility map that lets index-only scans skip the table); SQLite has no counterpart
    // that runs by itself.
    if matches!(d.backend, DatabaseBackend::Postgres) {
        exec(db, "VACUUM ANALYZE").await?;
        exec(db, "CHECKPOINT").await?;
    } else {
        exec(db, "PRAGMA wal_checkpoint(TRUNCATE)").await?;
    }
    Ok(FillReport {
        keys,
        jobs,
        usage_rows,
        took: start.elapsed(),
    })
}

// ---------------------------------------------------------------------------------------------
// One store, end to end

/// A signed-in client of `server` with a fresh key; returns the key too.
async fn client_of(server: &Server) -> anyhow::Result<(Client, tollgate::models::api_keys::Model)> {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let cookie = sign_in(&http, server).await?;
    let (key, secret) = issue_key_secret(&server.ctx, None, Scope::Client).await?;
    let client = Client {
        http,
        base: server.base.clone(),
        cookie,
        secret,
    };
    Ok((client, key))
}

/// Admissions and round trips, alternating request by request between an empty server and
/// the filled one, so both see the same moment's load on this shared machine: `(admissions,
/// round trips)`, each `[empty, filled]`.
async fn alternating(empty: &Client, filled: &Client) -> anyhow::Result<[[Timing; 2]; 2]> {
    let mut times = [[Vec::new(), Vec::new()], [Vec::new(), Vec::new()]];
    for i in 0..ADMISSIONS + WARM_UP {
        for (side, client) in [empty, filled].into_iter().enumerate() {
            let t = client.admit(i).await?;
            if i >= WARM_UP {
                times[0][side].push(t);
            }
        }
    }
    for i in 0..ADMISSIONS + WARM_UP {
        for (side, client) in [empty, filled].into_iter().enumerate() {
            let t = client.round_trip(i).await?;
            if i >= WARM_UP {
                times[1][side].push(t);
            }
        }
    }
    Ok(times.map(|pair| pair.map(|t| Timing::of(&t))))
}

/// Pages before and after `server` is filled; admission alongside `twin`, a second server that
/// stays empty.
async fn run_store(
    store: Store,
    server: &Server,
    twin: &Server,
    args: &Args,
) -> anyhow::Result<Measured> {
    let (client, heavy) = client_of(server).await?;
    let (twin_client, _) = client_of(twin).await?;
    // A filled key for `?key=` (made now so the empty run asks for a key that exists then too:
    // it is issued, and the fill gives it no jobs, so the figure is the lookup and the scan).
    let (other, _) = issue_key_secret(&server.ctx, None, Scope::Client).await?;
    let probes = probes(&heavy.prefix, &other.prefix);

    eprintln!("  {} empty …", store.name());
    // The same jobs on the server to be filled as the figures after the fill will have made.
    for i in 0..ADMISSIONS + WARM_UP {
        client.admit(i).await?;
    }
    let empty = measure_probes(&client, &probes).await?;

    eprintln!(
        "  {} fill: {} keys, {} jobs …",
        store.name(),
        args.scale_keys,
        args.scale_jobs
    );
    let fill = fill(&server.ctx, args, heavy.id).await?;

    eprintln!(
        "  {} filled: admission, alternating with an empty server …",
        store.name()
    );
    let [[adm0, adm1], [rt0, rt1]] = alternating(&twin_client, &client).await?;
    let filled = measure_probes(&client, &probes).await?;

    let mut rows = vec![
        (
            "admission `POST /api/jobs` (202)".to_string(),
            adm0,
            adm1,
            None,
        ),
        (
            "round trip `POST /api/`, 1 token (scripted)".to_string(),
            rt0,
            rt1,
            None,
        ),
    ];
    for ((p, e), f) in probes.iter().zip(empty).zip(filled) {
        rows.push((p.label.clone(), e, f, p.ceiling_ms));
    }
    Ok(Measured { store, fill, rows })
}

/// What is measured, in order; `heavy` is the measured key, `other` a key with no jobs.
fn probes(heavy: &str, other: &str) -> Vec<Probe> {
    let page = |label: &str, path: String, ceiling: Option<f64>| Probe {
        label: label.to_string(),
        path,
        auth: Auth::Session,
        ceiling_ms: ceiling,
    };
    vec![
        Probe {
            label: "`GET /metrics`".into(),
            path: "/metrics".into(),
            auth: Auth::Open,
            ceiling_ms: Some(50.0),
        },
        page("keys list, first page", "/admin/keys".into(), Some(200.0)),
        page(
            "keys list, page 500",
            "/admin/keys?page=500".into(),
            Some(200.0),
        ),
        page(
            "keys list, search by name",
            "/admin/keys?q=customer%2042424".into(),
            Some(200.0),
        ),
        page(
            "one key's page (charts, recent jobs)",
            format!("/admin/keys/{heavy}"),
            Some(200.0),
        ),
        page("jobs list", "/admin/jobs".into(), Some(200.0)),
        page(
            "jobs list `?model=` (a tenth of jobs)",
            "/admin/jobs?model=llama3.2-1b".into(),
            Some(200.0),
        ),
        page(
            "jobs list `?key=` (the measured key)",
            format!("/admin/jobs?key={heavy}"),
            Some(200.0),
        ),
        page(
            "jobs list `?key=` (a key with no jobs)",
            format!("/admin/jobs?key={other}"),
            Some(200.0),
        ),
        page(
            "jobs list `?status=failed`",
            "/admin/jobs?status=failed".into(),
            Some(200.0),
        ),
        page("overview", "/admin/overview".into(), Some(200.0)),
        Probe {
            label: "`GET /usage/` (the measured key, all its days)".into(),
            path: "/usage/".into(),
            auth: Auth::Key,
            ceiling_ms: None,
        },
    ]
}

/// A server on fresh SQLite files.
async fn sqlite_server() -> anyhow::Result<Server> {
    let dir = std::env::temp_dir().join(format!("tollgate-scale-{}", uuid::Uuid::new_v4()));
    let db = format!("sqlite://{}/db.sqlite?mode=rwc", dir.display());
    serve(dir, db).await
}

async fn on_sqlite(args: &Args) -> anyhow::Result<Measured> {
    let server = sqlite_server().await?;
    let twin = sqlite_server().await?;
    run_store(Store::Sqlite, &server, &twin, args).await
}

async fn on_postgres(args: &Args) -> anyhow::Result<Measured> {
    let names = [0, 1].map(|_| format!("tollgate_scale_{}", uuid::Uuid::new_v4().simple()));
    let admin = sea_orm::Database::connect(format!("{}/postgres", args.postgres)).await?;
    for name in &names {
        admin
            .execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await?;
    }
    let measured = async {
        let mut servers = Vec::new();
        for name in &names {
            let dir = std::env::temp_dir().join(format!("tollgate-scale-{}", uuid::Uuid::new_v4()));
            servers.push(serve(dir, format!("{}/{name}", args.postgres)).await?);
        }
        let measured = run_store(Store::Postgres, &servers[0], &servers[1], args).await;
        for s in &servers {
            s.ctx.db.close_by_ref().await.ok();
        }
        measured
    }
    .await;
    for name in &names {
        let _ = admin
            .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await;
    }
    admin.close().await.ok();
    measured
}

fn report(results: &[Result<Measured, String>], args: &Args) -> String {
    let m = machine();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n## Scale: {} jobs, {} keys\n\nMachine: {}, {} cores, {:.1} GiB RAM, load {:.2} / {:.2} / {:.2}. \
         Build: {}. p50 (p90) of {PAGE_REQUESTS} requests per page figure and {ADMISSIONS} per \
         admission figure, after {WARM_UP} untimed ones. Pages: the same server before and after \
         its fill. Admission and round trip: after the fill, alternating request by request \
         with a second server whose database stays empty.",
        args.scale_jobs,
        args.scale_keys,
        m.cpu,
        m.cores,
        m.ram_gib,
        m.load[0],
        m.load[1],
        m.load[2],
        if cfg!(debug_assertions) {
            "debug (dev profile)"
        } else {
            "release"
        },
    );
    for r in results {
        match r {
            Err(e) => {
                let _ = writeln!(s, "\nNot measured: {e}");
            }
            Ok(r) => {
                let _ = writeln!(
                    s,
                    "\n### {}\n\nFill: {} keys, {} jobs, {} usage rows in {:.1} s.\n",
                    r.store.name(),
                    r.fill.keys,
                    r.fill.jobs,
                    r.fill.usage_rows,
                    r.fill.took.as_secs_f64()
                );
                let _ = writeln!(s, "| figure | empty | filled | filled ÷ empty | target |");
                let _ = writeln!(s, "|---|---:|---:|---:|---|");
                for (i, (label, e, f, ceiling)) in r.rows.iter().enumerate() {
                    let ratio = f.p50 / e.p50.max(f64::EPSILON);
                    let target = match (i, ceiling) {
                        (0, _) => super::verdict(ratio <= 1.10, "≤ 1.10 × empty".into()),
                        (_, Some(c)) => super::verdict(f.p50 <= *c, format!("≤ {c:.0} ms")),
                        _ => "—".to_string(),
                    };
                    let _ = writeln!(
                        s,
                        "| {label} | {:.2} ({:.2}) ms | {:.2} ({:.2}) ms | {ratio:.2} | {target} |",
                        e.p50, e.p90, f.p50, f.p90
                    );
                }
            }
        }
    }
    s
}

/// Runs part 7 on SQLite, then on Postgres, and prints the Markdown report.
pub(super) async fn only_scale(args: &Args) -> anyhow::Result<()> {
    eprintln!("7. scale: SQLite …");
    let sqlite = on_sqlite(args).await.map_err(|e| format!("SQLite: {e:#}"));
    eprintln!("7. scale: Postgres {} …", args.postgres);
    let postgres = on_postgres(args)
        .await
        .map_err(|e| format!("Postgres: {e:#}"));
    let failed = sqlite.is_err() && postgres.is_err();
    println!("{}", report(&[sqlite, postgres], args));
    if failed {
        bail!("neither store could be measured");
    }
    Ok(())
}
