//! Who may call what: every route of the router, read from the router itself, against every
//! kind of caller. A route added without a row in [`class_of`] fails the test, so no route can
//! ship without someone deciding who may reach it.
//!
//! Runs on the scripted engine: what is checked here happens before any generation.

mod common;

use common::{TestApp, TestKey};
use loco_rs::app::Hooks;
use reqwest::{header, Method, StatusCode};
use serde_json::{json, Value};
use tollgate::{
    app::App,
    models::{
        admin_sessions, admins,
        api_keys::{ActiveModel as KeyActive, KeyParams, Scope},
        users::{self, NewUser, Role},
    },
};

/// Who a route is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// Anyone, key or not (health checks, metrics, the login route).
    Public,
    /// Any key in good standing (reads).
    Keyed,
    /// A key in good standing that may spend a call (generations and embeddings).
    Metered,
    /// A key in good standing with the `admin` scope.
    Admin,
    /// A dashboard page or form behind an admin's browser session.
    Session,
    /// A dashboard page reached before signing in (sign-in, first-run setup, the stylesheet).
    SessionPublic,
}

/// The row every route must have. Paths are as the router lists them.
fn class_of(method: &Method, uri: &str) -> Option<Class> {
    use Class::*;
    let m = method.as_str();
    Some(match (m, uri) {
        (
            _,
            "/_ping" | "/_health" | "/_readiness" | "/ping" | "/health" | "/metrics" | "/token"
            | "/openapi.json" | "/api/version" | "/",
        ) => Public,
        (
            "GET",
            "/api"
            | "/api/usage"
            | "/api/jobs/{id}"
            | "/api/jobs/{id}/events"
            | "/usage"
            | "/v1/models"
            | "/llm/configurations"
            | "/llm/configuration/{config_id}"
            | "/llm/loaded_models"
            | "/active_models"
            | "/v1/models/{*id}"
            | "/v1/responses/{id}"
            | "/v1/responses/{id}/input_items"
            | "/props"
            | "/api/tags"
            | "/api/ps",
        )
        | (
            "POST",
            "/tokenize"
            | "/detokenize"
            | "/apply-template"
            | "/api/show"
            | "/vllm_request/start"
            | "/v1/responses/{id}/cancel",
        )
        | ("DELETE", "/v1/responses/{id}") => Keyed,
        (
            "POST",
            "/api"
            | "/analyze"
            | "/api/jobs"
            | "/generate"
            | "/chat_completion"
            | "/v1/chat/completions"
            | "/v1/completions"
            | "/v1/embeddings"
            | "/v1/responses"
            | "/completion"
            | "/completions"
            | "/api/chat"
            | "/api/generate"
            | "/api/embed"
            | "/api/embeddings"
            | "/generate-embedding"
            | "/llm/inference"
            | "/llm_request",
        ) => Metered,
        (
            "POST",
            "/attach-head"
            | "/api/adapters"
            | "/db_request/add_user"
            | "/api/users/{username}/reset",
        )
        | (
            "GET",
            "/api/adapters"
            | "/api/adapters/{name}"
            | "/api/workers"
            | "/api/users"
            | "/api/users/{username}",
        )
        | ("PATCH", "/api/users/{username}")
        | (
            "DELETE",
            "/api/adapters/{name}" | "/llm/configuration/{config_id}" | "/api/users/{username}",
        )
        | (
            "POST",
            "/llm/configure_model"
            | "/llm/load_model/{config_id}"
            | "/llm/unload_model/{model_id}"
            | "/vllm_request/terminate",
        ) => Admin,
        (_, "/admin/login" | "/admin/setup" | "/admin/static/dashboard.css") => SessionPublic,
        (_, u) if u == "/admin" || u.starts_with("/admin/") => Session,
        _ => return None,
    })
}

/// The kinds of caller every route is tried with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cred {
    NoKey,
    Unknown,
    Revoked,
    Expired,
    NotYetValid,
    UserDisabled,
    OverQuota,
    Client,
    Admin,
    Session,
}

