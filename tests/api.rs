//! `POST /api/` end to end: real SQLite, real queue, real SmolLM2.

mod common;

use chrono::{Duration, Utc};
use common::{code, metric_in, scrape, TestApp};
use reqwest::Method;
use serde_json::json;
use tollgate::models::api_keys::KeyParams;

#[tokio::test]
async fn a_valid_key_gets_generated_text_from_the_model() {
    let app = TestApp::spawn().await;
    let key = app.key_with_calls(Some(5)).await;

    let (status, body) = app
        .post_api(
            &key,
            json!({"text": "What is the capital of France?", "temperature": 0}),
        )
        .await;

    assert_eq!(status, 200, "{body}");
    let message = body["message"].as_str().expect("message");
    assert!(!message.trim().is_empty(), "empty generation: {body}");
    assert!(body["job_id"].as_str().is_some_and(|id| !id.is_empty()));
    assert!(body["usage"]["prompt_tokens"].as_i64().unwrap_or(0) > 0);
    assert!(body["usage"]["completion_tokens"].as_i64().unwrap_or(0) > 0);
    assert_eq!(app.calls_used(&key).await, 1);
}

#[tokio::test]
async fn the_analyze_alias_and_the_unslashed_path_serve_the_same_api() {
    let app = TestApp::spawn().await;
    let key = app.key_with_calls(None).await;
    for path in ["/analyze/", "/api", "/analyze"] {
        let (status, body) = app
            .post(Some(&key), path, json!({"text": "Say hi", "max_tokens": 4}))
            .await;
        assert_eq!(status, 200, "{path}: {body}");
        assert!(body["message"].is_string(), "{path}: {body}");
    }
    assert_eq!(app.calls_used(&key).await, 3);
}

#[tokio::test]
async fn one_loaded_model_serves_consecutive_requests() {
    let app = TestApp::spawn().await;
    let key = app.key_with_calls(None).await;
    for _ in 0..3 {
        let (status, body) = app
            .post_api(&key, json!({"text": "Count to three.", "max_tokens": 8}))
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, public) = app.get(None, "/ping").await;
    assert_eq!(status, 200);
    assert_eq!(
        public,
        json!({"status": "ok", "ready": true, "models": ["smollm2"]}),
        "the public answer says no more"
    );
    // The probe llama.cpp's server and vLLM serve, for load balancers and client libraries.
    assert_eq!(
        app.get(None, "/health").await,
        (200, json!({"status": "ok"}))
    );
    let admin = app.admin_key().await;
    let (status, ping) = app.get(Some(&admin), "/ping").await;
    assert_eq!(status, 200);
    assert_eq!(ping["status"], "ok");
    assert_eq!(ping["ready"], true);
    let engine = &ping["worker"]["engine"];
    assert_eq!(engine["loads"], 1, "model reloaded: {ping}");
    assert_eq!(engine["jobs_served"], 3, "{ping}");
}

#[tokio::test]
async fn greedy_generation_with_a_seed_is_repeatable_and_stop_words_cut_the_output() {
    let app = TestApp::spawn().await;
    let key = app.key_with_calls(None).await;
    let body = json!({"text": "List the days of the week.", "temperature": 0, "max_tokens": 24});
    let (_, a) = app.post_api(&key, body.clone()).await;
    let (_, b) = app.post_api(&key, body).await;
    assert_eq!(a["message"], b["message"], "greedy decoding differs");

    let full = a["message"].as_str().expect("message").to_string();
    // Stop at the first word of the greedy answer that is not at its very start.
    let word = full
        .split_whitespace()
        .nth(2)
        .expect("at least three words")
        .to_string();
    let (status, cut) = app
        .post_api(
            &key,
            json!({"text": "List the days of the week.", "temperature": 0, "max_tokens": 24, "stop": [word.clone()]}),
        )
        .await;
    assert_eq!(status, 200, "{cut}");
    let cut = cut["message"].as_str().expect("message");
    assert!(!cut.contains(&word), "stop word {word:?} in {cut:?}");
    assert!(full.starts_with(cut), "{cut:?} is not a prefix of {full:?}");
}

