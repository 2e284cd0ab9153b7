//! The admin dashboard under `/admin`: first-run setup, sign-in, keys, jobs, an overview of the
//! queues and workers, and LoRA heads. Server-rendered with Loco's tera views
//! (`assets/views/dashboard`); works without JavaScript and without any CDN.
//!
//! Sessions: an HttpOnly, SameSite=Strict cookie holding a random token whose hash is stored
//! (`admin_sessions`); every state-changing form carries the session's CSRF token and is refused
//! with 403 without it. Unauthenticated pages redirect to the sign-in page.
//!
//! Rooms: this module holds the routes and what every page shares (the `SignedIn` and
//! `AdminForm` extractors, rendering, error pages); `session` signs admins in and out and serves
//! the first-run setup link; `keys`, `jobs`, `overview`, `adapters`, `users` and `models` hold
//! the pages of the same names, `key_form` turns a key into its form and a posted form into key parameters, and
//! `api_docs` shows the OpenAPI document as a page.

// Handlers fail with the page to show (a `Response`); it is built once per request, so its
// size does not matter.
#![allow(clippy::result_large_err)]

mod adapters;
mod api_docs;
mod jobs;
mod key_form;
mod keys;
mod models;
mod overview;
mod session;
mod users;

use std::collections::HashMap;

use axum::{
    extract::{FromRequest, FromRequestParts, Request},
    http::{header, request::Parts, StatusCode},
    response::{Html, IntoResponse, Redirect, Response},
    Form,
};
use loco_rs::{
    app::AppContext,
    controller::{
        views::{engines::TeraView, ViewRenderer},
        Routes,
    },
};
use serde_json::{json, Value};

use crate::models::{admin_sessions, admins, api_keys::constant_time_eq};

/// The session cookie's name.
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
    cookie(&parts.headers, COOKIE)
}

/// The value of cookie `name` in a request's headers, if set and not empty.
fn cookie(headers: &axum::http::HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, value)| value.to_string())
        .filter(|v| !v.is_empty())
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

    /// `data` with what the signed-in layout shows: the admin's email and the CSRF token.
    fn page(&self, mut data: Value) -> Value {
        data["admin_email"] = json!(self.admin.email);
        data["csrf"] = json!(self.session.csrf_token);
        data
    }
}

/// A form posted by a signed-in admin whose CSRF token matched. Every state-changing handler
/// takes this rather than `SignedIn` and `Form`, so none can forget the check.
///
/// The checks run in the order a handler would: no session redirects to sign-in, a body that
/// is not a form is axum's rejection, a wrong token is 403.
pub struct AdminForm {
    admin: SignedIn,
    fields: Fields,
}

impl FromRequest<AppContext> for AdminForm {
    type Rejection = Response;

    async fn from_request(req: Request, ctx: &AppContext) -> Result<Self, Self::Rejection> {
        let (mut parts, body) = req.into_parts();
        let admin = SignedIn::from_request_parts(&mut parts, ctx).await?;
        let Form(fields) = Form::<Fields>::from_request(Request::from_parts(parts, body), ctx)
            .await
            .map_err(IntoResponse::into_response)?;
        admin.check_csrf(&fields)?;
        Ok(Self { admin, fields })
    }
}

async fn index(_admin: SignedIn) -> Response {
    see_other("/admin/overview")
}

/// The dashboard's stylesheet, from `assets/static`, compiled in (no CDN, no static-file setup).
async fn stylesheet() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        include_str!("../../../assets/static/dashboard.css"),
    )
        .into_response()
}

pub fn routes() -> Routes {
    use axum::routing::{get, post};
    Routes::new()
        .prefix("/admin")
        .add("/", get(index))
        .add("/static/dashboard.css", get(stylesheet))
        .add("/login", get(session::login_page).post(session::login))
        .add("/logout", post(session::logout))
        .add("/setup", get(session::setup_page).post(session::setup))
        .add("/keys", get(keys::list).post(keys::create))
        .add("/keys/new", get(keys::new_page))
        .add("/jobs", get(jobs::list))
        .add("/jobs/{id}", get(jobs::detail))
        .add("/overview", get(overview::page))
        .add("/adapters", get(adapters::page).post(adapters::register))
        .add("/adapters/{name}/remove", post(adapters::remove))
        .add("/users", get(users::page).post(users::create))
        .add("/users/{username}/{action}", post(users::act))
        .add("/models", get(models::page))
        .add("/models/{id}/load", post(models::load))
        .add("/models/{id}/unload", post(models::unload))
        .add("/api", get(api_docs::page))
        .add("/keys/{prefix}", get(keys::detail).post(keys::edit))
        .add("/keys/{prefix}/rotate", post(keys::rotate))
        .add("/keys/{prefix}/revoke", post(keys::revoke))
        .add("/keys/{prefix}/reactivate", post(keys::reactivate))
}
