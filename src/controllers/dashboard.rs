//! The admin dashboard under `/admin`: first-run setup, sign-in, and keys (list, create with the
//! secret shown once, revoke, reactivate). Server-rendered with Loco's tera views; works without
//! JavaScript and without any CDN.
//!
//! Sessions: an HttpOnly, SameSite=Strict cookie holding a random token whose hash is stored
//! (`admin_sessions`); every state-changing form carries the session's CSRF token and is refused
//! with 403 without it. Unauthenticated pages redirect to the sign-in page.

// Handlers fail with the page to show (a `Response`); it is built once per request, so its
// size does not matter.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;

use axum::{
    extract::{FromRequestParts, Path, Query, State},
    http::{header, request::Parts, HeaderValue, StatusCode},
    response::{Html, IntoResponse, Redirect, Response},
    Form,
};
use loco_rs::{
    app::AppContext,
    controller::{
        views::{engines::TeraView, ViewEngine, ViewRenderer},
        Routes,
    },
};
use serde_json::{json, Value};

use crate::{
    models::{
        adapters, admin_sessions, admins,
        api_keys::{self, KeyParams},
        jobs, now, usage_records,
    },
    services::Services,
    views::chart,
};

const COOKIE: &str = "tg_admin";

type Fields = HashMap<String, String>;

/// A page or an error page; never a JSON error (this is a browser UI).
type PageResult = Result<Response, Response>;

fn render(v: &TeraView, status: StatusCode, template: &str, data: &Value) -> PageResult {
    // Every template may read these; absent ones are empty, not template errors.
    let mut data = data.clone();
    if let Some(map) = data.as_object_mut() {
        for (name, empty) in [
            ("form", json!({})),
            ("errors", json!({})),
            ("error", Value::Null),
            ("email", json!("")),
            ("admin_email", Value::Null),
            ("csrf", json!("")),
            ("q", json!("")),
            ("rotated", json!(false)),
        ] {
            map.entry(name).or_insert(empty);
        }
    }
    match v.render(template, &data) {
        Ok(html) => Ok((status, Html(html)).into_response()),
        Err(e) => {
            tracing::error!(error = %e, template, "dashboard template failed");
            Err((
                StatusCode::INTERNAL_SERVER_ERROR,
                "page could not be rendered",
            )
                .into_response())
        }
    }
}

fn internal(e: impl std::fmt::Display) -> Response {
    tracing::error!(error = %e, "dashboard error");
    (StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response()
}

fn not_found_page(what: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        Html(format!(
            "<h1>404</h1><p>{what}</p><p><a href=\"/admin\">Dashboard</a></p>"
        )),
    )
        .into_response()
}

fn see_other(to: &str) -> Response {
    Redirect::to(to).into_response()
}

/// The session cookie's token, from the `Cookie` header.
fn cookie_token(parts: &Parts) -> Option<String> {
    parts
        .headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_string())
        .filter(|v| !v.is_empty())
}

fn session_cookie(token: &str, max_age_secs: i64, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{COOKIE}={token}; Path=/admin; HttpOnly; SameSite=Strict; Max-Age={max_age_secs}{secure}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("tg_admin=; Path=/admin; Max-Age=0"))
}

/// A signed-in admin (the request carried a valid session cookie).
pub struct SignedIn {
    admin: admins::Model,
    session: admin_sessions::Model,
    token: String,
}

impl FromRequestParts<AppContext> for SignedIn {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        ctx: &AppContext,
    ) -> Result<Self, Self::Rejection> {
        let Some(token) = cookie_token(parts) else {
            return Err(see_other("/admin/login"));
        };
        match admin_sessions::find_valid(&ctx.db, &token).await {
            Ok(Some((session, admin))) => Ok(Self {
                admin,
                session,
                token,
            }),
            Ok(None) => Err(see_other("/admin/login")),
            Err(e) => Err(internal(e)),
        }
    }
}

impl SignedIn {
    /// 403 unless the form's `csrf` field is this session's token.
    fn check_csrf(&self, fields: &Fields) -> Result<(), Response> {
        let sent = fields.get("csrf").map_or("", String::as_str);
        if !sent.is_empty() && constant_time_eq(sent, &self.session.csrf_token) {
            Ok(())
        } else {
            Err((
                StatusCode::FORBIDDEN,
                Html("<h1>403</h1><p>The form's security token is missing or stale. Go back, reload the page and try again.</p>"),
            )
                .into_response())
        }
    }

