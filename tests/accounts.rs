//! Seed 002's accounts end to end (real SQLite/Postgres, real queue, real SmolLM2): logins,
//! users, token budgets with reservation and settlement, conversation memory, active models.

mod common;

use std::sync::Arc;

use reqwest::Method;

use common::{code, key_of, merge, read, retry_after, FailingEngine, TestApp, TestKey};
use sea_orm::{EntityTrait, PaginatorTrait};
use serde_json::{json, Value};
use tollgate::{
    engine::{GenerationRequest, Prompt},
    models::{
        _entities::{api_keys as key_entity, jobs as job_entity},
        api_keys::{self, KeyParams},
        budgets,
        conversations::{self, Owner},
        jobs, users,
    },
    notify::JobEvents,
    workers::generation::Outcome,
};

const PASSWORD: &str = "correct horse battery";

async fn add_user(app: &TestApp, admin: &TestKey, body: Value) -> (u16, Value) {
    app.post(Some(admin), "/db_request/add_user/", body).await
}

async fn login(app: &TestApp, username: &str, password: &str) -> (u16, Value) {
    app.post(
        None,
        "/token",
        json!({"username": username, "password": password}),
    )
    .await
}

/// Adds a user through the API (with `extra` fields) and logs in; returns the token.
async fn user_token(app: &TestApp, admin: &TestKey, username: &str, extra: Value) -> TestKey {
    let body = merge(json!({"username": username, "password": PASSWORD}), &extra);
    let (status, reply) = add_user(app, admin, body).await;
    assert_eq!(status, 200, "{reply}");
    token_for(app, username).await
}

async fn token_for(app: &TestApp, username: &str) -> TestKey {
    let (status, body) = login(app, username, PASSWORD).await;
    assert_eq!(status, 200, "{body}");
    key_of(app, body["access_token"].as_str().expect("token")).await
}

async fn user(app: &TestApp, username: &str) -> users::Model {
    users::Model::find_by_username(&app.ctx.db, username)
        .await
        .expect("db")
        .expect("user row")
}

async fn job(app: &TestApp, id: &str) -> job_entity::Model {
    jobs::Model::find_any(&app.ctx.db, id)
        .await
        .expect("db")
        .expect("job row")
}

/// (prompt, generated) token totals of a key's finished jobs.
async fn spent(app: &TestApp, key: &TestKey) -> (i64, i64) {
    app.jobs_of(key)
        .await
        .iter()
        .filter(|j| j.status == "done")
        .fold((0, 0), |(p, g), j| {
            (
                p + i64::from(j.prompt_tokens),
                g + i64::from(j.generated_tokens),
            )
        })
}

/// What a refused request must leave untouched.
async fn snapshot(app: &TestApp, key: &TestKey, username: Option<&str>) -> Value {
    let k = app.key_row(key).await;
    let u = match username {
        Some(name) => {
            let u = user(app, name).await;
            json!([u.prompt_tokens_used, u.gen_tokens_used])
        }
        None => Value::Null,
    };
    json!({
        "calls": k.calls_used,
        "key": [k.prompt_tokens_used, k.gen_tokens_used],
        "user": u,
        "jobs": app.job_count().await,
    })
}

/// Fires every (key, path, body) at once; returns the statuses in order.
async fn fire(app: &TestApp, calls: Vec<(&TestKey, &str, Value)>) -> Vec<u16> {
    let answers = app.post_at_once(calls).await;
    answers.into_iter().map(|(status, _)| status).collect()
}

#[tokio::test]
async fn a_user_logs_in_and_calls_the_openai_and_llm_request_routes_with_the_token() {
    let app = TestApp::spawn().await;
    let admin = app.admin_key().await;
    let (status, body) = add_user(
        &app,
        &admin,
        json!({"username": "alice", "password": PASSWORD, "gen_token_limit": 1000}),
    )
    .await;
    assert_eq!(status, 200, "{body}");

    let (status, body) = login(&app, "alice", PASSWORD).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["username"], "alice");
    assert_eq!(body["token_type"], "bearer");
    assert_eq!(body["expires_in"], 1440 * 60);
    let secret = body["access_token"].as_str().expect("token").to_string();

    // The token is a key row linked to the user, stored only as a hash, valid for the TTL.
    let token = key_of(&app, &secret).await;
    let row = app.key_row(&token).await;
    let alice = user(&app, "alice").await;
    assert_eq!(row.user_id, Some(alice.id));
    assert_eq!(row.scope, "client");
    assert_eq!(row.secret_hash, api_keys::hash_secret(&secret));
    let stored = serde_json::to_string(&row).expect("serialize");
    assert!(!stored.contains(secret.rsplit('_').next().expect("body")));
    let ttl = row.valid_until.expect("expiry") - chrono::Utc::now().fixed_offset();
    assert!(
        (1439..=1440).contains(&ttl.num_minutes()),
        "ttl {ttl:?} is not the configured 1440 minutes"
    );
    assert!(!alice.password_hash.contains(PASSWORD));
    assert!(alice.password_hash.starts_with("$argon2"));

    let request = json!({"model": "smollm2", "messages": [{"role": "user", "content": "Say hi"}],
                         "max_tokens": 6});
    let (status, chat) = app
        .post(Some(&token), "/v1/chat/completions", request)
        .await;
    assert_eq!(status, 200, "{chat}");
    assert!(
        chat["choices"][0]["message"]["content"].is_string(),
        "{chat}"
    );

    let request = json!({"model": "smollm2", "inference_endpoint": "http://old-vllm:8000/v1",
                         "prompt": "Name a colour.", "max_tokens": 6});
    let (status, answer) = app.post(Some(&token), "/llm_request", request).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["username"], "alice");
    assert!(
        answer["data"].as_str().is_some_and(|d| !d.is_empty()),
        "{answer}"
    );

    // Both generations are on the key's and the user's counters, exactly as generated.
    let (prompt, generated) = spent(&app, &token).await;
    assert!(prompt > 0 && generated > 0);
    let row = app.key_row(&token).await;
    assert_eq!(
        (row.prompt_tokens_used, row.gen_tokens_used),
        (prompt, generated)
    );
    let alice = user(&app, "alice").await;
    assert_eq!(
        (alice.prompt_tokens_used, alice.gen_tokens_used),
        (prompt, generated)
    );
    assert_eq!(row.calls_used, 2);

    let (status, usage) = app.get(Some(&token), "/api/usage").await;
    assert_eq!(status, 200, "{usage}");
    assert_eq!(usage["user"]["username"], "alice");
    assert_eq!(usage["user"]["gen_token_limit"], 1000);
    assert_eq!(usage["user"]["gen_tokens_used"], generated);

    // FastAPI's OAuth2 clients send a form.
    let resp = app
        .request(reqwest::Method::POST, None, "/token")
        .form(&[
            ("grant_type", "password"),
            ("username", "alice"),
            ("password", PASSWORD),
            ("scope", ""),
        ])
        .send()
        .await
        .expect("request");
    let (status, body) = read(resp).await;
    assert_eq!(status, 200, "{body}");
    assert_ne!(body["access_token"].as_str(), Some(secret.as_str()));
}