#[tokio::test]
async fn max_tokens_bounds_the_generation() {
    let app = TestApp::spawn().await;
    let key = app.key_with_calls(None).await;
    let (status, body) = app
        .post_api(&key, json!({"text": "Write a long story about a dragon.", "max_tokens": 5, "temperature": 0}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 5);
    assert_eq!(body["finish_reason"], "length");
}

#[tokio::test]
async fn fifty_concurrent_requests_on_twenty_calls_admit_exactly_twenty() {
    let app = TestApp::spawn().await;
    let key = app.key_with_calls(Some(20)).await;
    let (ok, limited) = common::concurrent_calls(&app, &key, 50).await;
    assert_eq!((ok, limited), (20, 30));
    assert_eq!(app.calls_used(&key).await, 20);
    assert_eq!(app.job_count().await, 20);
}

#[tokio::test]
async fn a_hot_keys_concurrent_admissions_share_commits_and_are_counted_exactly() {
    let app = TestApp::spawn_scripted(|_| {}).await;
    common::hot_key_bursts_share_commits_exactly(&app).await;
}

#[tokio::test]
async fn many_keys_concurrent_admissions_share_commits_each_refused_on_its_own_and_counted_exactly()
{
    let app = TestApp::spawn_scripted(|_| {}).await;
    common::many_keys_bursts_share_commits_exactly(&app).await;
}

#[tokio::test]
async fn a_batch_charge_is_all_or_none_per_key_and_concurrent_batches_count_every_call() {
    let app = TestApp::spawn_scripted(|_| {}).await;
    common::charge_many_is_all_or_none_per_key_and_concurrent_batches_do_not_deadlock(&app).await;
}

#[tokio::test]
async fn concurrent_admissions_at_a_token_budgets_edge_admit_exactly_what_fits() {
    let app = TestApp::spawn_scripted(|_| {}).await;
    // Room for seven one-token generations (each reserves and spends exactly one): a batch of
    // more does not fit whole, and each then meets its own answer.
    let key = app
        .issue_key(KeyParams {
            email: "b@example.com".into(),
            gen_token_limit: Some(7),
            ..Default::default()
        })
        .await;
    let body = json!({"text": "Tell me about the sea.", "max_tokens": 1});
    let answers = app
        .post_at_once((0..30).map(|_| (&key, "/api/", body.clone())))
        .await;
    common::admitted_exactly_the_rest_over_budget(&answers, 7);
    assert_eq!(app.calls_used(&key).await, 7);
    assert_eq!(app.jobs_of(&key).await.len(), 7);
    assert_eq!(app.key_row(&key).await.gen_tokens_used, 7);
}

#[tokio::test]
async fn concurrent_admissions_of_two_keys_at_their_users_budget_edge_admit_exactly_what_fits() {
    let app = TestApp::spawn_scripted(|_| {}).await;
    common::two_keys_at_their_users_budget_edge_admit_exactly_what_fits(&app).await;
}

#[tokio::test]
async fn concurrent_repeats_of_one_client_job_id_make_one_job_and_one_charge() {
    let app = TestApp::spawn_scripted(|_| {}).await;
    let key = app.key_with_calls(Some(100)).await;
    let body = json!({
        "job_id": "burst-1",
        "meta": {"temperature": 0, "tokens_limit": 2, "model": "gpt-model"},
        "content": "What is AI?"
    });
    let path = format!("/k/{}/generate", key.secret);
    let sends = (0..8).map(|_| {
        let req = app.http.post(app.url(&path)).json(&body);
        tokio::spawn(async move { common::read(req.send().await.expect("send")).await })
    });
    let mut answers = Vec::new();
    for send in sends.collect::<Vec<_>>() {
        answers.push(send.await.expect("task"));
    }
    for (status, answer) in &answers {
        assert_eq!(*status, 200, "{answer}");
        assert_eq!(
            answer["content"], answers[0].1["content"],
            "one job's answer"
        );
    }
    assert_eq!(app.calls_used(&key).await, 1);
    assert_eq!(app.jobs_of(&key).await.len(), 1);
}

#[tokio::test]
async fn an_unlimited_key_inside_its_window_works() {
    let app = TestApp::spawn().await;
    let key = app
        .issue_key(KeyParams {
            name: "windowed".into(),
            email: "w@example.com".into(),
            max_calls: None,
            valid_from: Some((Utc::now() - Duration::days(1)).fixed_offset()),
            valid_until: Some((Utc::now() + Duration::days(1)).fixed_offset()),
            ..Default::default()
        })
        .await;
    let (status, body) = app
        .post_api(&key, json!({"text": "Hello", "max_tokens": 2}))
        .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn browser_clients_on_other_origins_may_call_the_api() {
    let app = TestApp::spawn_scripted(|_| {}).await;
    let key = app.key_with_calls(None).await;
    // The preflight a browser sends before a JSON POST with a bearer key.
    let preflight = app
        .request(Method::OPTIONS, None, "/v1/chat/completions")
        .header("Origin", "https://chat.example.com")
        .header("Access-Control-Request-Method", "POST")
        .header(
            "Access-Control-Request-Headers",
            "authorization, content-type",
        )
        .send()
        .await
        .expect("preflight");
    assert!(preflight.status().is_success(), "{}", preflight.status());
    assert_eq!(
        common::header(&preflight, "access-control-allow-origin").as_deref(),
        Some("*")
    );
    let allowed = common::header(&preflight, "access-control-allow-headers").unwrap_or_default();
    assert!(
        allowed.contains('*') || allowed.contains("authorization"),
        "{allowed}"
    );
    // The call itself, readable by the page (its Retry-After and Location too).
    let resp = app
        .request(Method::POST, Some(&key), "/v1/chat/completions")
        .header("Origin", "https://chat.example.com")
        .json(&json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}))
        .send()
        .await
        .expect("call");
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(
        common::header(&resp, "access-control-allow-origin").as_deref(),
        Some("*")
    );
    let exposed = common::header(&resp, "access-control-expose-headers").unwrap_or_default();
    assert!(exposed.contains("retry-after"), "{exposed}");
}

