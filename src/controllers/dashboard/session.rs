//! Sign-in, sign-out and the first-run setup link.

use axum::{
    extract::{Query, State},
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{Html, IntoResponse, Response},
    Form,
};
use loco_rs::{
    app::AppContext,
    controller::views::{engines::TeraView, ViewEngine},
};
use serde_json::json;

use super::{cookie, internal, render, see_other, AdminForm, Fields, PageResult, COOKIE};
use crate::{
    extractors::ClientAddress,
    models::{admin_sessions, admins, api_keys::constant_time_eq},
    services::Services,
};

fn session_cookie(token: &str, max_age_secs: i64, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{COOKIE}={token}; Path=/admin; HttpOnly; SameSite=Strict; Max-Age={max_age_secs}{secure}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("tg_admin=; Path=/admin; Max-Age=0"))
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

/// The sign-in form's CSRF cookie: a sign-in posted from another site (which would sign the
/// victim in as the attacker) carries neither this SameSite=Strict cookie nor its value.
const LOGIN_COOKIE: &str = "tg_login";

/// The sign-in page, with a fresh CSRF token in a cookie and in the form (double submit).
fn login_form(v: &TeraView, status: StatusCode, data: serde_json::Value) -> PageResult {
    let token = uuid::Uuid::new_v4().simple().to_string();
    let mut data = data;
    data["csrf"] = json!(token);
    let mut resp = render(v, status, "dashboard/login.html", &data)?;
    if let Ok(value) = HeaderValue::from_str(&format!(
        "{LOGIN_COOKIE}={token}; Path=/admin/login; HttpOnly; SameSite=Strict; Max-Age=3600"
    )) {
        resp.headers_mut().insert(header::SET_COOKIE, value);
    }
    Ok(resp)
}

pub(super) async fn login_page(ViewEngine(v): ViewEngine<TeraView>) -> PageResult {
    login_form(&v, StatusCode::OK, json!({}))
}

pub(super) async fn login(
    State(ctx): State<AppContext>,
    ViewEngine(v): ViewEngine<TeraView>,
    ClientAddress(address): ClientAddress,
    headers: HeaderMap,
    Form(fields): Form<Fields>,
) -> PageResult {
    let services = Services::from_ctx(&ctx).map_err(IntoResponse::into_response)?;
    let sent = fields.get("csrf").map_or("", String::as_str);
    let expected = cookie(&headers, LOGIN_COOKIE).unwrap_or_default();
    if sent.is_empty() || !constant_time_eq(sent, &expected) {
        return Err((
            StatusCode::FORBIDDEN,
            Html("<h1>403</h1><p>The sign-in form's security token is missing or stale. Go back, reload the page and try again.</p>"),
        )
            .into_response());
    }
    let email = fields
        .get("email")
        .map(|e| e.trim().to_lowercase())
        .unwrap_or_default();
    let password = fields.get("password").cloned().unwrap_or_default();
    let throttle_key = format!("admin:{email}");
    if let Err(wait) = services.logins.begin(&address, &throttle_key) {
        return login_form(
            &v,
            StatusCode::TOO_MANY_REQUESTS,
            json!({"email": email, "error": format!("Too many failed sign-ins. Try again in {} s.", wait.as_secs().max(1))}),
        );
    }
    let admin = admins::Model::find_by_email(&ctx.db, &email)
        .await
        .map_err(internal)?;
    // The argon2 check runs off the async runtime, and runs for unknown emails too (against a
    // decoy hash), so a sign-in's time does not tell which emails are admins.
    let permit = services
        .password_check()
        .map_err(IntoResponse::into_response)?;
    let verified = tokio::task::spawn_blocking({
        let admin = admin.clone();
        move || match admin {
            Some(a) => a.verify_password(&password),
            None => {
                admins::verify_decoy(&password);
                false
            }
        }
    })
    .await
    .map_err(internal)?;
    drop(permit);
    match admin {
        Some(admin) if verified => {
            services.logins.succeeded(&address, &throttle_key);
            start_session(&ctx, &services, admin.id).await
        }
        _ => login_form(
            &v,
            StatusCode::UNAUTHORIZED,
            json!({"email": email, "error": "Wrong email or password."}),
        ),
    }
}

pub(super) async fn logout(State(ctx): State<AppContext>, form: AdminForm) -> PageResult {
    admin_sessions::end(&ctx.db, &form.admin.token)
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
    if !services.setup.is_valid(token) {
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

pub(super) async fn setup_page(
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

pub(super) async fn setup(
    State(ctx): State<AppContext>,
    ViewEngine(v): ViewEngine<TeraView>,
    Form(fields): Form<Fields>,
) -> PageResult {
    let services = Services::from_ctx(&ctx).map_err(IntoResponse::into_response)?;
    let token = fields.get("token").cloned().unwrap_or_default();
    if !setup_open(&ctx, &services, &token).await? {
        return setup_gone(&v);
    }
    // Taken before the admin is created, in one step: of two posts racing with the same link,
    // one gets it and the other the used-up page. Given back if the form needs another try.
    let Some(claim) = services.setup.take(&token) else {
        return setup_gone(&v);
    };
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
            Ok(admin) => return start_session(&ctx, &services, admin.id).await,
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
    services.setup.give_back(claim);
    render(
        &v,
        StatusCode::UNPROCESSABLE_ENTITY,
        "dashboard/setup.html",
        &json!({"token": token, "email": email, "errors": errors}),
    )
}