    fn page(&self, mut data: Value) -> Value {
        data["admin_email"] = json!(self.admin.email);
        data["csrf"] = json!(self.session.csrf_token);
        data
    }
}

fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

async fn start_session(ctx: &AppContext, services: &Services, admin_id: i32) -> PageResult {
    let minutes = services.settings.auth.session_ttl_minutes.max(1);
    let (token, _) =
        admin_sessions::start(&ctx.db, admin_id, chrono::Duration::minutes(minutes.into()))
            .await
            .map_err(internal)?;
    let mut resp = see_other("/admin/keys");
    resp.headers_mut().insert(
        header::SET_COOKIE,
        session_cookie(
            &token,
            i64::from(minutes) * 60,
            services.settings.auth.secure_cookies,
        ),
    );
    Ok(resp)
}

async fn index(_admin: SignedIn) -> Response {
    see_other("/admin/overview")
}

async fn login_page(ViewEngine(v): ViewEngine<TeraView>) -> PageResult {
    render(&v, StatusCode::OK, "dashboard/login.html", &json!({}))
}

async fn login(
    State(ctx): State<AppContext>,
    ViewEngine(v): ViewEngine<TeraView>,
    Form(fields): Form<Fields>,
) -> PageResult {
    let services = Services::from_ctx(&ctx).map_err(IntoResponse::into_response)?;
    let email = fields
        .get("email")
        .map(|e| e.trim().to_lowercase())
        .unwrap_or_default();
    let password = fields.get("password").cloned().unwrap_or_default();
    let throttle_key = format!("admin:{email}");
    if let Err(wait) = services.logins.begin(&throttle_key) {
        return render(
            &v,
            StatusCode::TOO_MANY_REQUESTS,
            "dashboard/login.html",
            &json!({"email": email, "error": format!("Too many failed sign-ins. Try again in {} s.", wait.as_secs().max(1))}),
        );
    }
    let admin = admins::Model::find_by_email(&ctx.db, &email)
        .await
        .map_err(internal)?;
    match admin {
        Some(admin) if admin.verify_password(&password) => {
            services.logins.succeeded(&throttle_key);
            start_session(&ctx, &services, admin.id).await
        }
        _ => render(
            &v,
            StatusCode::UNAUTHORIZED,
            "dashboard/login.html",
            &json!({"email": email, "error": "Wrong email or password."}),
        ),
    }
}

async fn logout(
    State(ctx): State<AppContext>,
    admin: SignedIn,
    Form(fields): Form<Fields>,
) -> PageResult {
    admin.check_csrf(&fields)?;
    admin_sessions::end(&ctx.db, &admin.token)
        .await
        .map_err(internal)?;
    let mut resp = see_other("/admin/login");
    resp.headers_mut()
        .insert(header::SET_COOKIE, session_cookie("", 0, false));
    Ok(resp)
}

/// Whether `token` is the live setup link; it only works while there is no admin at all.
async fn setup_open(ctx: &AppContext, services: &Services, token: &str) -> Result<bool, Response> {
    use sea_orm::{EntityTrait, PaginatorTrait};
    if !services.setup_link_valid(token) {
        return Ok(false);
    }
    admins::Entity::find()
        .count(&ctx.db)
        .await
        .map(|n| n == 0)
        .map_err(internal)
}

/// The page for a setup link that is used up, expired or unknown (404).
fn setup_gone(v: &TeraView) -> PageResult {
    render(
        v,
        StatusCode::NOT_FOUND,
        "dashboard/setup_gone.html",
        &json!({}),
    )
}

async fn setup_page(
    State(ctx): State<AppContext>,
    ViewEngine(v): ViewEngine<TeraView>,
    Query(q): Query<Fields>,
) -> PageResult {
    let services = Services::from_ctx(&ctx).map_err(IntoResponse::into_response)?;
    let token = q.get("token").cloned().unwrap_or_default();
    if !setup_open(&ctx, &services, &token).await? {
        return setup_gone(&v);
    }
    render(
        &v,
        StatusCode::OK,
        "dashboard/setup.html",
        &json!({"token": token}),
    )
}

