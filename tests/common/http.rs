//! Requests to a test server and reading their answers.

use reqwest::{Method, RequestBuilder, Response};
use serde::Serialize;
use serde_json::{json, Value};

use super::{TestApp, TestKey};

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `method path` with `key` as its bearer token (`None`: no `Authorization` header), for a
    /// test that sets its own headers or body, or reads the response's headers.
    pub fn request(&self, method: Method, key: Option<&TestKey>, path: &str) -> RequestBuilder {
        let req = self.http.request(method, self.url(path));
        match key {
            Some(k) => req.bearer_auth(&k.secret),
            None => req,
        }
    }

    /// Sends `method path` with `key` and, if given, a JSON body; returns the status and the
    /// JSON answer.
    pub async fn send(
        &self,
        method: Method,
        key: Option<&TestKey>,
        path: &str,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let mut req = self.request(method, key, path);
        if let Some(b) = body {
            req = req.json(b);
        }
        read(req.send().await.expect("request")).await
    }

    /// `POST path` with a JSON body.
    pub async fn post(
        &self,
        key: Option<&TestKey>,
        path: &str,
        body: impl Serialize,
    ) -> (u16, Value) {
        let req = self.request(Method::POST, key, path).json(&body);
        read(req.send().await.expect("request")).await
    }

    /// `POST path` without a body.
    pub async fn post_empty(&self, key: Option<&TestKey>, path: &str) -> (u16, Value) {
        self.send(Method::POST, key, path, None).await
    }

    pub async fn get(&self, key: Option<&TestKey>, path: &str) -> (u16, Value) {
        self.send(Method::GET, key, path, None).await
    }

    pub async fn delete(&self, key: Option<&TestKey>, path: &str) -> (u16, Value) {
        self.send(Method::DELETE, key, path, None).await
    }

    /// `POST /api/` with a JSON body and a bearer key.
    pub async fn post_api(&self, key: &TestKey, body: impl Serialize) -> (u16, Value) {
        self.post(Some(key), "/api/", body).await
    }

    /// Sends every `(key, path, body)` POST at once; the answers in the same order.
    pub async fn post_at_once<'a>(
        &self,
        calls: impl IntoIterator<Item = (&'a TestKey, &'a str, Value)>,
    ) -> Vec<(u16, Value)> {
        let tasks: Vec<_> = calls
            .into_iter()
            .map(|(key, path, body)| {
                let req = self.request(Method::POST, Some(key), path).json(&body);
                tokio::spawn(async move { read(req.send().await.expect("request")).await })
            })
            .collect();
        let mut answers = Vec::new();
        for t in tasks {
            answers.push(t.await.expect("task"));
        }
        answers
    }
}

pub async fn read(resp: Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    let value = serde_json::from_str(&text).unwrap_or_else(|_| json!({ "raw": text }));
    (status, value)
}

/// The `error.code` of an error response.
pub fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("<no error code>")
}