const CREDS: [Cred; 10] = [
    Cred::NoKey,
    Cred::Unknown,
    Cred::Revoked,
    Cred::Expired,
    Cred::NotYetValid,
    Cred::UserDisabled,
    Cred::OverQuota,
    Cred::Client,
    Cred::Admin,
    Cred::Session,
];

/// What a call must get: refused with this status and code, sent to the sign-in page, or let
/// through (answered by the handler: 2xx, 404 for the placeholder ids, 422 for the empty body).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Refused(u16, &'static str),
    ToSignIn,
    CsrfRefused,
    Through,
    /// A public route answers for itself (the login route refuses bad credentials with 401):
    /// whatever key comes along, it is neither read nor the reason for the answer.
    Answered,
}

fn expected(class: Class, method: &Method, cred: Cred) -> Expect {
    use Expect::*;
    match class {
        Class::Public | Class::SessionPublic => Answered,
        Class::Session => match cred {
            Cred::Session if method == Method::GET => Through,
            // A signed-in admin's form without its CSRF token.
            Cred::Session => CsrfRefused,
            // API keys never open the dashboard.
            _ => ToSignIn,
        },
        Class::Keyed | Class::Metered | Class::Admin => match cred {
            Cred::NoKey | Cred::Session => Refused(401, "missing_api_key"),
            Cred::Unknown => Refused(401, "invalid_api_key"),
            Cred::Revoked => Refused(401, "key_revoked"),
            Cred::Expired => Refused(403, "key_expired"),
            Cred::NotYetValid => Refused(403, "key_not_yet_valid"),
            Cred::UserDisabled => Refused(403, "user_disabled"),
            Cred::OverQuota if class == Class::Metered => Refused(429, "quota_exceeded"),
            Cred::Client if class == Class::Admin => Refused(403, "admin_scope_required"),
            Cred::OverQuota | Cred::Client | Cred::Admin => Through,
        },
    }
}

/// The keys and the session of the matrix. Every key but the client key has the `admin`
/// scope, so that the admin routes show the standing check (not the scope) refusing them.
struct Callers {
    revoked: TestKey,
    expired: TestKey,
    not_yet: TestKey,
    disabled: TestKey,
    over_quota: TestKey,
    client: TestKey,
    admin: TestKey,
    session_cookie: String,
}

async fn admin_key(app: &TestApp, params: KeyParams) -> TestKey {
    app.issue_key(KeyParams {
        name: "matrix".into(),
        email: "matrix@example.com".into(),
        scope: Scope::Admin,
        ..params
    })
    .await
}

/// A seed 002 user with the admin role and the password "a long admin password".
async fn admin_user(app: &TestApp, username: &str, enabled: bool) -> users::Model {
    users::ActiveModel::create(
        &app.ctx.db,
        NewUser {
            username: username.into(),
            password: "a long admin password".into(),
            role: Role::Admin,
            enabled,
            prompt_token_limit: None,
            gen_token_limit: None,
            prompt_tokens_used: 0,
            gen_tokens_used: 0,
            min_password_chars: 8,
        },
    )
    .await
    .expect("user")
}