async fn setup(
    State(ctx): State<AppContext>,
    ViewEngine(v): ViewEngine<TeraView>,
    Form(fields): Form<Fields>,
) -> PageResult {
    let services = Services::from_ctx(&ctx).map_err(IntoResponse::into_response)?;
    let token = fields.get("token").cloned().unwrap_or_default();
    if !setup_open(&ctx, &services, &token).await? {
        return setup_gone(&v);
    }
    let email = fields
        .get("email")
        .map(|e| e.trim().to_string())
        .unwrap_or_default();
    let password = fields.get("password").cloned().unwrap_or_default();
    let again = fields.get("password2").cloned().unwrap_or_default();
    let mut errors = serde_json::Map::new();
    if password != again {
        errors.insert("password2".into(), json!("The passwords differ."));
    }
    if errors.is_empty() {
        match admins::ActiveModel::create(&ctx.db, &email, &password).await {
            Ok(admin) => {
                services.consume_setup_link();
                return start_session(&ctx, &services, admin.id).await;
            }
            Err(crate::models::ModelError::Invalid(m)) => {
                let field = if m.contains("password") {
                    "password"
                } else {
                    "email"
                };
                errors.insert(field.into(), json!(m));
            }
            Err(e) => return Err(internal(e)),
        }
    }
    render(
        &v,
        StatusCode::UNPROCESSABLE_ENTITY,
        "dashboard/setup.html",
        &json!({"token": token, "email": email, "errors": errors}),
    )
}

/// One key as the list shows it.
fn key_row(k: &api_keys::Model) -> Value {
    let at = now();
    let used_pct = k
        .max_calls
        .filter(|m| *m > 0)
        .map_or(0, |m| (k.calls_used.saturating_mul(100) / m).min(100));
    json!({
        "prefix": k.prefix,
        "name": k.name,
        "email": k.email,
        "organization": k.organization,
        "scope": k.scope,
        "calls_used": k.calls_used,
        "max_calls": k.max_calls,
        "used_pct": used_pct,
        "prompt_tokens_used": k.prompt_tokens_used,
        "prompt_token_limit": k.prompt_token_limit,
        "gen_tokens_used": k.gen_tokens_used,
        "gen_token_limit": k.gen_token_limit,
        "priority": k.priority,
        "state": k.state_at(at).as_str(),
        "revoked": k.revoked_at.is_some(),
        "valid_from": k.valid_from.map(|t| t.format("%Y-%m-%d").to_string()),
        "valid_until": k.valid_until.map(|t| t.format("%Y-%m-%d").to_string()),
        "last_used": k.last_used_at.map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string()),
    })
}

/// A key's current values as the edit form shows them.
fn key_form(k: &api_keys::Model) -> Value {
    let num = |v: Option<i64>| v.map(|n| n.to_string()).unwrap_or_default();
    let day = |t: Option<sea_orm::prelude::DateTimeWithTimeZone>| {
        t.map(|t| t.format("%Y-%m-%d").to_string())
            .unwrap_or_default()
    };
    json!({
        "name": k.name,
        "email": k.email,
        "organization": k.organization.clone().unwrap_or_default(),
        "calls": num(k.max_calls),
        "prompt_tokens": num(k.prompt_token_limit),
        "gen_tokens": num(k.gen_token_limit),
        "priority": k.priority.to_string(),
        "valid_from": day(k.valid_from),
        "valid_until": day(k.valid_until),
    })
}

async fn keys(
    State(ctx): State<AppContext>,
    admin: SignedIn,
    ViewEngine(v): ViewEngine<TeraView>,
    Query(q): Query<Fields>,
) -> PageResult {
    let search = q
        .get("q")
        .map(|s| s.trim().to_lowercase())
        .unwrap_or_default();
    let all = api_keys::Model::list(&ctx.db).await.map_err(internal)?;
    let rows: Vec<Value> = all
        .iter()
        // Seed 002's per-login tokens are keys too; the list shows the keys admins issue.
        .filter(|k| k.user_id.is_none())
        .filter(|k| {
            search.is_empty()
                || k.name.to_lowercase().contains(&search)
                || k.email.contains(&search)
                || k.prefix.contains(&search)
        })
        .map(key_row)
        .collect();
    render(
        &v,
        StatusCode::OK,
        "dashboard/keys.html",
        &admin.page(json!({"keys": rows, "q": search})),
    )
}

