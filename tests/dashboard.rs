//! The admin dashboard over HTTP, as a browser uses it: first-run setup link, sign-in cookie,
//! CSRF on every form, keys created (secret shown once), revoked and reactivated.

mod common;

use common::TestApp;
use reqwest::{header, redirect::Policy, Client, RequestBuilder, Response, StatusCode};
use serde_json::json;
use tollgate::{models::api_keys::KeyParams, services::Services};

/// A browser without cookie storage on one test server: the test carries the session cookie
/// itself (none until it signs in).
struct Browser<'a> {
    app: &'a TestApp,
    http: Client,
    cookie: String,
}

impl<'a> Browser<'a> {
    fn new(app: &'a TestApp) -> Self {
        let http = Client::builder()
            .redirect(Policy::none())
            .build()
            .expect("client");
        Self {
            app,
            http,
            cookie: String::new(),
        }
    }

    fn with_cookie(&self, req: RequestBuilder) -> RequestBuilder {
        if self.cookie.is_empty() {
            req
        } else {
            req.header(header::COOKIE, &self.cookie)
        }
    }

    async fn get(&self, path: &str) -> Response {
        let req = self.with_cookie(self.http.get(self.app.url(path)));
        req.send().await.expect("get")
    }

    /// A page's status and HTML.
    async fn page(&self, path: &str) -> (StatusCode, String) {
        let resp = self.get(path).await;
        (resp.status(), resp.text().await.expect("body"))
    }

    async fn form(&self, path: &str, fields: &[(&str, &str)]) -> Response {
        let req = self.with_cookie(self.http.post(self.app.url(path)));
        req.form(fields).send().await.expect("post")
    }

    /// Opens the sign-in page and submits its form (with the page's CSRF cookie and field),
    /// never with a session cookie.
    async fn sign_in(&self, email: &str, password: &str) -> Response {
        let page = self
            .http
            .get(self.app.url("/admin/login"))
            .send()
            .await
            .expect("get");
        let set = common::header(&page, header::SET_COOKIE.as_str()).expect("login cookie");
        let login_cookie = set.split(';').next().expect("cookie").to_string();
        let csrf = csrf_of(&page.text().await.expect("page"));
        let fields = [("email", email), ("password", password), ("csrf", &csrf)];
        let req = self.http.post(self.app.url("/admin/login"));
        req.header(header::COOKIE, login_cookie)
            .form(&fields)
            .send()
            .await
            .expect("post")
    }

    /// Creates the admin `root@example.com` and signs in as them.
    async fn sign_in_as_new_admin(&mut self) {
        tollgate::models::admins::ActiveModel::create(
            &self.app.ctx.db,
            "root@example.com",
            "long-enough-pw",
        )
        .await
        .expect("admin");
        let resp = self.sign_in("root@example.com", "long-enough-pw").await;
        self.cookie = session_cookie(&resp);
    }
}

fn location(resp: &Response) -> String {
    common::header(resp, header::LOCATION.as_str()).unwrap_or_default()
}

/// `tg_admin=<token>` from a `Set-Cookie` header, checking its attributes.
fn session_cookie(resp: &Response) -> String {
    let set = common::header(resp, header::SET_COOKIE.as_str()).expect("Set-Cookie");
    assert!(set.contains("HttpOnly"), "{set}");
    assert!(set.contains("SameSite=Strict"), "{set}");
    set.split(';').next().expect("cookie").to_string()
}

/// The first capture of `pattern` in `page`.
fn capture(pattern: &str, page: &str, what: &str) -> String {
    regex::Regex::new(pattern)
        .expect("regex")
        .captures(page)
        .and_then(|c| c.get(1))
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| panic!("{what} on the page"))
}

