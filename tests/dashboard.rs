//! The admin dashboard over HTTP, as a browser uses it: first-run setup link, sign-in cookie,
//! CSRF on every form, keys created (secret shown once), revoked and reactivated.

mod common;

use common::TestApp;
use reqwest::{header, redirect::Policy, Client, StatusCode};
use serde_json::json;
use tollgate::services::Services;

/// A browser without cookie storage: the test carries the session cookie itself.
fn browser() -> Client {
    Client::builder()
        .redirect(Policy::none())
        .build()
        .expect("client")
}

fn location(resp: &reqwest::Response) -> String {
    resp.headers()
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// `tg_admin=<token>` from a `Set-Cookie` header, checking its attributes.
fn session_cookie(resp: &reqwest::Response) -> String {
    let set = resp
        .headers()
        .get(header::SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .expect("Set-Cookie")
        .to_string();
    assert!(set.contains("HttpOnly"), "{set}");
    assert!(set.contains("SameSite=Strict"), "{set}");
    set.split(';').next().expect("cookie").to_string()
}

fn csrf_of(page: &str) -> String {
    let re = regex::Regex::new(r#"name="csrf" value="([0-9a-f]+)""#).expect("regex");
    re.captures(page)
        .and_then(|c| c.get(1))
        .map(|m| m.as_str().to_string())
        .expect("a csrf field on the page")
}

async fn page(http: &Client, url: String, cookie: &str) -> (StatusCode, String) {
    let resp = http
        .get(url)
        .header(header::COOKIE, cookie)
        .send()
        .await
        .expect("get");
    (resp.status(), resp.text().await.expect("body"))
}

async fn form(
    http: &Client,
    url: String,
    cookie: &str,
    fields: &[(&str, &str)],
) -> reqwest::Response {
    http.post(url)
        .header(header::COOKIE, cookie)
        .form(fields)
        .send()
        .await
        .expect("post")
}

#[tokio::test]
async fn from_an_empty_database_to_a_working_key_in_the_browser() {
    let app = TestApp::spawn().await;
    let http = browser();
    let url = |p: &str| app.url(p);

    // Nothing is reachable without signing in.
    for path in ["/admin", "/admin/keys", "/admin/keys/new"] {
        let resp = http.get(url(path)).send().await.expect("get");
        assert_eq!(resp.status(), StatusCode::SEE_OTHER, "{path}");
        assert_eq!(location(&resp), "/admin/login", "{path}");
    }
    let resp = form(&http, url("/admin/keys"), "", &[("email", "x@example.com")]).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(app.key_count().await, 0);

    // First run: the link the server printed (same code path) creates the first admin.
    let services = Services::from_ctx(&app.ctx).expect("services");
    let token = services.new_setup_link();
    let (status, _) = page(&http, url("/admin/setup?token=wrong"), "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = page(&http, url(&format!("/admin/setup?token={token}")), "").await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("Create the first admin"), "{body}");
    let resp = form(
        &http,
        url("/admin/setup"),
        "",
        &[
            ("token", &token),
            ("email", "root@example.com"),
            ("password", "long-enough-pw"),
            ("password2", "different-pw"),
        ],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert!(resp
        .text()
        .await
        .expect("body")
        .contains("The passwords differ."));
    let resp = form(
        &http,
        url("/admin/setup"),
        "",
        &[
            ("token", &token),
            ("email", "root@example.com"),
            ("password", "long-enough-pw"),
            ("password2", "long-enough-pw"),
        ],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(location(&resp), "/admin/keys");
    let cookie = session_cookie(&resp);
    // Single use.
    let (status, _) = page(&http, url(&format!("/admin/setup?token={token}")), "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (status, body) = page(&http, url("/admin/keys"), &cookie).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("No keys"), "{body}");
    let csrf = csrf_of(&body);

    // Forms without the CSRF token change nothing.
    let resp = form(
        &http,
        url("/admin/keys"),
        &cookie,
        &[("email", "client@example.com")],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let resp = form(
        &http,
        url("/admin/keys"),
        &cookie,
        &[("csrf", "0000"), ("email", "client@example.com")],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_eq!(app.key_count().await, 0);

    // Errors show next to their fields, and nothing is created.
    let resp = form(
        &http,
        url("/admin/keys"),
        &cookie,
        &[
            ("csrf", &csrf),
            ("email", "nope"),
            ("calls", "-1"),
            ("valid_until", "someday"),
        ],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body = resp.text().await.expect("body");
    assert!(
        body.contains(r#"id="email-error">An email address is required."#),
        "{body}"
    );
    assert!(
        body.contains(r#"id="calls-error">A whole number, 0 or more."#),
        "{body}"
    );
    assert!(
        body.contains(r#"id="valid_until-error">"#) && body.contains("is not a date"),
        "{body}"
    );
    assert_eq!(app.key_count().await, 0);

    // Create a key: the secret is on the next page, once.
    let resp = form(
        &http,
        url("/admin/keys"),
        &cookie,
        &[
            ("csrf", &csrf),
            ("name", "Demo"),
            ("email", "client@example.com"),
            ("calls", "2"),
        ],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(
        resp.headers()
            .get(header::CACHE_CONTROL)
            .and_then(|v| v.to_str().ok()),
        Some("no-store")
    );
    let body = resp.text().await.expect("body");
    let secret = regex::Regex::new(r"tg_[0-9a-f]{8}_[0-9a-f]{64}")
        .expect("regex")
        .find(&body)
        .map(|m| m.as_str().to_string())
        .expect("the secret on the page");
    let prefix = secret[3..11].to_string();

    // The key works, and the list shows its usage.
    let resp = app
        .http
        .post(app.url("/api/"))
        .bearer_auth(&secret)
        .json(&json!({"text": "hi", "max_tokens": 2}))
        .send()
        .await
        .expect("call");
    assert_eq!(resp.status(), StatusCode::OK);
    let (_, body) = page(&http, url("/admin/keys?q=demo"), &cookie).await;
    assert!(body.contains(&format!("tg_{prefix}_…")), "{body}");
    assert!(body.contains("1 / 2"), "{body}");
    assert!(!body.contains(&secret), "the list never shows a secret");
    // The key's page: today's bar in both charts, and the job.
    let (status, body) = page(&http, url(&format!("/admin/keys/{prefix}")), &cookie).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    assert!(
        body.contains(&format!("<title>{today}: 1</title>")),
        "{body}"
    );
    assert_eq!(body.matches("<svg").count(), 2, "{body}");
    assert!(
        body.contains("<code>/api/</code>") && body.contains(">done"),
        "{body}"
    );
    let (status, _) = page(&http, url("/admin/keys/ffffffff"), &cookie).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Jobs across keys, filtered, and one job's detail.
    let (status, body) = page(&http, url("/admin/jobs?status=done"), &cookie).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body.contains("<code>/api/</code>") && body.contains(&prefix),
        "{body}"
    );
    let (_, body) = page(&http, url("/admin/jobs?status=failed"), &cookie).await;
    assert!(body.contains("No jobs match."), "{body}");
    let (_, body) = page(&http, url("/admin/jobs?key=ffffffff"), &cookie).await;
    assert!(body.contains("No jobs match."), "{body}");
    let job_id = regex::Regex::new(r#"/admin/jobs/([0-9a-f-]{36})"#)
        .expect("regex")
        .captures(&page(&http, url("/admin/jobs"), &cookie).await.1)
        .and_then(|c| c.get(1))
        .map(|m| m.as_str().to_string())
        .expect("a job link");
    let (status, body) = page(&http, url(&format!("/admin/jobs/{job_id}")), &cookie).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body.contains(&job_id) && body.contains("ran ") && body.contains("waited "),
        "{body}"
    );

    // The overview: numbers from the database and the worker.
    let (status, body) = page(&http, url("/admin/overview"), &cookie).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body.contains("Jobs finished (last 15 min)</th><td>1 ("),
        "{body}"
    );
    assert!(
        body.contains(" ms / ") && body.contains("embedded-"),
        "{body}"
    );
    assert!(body.contains("Queue depth · smollm2"), "{body}");

    let (_, body) = page(&http, url("/admin/keys?q=nomatch"), &cookie).await;
    assert!(body.contains("No keys"), "{body}");

    // Revoke: the next call is 401. Reactivate: it works again.
    let resp = form(
        &http,
        url(&format!("/admin/keys/{prefix}/revoke")),
        &cookie,
        &[("csrf", &csrf)],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let call = || {
        app.http
            .post(app.url("/api/"))
            .bearer_auth(&secret)
            .json(&json!({"text": "hi", "max_tokens": 2}))
            .send()
    };
    assert_eq!(
        call().await.expect("call").status(),
        StatusCode::UNAUTHORIZED
    );
    let (_, body) = page(&http, url("/admin/keys"), &cookie).await;
    assert!(body.contains(">revoked<"), "{body}");
    let resp = form(
        &http,
        url(&format!("/admin/keys/{prefix}/reactivate")),
        &cookie,
        &[("csrf", &csrf)],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(call().await.expect("call").status(), StatusCode::OK);

    // Edit limits and window: counters stay.
    let edit = [
        ("email", "client@example.com"),
        ("name", "Demo"),
        ("calls", "5"),
        ("valid_until", "2099-12-31"),
    ];
    let resp = form(&http, url(&format!("/admin/keys/{prefix}")), &cookie, &edit).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN, "no csrf, no change");
    let mut with_csrf = vec![("csrf", csrf.as_str())];
    with_csrf.extend(edit);
    let resp = form(
        &http,
        url(&format!("/admin/keys/{prefix}")),
        &cookie,
        &with_csrf,
    )
    .await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(location(&resp), format!("/admin/keys/{prefix}"));
    let key = tollgate::models::api_keys::Model::find_by_prefix(&app.ctx.db, &prefix)
        .await
        .expect("db")
        .expect("key");
    assert_eq!((key.max_calls, key.calls_used), (Some(5), 2));
    assert!(key.valid_until.is_some());

    // Rotate: a new secret for the same key; the old one stops working.
    let resp = form(
        &http,
        url(&format!("/admin/keys/{prefix}/rotate")),
        &cookie,
        &[("csrf", &csrf)],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.text().await.expect("body");
    assert!(body.contains("New secret for"), "{body}");
    let rotated = regex::Regex::new(r"tg_[0-9a-f]{8}_[0-9a-f]{64}")
        .expect("regex")
        .find(&body)
        .map(|m| m.as_str().to_string())
        .expect("the new secret");
    assert_ne!(rotated, secret);
    assert_eq!(
        call().await.expect("call").status(),
        StatusCode::UNAUTHORIZED
    );
    let resp = app
        .http
        .post(app.url("/api/"))
        .bearer_auth(&rotated)
        .json(&json!({"text": "hi", "max_tokens": 2}))
        .send()
        .await
        .expect("call");
    assert_eq!(resp.status(), StatusCode::OK);
    let key = {
        use sea_orm::EntityTrait;
        tollgate::models::api_keys::Entity::find_by_id(key.id)
            .one(&app.ctx.db)
            .await
            .expect("db")
            .expect("key")
    };
    assert_eq!(key.calls_used, 3, "the same key, its history kept");

    // Sign out ends the session on the server, not only in the browser.
    let resp = form(&http, url("/admin/logout"), &cookie, &[("csrf", &csrf)]).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(location(&resp), "/admin/login");
    let resp = http
        .get(url("/admin/keys"))
        .header(header::COOKIE, &cookie)
        .send()
        .await
        .expect("get");
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);

    // Sign in again.
    let resp = form(
        &http,
        url("/admin/login"),
        "",
        &[
            ("email", "root@example.com"),
            ("password", "wrong-password"),
        ],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert!(resp
        .text()
        .await
        .expect("body")
        .contains("Wrong email or password."));
    let resp = form(
        &http,
        url("/admin/login"),
        "",
        &[
            ("email", "Root@Example.com"),
            ("password", "long-enough-pw"),
        ],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let cookie = session_cookie(&resp);
    let (status, _) = page(&http, url("/admin/keys"), &cookie).await;
    assert_eq!(status, StatusCode::OK);

    // The stylesheet is served locally.
    let resp = http
        .get(url("/admin/static/dashboard.css"))
        .send()
        .await
        .expect("css");
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.text().await.expect("css").contains(".bar"));
}

#[tokio::test]
async fn repeated_failed_sign_ins_are_throttled() {
    let app = TestApp::spawn_with(|s| s["auth"]["login_max_failures"] = json!(2)).await;
    let http = browser();
    for _ in 0..2 {
        let resp = form(
            &http,
            app.url("/admin/login"),
            "",
            &[("email", "a@example.com"), ("password", "nope-nope")],
        )
        .await;
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    }
    let resp = form(
        &http,
        app.url("/admin/login"),
        "",
        &[("email", "a@example.com"), ("password", "nope-nope")],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn admins_register_and_remove_lora_heads_in_the_dashboard() {
    let dir = common::scratch_dir("dash-adapters");
    std::fs::create_dir_all(&dir).expect("adapters dir");
    common::make_adapter(&dir.join("demo.gguf"), 1234);
    let adapters_dir = dir.display().to_string();
    let app = TestApp::spawn_with(move |s| s["engine"]["adapters_dir"] = json!(adapters_dir)).await;
    tollgate::models::admins::ActiveModel::create(
        &app.ctx.db,
        "root@example.com",
        "long-enough-pw",
    )
    .await
    .expect("admin");
    let http = browser();
    let resp = form(
        &http,
        app.url("/admin/login"),
        "",
        &[
            ("email", "root@example.com"),
            ("password", "long-enough-pw"),
        ],
    )
    .await;
    let cookie = session_cookie(&resp);
    let (status, body) = page(&http, app.url("/admin/adapters"), &cookie).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("No LoRA heads registered."), "{body}");
    let csrf = csrf_of(&body);

    // A path out of the folder: the error shows at the path field, nothing is stored.
    let resp = form(
        &http,
        app.url("/admin/adapters"),
        &cookie,
        &[
            ("csrf", &csrf),
            ("name", "demo"),
            ("path", "../demo.gguf"),
            ("scale", "1"),
        ],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body = resp.text().await.expect("body");
    assert!(
        body.contains(r#"id="path-error">path must stay inside"#),
        "{body}"
    );
    assert!(body.contains("No LoRA heads registered."), "{body}");

    let resp = form(
        &http,
        app.url("/admin/adapters"),
        &cookie,
        &[
            ("csrf", &csrf),
            ("name", "demo"),
            ("path", "demo.gguf"),
            ("scale", "0.5"),
        ],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let (_, body) = page(&http, app.url("/admin/adapters"), &cookie).await;
    assert!(
        body.contains("<code>smollm2:demo</code>") && body.contains(">0.5<"),
        "{body}"
    );

    // The head is usable at once through the API.
    let key = app.key_with_calls(None).await;
    let resp = app
        .http
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(&key.secret)
        .json(&json!({"model": "smollm2:demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}))
        .send()
        .await
        .expect("call");
    assert_eq!(resp.status(), StatusCode::OK);
    let (_, body) = page(&http, app.url("/admin/adapters"), &cookie).await;
    assert!(
        body.contains("embedded-"),
        "loaded on the worker after use: {body}"
    );

    let resp = form(&http, app.url("/admin/adapters/demo/remove"), &cookie, &[]).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN, "no csrf");
    let resp = form(
        &http,
        app.url("/admin/adapters/demo/remove"),
        &cookie,
        &[("csrf", &csrf)],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let (_, body) = page(&http, app.url("/admin/adapters"), &cookie).await;
    assert!(body.contains("No LoRA heads registered."), "{body}");
}

#[tokio::test]
async fn every_page_needs_a_session_and_every_form_its_csrf_token() {
    let app = TestApp::spawn().await;
    let key = app.key_with_calls(Some(1)).await;
    let prefix = app.key_row(&key).await.prefix;
    let http = browser();
    let gets = [
        "/admin".to_string(),
        "/admin/overview".into(),
        "/admin/keys".into(),
        "/admin/keys/new".into(),
        format!("/admin/keys/{prefix}"),
        "/admin/jobs".into(),
        "/admin/jobs/00000000-0000-0000-0000-000000000000".into(),
        "/admin/adapters".into(),
    ];
    let posts = [
        "/admin/logout".to_string(),
        "/admin/keys".into(),
        format!("/admin/keys/{prefix}"),
        format!("/admin/keys/{prefix}/rotate"),
        format!("/admin/keys/{prefix}/revoke"),
        format!("/admin/keys/{prefix}/reactivate"),
        "/admin/adapters".into(),
        "/admin/adapters/x/remove".into(),
    ];
    for path in gets.iter().chain(posts.iter()) {
        let req = if gets.contains(path) {
            http.get(app.url(path))
        } else {
            http.post(app.url(path))
                .form(&[("csrf", "x"), ("email", "a@example.com")])
        };
        let resp = req.send().await.expect("send");
        assert_eq!(
            resp.status(),
            StatusCode::SEE_OTHER,
            "{path} without a session"
        );
        assert_eq!(location(&resp), "/admin/login", "{path}");
    }

    tollgate::models::admins::ActiveModel::create(
        &app.ctx.db,
        "root@example.com",
        "long-enough-pw",
    )
    .await
    .expect("admin");
    let resp = form(
        &http,
        app.url("/admin/login"),
        "",
        &[
            ("email", "root@example.com"),
            ("password", "long-enough-pw"),
        ],
    )
    .await;
    let cookie = session_cookie(&resp);
    for path in &gets[1..] {
        let (status, body) = page(&http, app.url(path), &cookie).await;
        let expected = if path.starts_with("/admin/jobs/0000") {
            StatusCode::NOT_FOUND
        } else {
            StatusCode::OK
        };
        assert_eq!(status, expected, "{path}: {body}");
    }
    let before = app.key_row(&key).await;
    for path in &posts {
        for csrf in [None, Some("0123456789abcdef0123456789abcdef")] {
            let mut fields = vec![
                ("email", "changed@example.com"),
                ("name", "x"),
                ("path", "a.gguf"),
            ];
            if let Some(c) = csrf {
                fields.push(("csrf", c));
            }
            let resp = form(&http, app.url(path), &cookie, &fields).await;
            assert_eq!(
                resp.status(),
                StatusCode::FORBIDDEN,
                "{path} with csrf {csrf:?}"
            );
        }
    }
    assert_eq!(app.key_row(&key).await, before, "no form changed the key");
    assert_eq!(app.key_count().await, 1);
    let (status, _) = page(&http, app.url("/admin/keys"), &cookie).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "logout without csrf did not end the session"
    );
}