/// Days shown in a key's charts.
const CHART_DAYS: i64 = 30;

async fn key_detail(
    State(ctx): State<AppContext>,
    admin: SignedIn,
    ViewEngine(v): ViewEngine<TeraView>,
    Path(prefix): Path<String>,
) -> PageResult {
    let Some(key) = api_keys::Model::find_by_prefix(&ctx.db, &prefix)
        .await
        .map_err(internal)?
    else {
        return Err(not_found_page("No such key."));
    };
    let to = chrono::Utc::now().date_naive();
    let from = to - chrono::Duration::days(CHART_DAYS - 1);
    let days = usage_records::daily(&ctx.db, key.id, from, to)
        .await
        .map_err(internal)?;
    // One point per day, zero where nothing happened.
    let series = |pick: fn(&usage_records::DailyUsage) -> i64| -> Vec<(String, i64)> {
        (0..CHART_DAYS)
            .map(|i| from + chrono::Duration::days(i))
            .map(|day| {
                let value = days.iter().find(|d| d.day == day).map_or(0, pick);
                (day.format("%Y-%m-%d").to_string(), value)
            })
            .collect()
    };
    let requests_chart = chart::bars("Requests per day", &series(|d| d.requests));
    let tokens_chart = chart::bars("Generated tokens per day", &series(|d| d.generated_tokens));
    let jobs: Vec<Value> = jobs::Model::recent_for_key(&ctx.db, key.id, 20)
        .await
        .map_err(internal)?
        .iter()
        .map(|j| {
            json!({
                "id": j.id,
                "endpoint": j.endpoint,
                "model": j.model,
                "status": j.status,
                "queued_at": j.queued_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                "latency_ms": j.finished_at.map(|f| (f - j.queued_at).num_milliseconds()),
                "prompt_tokens": j.prompt_tokens,
                "generated_tokens": j.generated_tokens,
                "error": j.error,
            })
        })
        .collect();
    render(
        &v,
        StatusCode::OK,
        "dashboard/key.html",
        &admin.page(json!({
            "key": key_row(&key),
            "form": key_form(&key),
            "requests_chart": requests_chart,
            "tokens_chart": tokens_chart,
            "jobs": jobs,
            "days": CHART_DAYS,
        })),
    )
}

fn ms_between(
    a: Option<sea_orm::prelude::DateTimeWithTimeZone>,
    b: Option<sea_orm::prelude::DateTimeWithTimeZone>,
) -> Option<i64> {
    Some((b? - a?).num_milliseconds())
}

fn job_row(j: &jobs::Model, prefixes: &HashMap<i32, String>) -> Value {
    json!({
        "id": j.id,
        "key": prefixes.get(&j.api_key_id),
        "endpoint": j.endpoint,
        "model": j.model,
        "status": j.status,
        "queued_at": j.queued_at.format("%Y-%m-%d %H:%M:%S").to_string(),
        "wait_ms": ms_between(Some(j.queued_at), j.started_at),
        "run_ms": ms_between(j.started_at, j.finished_at),
        "latency_ms": ms_between(Some(j.queued_at), j.finished_at),
        "prompt_tokens": j.prompt_tokens,
        "generated_tokens": j.generated_tokens,
        "finish_reason": j.finish_reason,
        "worker": j.worker,
        "attempts": j.attempts,
        "refunded": j.refunded,
        "error": j.error,
    })
}

async fn key_prefixes(ctx: &AppContext) -> Result<HashMap<i32, String>, Response> {
    Ok(api_keys::Model::list(&ctx.db)
        .await
        .map_err(internal)?
        .into_iter()
        .map(|k| (k.id, k.prefix))
        .collect())
}

async fn jobs_page(
    State(ctx): State<AppContext>,
    admin: SignedIn,
    ViewEngine(v): ViewEngine<TeraView>,
    Query(q): Query<Fields>,
) -> PageResult {
    let pick = |name: &str| q.get(name).map(|s| s.trim()).filter(|s| !s.is_empty());
    let prefixes = key_prefixes(&ctx).await?;
    // An unknown prefix matches no job (id -1).
    let key_id = pick("key").map(|p| {
        prefixes
            .iter()
            .find(|(_, v)| *v == p)
            .map_or(-1, |(id, _)| *id)
    });
    let rows: Vec<Value> = jobs::Model::recent(&ctx.db, pick("status"), key_id, pick("model"), 100)
        .await
        .map_err(internal)?
        .iter()
        .map(|j| job_row(j, &prefixes))
        .collect();
    render(
        &v,
        StatusCode::OK,
        "dashboard/jobs.html",
        &admin.page(json!({
            "jobs": rows,
            "filter": {
                "status": pick("status").unwrap_or_default(),
                "key": pick("key").unwrap_or_default(),
                "model": pick("model").unwrap_or_default(),
            },
            "statuses": [jobs::QUEUED, jobs::RUNNING, jobs::DONE, jobs::FAILED],
        })),
    )
}