fn csrf_of(page: &str) -> String {
    capture(r#"name="csrf" value="([0-9a-f]+)""#, page, "a csrf field")
}

/// The key secret shown on a page.
fn secret_on(page: &str) -> String {
    capture(r"(tg_[0-9a-f]{8}_[0-9a-f]{64})", page, "a secret")
}

/// The status of a small `POST /api/` call with `secret`, as a client makes it.
async fn call_api(app: &TestApp, secret: &str) -> StatusCode {
    app.http
        .post(app.url("/api/"))
        .bearer_auth(secret)
        .json(&json!({"text": "hi", "max_tokens": 2}))
        .send()
        .await
        .expect("call")
        .status()
}

#[tokio::test]
async fn from_an_empty_database_to_a_working_key_in_the_browser() {
    let app = TestApp::spawn_scripted(|_| {}).await;
    let mut b = Browser::new(&app);

    // Nothing is reachable without signing in.
    for path in ["/admin", "/admin/keys", "/admin/keys/new"] {
        let resp = b.get(path).await;
        assert_eq!(resp.status(), StatusCode::SEE_OTHER, "{path}");
        assert_eq!(location(&resp), "/admin/login", "{path}");
    }
    let resp = b.form("/admin/keys", &[("email", "x@example.com")]).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(app.key_count().await, 0);

    // First run: the link the server printed (same code path) creates the first admin.
    let services = Services::from_ctx(&app.ctx).expect("services");
    let token = services.setup.issue();
    let (status, _) = b.page("/admin/setup?token=wrong").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = b.page(&format!("/admin/setup?token={token}")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("Create the first admin"), "{body}");
    let setup = |password2| {
        [
            ("token", token.as_str()),
            ("email", "root@example.com"),
            ("password", "long-enough-pw"),
            ("password2", password2),
        ]
    };
    let resp = b.form("/admin/setup", &setup("different-pw")).await;
    assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert!(resp
        .text()
        .await
        .expect("body")
        .contains("The passwords differ."));
    let resp = b.form("/admin/setup", &setup("long-enough-pw")).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(location(&resp), "/admin/keys");
    b.cookie = session_cookie(&resp);
    // Single use.
    let (status, _) = b.page(&format!("/admin/setup?token={token}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (status, body) = b.page("/admin/keys").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("No keys"), "{body}");
    let csrf = csrf_of(&body);

    // Forms without the CSRF token change nothing.
    let resp = b
        .form("/admin/keys", &[("email", "client@example.com")])
        .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let resp = b
        .form(
            "/admin/keys",
            &[("csrf", "0000"), ("email", "client@example.com")],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_eq!(app.key_count().await, 0);

    // Errors show next to their fields, and nothing is created.
    let resp = b
        .form(
            "/admin/keys",
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
    let resp = b
        .form(
            "/admin/keys",
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
        common::header(&resp, header::CACHE_CONTROL.as_str()).as_deref(),
        Some("no-store")
    );
    let body = resp.text().await.expect("body");
    let secret = secret_on(&body);
    let prefix = secret[3..11].to_string();

    // The key works, and the list shows its usage.
    assert_eq!(call_api(&app, &secret).await, StatusCode::OK);
    let (_, body) = b.page("/admin/keys?q=demo").await;
    assert!(body.contains(&format!("tg_{prefix}_…")), "{body}");
    assert!(body.contains("1 / 2"), "{body}");
    assert!(!body.contains(&secret), "the list never shows a secret");
    // The key's page: today's bar in both charts, and the job.
    let (status, body) = b.page(&format!("/admin/keys/{prefix}")).await;
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
    let (status, _) = b.page("/admin/keys/ffffffff").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Jobs across keys, filtered, and one job's detail.
    let (status, body) = b.page("/admin/jobs?status=done").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body.contains("<code>/api/</code>") && body.contains(&prefix),
        "{body}"
    );
    let (_, body) = b.page("/admin/jobs?status=failed").await;
    assert!(body.contains("No jobs match."), "{body}");
    let (_, body) = b.page("/admin/jobs?key=ffffffff").await;
    assert!(body.contains("No jobs match."), "{body}");
    let jobs = b.page("/admin/jobs").await.1;
    let job_id = capture(r#"/admin/jobs/([0-9a-f-]{36})"#, &jobs, "a job link");
    let (status, body) = b.page(&format!("/admin/jobs/{job_id}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body.contains(&job_id) && body.contains("ran ") && body.contains("waited "),
        "{body}"
    );

    // The overview: numbers from the database and the worker.
    let (status, body) = b.page("/admin/overview").await;
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

    let (_, body) = b.page("/admin/keys?q=nomatch").await;
    assert!(body.contains("No keys"), "{body}");

    // Revoke: the next call is 401. Reactivate: it works again.
    let resp = b
        .form(&format!("/admin/keys/{prefix}/revoke"), &[("csrf", &csrf)])
        .await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(call_api(&app, &secret).await, StatusCode::UNAUTHORIZED);
    let (_, body) = b.page("/admin/keys").await;
    assert!(body.contains(">revoked<"), "{body}");
    let resp = b
        .form(
            &format!("/admin/keys/{prefix}/reactivate"),
            &[("csrf", &csrf)],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(call_api(&app, &secret).await, StatusCode::OK);

    // Edit limits and window: counters stay.
    let edit = [
        ("email", "client@example.com"),
        ("name", "Demo"),
        ("calls", "5"),
        ("valid_until", "2099-12-31"),
    ];
    let resp = b.form(&format!("/admin/keys/{prefix}"), &edit).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN, "no csrf, no change");
    let mut with_csrf = vec![("csrf", csrf.as_str())];
    with_csrf.extend(edit);
    let resp = b.form(&format!("/admin/keys/{prefix}"), &with_csrf).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(location(&resp), format!("/admin/keys/{prefix}"));
    let key = tollgate::models::api_keys::Model::find_by_prefix(&app.ctx.db, &prefix)
        .await
        .expect("db")
        .expect("key");
    assert_eq!((key.max_calls, key.calls_used), (Some(5), 2));
    assert!(key.valid_until.is_some());

    // Rotate: a new secret for the same key; the old one stops working.
    let resp = b
        .form(&format!("/admin/keys/{prefix}/rotate"), &[("csrf", &csrf)])
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.text().await.expect("body");
    assert!(body.contains("New secret for"), "{body}");
    let rotated = secret_on(&body);
    assert_ne!(rotated, secret);
    assert_eq!(call_api(&app, &secret).await, StatusCode::UNAUTHORIZED);
    assert_eq!(call_api(&app, &rotated).await, StatusCode::OK);
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
    let resp = b.form("/admin/logout", &[("csrf", &csrf)]).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(location(&resp), "/admin/login");
    let resp = b.get("/admin/keys").await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);

    // Sign in again.
    let resp = b.sign_in("root@example.com", "wrong-password").await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert!(resp
        .text()
        .await
        .expect("body")
        .contains("Wrong email or password."));
    let resp = b.sign_in("Root@Example.com", "long-enough-pw").await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    b.cookie = session_cookie(&resp);
    let (status, _) = b.page("/admin/keys").await;
    assert_eq!(status, StatusCode::OK);

    // The stylesheet is served locally.
    let resp = b
        .http
        .get(app.url("/admin/static/dashboard.css"))
        .send()
        .await
        .expect("css");
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.text().await.expect("css").contains(".bar"));
}

/// Rows of the keys table on a list page.
fn key_rows(page: &str) -> usize {
    page.matches(r#"<tr id="key-"#).count()
}

#[tokio::test]
async fn the_keys_list_comes_in_pages_of_a_hundred_newest_first_and_searches_every_key() {
    let app = TestApp::spawn_scripted(|_| {}).await;
    let mut b = Browser::new(&app);
    b.sign_in_as_new_admin().await;
    let mut keys = Vec::new();
    for i in 0..150 {
        let params = KeyParams {
            name: format!("client {i:03}"),
            email: format!("c{i:03}@example.com"),
            ..Default::default()
        };
        keys.push(common::issue_key(&app.ctx.db, params).await);
    }

    let (status, page1) = b.page("/admin/keys").await;
    assert_eq!(status, StatusCode::OK, "{page1}");
    assert_eq!(key_rows(&page1), 100, "{page1}");
    assert!(
        page1.contains("client 149") && page1.contains("client 050"),
        "{page1}"
    );
    assert!(!page1.contains("client 049"), "{page1}");
    assert!(page1.contains("Keys 1–100 of 150"), "{page1}");
    assert!(
        page1.contains(r#"<a rel="next" href="/admin/keys?page=2">"#),
        "{page1}"
    );
    assert!(!page1.contains(r#"rel="prev""#), "{page1}");

    let (_, page2) = b.page("/admin/keys?page=2").await;
    assert_eq!(key_rows(&page2), 50, "{page2}");
    assert!(
        page2.contains("client 049") && page2.contains("client 000"),
        "{page2}"
    );
    assert!(!page2.contains("client 050"), "{page2}");
    assert!(page2.contains("Keys 101–150 of 150"), "{page2}");
    assert!(
        page2.contains(r#"<a rel="prev" href="/admin/keys?page=1">"#),
        "{page2}"
    );
    assert!(!page2.contains(r#"rel="next""#), "{page2}");

    let (status, page3) = b.page("/admin/keys?page=3").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(key_rows(&page3), 0, "{page3}");
    assert!(page3.contains("No keys on page 3."), "{page3}");
    for bad in ["0", "-1", "x", "99999999999999999999"] {
        let (status, page) = b.page(&format!("/admin/keys?page={bad}")).await;
        assert_eq!(status, StatusCode::OK, "page={bad}");
        assert_eq!(key_rows(&page), 100, "page={bad} is the first page");
    }

    // Search covers every key, not only the page shown: by name (any case), email and prefix.
    let (_, found) = b.page("/admin/keys?q=CLIENT%20007").await;
    assert_eq!(key_rows(&found), 1, "{found}");
    assert!(found.contains("client 007"), "{found}");
    let (_, found) = b.page("/admin/keys?q=c012%40example").await;
    assert_eq!(key_rows(&found), 1, "{found}");
    assert!(found.contains("client 012"), "{found}");
    let (_, found) = b.page(&format!("/admin/keys?q={}", keys[3].prefix)).await;
    assert!(
        found.contains(&format!("tg_{}_…", keys[3].prefix)),
        "{found}"
    );
    // Searching pages too, and the links keep the search.
    let (_, found) = b.page("/admin/keys?q=client").await;
    assert_eq!(key_rows(&found), 100, "{found}");
    assert!(
        found.contains(r#"href="/admin/keys?page=2&amp;q=client""#),
        "{found}"
    );
    let (_, found) = b.page("/admin/keys?q=client%201").await;
    assert_eq!(key_rows(&found), 50, "client 100 to 149: {found}");
    assert!(found.contains("Keys 1–50 of 50"), "{found}");
    // `%` and `_` are characters to find, not wildcards.
    for wildcard in ["%25", "client_0"] {
        let (_, none) = b.page(&format!("/admin/keys?q={wildcard}")).await;
        assert_eq!(key_rows(&none), 0, "q={wildcard}: {none}");
        assert!(none.contains("No keys match"), "{none}");
    }
}

#[tokio::test]
async fn the_jobs_list_names_each_jobs_key_and_filters_by_its_prefix() {
    let app = TestApp::spawn_scripted(|_| {}).await;
    let mut b = Browser::new(&app);
    b.sign_in_as_new_admin().await;
    // Keys that ran nothing around the two that did.
    let mut keys = Vec::new();
    for i in 0..5 {
        let params = KeyParams {
            name: format!("k{i}"),
            email: format!("k{i}@example.com"),
            ..Default::default()
        };
        keys.push(common::issue_key(&app.ctx.db, params).await);
    }
    let (a, c) = (&keys[1], &keys[3]);
    for _ in 0..2 {
        assert_eq!(call_api(&app, &a.secret).await, StatusCode::OK);
    }
    assert_eq!(call_api(&app, &c.secret).await, StatusCode::OK);
    let label = |k: &common::TestKey| format!("<code>{}</code>", k.prefix);

    let (status, all) = b.page("/admin/jobs").await;
    assert_eq!(status, StatusCode::OK, "{all}");
    assert_eq!(all.matches(&label(a)).count(), 2, "{all}");
    assert_eq!(all.matches(&label(c)).count(), 1, "{all}");
    for idle in [&keys[0], &keys[2], &keys[4]] {
        assert!(!all.contains(&idle.prefix), "{all}");
    }

    let (_, only_a) = b.page(&format!("/admin/jobs?key={}", a.prefix)).await;
    assert_eq!(only_a.matches(&label(a)).count(), 2, "{only_a}");
    assert_eq!(only_a.matches(&label(c)).count(), 0, "{only_a}");
    let (_, only_c) = b.page(&format!("/admin/jobs?key=%20{}%20", c.prefix)).await;
    assert_eq!(only_c.matches(&label(c)).count(), 1, "{only_c}");
    assert_eq!(only_c.matches(&label(a)).count(), 0, "{only_c}");
    // With the other filters too (the key's index leads; the rest still filter).
    let (_, a_done) = b
        .page(&format!(
            "/admin/jobs?key={}&status=done&model=smollm2",
            a.prefix
        ))
        .await;
    assert_eq!(a_done.matches(&label(a)).count(), 2, "{a_done}");
    assert_eq!(a_done.matches(&label(c)).count(), 0, "{a_done}");
    let (_, a_failed) = b
        .page(&format!("/admin/jobs?key={}&status=failed", a.prefix))
        .await;
    assert!(a_failed.contains("No jobs match."), "{a_failed}");
    let (_, a_other_model) = b
        .page(&format!("/admin/jobs?key={}&model=other", a.prefix))
        .await;
    assert!(a_other_model.contains("No jobs match."), "{a_other_model}");
    let (_, none) = b.page(&format!("/admin/jobs?key={}", keys[0].prefix)).await;
    assert!(none.contains("No jobs match."), "{none}");
    let (_, none) = b.page("/admin/jobs?key=nosuchkey").await;
    assert!(none.contains("No jobs match."), "{none}");

    // A job's page names its key too.
    let id = capture(r#"/admin/jobs/([0-9a-f-]{36})"#, &only_c, "a job link");
    let (status, job) = b.page(&format!("/admin/jobs/{id}")).await;
    assert_eq!(status, StatusCode::OK, "{job}");
    assert!(job.contains(&label(c)), "{job}");
}

#[tokio::test]
async fn a_sign_in_posted_without_the_forms_token_is_refused() {
    let app = TestApp::spawn_scripted(|_| {}).await;
    tollgate::models::admins::ActiveModel::create(
        &app.ctx.db,
        "root@example.com",
        "long-enough-pw",
    )
    .await
    .expect("admin");
    let b = Browser::new(&app);
    // Another site's form: the right credentials, no token, no cookie.
    let resp = b
        .http
        .post(app.url("/admin/login"))
        .form(&[
            ("email", "root@example.com"),
            ("password", "long-enough-pw"),
        ])
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert!(
        common::header(&resp, header::SET_COOKIE.as_str()).is_none(),
        "no session"
    );
    // A token that is not the cookie's.
    let resp = b
        .http
        .post(app.url("/admin/login"))
        .header(header::COOKIE, "tg_login=aaaa")
        .form(&[
            ("email", "root@example.com"),
            ("password", "long-enough-pw"),
            ("csrf", "bbbb"),
        ])
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    // The page's own form signs in.
    let resp = b.sign_in("root@example.com", "long-enough-pw").await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn two_setup_posts_racing_with_one_link_create_one_admin() {
    use sea_orm::{EntityTrait, PaginatorTrait};
    let app = TestApp::spawn_scripted(|_| {}).await;
    let token = tollgate::services::Services::from_ctx(&app.ctx)
        .expect("services")
        .setup
        .issue();
    let mut posts = Vec::new();
    for i in 0..8 {
        let (http, url, token) = (app.http.clone(), app.url("/admin/setup"), token.clone());
        posts.push(tokio::spawn(async move {
            let email = format!("admin{i}@example.com");
            http.post(url)
                .form(&[
                    ("token", token.as_str()),
                    ("email", email.as_str()),
                    ("password", "long-enough-pw"),
                    ("password2", "long-enough-pw"),
                ])
                .send()
                .await
                .expect("post")
                .status()
        }));
    }
    for p in posts {
        p.await.expect("task");
    }
    let admins = tollgate::models::_entities::admins::Entity::find()
        .count(&app.ctx.db)
        .await
        .expect("count");
    assert_eq!(admins, 1, "one setup link, one admin");
}

#[tokio::test]
async fn repeated_failed_sign_ins_are_throttled() {
    let app = TestApp::spawn_scripted(|s| s["auth"]["login_max_failures"] = json!(2)).await;
    let b = Browser::new(&app);
    for _ in 0..2 {
        let resp = b.sign_in("a@example.com", "nope-nope").await;
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    }
    let resp = b.sign_in("a@example.com", "nope-nope").await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn admins_register_and_remove_lora_heads_in_the_dashboard() {
    let dir = common::scratch_dir("dash-adapters");
    std::fs::create_dir_all(&dir).expect("adapters dir");
    common::make_adapter(&dir.join("demo.gguf"), 1234);
    let adapters_dir = dir.display().to_string();
    let app = TestApp::spawn_with(move |s| s["engine"]["adapters_dir"] = json!(adapters_dir)).await;
    let mut b = Browser::new(&app);
    b.sign_in_as_new_admin().await;
    let (status, body) = b.page("/admin/adapters").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("No LoRA heads registered."), "{body}");
    let csrf = csrf_of(&body);

    let head = |path, scale| {
        [
            ("csrf", csrf.as_str()),
            ("name", "demo"),
            ("path", path),
            ("scale", scale),
        ]
    };

    // A path out of the folder: the error shows at the path field, nothing is stored.
    let resp = b.form("/admin/adapters", &head("../demo.gguf", "1")).await;
    assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body = resp.text().await.expect("body");
    assert!(
        body.contains(r#"id="path-error">path must stay inside"#),
        "{body}"
    );
    assert!(body.contains("No LoRA heads registered."), "{body}");

    let resp = b.form("/admin/adapters", &head("demo.gguf", "0.5")).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let (_, body) = b.page("/admin/adapters").await;
    assert!(
        body.contains("<code>smollm2:demo</code>") && body.contains(">0.5<"),
        "{body}"
    );

    // The head is usable at once through the API.
    let key = app.key_with_calls(None).await;
    let chat = json!({"model": "smollm2:demo", "messages": [{"role": "user", "content": "hi"}],
                      "max_tokens": 4});
    let (status, body) = app.post(Some(&key), "/v1/chat/completions", chat).await;
    assert_eq!(status, StatusCode::OK.as_u16(), "{body}");
    let (_, body) = b.page("/admin/adapters").await;
    assert!(
        body.contains("embedded-"),
        "loaded on the worker after use: {body}"
    );

    let resp = b.form("/admin/adapters/demo/remove", &[]).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN, "no csrf");
    let resp = b
        .form("/admin/adapters/demo/remove", &[("csrf", &csrf)])
        .await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let (_, body) = b.page("/admin/adapters").await;
    assert!(body.contains("No LoRA heads registered."), "{body}");
}

#[tokio::test]
async fn every_page_needs_a_session_and_every_form_its_csrf_token() {
    let app = TestApp::spawn_scripted(|_| {}).await;
    let key = app.key_with_calls(Some(1)).await;
    let prefix = app.key_row(&key).await.prefix;
    let mut b = Browser::new(&app);
    let gets = [
        "/admin".to_string(),
        "/admin/overview".into(),
        "/admin/keys".into(),
        "/admin/keys/new".into(),
        format!("/admin/keys/{prefix}"),
        "/admin/jobs".into(),
        "/admin/jobs/00000000-0000-0000-0000-000000000000".into(),
        "/admin/adapters".into(),
        "/admin/users".into(),
        "/admin/models".into(),
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
        "/admin/users".into(),
        "/admin/users/x/disable".into(),
        "/admin/users/x/delete".into(),
        "/admin/models/x/load".into(),
        "/admin/models/x/unload".into(),
    ];
    for path in gets.iter().chain(posts.iter()) {
        let resp = if gets.contains(path) {
            b.get(path).await
        } else {
            b.form(path, &[("csrf", "x"), ("email", "a@example.com")])
                .await
        };
        assert_eq!(
            resp.status(),
            StatusCode::SEE_OTHER,
            "{path} without a session"
        );
        assert_eq!(location(&resp), "/admin/login", "{path}");
    }

    b.sign_in_as_new_admin().await;
    for path in &gets[1..] {
        let (status, body) = b.page(path).await;
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
            let resp = b.form(path, &fields).await;
            assert_eq!(
                resp.status(),
                StatusCode::FORBIDDEN,
                "{path} with csrf {csrf:?}"
            );
        }
    }
    assert_eq!(app.key_row(&key).await, before, "no form changed the key");
    assert_eq!(app.key_count().await, 1);
    let (status, _) = b.page("/admin/keys").await;
    assert_eq!(
        status,
        StatusCode::OK,
        "logout without csrf did not end the session"
    );
}

#[tokio::test]
async fn admins_manage_users_and_models_in_the_dashboard() {
    let app = TestApp::spawn_scripted(|_| {}).await;
    let mut b = Browser::new(&app);
    b.sign_in_as_new_admin().await;
    let (status, body) = b.page("/admin/users").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("No users yet."), "{body}");
    let csrf = csrf_of(&body);

    // A bad limit: 422 with the message at its field; nothing stored.
    let user = |limit| {
        [
            ("csrf", csrf.clone()),
            ("username", "dora".to_string()),
            ("password", "long-enough-pw".to_string()),
            ("role", "user".to_string()),
            ("prompt_token_limit", limit),
            ("gen_token_limit", String::new()),
        ]
    };
    let fields = user("-3".into());
    let pairs: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let resp = b.form("/admin/users", &pairs).await;
    assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body = resp.text().await.expect("body");
    assert!(
        body.contains(r#"id="prompt_token_limit-error">A whole number"#),
        "{body}"
    );
    assert!(body.contains("No users yet."), "{body}");

    let fields = user("1000".into());
    let pairs: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let resp = b.form("/admin/users", &pairs).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let login = || {
        app.post(
            None,
            "/token",
            json!({"username": "dora", "password": "long-enough-pw"}),
        )
    };
    let (status, body) = login().await;
    assert_eq!(status, 200, "{body}");
    let token = common::key_of(&app, body["access_token"].as_str().expect("token")).await;
    let (_, body) = b.page("/admin/users").await;
    assert!(
        body.contains(r#"<tr id="user-dora">"#) && body.contains("0 / 1000"),
        "{body}"
    );

    // Disable: the user's existing token stops at once, and so do new logins.
    let resp = b
        .form("/admin/users/dora/disable", &[("csrf", &csrf)])
        .await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let (status, _) = app.post_api(&token, json!({"text": "hi"})).await;
    assert_eq!(status, 403);
    let (status, _) = login().await;
    assert_eq!(status, 403);
    let resp = b.form("/admin/users/dora/enable", &[("csrf", &csrf)]).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let (status, body) = app.post_api(&token, json!({"text": "hi"})).await;
    assert_eq!(status, 200, "{body}");
    let resp = b.form("/admin/users/dora/reset", &[("csrf", &csrf)]).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let (_, body) = b.page("/admin/users").await;
    assert!(body.contains("0 / 1000"), "counters reset: {body}");
    let resp = b
        .form("/admin/users/nobody/disable", &[("csrf", &csrf)])
        .await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let resp = b.form("/admin/users/dora/delete", &[("csrf", &csrf)]).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let (status, _) = app.post_api(&token, json!({"text": "hi"})).await;
    assert_eq!(status, 401, "a deleted user's token is revoked");

    // Models: the default one is served and ready; a stored configuration loads and unloads.
    let (status, body) = b.page("/admin/models").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body.contains(r#"<tr id="model-smollm2">"#) && body.contains("<td>ready</td>"),
        "{body}"
    );
    let admin = app.admin_key().await;
    let config = json!({"model_id": "second", "model_name": "smollm2",
                        "model_type": "llama_cpp", "model_kwargs": {}});
    let (status, body) = app
        .post(Some(&admin), "/llm/configure_model/", config)
        .await;
    assert_eq!(status, 200, "{body}");
    let config_id = body["config_id"].as_str().expect("config id").to_string();
    let (_, body) = b.page("/admin/models").await;
    let load = format!("/admin/models/{config_id}/load");
    assert!(body.contains(&format!(r#"action="{load}""#)), "{body}");
    let resp = b.form(&load, &[("csrf", &csrf)]).await;
    let status = resp.status();
    let body = resp.text().await.expect("body");
    assert_eq!(status, StatusCode::SEE_OTHER, "{body}");
    let (_, body) = b.page("/admin/models").await;
    assert!(body.contains(r#"<tr id="model-second">"#), "{body}");
    let resp = b
        .form("/admin/models/second/unload", &[("csrf", &csrf)])
        .await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let (_, body) = b.page("/admin/models").await;
    assert!(!body.contains(r#"<tr id="model-second">"#), "{body}");
    // The default model cannot be unloaded: the page says why.
    let resp = b
        .form("/admin/models/smollm2/unload", &[("csrf", &csrf)])
        .await;
    assert_eq!(resp.status(), StatusCode::CONFLICT);
    let body = resp.text().await.expect("body");
    assert!(
        body.contains(r#"id="problem""#) && body.contains("default model"),
        "{body}"
    );
}