#[tokio::test]
async fn a_job_that_outlives_the_wait_answers_202_and_is_polled_to_its_result() {
    let app = TestApp::spawn_with(|s| s["api"]["wait_timeout_ms"] = json!(1)).await;
    let key = app.key_with_calls(None).await;
    let (status, body) = app
        .post_api(
            &key,
            json!({"text": "Tell me about the sea.", "max_tokens": 48, "temperature": 0}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let job_id = body["job_id"].as_str().expect("job id").to_string();
    assert_eq!(body["poll_url"], format!("/api/jobs/{job_id}"));

    let last = common::poll_job(&app, &key, &job_id).await;
    assert_eq!(last["status"], "done", "{last}");
    assert!(last["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert!(last["usage"]["completion_tokens"].as_i64().unwrap_or(0) > 0);
    assert!(last["timings"]["run_ms"].as_i64().is_some());

    // Another key cannot see it.
    let other = app.key_with_calls(None).await;
    let (status, err) = app.get(Some(&other), &format!("/api/jobs/{job_id}")).await;
    assert_eq!(status, 404);
    assert_eq!(code(&err), "job_not_found");

    // The peers' routes know no 202 (their clients would read it as the answer): they wait
    // until the job settles, however long past `wait_timeout_ms`.
    let (status, chat) = app
        .post(
            Some(&key),
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Tell me about the sea."}],
                   "max_tokens": 48, "temperature": 0}),
        )
        .await;
    assert_eq!(status, 200, "{chat}");
    assert!(
        chat["choices"][0]["message"]["content"].is_string(),
        "{chat}"
    );
    let (status, ollama) = app
        .post(
            Some(&key),
            "/api/generate",
            json!({"model": "smollm2", "prompt": "Tell me about the sea.", "stream": false,
                   "options": {"num_predict": 48, "temperature": 0}}),
        )
        .await;
    assert_eq!(status, 200, "{ollama}");
    assert_eq!(ollama["done"], true, "{ollama}");
}

#[tokio::test]
async fn usage_reports_requests_and_tokens_per_day_for_the_calling_key() {
    let app = TestApp::spawn().await;
    let key = app.key_with_calls(None).await;
    let other = app.key_with_calls(None).await;
    let mut prompt = 0;
    let mut generated = 0;
    for text in ["One", "Two"] {
        let (_, body) = app
            .post_api(&key, json!({"text": text, "max_tokens": 6}))
            .await;
        prompt += body["usage"]["prompt_tokens"].as_i64().expect("usage");
        generated += body["usage"]["completion_tokens"].as_i64().expect("usage");
    }
    app.post_api(&other, json!({"text": "Three", "max_tokens": 3}))
        .await;

    let (status, usage) = app.get(Some(&key), "/api/usage").await;
    assert_eq!(status, 200, "{usage}");
    let days = usage["days"].as_array().expect("days");
    assert_eq!(days.len(), 1, "{usage}");
    assert_eq!(days[0]["day"], Utc::now().date_naive().to_string());
    assert_eq!(days[0]["requests"], 2);
    assert_eq!(days[0]["prompt_tokens"], prompt);
    assert_eq!(days[0]["generated_tokens"], generated);
    assert!(days[0]["words"].as_i64().unwrap_or(0) > 0);
    assert_eq!(usage["key"]["calls_used"], 2);

    for path in ["/api/usage?from=yesterday", "/usage/?from=yesterday"] {
        let (status, err) = app.get(Some(&key), path).await;
        assert_eq!(status, 422, "{path}");
        assert_eq!(code(&err), "invalid_date", "{path}");
    }
    // Dates at the edge of what chrono holds are refused, never a panic.
    for path in ["/api/usage?to=-262143-01-01", "/usage/?to=-262143-01-01"] {
        let (status, err) = app.get(Some(&key), path).await;
        assert_eq!(status, 422, "{path}: {err}");
    }
}

#[tokio::test]
async fn usage_answers_as_djangollmapi_did_with_the_words_sent_per_day() {
    let app = TestApp::spawn_scripted(|_| {}).await;
    let key = app.key_with_calls(None).await;
    let other = app.key_with_calls(None).await;
    for text in [
        "Is this real?",
        "This could be any payload data the api expects.",
    ] {
        let (status, body) = app.post_api(&key, json!({"text": text})).await;
        assert_eq!(status, 200, "{body}");
    }
    app.post_api(&other, json!({"text": "not counted for the first key"}))
        .await;
    let (status, usage) = app.get(Some(&key), "/usage/").await;
    assert_eq!(status, 200, "{usage}");
    let today = format!("{}T00:00:00Z", Utc::now().date_naive());
    assert_eq!(
        usage,
        json!([{"day": today, "total_words": 3 + 9}]),
        "a bare list of days, each with the words of the texts sent"
    );
    // Seed 003's GET on its API route.
    let (status, body) = app.get(Some(&key), "/api/").await;
    assert_eq!(
        (status, body),
        (200, json!({"message": "Use a post request."}))
    );
    assert_eq!(app.calls_used(&key).await, 2, "a GET spends nothing");
}

#[tokio::test]
async fn the_stored_key_row_holds_only_a_hash_of_the_secret() {
    let app = TestApp::spawn().await;
    let key = app.key_with_calls(Some(1)).await;
    let row = app.key_row(&key).await;
    let stored = serde_json::to_string(&row).expect("serialize");
    let random_part = key.secret.rsplit('_').next().expect("secret body");
    assert!(!stored.contains(&key.secret));
    assert!(!stored.contains(random_part));
    assert_eq!(
        row.secret_hash,
        tollgate::models::api_keys::hash_secret(&key.secret)
    );
    assert_eq!(row.secret_hash.len(), 64);
    assert!(key.secret.starts_with(&format!("tg_{}_", row.prefix)));
    assert_eq!(random_part.len(), 64, "256-bit secret");
}

#[tokio::test]
async fn an_async_job_is_accepted_at_once_and_its_result_is_polled() {
    let app = TestApp::spawn().await;
    let key = app.key_with_calls(Some(2)).await;
    let resp = app
        .request(Method::POST, Some(&key), "/api/jobs")
        .json(&json!({"text": "Name three fruits.", "max_tokens": 16}))
        .send()
        .await
        .expect("request");
    let location = common::header(&resp, "location");
    let (status, body) = common::read(resp).await;
    assert_eq!(status, 202, "{body}");
    let job_id = body["job_id"].as_str().expect("job id").to_string();
    assert_eq!(location, Some(format!("/api/jobs/{job_id}")));
    assert_eq!(
        app.calls_used(&key).await,
        1,
        "an accepted job is charged once"
    );
    let job = common::poll_job(&app, &key, &job_id).await;
    assert_eq!(job["status"], "done", "{job}");
    assert!(
        job["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{job}"
    );

    let (status, _) = app.post(Some(&key), "/api/jobs", json!({"text": ""})).await;
    assert_eq!(status, 422);
    assert_eq!(app.calls_used(&key).await, 1);
    assert_eq!(app.job_count().await, 1);
}

#[tokio::test]
async fn metrics_can_require_a_token_and_listings_follow_the_keys_allow_lists() {
    let app = TestApp::spawn_scripted(|s| s["api"]["metrics_token"] = json!("scrape-me")).await;
    let resp = app.http.get(app.url("/metrics")).send().await.expect("get");
    assert_eq!(resp.status().as_u16(), 401);
    let resp = app
        .http
        .get(app.url("/metrics"))
        .bearer_auth("scrape-me")
        .send()
        .await
        .expect("get");
    assert_eq!(resp.status().as_u16(), 200);
    assert!(resp.text().await.expect("text").contains("tollgate_jobs"));

    let admin = app.admin_key().await;
    let (status, body) = app
        .post(
            Some(&admin),
            "/llm/configure_model/",
            json!({"model_id": "hidden", "model_name": "x.gguf", "model_type": "llama.cpp"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let config_id = body["config_id"].as_str().expect("id").to_string();
    let limited = app
        .issue_key(tollgate::models::api_keys::KeyParams {
            email: "l@example.com".into(),
            allowed_models: vec!["smollm2".into()],
            ..Default::default()
        })
        .await;
    let (_, listed) = app.get(Some(&limited), "/llm/configurations/").await;
    assert_eq!(
        listed,
        json!([]),
        "a configuration of a model the key may not use is hidden"
    );
    let (status, _) = app
        .get(Some(&limited), &format!("/llm/configuration/{config_id}"))
        .await;
    assert_eq!(status, 404);
    let (_, listed) = app.get(Some(&admin), "/llm/configurations/").await;
    assert_eq!(listed.as_array().map(Vec::len), Some(1));
    let only_other = app
        .issue_key(tollgate::models::api_keys::KeyParams {
            email: "o@example.com".into(),
            allowed_models: vec!["other".into()],
            ..Default::default()
        })
        .await;
    let (_, engines) = app.get(Some(&only_other), "/active_models/").await;
    assert_eq!(
        engines,
        json!([]),
        "engines of models the key may not use are hidden"
    );
    let (_, engines) = app.get(Some(&limited), "/active_models/").await;
    assert_eq!(engines.as_array().map(Vec::len), Some(1), "{engines}");
}

#[tokio::test]
async fn metrics_count_finished_jobs_from_running_totals_not_the_jobs_table() {
    use sea_orm::ConnectionTrait;

    let app = TestApp::spawn_scripted(|_| {}).await;
    let key = app.key_with_calls(None).await;
    for _ in 0..3 {
        let (status, body) = app.post_api(&key, json!({"text": "count me"})).await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, body) = app.post_api(&key, json!({"text": ""})).await;
    assert_eq!(status, 422, "{body}");
    let before = scrape(&app).await;
    assert_eq!(metric_in(&before, "tollgate_jobs{status=\"done\"}"), 3);
    assert_eq!(metric_in(&before, "tollgate_jobs{status=\"queued\"}"), 0);
    let generated = metric_in(&before, "tollgate_generated_tokens_total");
    let stored: u64 = app
        .jobs_of(&key)
        .await
        .iter()
        .map(|j| u64::try_from(j.generated_tokens).unwrap_or_default())
        .sum();
    assert!(generated > 0);
    assert_eq!(generated, stored, "totals equal the jobs' own counts");

    // Finished jobs purged (retention): the totals are counters, so they stay.
    app.ctx
        .db
        .execute_unprepared("DELETE FROM jobs")
        .await
        .expect("purge");
    let after = scrape(&app).await;
    assert_eq!(metric_in(&after, "tollgate_jobs{status=\"done\"}"), 3);
    assert_eq!(
        metric_in(&after, "tollgate_generated_tokens_total"),
        generated
    );
}

#[tokio::test]
async fn retention_erases_old_job_texts_and_keeps_counts_and_usage() {
    use sea_orm::{ActiveModelTrait, ActiveValue::Set, EntityTrait};
    use tollgate::models::{jobs, usage_records};

    let app = TestApp::spawn_scripted(|s| s["retention"]["job_text_days"] = json!(30)).await;
    let key = app.key_with_calls(None).await;
    for text in ["an old secret", "a recent question"] {
        let (status, body) = app.post_api(&key, json!({"text": text})).await;
        assert_eq!(status, 200, "{body}");
    }
    let all = app.jobs_of(&key).await;
    let old = all
        .iter()
        .find(|j| j.request.contains("an old secret"))
        .expect("old job")
        .clone();
    let long_ago = old.finished_at.expect("finished") - Duration::days(31);
    // Texts kept beside the request and result: tokens, other choices, what an answer echoes.
    jobs::ActiveModel {
        id: Set(old.id.clone()),
        finished_at: Set(Some(long_ago)),
        logprobs: Set(Some(r#"[{"token": "an old secret"}]"#.into())),
        choices: Set(Some(r#"[{"text": "an old secret"}]"#.into())),
        echo: Set(Some(r#"{"instructions": "an old secret"}"#.into())),
        ..Default::default()
    }
    .update(&app.ctx.db)
    .await
    .expect("age the job");
    let usage_before = usage_records::Entity::find()
        .all(&app.ctx.db)
        .await
        .expect("usage")
        .len();

    let erased = tollgate::retention::purge(&app.ctx.db, 30)
        .await
        .expect("purge");
    assert_eq!(erased, 1);
    assert_eq!(
        tollgate::retention::purge(&app.ctx.db, 30)
            .await
            .expect("again"),
        0
    );
    let after = app.jobs_of(&key).await;
    let purged = after.iter().find(|j| j.id == old.id).expect("row kept");
    assert_eq!(purged.request, jobs::PURGED);
    assert_eq!(
        (purged.result.as_deref(), purged.error.as_deref()),
        (None, None)
    );
    assert_eq!(
        (
            purged.logprobs.as_deref(),
            purged.choices.as_deref(),
            purged.echo.as_deref()
        ),
        (None, None, None),
        "nothing of the old texts is left"
    );
    assert_eq!(purged.generated_tokens, old.generated_tokens, "counts stay");
    let recent = after.iter().find(|j| j.id != old.id).expect("recent job");
    assert!(recent.request.contains("a recent question") && recent.result.is_some());
    assert_eq!(
        usage_records::Entity::find()
            .all(&app.ctx.db)
            .await
            .expect("usage")
            .len(),
        usage_before,
        "usage records stay"
    );
    assert_eq!(app.calls_used(&key).await, 2);
}

#[tokio::test]
async fn no_max_tokens_means_until_the_context_is_full_never_a_refusal() {
    let app = TestApp::spawn_scripted(|s| {
        s["engine"]["context_size"] = json!(96);
        s["api"]["default_max_tokens"] = json!(2048);
    })
    .await;
    let key = app.key_with_calls(None).await;
    let chat =
        json!({"model": "smollm2", "messages": [{"role": "user", "content": "Tell me a story."}]});
    let (status, body) = app.post(Some(&key), "/v1/chat/completions", chat).await;
    assert_eq!(status, 200, "{body}");
    let job = app.jobs_of(&key).await.pop().expect("job");
    // The prompt as admission counted it (the scripted engine reports its own count).
    let prompt = job.reserved_prompt_tokens;
    assert!(prompt > 0);
    assert_eq!(
        job.reserved_gen_tokens,
        96 - prompt,
        "cut to the room the prompt leaves, not the 2,048 ceiling"
    );
}