async fn job_page(
    State(ctx): State<AppContext>,
    admin: SignedIn,
    ViewEngine(v): ViewEngine<TeraView>,
    Path(id): Path<String>,
) -> PageResult {
    let Some(job) = jobs::Model::find_any(&ctx.db, &id)
        .await
        .map_err(internal)?
    else {
        return Err(not_found_page("No such job."));
    };
    let prefixes = key_prefixes(&ctx).await?;
    let mut row = job_row(&job, &prefixes);
    row["request"] = json!(job.request);
    row["result"] = json!(job
        .result
        .as_deref()
        .map(|r| r.chars().take(4000).collect::<String>()));
    row["started_at"] = json!(job
        .started_at
        .map(|t| t.format("%Y-%m-%d %H:%M:%S%.3f").to_string()));
    row["finished_at"] = json!(job
        .finished_at
        .map(|t| t.format("%Y-%m-%d %H:%M:%S%.3f").to_string()));
    render(
        &v,
        StatusCode::OK,
        "dashboard/job.html",
        &admin.page(json!({"job": row})),
    )
}

/// The value at quantile `q` (0..=1) of sorted `values`.
fn quantile(sorted: &[i64], q: f64) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted.get(i).copied()
}

async fn overview(
    State(ctx): State<AppContext>,
    admin: SignedIn,
    ViewEngine(v): ViewEngine<TeraView>,
) -> PageResult {
    let services = Services::from_ctx(&ctx).map_err(IntoResponse::into_response)?;
    let window_minutes = 15;
    let since = now() - chrono::Duration::minutes(window_minutes);
    let recent = jobs::Model::finished_since(&ctx.db, since)
        .await
        .map_err(internal)?;
    let mut latencies: Vec<i64> = recent
        .iter()
        .filter(|j| j.status == jobs::DONE)
        .filter_map(|j| ms_between(Some(j.queued_at), j.finished_at))
        .collect();
    latencies.sort_unstable();
    let failed = recent.iter().filter(|j| j.status == jobs::FAILED).count();
    let mut queues = Vec::new();
    for (model, queue) in services.served_queues(&ctx.db).await {
        queues.push(json!({"model": model, "depth": queue.depth().await.ok()}));
    }
    // Every worker process that ever heartbeated (the registry table), then the models this
    // process loaded at run time (seed 004), which live and die with it.
    let gone_after = services.settings.queue.orphan_after();
    let mut workers: Vec<serde_json::Value> = crate::models::workers::list(&ctx.db)
        .await
        .map_err(internal)?
        .iter()
        .map(|w| {
            let mut row = w.to_json(gone_after);
            row["heartbeat_age"] = json!(format!("{:.0} s", w.heartbeat_age().as_secs_f64()));
            row["tokens_per_second"] = json!(w.tokens_per_second.map(|t| format!("{t:.1}")));
            row
        })
        .collect();
    for m in services.registry.all() {
        let status = m.status();
        workers.push(json!({
            "id": format!("{} (loaded {}, in this process)", m.model_id, m.loaded_at.format("%H:%M")),
            "models": [status.model],
            "device": status.device,
            "state": if status.ready { "idle" } else { "loading" },
            "jobs_served": status.jobs_served,
            "adapters": status.adapters,
        }));
    }
    #[allow(clippy::cast_precision_loss)]
    let per_minute = recent.len() as f64 / window_minutes as f64;
    render(
        &v,
        StatusCode::OK,
        "dashboard/overview.html",
        &admin.page(json!({
            "window_minutes": window_minutes,
            "per_minute": format!("{per_minute:.1}"),
            "finished": recent.len(),
            "failed": failed,
            "p50": quantile(&latencies, 0.5),
            "p95": quantile(&latencies, 0.95),
            "queues": queues,
            "workers": workers,
            "mode": if services.engine.is_some() { "embedded worker (in this process)" } else { "external workers" },
        })),
    )
}