async fn callers(app: &TestApp) -> Callers {
    let day = chrono::Duration::days(1);
    let now = tollgate::models::now();
    let revoked = admin_key(app, KeyParams::default()).await;
    KeyActive::revoke(&app.ctx.db, &revoked.prefix)
        .await
        .expect("revoke");
    let expired = admin_key(
        app,
        KeyParams {
            valid_until: Some(now - day),
            ..Default::default()
        },
    )
    .await;
    let not_yet = admin_key(
        app,
        KeyParams {
            valid_from: Some(now + day),
            ..Default::default()
        },
    )
    .await;
    let user = admin_user(app, "disabled-admin", false).await;
    let disabled = admin_key(
        app,
        KeyParams {
            user_id: Some(user.id),
            ..Default::default()
        },
    )
    .await;
    let over_quota = admin_key(
        app,
        KeyParams {
            max_calls: Some(0),
            ..Default::default()
        },
    )
    .await;
    let client = app.key_with_calls(None).await;
    let admin = app.admin_key().await;
    let person = admins::ActiveModel::create(&app.ctx.db, "root@example.com", "long password 1")
        .await
        .expect("admin");
    let (token, _) = admin_sessions::start(&app.ctx.db, person.id, chrono::Duration::hours(1))
        .await
        .expect("session");
    Callers {
        revoked,
        expired,
        not_yet,
        disabled,
        over_quota,
        client,
        admin,
        session_cookie: format!("tg_admin={token}"),
    }
}

impl Callers {
    fn key(&self, cred: Cred) -> Option<&str> {
        Some(match cred {
            Cred::NoKey | Cred::Session => return None,
            Cred::Unknown => {
                "tg_nosuchkey_0000000000000000000000000000000000000000000000000000000000000000"
            }
            Cred::Revoked => &self.revoked.secret,
            Cred::Expired => &self.expired.secret,
            Cred::NotYetValid => &self.not_yet.secret,
            Cred::UserDisabled => &self.disabled.secret,
            Cred::OverQuota => &self.over_quota.secret,
            Cred::Client => &self.client.secret,
            Cred::Admin => &self.admin.secret,
        })
    }

    fn all_keys(&self) -> [&TestKey; 7] {
        [
            &self.revoked,
            &self.expired,
            &self.not_yet,
            &self.disabled,
            &self.over_quota,
            &self.client,
            &self.admin,
        ]
    }
}