/// A response header as text, if present.
pub fn header(resp: &Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// The seconds of a `Retry-After` header, if present.
pub fn retry_after(resp: &Response) -> Option<u64> {
    header(resp, "retry-after").and_then(|v| v.parse().ok())
}

/// `base` with the top-level fields of `extra` added (replacing any of the same name).
pub fn merge(mut base: Value, extra: &Value) -> Value {
    if let (Some(b), Some(e)) = (base.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    base
}

/// The `id`s of a list's items (`/v1/models`' `data`, the worker registry's `data`).
pub fn ids(list: &Value) -> Vec<&str> {
    list.as_array()
        .expect("a list")
        .iter()
        .filter_map(|item| item["id"].as_str())
        .collect()
}

/// Fires `n` concurrent one-token `POST /api/` calls with `key`; returns (admitted, 429s) and
/// fails on any other status. Admitted means charged and queued: 200, or 202 when a loaded
/// machine makes the job outlast the request's wait.
pub async fn concurrent_calls(app: &TestApp, key: &TestKey, n: usize) -> (usize, usize) {
    let calls = (0..n).map(|i| {
        (
            key,
            "/api/",
            json!({"text": format!("Number {i}"), "max_tokens": 1}),
        )
    });
    let (mut ok, mut limited) = (0, 0);
    for (status, _) in app.post_at_once(calls).await {
        match status {
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

/// The `data:` payloads of a server-sent event stream, in order.
pub fn sse_data(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| d.trim_start().to_string())
        .collect()
}

/// The text a streamed chat completion's body adds up to (its first choice's `delta.content`).
pub fn streamed_chat_text(body: &str) -> String {
    sse_data(body)
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect()
}

/// POSTs `body` and reads the answer whole: status, content type and text (a stream's events).
pub async fn post_stream(
    app: &TestApp,
    key: &TestKey,
    path: &str,
    body: Value,
) -> (u16, String, String) {
    let resp = app
        .request(reqwest::Method::POST, Some(key), path)
        .json(&body)
        .send()
        .await
        .expect("request");
    let status = resp.status().as_u16();
    let content_type = header(&resp, "content-type").unwrap_or_default();
    (status, content_type, resp.text().await.expect("body"))
}

/// A `/metrics` scrape (open in the test config).
pub async fn scrape(app: &TestApp) -> String {
    let resp = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("metrics");
    assert_eq!(resp.status().as_u16(), 200);
    resp.text().await.expect("metrics text")
}

/// The value of series `name` (with its labels, if any) in a scrape.
pub fn metric_in(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
}

/// The value of series `name` now.
pub async fn metric(app: &TestApp, name: &str) -> u64 {
    metric_in(&scrape(app).await, name)
}

/// This process's shared admission commits from `/metrics`: (transactions, admissions in them).
pub async fn shared_commits(app: &TestApp) -> (u64, u64) {
    let text = scrape(app).await;
    (
        metric_in(&text, "tollgate_admission_shared_commits_total"),
        metric_in(&text, "tollgate_admissions_in_shared_commits_total"),
    )
}

/// Bursts of 40 one-token calls at once on one unlimited key until some shared a commit (at most
/// five bursts), then checks that every admission was charged, recorded and settled exactly:
/// one call, one job and its own prompt's tokens each, whether it committed alone or with others.
pub async fn hot_key_bursts_share_commits_exactly(app: &TestApp) {
    let key = app.key_with_calls(None).await;
    let mut admitted = 0;
    for _ in 0..5 {
        let (ok, limited) = concurrent_calls(app, &key, 40).await;
        assert_eq!((ok, limited), (40, 0));
        admitted += ok;
        if shared_commits(app).await.0 > 0 {
            break;
        }
    }
    some_shared_a_commit(app, "burst of 40 concurrent admissions").await;
    // Each job recorded once under its own id, with its own reservation.
    let jobs = charged_and_settled_exactly(app, &key, admitted).await;
    let ids: std::collections::HashSet<_> = jobs.iter().map(|j| j.id.as_str()).collect();
    assert_eq!(ids.len(), admitted);
    assert!(jobs
        .iter()
        .all(|j| j.reserved_gen_tokens == 1
            && j.reserved_prompt_tokens >= i64::from(j.prompt_tokens)));
}

/// Fails unless this process shared some commit, each with at least two admissions.
async fn some_shared_a_commit(app: &TestApp, what: &str) {
    let (shared, together) = shared_commits(app).await;
    assert!(shared > 0, "no {what} shared a commit");
    assert!(
        together >= 2 * shared,
        "{together} admissions in {shared} shared commits"
    );
}

/// Checks that `key` was charged `admitted` calls and has as many jobs, waits until they are
/// settled (bounded, not a timing check), then that all ran and the key's token counters are
/// exactly what they read and wrote; returns the jobs.
async fn charged_and_settled_exactly(
    app: &TestApp,
    key: &TestKey,
    admitted: usize,
) -> Vec<tollgate::models::_entities::jobs::Model> {
    assert_eq!(app.calls_used(key).await, admitted as i64);
    let mut jobs = app.jobs_of(key).await;
    for _ in 0..600 {
        if jobs.iter().all(|j| j.is_finished()) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        jobs = app.jobs_of(key).await;
    }
    assert_eq!(jobs.len(), admitted);
    assert!(jobs.iter().all(|j| j.status == "done"), "every job ran");
    let row = app.key_row(key).await;
    let prompt: i64 = jobs.iter().map(|j| i64::from(j.prompt_tokens)).sum();
    let generated: i64 = jobs.iter().map(|j| i64::from(j.generated_tokens)).sum();
    assert_eq!(
        (row.prompt_tokens_used, row.gen_tokens_used),
        (prompt, generated)
    );
    jobs
}

/// Bursts of one one-token call on each of 36 keys at once, until some burst shared a commit (at
/// most six bursts; with one call per key in flight, a shared commit spans keys). Thirty keys are
/// unlimited, four have quota for two calls, and two act for one user whose budget has room for
/// three generated tokens: each refusal must be its own (429 with its reason) and every count
/// exact, whether an admission committed alone or with other keys'.
pub async fn many_keys_bursts_share_commits_exactly(app: &TestApp) {
    use tollgate::models::users;
    let (_, budgeted) = keys_of_a_user_with_gen_budget(app, "budgeted", 3, 2).await;
    let mut free = Vec::new();
    for _ in 0..30 {
        free.push(app.key_with_calls(None).await);
    }
    let mut limited = Vec::new();
    for _ in 0..4 {
        limited.push(app.key_with_calls(Some(2)).await);
    }
    let all: Vec<&TestKey> = free.iter().chain(&limited).chain(&budgeted).collect();
    let mut admitted = vec![0usize; all.len()];
    let mut bursts = 0;
    while bursts < 6 {
        bursts += 1;
        let calls = all.iter().enumerate().map(|(i, key)| {
            (
                *key,
                "/api/",
                json!({"text": format!("Burst {bursts} key {i}"), "max_tokens": 1}),
            )
        });
        for (i, (status, answer)) in app.post_at_once(calls).await.into_iter().enumerate() {
            match status {
                200 | 202 => admitted[i] += 1,
                429 if i < free.len() => panic!("an unlimited key was refused: {answer}"),
                429 if i < free.len() + limited.len() => {
                    assert_eq!(code(&answer), "quota_exceeded", "{answer}");
                }
                429 => assert_eq!(code(&answer), "token_budget_exceeded", "{answer}"),
                other => panic!("unexpected status {other}: {answer}"),
            }
        }
        if bursts >= 2 && shared_commits(app).await.0 > 0 {
            break;
        }
    }
    some_shared_a_commit(app, "burst of 36 keys' concurrent admissions").await;
    let (free_n, limited_n) = (free.len(), limited.len());
    assert!(admitted[..free_n].iter().all(|&n| n == bursts));
    assert!(admitted[free_n..free_n + limited_n].iter().all(|&n| n == 2));
    assert_eq!(admitted[free_n + limited_n..].iter().sum::<usize>(), 3);
    // The user's budget spent exactly what its keys' jobs wrote.
    let mut user_generated = 0;
    for (key, &n) in all.iter().zip(&admitted) {
        let jobs = charged_and_settled_exactly(app, key, n).await;
        if budgeted.iter().any(|b| b.id == key.id) {
            user_generated += jobs
                .iter()
                .map(|j| i64::from(j.generated_tokens))
                .sum::<i64>();
        }
    }
    let user = users::Model::find_by_username(&app.ctx.db, "budgeted")
        .await
        .expect("db")
        .expect("user");
    assert_eq!((user.gen_tokens_used, user_generated), (3, 3));
}

/// Forty concurrent one-token calls on two keys acting for one user with room for five
/// generated tokens: batches holding both keys' admissions do not fit the user's budget, are
/// tried again without them, and each then meets its own answer: exactly five admitted, the rest
/// `token_budget_exceeded`, every count exact.
pub async fn two_keys_at_their_users_budget_edge_admit_exactly_what_fits(app: &TestApp) {
    use tollgate::models::users;
    let (_, keys) = keys_of_a_user_with_gen_budget(app, "shared-budget", 5, 2).await;
    let body = json!({"text": "Tell me about the sea.", "max_tokens": 1});
    let answers = app
        .post_at_once((0..40).map(|i| (&keys[i % 2], "/api/", body.clone())))
        .await;
    admitted_exactly_the_rest_over_budget(&answers, 5);
    let calls = app.calls_used(&keys[0]).await + app.calls_used(&keys[1]).await;
    let jobs = app.jobs_of(&keys[0]).await.len() + app.jobs_of(&keys[1]).await.len();
    assert_eq!((calls, jobs), (5, 5));
    let user = users::Model::find_by_username(&app.ctx.db, "shared-budget")
        .await
        .expect("db")
        .expect("user");
    assert_eq!(user.gen_tokens_used, 5);
}

/// A user (role user) whose generated tokens are limited to `limit`, and `keys` keys acting
/// for it.
pub async fn keys_of_a_user_with_gen_budget(
    app: &TestApp,
    name: &str,
    limit: i64,
    keys: usize,
) -> (tollgate::models::_entities::users::Model, Vec<TestKey>) {
    use tollgate::models::{
        api_keys::KeyParams,
        users::{ActiveModel, NewUser, Role},
    };
    let user = ActiveModel::create(
        &app.ctx.db,
        NewUser {
            username: name.into(),
            password: "a long enough password".into(),
            role: Role::User,
            enabled: true,
            prompt_token_limit: None,
            gen_token_limit: Some(limit),
            prompt_tokens_used: 0,
            gen_tokens_used: 0,
            min_password_chars: 8,
        },
    )
    .await
    .expect("user");
    let mut issued = Vec::with_capacity(keys);
    for n in 0..keys {
        issued.push(
            app.issue_key(KeyParams {
                email: format!("{name}-{n}@example.com"),
                user_id: Some(user.id),
                ..Default::default()
            })
            .await,
        );
    }
    (user, issued)
}

/// Fails unless exactly `n` of concurrent `answers` were admitted (200, or 202 on a loaded
/// machine) and every other one is a 429 `token_budget_exceeded`.
pub fn admitted_exactly_the_rest_over_budget(answers: &[(u16, Value)], n: usize) {
    let admitted = answers
        .iter()
        .filter(|(s, _)| *s == 200 || *s == 202)
        .count();
    assert_eq!(admitted, n, "{answers:?}");
    for (status, answer) in answers.iter().filter(|(s, _)| *s != 200 && *s != 202) {
        assert_eq!(*status, 429, "{answer}");
        assert_eq!(code(answer), "token_budget_exceeded", "{answer}");
    }
}