async fn adapters_page(
    State(ctx): State<AppContext>,
    admin: SignedIn,
    ViewEngine(v): ViewEngine<TeraView>,
) -> PageResult {
    adapters_view(
        &ctx,
        &admin,
        &v,
        StatusCode::OK,
        &Fields::new(),
        &serde_json::Map::new(),
    )
    .await
}

async fn adapters_view(
    ctx: &AppContext,
    admin: &SignedIn,
    v: &TeraView,
    status: StatusCode,
    form: &Fields,
    errors: &serde_json::Map<String, Value>,
) -> PageResult {
    let services = Services::from_ctx(ctx).map_err(IntoResponse::into_response)?;
    let holders = super::adapters::holders(&ctx.db, &services).await;
    let rows: Vec<Value> = adapters::Model::list(&ctx.db)
        .await
        .map_err(internal)?
        .iter()
        .map(|a| {
            json!({
                "name": a.name,
                "model": format!("{}:{}", a.base_model, a.name),
                "file": a.file,
                "default_scale": a.default_scale,
                "loaded_on": super::adapters::loaded_on(&holders, &a.name),
            })
        })
        .collect();
    render(
        v,
        status,
        "dashboard/adapters.html",
        &admin.page(json!({
            "adapters": rows,
            "adapters_dir": services.settings.engine.adapters_dir.display().to_string(),
            "form": form,
            "errors": errors,
        })),
    )
}

async fn register_adapter(
    State(ctx): State<AppContext>,
    admin: SignedIn,
    ViewEngine(v): ViewEngine<TeraView>,
    Form(fields): Form<Fields>,
) -> PageResult {
    admin.check_csrf(&fields)?;
    let services = Services::from_ctx(&ctx).map_err(IntoResponse::into_response)?;
    let field = |n: &str| fields.get(n).map_or("", String::as_str);
    let scale = match field("scale").trim() {
        "" => None,
        raw => match raw.parse::<f64>() {
            Ok(x) => Some(x),
            Err(_) => {
                let mut errors = serde_json::Map::new();
                errors.insert("scale".into(), json!("A number from 0 to 4."));
                return adapters_view(
                    &ctx,
                    &admin,
                    &v,
                    StatusCode::UNPROCESSABLE_ENTITY,
                    &fields,
                    &errors,
                )
                .await;
            }
        },
    };
    match super::adapters::register(&ctx, &services, field("name"), field("path"), scale, None)
        .await
    {
        Ok(a) => {
            tracing::info!(adapter = %a.name, admin = %admin.admin.email, "LoRA head registered from the dashboard");
            Ok(see_other("/admin/adapters"))
        }
        Err(e) if e.status.is_client_error() => {
            let target = if e.code.contains("name") || e.code == "adapter_exists" {
                "name"
            } else if e.code.contains("scale") {
                "scale"
            } else {
                "path"
            };
            let mut errors = serde_json::Map::new();
            errors.insert(target.into(), json!(e.message));
            adapters_view(
                &ctx,
                &admin,
                &v,
                StatusCode::UNPROCESSABLE_ENTITY,
                &fields,
                &errors,
            )
            .await
        }
        Err(e) => Err(internal(e.message)),
    }
}

async fn remove_adapter(
    State(ctx): State<AppContext>,
    admin: SignedIn,
    Path(name): Path<String>,
    Form(fields): Form<Fields>,
) -> PageResult {
    admin.check_csrf(&fields)?;
    match adapters::ActiveModel::remove(&ctx.db, &name)
        .await
        .map_err(internal)?
    {
        Some(_) => {
            tracing::info!(adapter = %name, admin = %admin.admin.email, "LoRA head removed from the dashboard");
            Ok(see_other("/admin/adapters"))
        }
        None => Err(not_found_page("No such LoRA head.")),
    }
}

async fn new_key_page(admin: SignedIn, ViewEngine(v): ViewEngine<TeraView>) -> PageResult {
    render(
        &v,
        StatusCode::OK,
        "dashboard/new_key.html",
        &admin.page(json!({"form": {}})),
    )
}