/// The route's path with placeholder ids that name nothing.
fn concrete(uri: &str) -> String {
    uri.split('/')
        .map(|part| {
            if part.starts_with('{') {
                "nosuch"
            } else {
                part
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// Every (method, path) the router serves, from the router's own list.
fn routes(app: &TestApp) -> Vec<(Method, String)> {
    let mut all: Vec<(Method, String)> = App::routes(&app.ctx)
        .collect()
        .into_iter()
        .flat_map(|r| {
            let uri = r.uri.clone();
            r.actions.into_iter().map(move |m| (m, uri.clone()))
        })
        .filter(|(m, _)| *m != Method::HEAD)
        .collect();
    // The dashboard's prefix route is listed as `/admin/`.
    for (_, uri) in &mut all {
        if uri.len() > 1 {
            while uri.ends_with('/') {
                uri.pop();
            }
        }
    }
    all.sort_by(|a, b| (&a.1, a.0.as_str()).cmp(&(&b.1, b.0.as_str())));
    all.dedup();
    all
}

async fn call(
    app: &TestApp,
    callers: &Callers,
    method: &Method,
    uri: &str,
    cred: Cred,
) -> (u16, Option<String>, Value) {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let mut req = http.request(method.clone(), app.url(&concrete(uri)));
    if let Some(secret) = callers.key(cred) {
        req = req.bearer_auth(secret);
    }
    if cred == Cred::Session {
        req = req.header(header::COOKIE, &callers.session_cookie);
    }
    if *method == Method::POST {
        req = if uri.starts_with("/admin") {
            req.form(&[("x", "1")])
        } else {
            req.json(&json!({}))
        };
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let location = resp
        .headers()
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let text = resp.text().await.unwrap_or_default();
    let body = serde_json::from_str(&text).unwrap_or(json!({ "raw": text }));
    (status, location, body)
}

#[tokio::test]
async fn every_route_answers_every_kind_of_caller_as_its_class_says() {
    let app = TestApp::spawn_scripted(|_| {}).await;
    let callers = callers(&app).await;
    let routes = routes(&app);
    let unclassified: Vec<String> = routes
        .iter()
        .filter(|(m, u)| class_of(m, u).is_none())
        .map(|(m, u)| format!("{m} {u}"))
        .collect();
    assert!(
        unclassified.is_empty(),
        "routes without a row in class_of (decide who may call them): {unclassified:#?}"
    );
    // The matrix must cover every class, or the table above is not being exercised.
    for class in [
        Class::Public,
        Class::Keyed,
        Class::Metered,
        Class::Admin,
        Class::Session,
    ] {
        assert!(
            routes.iter().any(|(m, u)| class_of(m, u) == Some(class)),
            "no route of class {class:?}"
        );
    }
    let mut wrong = Vec::new();
    for (method, uri) in &routes {
        let Some(class) = class_of(method, uri) else {
            continue;
        };
        for cred in CREDS {
            let want = expected(class, method, cred);
            let (status, location, body) = call(&app, &callers, method, uri, cred).await;
            // Ollama's routes answer `{"error": "<message>", "code"}`.
            let code = body["error"]["code"]
                .as_str()
                .or_else(|| body["code"].as_str())
                .unwrap_or_default();
            let to_sign_in = status == StatusCode::SEE_OTHER.as_u16()
                && location.as_deref() == Some("/admin/login");
            let ok = match want {
                Expect::Refused(s, c) => status == s && code == c,
                Expect::ToSignIn => to_sign_in,
                Expect::CsrfRefused => status == 403,
                Expect::Answered => status < 500,
                Expect::Through => {
                    let refused = matches!(status, 401 | 403)
                        || (status == 429 && code == "quota_exceeded")
                        || to_sign_in
                        || status >= 500;
                    !refused
                }
            };
            if !ok {
                wrong.push(format!(
                    "{method} {uri} as {cred:?}: expected {want:?}, got {status} {code} {location:?}"
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} wrong answers:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    // Refused or not, nothing above spent a call or queued a job.
    for key in callers.all_keys() {
        assert_eq!(app.calls_used(key).await, 0, "key {}", key.prefix);
    }
    assert_eq!(app.job_count().await, 0);
}

#[tokio::test]
async fn an_admin_login_token_stops_working_on_admin_routes_when_it_expires() {
    let app = TestApp::spawn_scripted(|_| {}).await;
    admin_user(&app, "root", true).await;
    let (status, login) = app
        .post(
            None,
            "/token",
            json!({"username": "root", "password": "a long admin password"}),
        )
        .await;
    assert_eq!(status, 200, "{login}");
    let secret = login["access_token"].as_str().expect("token").to_string();
    let token = common::key_of(&app, &secret).await;
    let (status, workers) = app.get(Some(&token), "/api/workers").await;
    assert_eq!(
        status, 200,
        "a fresh admin token reaches admin routes: {workers}"
    );

    // The token's lifetime ends (its window is what `token_ttl_minutes` set).
    use sea_orm::{ActiveModelTrait, ActiveValue::Set, IntoActiveModel};
    let mut row = app.key_row(&token).await.into_active_model();
    row.valid_until = Set(Some(tollgate::models::now() - chrono::Duration::seconds(1)));
    row.update(&app.ctx.db).await.expect("expire the token");

    for (method, path) in [
        (Method::GET, "/api/workers"),
        (Method::GET, "/api/adapters"),
        (Method::POST, "/db_request/add_user"),
        (Method::POST, "/llm/configure_model"),
    ] {
        let body = (method == Method::POST)
            .then(|| json!({"username": "mallory", "password": "password-1234", "role": "admin"}));
        let (status, answer) = app
            .send(method.clone(), Some(&token), path, body.as_ref())
            .await;
        assert_eq!(status, 403, "{method} {path}: {answer}");
        assert_eq!(common::code(&answer), "key_expired", "{method} {path}");
    }
    assert!(
        users::Model::find_by_username(&app.ctx.db, "mallory")
            .await
            .expect("db")
            .is_none(),
        "an expired admin token created a user"
    );
}