#[tokio::test]
async fn wrong_credentials_are_401_a_disabled_user_403_and_repeated_failures_429() {
    let app = TestApp::spawn().await;
    let admin = app.admin_key().await;
    for (name, enabled) in [("bob", true), ("carol", false), ("dave", true)] {
        let (status, body) = add_user(
            &app,
            &admin,
            json!({"username": name, "password": PASSWORD, "enabled": enabled}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }

    let (status, wrong) = login(&app, "bob", "not the password").await;
    assert_eq!(status, 401, "{wrong}");
    assert_eq!(code(&wrong), "invalid_credentials");
    let (status, unknown) = login(&app, "nobody", "not the password").await;
    assert_eq!(status, 401, "{unknown}");
    assert_eq!(
        wrong["error"]["message"], unknown["error"]["message"],
        "unknown users and wrong passwords must look the same"
    );

    let (status, body) = login(&app, "carol", PASSWORD).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(code(&body), "user_disabled");
    let (status, _) = login(&app, "carol", "not the password").await;
    assert_eq!(
        status, 401,
        "a wrong password must not reveal that carol is disabled"
    );

    let (status, body) = app.post(None, "/token", json!({"username": "bob"})).await;
    assert_eq!(status, 422, "{body}");
    let resp = app
        .request(reqwest::Method::POST, None, "/token")
        .header("content-type", "application/json")
        .body("")
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status().as_u16(), 400);

    // Five failures lock the username for a minute, even for the right password.
    for _ in 0..5 {
        let (status, body) = login(&app, "dave", "guess").await;
        assert_eq!(status, 401, "{body}");
    }
    let resp = app
        .request(reqwest::Method::POST, None, "/token")
        .json(&json!({"username": "dave", "password": PASSWORD}))
        .send()
        .await
        .expect("request");
    let retry_after = retry_after(&resp);
    let (status, body) = read(resp).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(code(&body), "too_many_login_attempts");
    assert!(
        retry_after.is_some_and(|s| (1..=61).contains(&s)),
        "Retry-After: {retry_after:?}"
    );
    // Other usernames are not locked.
    let (status, body) = login(&app, "bob", PASSWORD).await;
    assert_eq!(status, 200, "{body}");

    // A token stops working when its user is disabled; nothing is charged.
    let token = key_of(&app, body["access_token"].as_str().expect("token")).await;
    users::ActiveModel::set_enabled(&app.ctx.db, "bob", false)
        .await
        .expect("disable");
    let before = snapshot(&app, &token, Some("bob")).await;
    let (status, body) = app
        .post(
            Some(&token),
            "/llm_request",
            json!({"model": "smollm2", "inference_endpoint": "x", "prompt": "hi"}),
        )
        .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(code(&body), "user_disabled");
    assert_eq!(snapshot(&app, &token, Some("bob")).await, before);
}

#[tokio::test]
async fn add_user_needs_an_admin_key_and_rejects_duplicates_and_bad_input() {
    let app = TestApp::spawn().await;
    let admin = app.admin_key().await;
    let client = app.key_with_calls(None).await;
    let body = json!({"username": "erin", "password": PASSWORD});

    let (status, reply) = add_user(&app, &client, body.clone()).await;
    assert_eq!(status, 403, "{reply}");
    assert_eq!(code(&reply), "admin_scope_required");
    let (status, _) = app.post(None, "/db_request/add_user/", body.clone()).await;
    assert_eq!(status, 401);
    assert!(users::Model::find_by_username(&app.ctx.db, "erin")
        .await
        .expect("db")
        .is_none());

    let (status, reply) = add_user(
        &app,
        &admin,
        json!({"username": "erin", "password": PASSWORD, "prompt_token_number": 7,
               "gen_token_number": 3, "prompt_token_limit": 100, "gen_token_limit": 50}),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["status"], "success");
    assert!(reply["message"]
        .as_str()
        .is_some_and(|m| m.contains("erin")));
    let erin = user(&app, "erin").await;
    assert_eq!(
        (
            erin.prompt_tokens_used,
            erin.gen_tokens_used,
            erin.prompt_token_limit,
            erin.gen_token_limit
        ),
        (7, 3, Some(100), Some(50))
    );
    assert_eq!(erin.role, "user");
    assert!(erin.enabled);

    let (status, reply) = add_user(&app, &admin, body).await;
    assert_eq!(status, 409, "{reply}");
    assert_eq!(code(&reply), "user_exists");

    for bad in [
        json!({"username": "frank", "password": ""}),
        json!({"username": "frank", "password": PASSWORD, "gen_token_limit": -1}),
        json!({"username": "", "password": PASSWORD}),
        json!({"username": "frank"}),
        json!({"username": "frank", "password": PASSWORD, "role": "root"}),
        json!({"username": "frank", "password": PASSWORD, "prompt_token_limit": "many"}),
    ] {
        let (status, reply) = add_user(&app, &admin, bad.clone()).await;
        assert_eq!(status, 422, "{bad} -> {reply}");
    }
    assert_eq!(
        users::Entity::find().count(&app.ctx.db).await.expect("db"),
        1
    );

    // An admin user's token has admin scope and can add users itself.
    let (status, _) = add_user(
        &app,
        &admin,
        json!({"username": "root", "password": PASSWORD, "role": "admin"}),
    )
    .await;
    assert_eq!(status, 200);
    let root = token_for(&app, "root").await;
    assert_eq!(app.key_row(&root).await.scope, "admin");
    let (status, reply) = add_user(
        &app,
        &root,
        json!({"username": "grace", "password": PASSWORD}),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    let erin_token = token_for(&app, "erin").await;
    let (status, _) = add_user(
        &app,
        &erin_token,
        json!({"username": "heidi", "password": PASSWORD}),
    )
    .await;
    assert_eq!(status, 403, "a user token has client scope");
}

#[tokio::test]
async fn a_request_over_the_remaining_budget_is_refused_with_429_and_changes_nothing() {
    let app = TestApp::spawn().await;
    let admin = app.admin_key().await;

    // The key's own generation budget: max_tokens is reserved in full.
    let key = app
        .issue_key(KeyParams {
            email: "k@example.com".into(),
            gen_token_limit: Some(10),
            ..Default::default()
        })
        .await;
    let before = snapshot(&app, &key, None).await;
    let (status, body) = app
        .post_api(&key, json!({"text": "Hello", "max_tokens": 11}))
        .await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(code(&body), "token_budget_exceeded");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("key") && message.contains("generation"),
        "{message}"
    );
    assert_eq!(snapshot(&app, &key, None).await, before);

    // The key's prompt budget.
    let small = app
        .issue_key(KeyParams {
            email: "p@example.com".into(),
            prompt_token_limit: Some(5),
            ..Default::default()
        })
        .await;
    let (status, body) = app
        .post_api(&small, json!({"text": "Hello there", "max_tokens": 1}))
        .await;
    assert_eq!(status, 429, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("prompt")));
    assert_eq!(app.calls_used(&small).await, 0);

    // The user's budget: the key reservation and the call charge are undone too.
    let token = user_token(&app, &admin, "ivan", json!({"gen_token_limit": 20})).await;
    let before = snapshot(&app, &token, Some("ivan")).await;
    let request =
        json!({"model": "smollm2", "inference_endpoint": "x", "prompt": "Hi", "max_tokens": 21});
    let (status, body) = app.post(Some(&token), "/llm_request", request).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(code(&body), "token_budget_exceeded");
    assert!(body["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("user")));
    // OpenAI's error shape on the OpenAI route.
    let request = json!({"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}],
                         "max_tokens": 21});
    let (status, body) = app
        .post(Some(&token), "/v1/chat/completions", request)
        .await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "token_budget_exceeded");
    assert_eq!(body["error"]["type"], "insufficient_quota");
    assert_eq!(snapshot(&app, &token, Some("ivan")).await, before);

    // Settlement: the unused part of max_tokens goes back. A stop string ends the reply early.
    let (status, body) = app
        .post_api(
            &token,
            json!({"text": "Write a sentence about the sea.", "max_tokens": 20, "stop": [" "], "temperature": 0}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let generated = body["usage"]["completion_tokens"].as_i64().expect("usage");
    let prompt = body["usage"]["prompt_tokens"].as_i64().expect("usage");
    assert!(
        generated < 20,
        "the stop string did not end the reply early: {body}"
    );
    let ivan = user(&app, "ivan").await;
    assert_eq!(
        (ivan.prompt_tokens_used, ivan.gen_tokens_used),
        (prompt, generated)
    );
    let row = app.key_row(&token).await;
    assert_eq!(
        (row.prompt_tokens_used, row.gen_tokens_used),
        (prompt, generated)
    );

    // The budget boundary is inclusive: exactly what is left is admitted, one more is not.
    let left = 20 - generated;
    let (status, body) = app
        .post_api(&token, json!({"text": "Hi", "max_tokens": left + 1}))
        .await;
    assert_eq!(status, 429, "{body}");
    let (status, body) = app
        .post_api(&token, json!({"text": "Hi", "max_tokens": left}))
        .await;
    assert_eq!(status, 200, "{body}");
    let ivan = user(&app, "ivan").await;
    assert!(ivan.gen_tokens_used <= 20);
    assert_eq!(ivan.gen_tokens_used, spent(&app, &token).await.1);
}

#[tokio::test]
async fn a_failed_job_releases_its_whole_reservation_exactly_once() {
    let app = TestApp::spawn().await;
    let admin = app.admin_key().await;
    let token = user_token(&app, &admin, "judy", json!({"gen_token_limit": 100})).await;
    let key = app.key_row(&token).await;
    let reservation = budgets::reserve(&app.ctx.db, &key, 12, 30)
        .await
        .expect("db")
        .expect("reserved");
    assert_eq!(user(&app, "judy").await.gen_tokens_used, 30);
    let request = GenerationRequest {
        model: "smollm2".into(),
        prompt: Prompt::Raw { text: "x".into() },
        params: common::greedy(30),
        adapter: None,
    };
    let delivery = common::queued_job(&app, key.id, 12, reservation, request).await;
    let worker = common::worker_on(&app, Arc::new(FailingEngine), JobEvents::default());
    let outcome = worker.run_one(delivery.clone()).await.expect("run");
    assert!(matches!(outcome, Outcome::Failed(_)), "{outcome:?}");
    let judy = user(&app, "judy").await;
    assert_eq!((judy.prompt_tokens_used, judy.gen_tokens_used), (0, 0));
    let row = app.key_row(&token).await;
    assert_eq!((row.prompt_tokens_used, row.gen_tokens_used), (0, 0));

    // A second delivery of the same job releases nothing more (others' reservations stay).
    budgets::reserve(&app.ctx.db, &key, 5, 5)
        .await
        .expect("db")
        .expect("reserved");
    let again = worker.run_one(delivery).await.expect("run");
    assert!(matches!(again, Outcome::AlreadySettled), "{again:?}");
    let judy = user(&app, "judy").await;
    assert_eq!((judy.prompt_tokens_used, judy.gen_tokens_used), (5, 5));
}

/// Prompt tokens of `text` as a one-turn chat (from a real request on an unlimited key).
async fn prompt_tokens_of(app: &TestApp, text: &str) -> i64 {
    let probe = app.key_with_calls(None).await;
    let (status, body) = app
        .post_api(&probe, json!({"text": text, "max_tokens": 1}))
        .await;
    assert_eq!(status, 200, "{body}");
    body["usage"]["prompt_tokens"].as_i64().expect("usage")
}

/// 16 concurrent requests (8 on each of two tokens of one user) against a user prompt budget
/// that holds exactly 4 of them: exactly 4 pass, and every counter ends exact.
async fn concurrent_prompt_budget(app: &TestApp) {
    const TEXT: &str = "Count to three.";
    let p = prompt_tokens_of(app, TEXT).await;
    let admin = app.admin_key().await;
    let first = user_token(app, &admin, "kim", json!({"prompt_token_limit": 4 * p})).await;
    let second = token_for(app, "kim").await;
    let calls = (0..16)
        .map(|i| {
            let key = if i % 2 == 0 { &first } else { &second };
            (key, "/api/", json!({"text": TEXT, "max_tokens": 2}))
        })
        .collect();
    let statuses = fire(app, calls).await;
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        4,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        12,
        "{statuses:?}"
    );
    let kim = user(app, "kim").await;
    let (p1, g1) = spent(app, &first).await;
    let (p2, g2) = spent(app, &second).await;
    assert_eq!(kim.prompt_tokens_used, 4 * p);
    assert_eq!(
        (kim.prompt_tokens_used, kim.gen_tokens_used),
        (p1 + p2, g1 + g2)
    );
    for (key, (p, g)) in [(&first, (p1, g1)), (&second, (p2, g2))] {
        let row = app.key_row(key).await;
        assert_eq!((row.prompt_tokens_used, row.gen_tokens_used), (p, g));
        assert_eq!(row.calls_used, app.jobs_of(key).await.len() as i64);
    }
}

#[tokio::test]
async fn concurrent_requests_never_overspend_a_small_budget() {
    let app = TestApp::spawn().await;
    concurrent_prompt_budget(&app).await;

    // A generation budget of 12 with max_tokens 4: reservations never let more than 12
    // tokens be generated, and settlement leaves the counter equal to what was generated.
    let key = app
        .issue_key(KeyParams {
            email: "g@example.com".into(),
            gen_token_limit: Some(12),
            ..Default::default()
        })
        .await;
    let calls = (0..16)
        .map(|_| {
            (
                &key,
                "/api/",
                json!({"text": "Count from one to one hundred.", "max_tokens": 4}),
            )
        })
        .collect();
    let statuses = fire(&app, calls).await;
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert!(ok >= 3, "{statuses:?}");
    assert!(statuses.contains(&429), "{statuses:?}");
    let row = app.key_row(&key).await;
    let (prompt, generated) = spent(&app, &key).await;
    assert!(generated <= 12);
    assert_eq!(
        (row.prompt_tokens_used, row.gen_tokens_used),
        (prompt, generated)
    );
    assert_eq!(row.calls_used, ok as i64);
}

#[tokio::test]
async fn on_postgres_concurrent_requests_never_overspend_a_small_budget() {
    let app = TestApp::spawn_on_postgres().await;
    concurrent_prompt_budget(&app).await;
}

#[tokio::test]
async fn memory_keeps_a_conversation_per_owner_and_number() {
    let app = TestApp::spawn().await;
    let admin = app.admin_key().await;
    let alice = user_token(&app, &admin, "alice", json!({})).await;
    let bob = user_token(&app, &admin, "bob", json!({})).await;
    let alice_id = user(&app, "alice").await.id;
    let ask = |key: &TestKey, prompt: &str, memory: Option<i64>| {
        let body = match memory {
            Some(n) => json!({"model": "smollm2", "inference_endpoint": "x", "prompt": prompt,
                              "memory": true, "conversation_number": n, "max_tokens": 12,
                              "temperature": 0}),
            None => json!({"model": "smollm2", "inference_endpoint": "x", "prompt": prompt,
                           "max_tokens": 12, "temperature": 0}),
        };
        let key = TestKey {
            id: key.id,
            prefix: key.prefix.clone(),
            secret: key.secret.clone(),
        };
        let app = &app;
        async move {
            let (status, body) = app.post(Some(&key), "/llm_request", body).await;
            assert_eq!(status, 200, "{body}");
            body
        }
    };
    const FACT: &str = "My secret code word is Zorblat. Please remember it.";
    const QUESTION: &str = "What is my secret code word?";

    let baseline = ask(&alice, QUESTION, None).await;
    let baseline_tokens = baseline["usage"]["prompt_tokens"].as_i64().expect("usage");
    assert!(
        conversations::messages(&app.ctx.db, Owner::User(alice_id), 0)
            .await
            .expect("db")
            .is_empty(),
        "a request without memory stores nothing"
    );

    let first = ask(&alice, FACT, Some(1)).await;
    let history = conversations::messages(&app.ctx.db, Owner::User(alice_id), 1)
        .await
        .expect("db");
    assert_eq!(history.len(), 2);
    assert_eq!(
        (history[0].role.as_str(), history[0].content.as_str()),
        ("user", FACT)
    );
    assert_eq!(history[1].role, "assistant");
    assert_eq!(Some(history[1].content.as_str()), first["data"].as_str());

    // The second turn's prompt is the stored history plus the question.
    let second = ask(&alice, QUESTION, Some(1)).await;
    let second_job = job(&app, second["job_id"].as_str().expect("job id")).await;
    assert!(
        second_job.request.contains("Zorblat"),
        "{}",
        second_job.request
    );
    assert!(
        i64::from(second_job.prompt_tokens) > baseline_tokens + 10,
        "history not in the prompt: {} vs {baseline_tokens}",
        second_job.prompt_tokens
    );
    assert_eq!(
        conversations::messages(&app.ctx.db, Owner::User(alice_id), 1)
            .await
            .expect("db")
            .len(),
        4
    );

    // Another number, another user's same number, and a user's other token start empty / share.
    for (key, n) in [(&alice, 2), (&bob, 1)] {
        let reply = ask(key, QUESTION, Some(n)).await;
        let j = job(&app, reply["job_id"].as_str().expect("job id")).await;
        assert!(!j.request.contains("Zorblat"), "{}", j.request);
        assert_eq!(i64::from(j.prompt_tokens), baseline_tokens);
    }
    let alice_again = token_for(&app, "alice").await;
    let reply = ask(&alice_again, QUESTION, Some(1)).await;
    let j = job(&app, reply["job_id"].as_str().expect("job id")).await;
    assert!(
        j.request.contains("Zorblat"),
        "the user's memory, not the token's"
    );

    // A key without a user keeps its own conversations.
    let plain = app.key_with_calls(None).await;
    let reply = ask(&plain, QUESTION, Some(1)).await;
    let j = job(&app, reply["job_id"].as_str().expect("job id")).await;
    assert!(!j.request.contains("Zorblat"));
    assert_eq!(
        reply["username"], "test",
        "a key without a user answers with its name"
    );
    assert_eq!(
        conversations::messages(&app.ctx.db, Owner::Key(plain.id), 1)
            .await
            .expect("db")
            .len(),
        2
    );

    // Rejections: nothing charged, nothing stored.
    let before = snapshot(&app, &alice, Some("alice")).await;
    for (body, status, expected) in [
        (
            json!({"model": "smollm2", "inference_endpoint": "x", "prompt": "hi", "memory": true}),
            422,
            "conversation_number_required",
        ),
        (
            json!({"model": "gpt-4", "inference_endpoint": "x", "prompt": "hi"}),
            404,
            "model_not_found",
        ),
        (
            json!({"model": "smollm2", "inference_endpoint": "x", "prompt": ""}),
            422,
            "empty_prompt",
        ),
        (
            json!({"model": "smollm2", "inference_endpoint": "x"}),
            422,
            "invalid_body",
        ),
    ] {
        let (got, reply) = app.post(Some(&alice), "/llm_request", body.clone()).await;
        assert_eq!(got, status, "{body} -> {reply}");
        assert_eq!(code(&reply), expected, "{reply}");
        if expected == "model_not_found" {
            assert!(reply["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("smollm2")));
        }
    }
    assert_eq!(snapshot(&app, &alice, Some("alice")).await, before);
    let (status, _) = app
        .post(
            None,
            "/llm_request",
            json!({"model": "smollm2", "inference_endpoint": "x", "prompt": "hi"}),
        )
        .await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn a_long_history_is_trimmed_from_the_oldest_turns_to_fit_the_context() {
    let app = TestApp::spawn_with(|s| s["engine"]["context_size"] = json!(512)).await;
    let key = app.key_with_calls(None).await;
    let owner = Owner::Key(key.id);
    for i in 0..40 {
        conversations::append(
            &app.ctx.db,
            owner,
            7,
            &format!("Turn {i}: tell me something about the number {i}, please, in detail."),
            &format!(
                "Reply {i}: the number {i} is a fine number with many properties worth noting."
            ),
            "seeded",
        )
        .await
        .expect("seed history");
    }
    let request = json!({"model": "smollm2", "inference_endpoint": "x",
                         "prompt": "And the last one?", "memory": true,
                         "conversation_number": 7, "max_tokens": 32, "temperature": 0});
    let (status, body) = app.post(Some(&key), "/llm_request", request).await;
    assert_eq!(status, 200, "{body}");
    let j = job(&app, body["job_id"].as_str().expect("job id")).await;
    let prompt = i64::from(j.prompt_tokens);
    assert!(
        prompt + 32 <= 512,
        "prompt {prompt} leaves no room for the reply"
    );
    assert!(prompt > 300, "trimmed far more than needed: {prompt}");
    assert!(j.request.contains("Turn 39:") && j.request.contains("Reply 39:"));
    assert!(j.request.contains("And the last one?"));
    assert!(
        !j.request.contains("Turn 0:"),
        "the oldest turn should be gone"
    );
    // No reply is sent without its question.
    let first_reply = (0..40).find(|i| j.request.contains(&format!("Reply {i}:")));
    let first_turn = (0..40).find(|i| j.request.contains(&format!("Turn {i}:")));
    assert_eq!(first_reply, first_turn);
    assert_eq!(
        conversations::messages(&app.ctx.db, owner, 7)
            .await
            .expect("db")
            .len(),
        82
    );
}

#[tokio::test]
async fn a_memory_request_that_outlives_the_wait_still_lands_in_the_conversation() {
    let app = TestApp::spawn_with(|s| s["api"]["wait_timeout_ms"] = json!(1)).await;
    let key = app.key_with_calls(None).await;
    let request = json!({"model": "smollm2", "inference_endpoint": "x",
                         "prompt": "Tell me about the sea.", "memory": true,
                         "conversation_number": 3, "max_tokens": 24});
    let (status, body) = app.post(Some(&key), "/llm_request", request).await;
    assert_eq!(status, 202, "{body}");
    let job_id = body["job_id"].as_str().expect("job id").to_string();
    let done = common::poll_job(&app, &key, &job_id).await;
    assert_eq!(done["status"], "done", "{done}");
    let mut stored = Vec::new();
    for _ in 0..100 {
        stored = conversations::messages(&app.ctx.db, Owner::Key(key.id), 3)
            .await
            .expect("db");
        if !stored.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(stored.len(), 2, "the exchange was not stored");
    assert_eq!(stored[0].content, "Tell me about the sea.");
    assert_eq!(Some(stored[1].content.as_str()), done["message"].as_str());
    assert_eq!(stored[1].job_id.as_deref(), Some(job_id.as_str()));
}

/// Every request documented by seed 002 (its JSON examples, placeholder values filled in)
/// gets the documented response shape.
#[tokio::test]
async fn seed_002_documented_requests_get_the_documented_shapes() {
    let app = TestApp::spawn().await;
    let admin = app.admin_key().await;

    // /db_request/add_user/
    let (status, body) = add_user(
        &app,
        &admin,
        json!({
            "username": "seeduser",
            "password": "seed-password",
            "prompt_token_number": 0,
            "gen_token_number": 0,
            "gen_token_limit": 5000,
            "prompt_token_limit": 20000
        }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["status"].is_string() && body["message"].is_string(),
        "{body}"
    );

    // The seed sets no password rule: its admins' short passwords work (the dashboard and the
    // CLI ask for 8 characters).
    let (status, body) = add_user(
        &app,
        &admin,
        json!({"username": "shortpass", "password": "string"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = login(&app, "shortpass", "string").await;
    assert_eq!(status, 200, "{body}");

    // /token
    let (status, body) = app
        .post(
            None,
            "/token",
            json!({"username": "seeduser", "password": "seed-password"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["username"].is_string() && body["access_token"].is_string());
    assert_eq!(body["token_type"], "bearer");
    let token = key_of(&app, body["access_token"].as_str().expect("token")).await;

    // /vllm_request/start with the user's token: the model already runs, so it is healthy
    // (named as vLLM's users name it, by its Hugging Face id); a model not running would load
    // new weights, which needs an admin key.
    let (status, body) = app
        .post(
            Some(&token),
            "/vllm_request/start",
            json!({"HUGGING_FACE_HUB_TOKEN": "hf_xxx", "Model": "HuggingFaceTB/SmolLM2-135M-Instruct"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "healthy", "{body}");
    assert_eq!(body["vLLM_endpoint"], format!("{}/v1", app.base));
    let (status, body) = app
        .post(
            Some(&token),
            "/vllm_request/start",
            json!({"HUGGING_FACE_HUB_TOKEN": "hf_xxx", "Model": "other-model.gguf"}),
        )
        .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(code(&body), "admin_scope_required");

    // /llm_request, without and with memory, the model named as the client started it
    for request in [
        json!({"model": "HuggingFaceTB/SmolLM2-135M-Instruct",
               "inference_endpoint": "http://localhost:8000/v1", "prompt": "Hello!"}),
        json!({"model": "smollm2", "inference_endpoint": "http://localhost:8000/v1",
               "prompt": "Hello!"}),
        json!({"model": "smollm2", "inference_endpoint": "http://localhost:8000/v1",
               "prompt": "Hello!", "memory": true, "conversation_number": 1}),
    ] {
        let (status, body) = app.post(Some(&token), "/llm_request", request).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["username"], "seeduser");
        assert!(body["data"].is_string(), "{body}");
    }

    // /active_models/
    let (status, body) = app.get(Some(&token), "/active_models/").await;
    assert_eq!(status, 200, "{body}");
    let list = body.as_array().expect("a list");
    assert_eq!(list.len(), 1, "{body}");
    let m = &list[0];
    for field in [
        "engine_name",
        "container_id",
        "model_name",
        "inference_end_point",
        "timestamp",
        "user_id",
    ] {
        assert!(m[field].is_string(), "{field}: {m}");
    }
    assert_eq!(m["model_name"], "smollm2");
    assert_eq!(m["quantized"], true, "Q4_1 weights are quantized");
    assert_eq!(m["max_model_length"], 2048);
    assert!(m["seed"].is_null());
    assert_eq!(m["inference_end_point"], format!("{}/v1", app.base));
    assert_eq!(m["user_id"], "seeduser");
    assert!(chrono::DateTime::parse_from_rfc3339(m["timestamp"].as_str().unwrap_or("")).is_ok());
    // The container id is the worker that ran this user's jobs.
    let worker = app
        .jobs_of(&token)
        .await
        .into_iter()
        .find_map(|j| j.worker)
        .expect("a job with its worker");
    assert_eq!(m["container_id"], worker.as_str());
    let (status, _) = app.get(None, "/active_models/").await;
    assert_eq!(status, 401);
}

/// `key:create prompt_tokens=… gen_tokens=…` and `user:create`, run through Loco's task
/// runner in-process (the same code path as `cargo loco task …`).
#[tokio::test]
async fn the_cli_tasks_set_token_budgets_and_create_users() {
    use loco_rs::task::Vars;
    use tollgate::app::App;

    let app = TestApp::spawn().await;
    let run = |name: &str, args: &[(&str, &str)]| {
        let vars = Vars::from_cli_args(
            args.iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect(),
        );
        let name = name.to_string();
        let ctx = app.ctx.clone();
        async move { loco_rs::boot::run_task::<App>(&ctx, Some(&name), &vars).await }
    };
    run(
        "key:create",
        &[
            ("email", "b@example.com"),
            ("prompt_tokens", "100"),
            ("gen_tokens", "50"),
        ],
    )
    .await
    .expect("key:create");
    assert!(
        run(
            "key:create",
            &[("email", "c@example.com"), ("gen_tokens", "lots")]
        )
        .await
        .is_err(),
        "a non-number budget must be refused"
    );
    run(
        "user:create",
        &[
            ("username", "boss"),
            ("password", "long-enough-password"),
            ("role", "admin"),
            ("gen_tokens", "500"),
        ],
    )
    .await
    .expect("user:create");

    let keys = key_entity::Entity::find()
        .all(&app.ctx.db)
        .await
        .expect("keys");
    assert_eq!(keys.len(), 1);
    assert_eq!(
        (keys[0].prompt_token_limit, keys[0].gen_token_limit),
        (Some(100), Some(50))
    );
    let boss = user(&app, "boss").await;
    assert_eq!(
        (boss.role.as_str(), boss.gen_token_limit),
        ("admin", Some(500))
    );
    // The admin user logs in with the password given to the task and gets an admin token.
    let (status, body) = login(&app, "boss", "long-enough-password").await;
    assert_eq!(status, 200, "{body}");
    let token = key_of(&app, body["access_token"].as_str().expect("token")).await;
    assert_eq!(app.key_row(&token).await.scope, "admin");

    // user:update and user:delete make the admin API's changes from the shell.
    run(
        "user:update",
        &[
            ("username", "boss"),
            ("enabled", "false"),
            ("gen_tokens", "none"),
        ],
    )
    .await
    .expect("user:update");
    let boss = user(&app, "boss").await;
    assert_eq!((boss.enabled, boss.gen_token_limit), (false, None));
    let (status, body) = app.get(Some(&token), "/api/workers").await;
    assert_eq!((status, code(&body)), (403, "user_disabled"));
    assert!(
        run("user:update", &[("username", "boss"), ("enabled", "maybe")])
            .await
            .is_err(),
        "a bad flag is refused"
    );
    run("user:delete", &[("username", "boss")])
        .await
        .expect("user:delete");
    let (status, body) = app.get(Some(&token), "/api/workers").await;
    assert_eq!((status, code(&body)), (401, "key_revoked"));
}

#[tokio::test]
async fn admins_disable_change_reset_and_delete_users_and_their_tokens_follow() {
    let app = TestApp::spawn_scripted(|_| {}).await;
    let admin = app.admin_key().await;
    let token = user_token(
        &app,
        &admin,
        "frank",
        json!({"gen_token_limit": 500, "gen_token_number": 40}),
    )
    .await;
    let (status, _) = app.get(Some(&token), "/v1/models").await;
    assert_eq!(status, 200);

    // Disabled: every token of the user stops at once, on every route.
    let (status, body) = app
        .send(
            Method::PATCH,
            Some(&admin),
            "/api/users/frank",
            Some(&json!({"enabled": false})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["enabled"], false);
    for path in ["/v1/models", "/api/jobs/none"] {
        let (status, body) = app.get(Some(&token), path).await;
        assert_eq!((status, code(&body)), (403, "user_disabled"), "{path}");
    }
    let (status, body) = login(&app, "frank", PASSWORD).await;
    assert_eq!((status, code(&body)), (403, "user_disabled"));

    // Enabled again, with new limits and a new password; counters reset.
    let (status, body) = app
        .send(
            Method::PATCH,
            Some(&admin),
            "/api/users/frank",
            Some(
                &json!({"enabled": true, "gen_token_limit": null, "prompt_token_limit": 900,
                         "password": "a brand new password"}),
            ),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (
            body["gen_token_limit"].clone(),
            body["prompt_token_limit"].clone()
        ),
        (Value::Null, json!(900))
    );
    let (status, _) = app.get(Some(&token), "/v1/models").await;
    assert_eq!(status, 200);
    let (status, _) = login(&app, "frank", PASSWORD).await;
    assert_eq!(status, 401, "the old password no longer works");
    let (status, body) = app.post_empty(Some(&admin), "/api/users/frank/reset").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["gen_token_number"], 0);
    let (status, list) = app.get(Some(&admin), "/api/users").await;
    assert_eq!(status, 200);
    assert_eq!(list["data"][0]["username"], "frank");
    assert!(
        !list.to_string().contains("argon2"),
        "no password hash is shown"
    );

    // Bad changes change nothing.
    for bad in [
        json!({"gen_token_limit": -1}),
        json!({"role": "root"}),
        json!({"color": "red"}),
    ] {
        let (status, body) = app
            .send(Method::PATCH, Some(&admin), "/api/users/frank", Some(&bad))
            .await;
        assert_eq!(status, 422, "{bad}: {body}");
    }
    let (status, body) = app
        .send(
            Method::PATCH,
            Some(&admin),
            "/api/users/nobody",
            Some(&json!({"enabled": false})),
        )
        .await;
    assert_eq!((status, code(&body)), (404, "user_not_found"));

    // Deleted: its tokens are revoked.
    let (status, body) = app.delete(Some(&admin), "/api/users/frank").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = app.get(Some(&token), "/v1/models").await;
    assert_eq!((status, code(&body)), (401, "key_revoked"));
    assert!(users::Model::find_by_username(&app.ctx.db, "frank")
        .await
        .expect("db")
        .is_none());
}

#[tokio::test]
async fn a_flood_of_sign_ins_is_refused_at_once_beyond_the_password_check_bound() {
    let app = TestApp::spawn_scripted(|s| {
        s["auth"]["password_checks"] = json!(1);
        s["auth"]["login_max_failures"] = json!(1000);
    })
    .await;
    let mut tasks = Vec::new();
    for i in 0..30 {
        let (http, url) = (app.http.clone(), app.url("/token"));
        tasks.push(tokio::spawn(async move {
            let resp = http
                .post(url)
                .json(&json!({"username": format!("nobody{i}"), "password": "guess-guess"}))
                .send()
                .await
                .expect("post");
            let retry = resp.headers().contains_key("retry-after");
            (resp.status().as_u16(), retry)
        }));
    }
    let mut seen = std::collections::BTreeMap::new();
    for t in tasks {
        let (status, retry) = t.await.expect("task");
        assert!(status != 503 || retry, "a 503 says when to retry");
        *seen.entry(status).or_insert(0) += 1;
    }
    assert!(
        seen.keys().all(|s| *s == 401 || *s == 503),
        "only wrong-credential answers and busy refusals: {seen:?}"
    );
    assert!(
        seen.get(&503).copied().unwrap_or(0) > 0,
        "the bound refused some: {seen:?}"
    );
    assert!(
        seen.get(&401).copied().unwrap_or(0) > 0,
        "some were checked: {seen:?}"
    );
    let (status, _) = app.get(None, "/ping").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn one_address_trying_many_usernames_is_throttled_and_login_tokens_share_the_users_rate() {
    let app = TestApp::spawn_scripted(|s| {
        s["auth"]["login_max_failures_per_address"] = json!(4);
        s["api"]["rate_limit"] = json!({"per_minute": 60, "burst": 2});
    })
    .await;
    let admin = app
        .issue_key(KeyParams {
            rate_limit_per_minute: Some(6000),
            rate_limit_burst: Some(100),
            ..common::admin_params()
        })
        .await;
    for name in ["erin", "frank"] {
        let (status, body) = add_user(
            &app,
            &admin,
            json!({"username": name, "password": PASSWORD}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }

    // Three logins of one user: three tokens, one rate (burst 2) between them.
    let tokens = [
        token_for(&app, "erin").await,
        token_for(&app, "erin").await,
        token_for(&app, "erin").await,
    ];
    let mut statuses = Vec::new();
    for token in &tokens {
        let (status, _) = app.post_api(token, json!({"text": "hi"})).await;
        statuses.push(status);
    }
    assert_eq!(statuses[..2], [200, 200], "{statuses:?}");
    assert_eq!(
        statuses[2], 429,
        "a third token must not bring a fresh burst"
    );
    assert_eq!(
        app.calls_used(&tokens[2]).await,
        0,
        "a refused call spends nothing"
    );
    // Another user's token has its own allowance.
    let frank = token_for(&app, "frank").await;
    let (status, body) = app.post_api(&frank, json!({"text": "hi"})).await;
    assert_eq!(status, 200, "{body}");

    // One address guessing across usernames: each name stays under its own limit (5), but
    // the address is locked after 4 failures, for every username, right password included.
    for name in ["u1", "u2", "u3", "u4"] {
        let (status, body) = login(&app, name, "guess").await;
        assert_eq!(status, 401, "{body}");
    }
    let (status, body) = login(&app, "frank", PASSWORD).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(code(&body), "too_many_login_attempts");
    let services = tollgate::services::Services::from_ctx(&app.ctx).expect("services");
    let (names, addresses) = services.logins.tracked();
    assert!(
        names >= 4 && addresses == 1,
        "{names} names, {addresses} addresses"
    );
}

#[tokio::test]
async fn a_conversation_keeps_its_newest_messages_only_and_others_are_untouched() {
    let app = TestApp::spawn_scripted(|_| {}).await;
    let key = app.key_with_calls(None).await;
    let other = app.key_with_calls(None).await;
    let turns = conversations::KEPT_MESSAGES / 2 + 5;
    for i in 0..turns {
        conversations::append(
            &app.ctx.db,
            Owner::Key(key.id),
            3,
            &format!("q{i}"),
            &format!("a{i}"),
            "seeded",
        )
        .await
        .expect("append");
    }
    conversations::append(
        &app.ctx.db,
        Owner::Key(other.id),
        3,
        "keep me",
        "kept",
        "seeded",
    )
    .await
    .expect("append");
    let kept = conversations::messages(&app.ctx.db, Owner::Key(key.id), 3)
        .await
        .expect("messages");
    assert_eq!(kept.len() as u64, conversations::KEPT_MESSAGES);
    assert_eq!(
        kept.last().map(|m| m.content.as_str()),
        Some(format!("a{}", turns - 1).as_str())
    );
    assert_eq!(
        kept.first().map(|m| m.content.as_str()),
        Some("q5"),
        "the oldest turns went first"
    );
    let untouched = conversations::messages(&app.ctx.db, Owner::Key(other.id), 3)
        .await
        .expect("messages");
    assert_eq!(
        untouched.len(),
        2,
        "another owner's conversation is not trimmed"
    );
}

/// A change racing the user's deletion: the password's hash takes long enough for the delete to
/// land between the change's lookup and its update. The change then answers 404 like any
/// change of a user that is gone (it was a 500 the fuzz run found), and nothing comes back.
#[tokio::test]
async fn a_change_that_loses_the_race_with_a_delete_is_404_not_500() {
    let app = TestApp::spawn_scripted(|_| {}).await;
    let admin = app.admin_key().await;
    let mut lost = 0;
    for round in 0..3 {
        let name = format!("racer{round}");
        let (status, reply) = add_user(
            &app,
            &admin,
            json!({"username": name, "password": PASSWORD}),
        )
        .await;
        assert_eq!(status, 200, "{reply}");
        let path = format!("/api/users/{name}");
        let new_password = json!({"password": "a password to hash a while"});
        let change = app.send(Method::PATCH, Some(&admin), &path, Some(&new_password));
        let delete = async {
            // Inside the change's hashing, after its lookup.
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            app.delete(Some(&admin), &path).await
        };
        let ((changed, body), (deleted, _)) = tokio::join!(change, delete);
        assert_eq!(deleted, 200);
        assert!(
            changed == 200 || (changed, code(&body)) == (404, "user_not_found"),
            "round {round}: {changed} {body}"
        );
        lost += usize::from(changed == 404);
        let (status, body) = app.get(Some(&admin), &path).await;
        assert_eq!((status, code(&body)), (404, "user_not_found"), "{body}");
    }
    // The race was run, not missed: the hashing outlasts the delete's head start.
    assert!(lost > 0, "no change lost the race in 3 rounds");
}