/// The create form as key parameters, or the errors to show next to each field.
fn key_params(fields: &Fields) -> Result<KeyParams, serde_json::Map<String, Value>> {
    let mut errors = serde_json::Map::new();
    let text = |name: &str| fields.get(name).map(|v| v.trim()).filter(|v| !v.is_empty());
    let mut number = |name: &str| -> Option<i64> {
        let raw = text(name)?;
        match raw.parse::<i64>() {
            Ok(n) if n >= 0 => Some(n),
            _ => {
                errors.insert(name.into(), json!("A whole number, 0 or more."));
                None
            }
        }
    };
    let max_calls = number("calls");
    let prompt_token_limit = number("prompt_tokens");
    let gen_token_limit = number("gen_tokens");
    let priority = number("priority").unwrap_or(0);
    if priority > i64::from(api_keys::MAX_PRIORITY) {
        errors.insert(
            "priority".into(),
            json!(format!("0 to {}.", api_keys::MAX_PRIORITY)),
        );
    }
    let mut bound = |name: &str, end: bool| {
        text(name).and_then(|raw| match api_keys::parse_bound(raw, end) {
            Ok(t) => Some(t),
            Err(e) => {
                errors.insert(name.into(), json!(e.to_string()));
                None
            }
        })
    };
    let valid_from = bound("valid_from", false);
    let valid_until = bound("valid_until", true);
    let email = text("email").unwrap_or_default().to_string();
    if !email.contains('@') {
        errors.insert("email".into(), json!("An email address is required."));
    }
    if let (Some(f), Some(u)) = (valid_from, valid_until) {
        if u < f {
            errors.insert(
                "valid_until".into(),
                json!("Must not be before “valid from”."),
            );
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(KeyParams {
        name: text("name").unwrap_or_default().to_string(),
        email,
        organization: text("organization").map(str::to_string),
        max_calls,
        valid_from,
        valid_until,
        prompt_token_limit,
        gen_token_limit,
        priority: i32::try_from(priority).unwrap_or(0),
        ..Default::default()
    })
}

async fn create_key(
    State(ctx): State<AppContext>,
    admin: SignedIn,
    ViewEngine(v): ViewEngine<TeraView>,
    Form(fields): Form<Fields>,
) -> PageResult {
    admin.check_csrf(&fields)?;
    let params = match key_params(&fields) {
        Ok(p) => p,
        Err(errors) => {
            return render(
                &v,
                StatusCode::UNPROCESSABLE_ENTITY,
                "dashboard/new_key.html",
                &admin.page(json!({"form": fields, "errors": errors})),
            )
        }
    };
    let issued = match api_keys::ActiveModel::issue(&ctx.db, params).await {
        Ok(i) => i,
        Err(crate::models::ModelError::Invalid(m)) => {
            return render(
                &v,
                StatusCode::UNPROCESSABLE_ENTITY,
                "dashboard/new_key.html",
                &admin.page(json!({"form": fields, "errors": {"email": m}})),
            )
        }
        Err(e) => return Err(internal(e)),
    };
    tracing::info!(prefix = %issued.key.prefix, admin = %admin.admin.email, "key issued from the dashboard");
    let mut resp = render(
        &v,
        StatusCode::CREATED,
        "dashboard/key_created.html",
        &admin.page(json!({"key": key_row(&issued.key), "secret": issued.secret})),
    )?;
    // The secret is on this page only: never cache it.
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

async fn set_revoked(
    ctx: &AppContext,
    admin: &SignedIn,
    fields: &Fields,
    prefix: &str,
    revoke: bool,
) -> PageResult {
    admin.check_csrf(fields)?;
    let result = if revoke {
        api_keys::ActiveModel::revoke(&ctx.db, prefix).await
    } else {
        api_keys::ActiveModel::reactivate(&ctx.db, prefix).await
    };
    match result {
        Ok(key) => {
            tracing::info!(prefix = %key.prefix, revoke, admin = %admin.admin.email, "key state changed from the dashboard");
            Ok(see_other("/admin/keys"))
        }
        Err(crate::models::ModelError::NotFound(_)) => Err(not_found_page("No such key.")),
        Err(e) => Err(internal(e)),
    }
}

async fn edit_key(
    State(ctx): State<AppContext>,
    admin: SignedIn,
    ViewEngine(v): ViewEngine<TeraView>,
    Path(prefix): Path<String>,
    Form(fields): Form<Fields>,
) -> PageResult {
    admin.check_csrf(&fields)?;
    let params = match key_params(&fields) {
        Ok(p) => p,
        Err(errors) => {
            return render(
                &v,
                StatusCode::UNPROCESSABLE_ENTITY,
                "dashboard/edit_key.html",
                &admin.page(json!({"prefix": prefix, "form": fields, "errors": errors})),
            )
        }
    };
    match api_keys::ActiveModel::edit(&ctx.db, &prefix, params).await {
        Ok(key) => {
            tracing::info!(prefix = %key.prefix, admin = %admin.admin.email, "key edited from the dashboard");
            Ok(see_other(&format!("/admin/keys/{}", key.prefix)))
        }
        Err(crate::models::ModelError::Invalid(m)) => render(
            &v,
            StatusCode::UNPROCESSABLE_ENTITY,
            "dashboard/edit_key.html",
            &admin.page(json!({"prefix": prefix, "form": fields, "errors": {"valid_until": m}})),
        ),
        Err(crate::models::ModelError::NotFound(_)) => Err(not_found_page("No such key.")),
        Err(e) => Err(internal(e)),
    }
}

async fn rotate_key(
    State(ctx): State<AppContext>,
    admin: SignedIn,
    ViewEngine(v): ViewEngine<TeraView>,
    Path(prefix): Path<String>,
    Form(fields): Form<Fields>,
) -> PageResult {
    admin.check_csrf(&fields)?;
    let issued = match api_keys::ActiveModel::rotate(&ctx.db, &prefix).await {
        Ok(i) => i,
        Err(crate::models::ModelError::NotFound(_)) => return Err(not_found_page("No such key.")),
        Err(e) => return Err(internal(e)),
    };
    tracing::info!(old = %prefix, new = %issued.key.prefix, admin = %admin.admin.email, "key rotated from the dashboard");
    let mut resp = render(
        &v,
        StatusCode::OK,
        "dashboard/key_created.html",
        &admin.page(json!({"key": key_row(&issued.key), "secret": issued.secret, "rotated": true})),
    )?;
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

async fn revoke(
    State(ctx): State<AppContext>,
    admin: SignedIn,
    Path(prefix): Path<String>,
    Form(fields): Form<Fields>,
) -> PageResult {
    set_revoked(&ctx, &admin, &fields, &prefix, true).await
}

async fn reactivate(
    State(ctx): State<AppContext>,
    admin: SignedIn,
    Path(prefix): Path<String>,
    Form(fields): Form<Fields>,
) -> PageResult {
    set_revoked(&ctx, &admin, &fields, &prefix, false).await
}

/// The dashboard's stylesheet, from `assets/static`, compiled in (no CDN, no static-file setup).
async fn stylesheet() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        include_str!("../../assets/static/dashboard.css"),
    )
        .into_response()
}

pub fn routes() -> Routes {
    use axum::routing::{get, post};
    Routes::new()
        .prefix("/admin")
        .add("/", get(index))
        .add("/static/dashboard.css", get(stylesheet))
        .add("/login", get(login_page).post(login))
        .add("/logout", post(logout))
        .add("/setup", get(setup_page).post(setup))
        .add("/keys", get(keys).post(create_key))
        .add("/keys/new", get(new_key_page))
        .add("/jobs", get(jobs_page))
        .add("/jobs/{id}", get(job_page))
        .add("/overview", get(overview))
        .add("/adapters", get(adapters_page).post(register_adapter))
        .add("/adapters/{name}/remove", post(remove_adapter))
        .add("/keys/{prefix}", get(key_detail).post(edit_key))
        .add("/keys/{prefix}/rotate", post(rotate_key))
        .add("/keys/{prefix}/revoke", post(revoke))
        .add("/keys/{prefix}/reactivate", post(reactivate))
}

#[cfg(test)]
mod tests {
    use super::quantile;

    #[test]
    fn quantiles_of_sorted_values() {
        let v: Vec<i64> = (1..=100).collect();
        assert_eq!(quantile(&v, 0.5), Some(51));
        assert_eq!(quantile(&v, 0.95), Some(95));
        assert_eq!(quantile(&[7], 0.95), Some(7));
        assert_eq!(quantile(&[], 0.5), None);
    }
}
