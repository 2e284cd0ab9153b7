//! Keys: the list, one key's page (usage charts, recent jobs, edit form), and the forms that
//! create, edit, rotate, revoke and reactivate a key. A new or rotated key's secret is shown
//! once, on the page that answers the form.

use std::collections::HashMap;

use axum::{
    extract::{Path, Query, State},
    http::{header, HeaderValue, StatusCode},
};
use loco_rs::{
    app::AppContext,
    controller::views::{engines::TeraView, ViewEngine},
};
use serde_json::{json, Value};

use super::{
    internal,
    jobs::job_row,
    key_form::{key_form, key_params},
    not_found_page, render, see_other, AdminForm, Fields, PageResult, SignedIn,
};
use crate::{
    models::{api_keys, jobs, now, usage_records, ModelError},
    views::chart,
};

/// Days shown in a key's charts.
const CHART_DAYS: i64 = 30;

/// Keys on one page of the list.
const KEYS_PER_PAGE: u64 = 100;

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

/// The create or edit form again (422): `data` plus the fields as sent and their `errors`.
fn form_again(
    v: &TeraView,
    admin: &SignedIn,
    template: &str,
    mut data: Value,
    fields: &Fields,
    errors: Value,
) -> PageResult {
    data["form"] = json!(fields);
    data["errors"] = errors;
    render(
        v,
        StatusCode::UNPROCESSABLE_ENTITY,
        template,
        &admin.page(data),
    )
}

/// The page that shows a key's secret, the only time it is shown: never cached.
fn secret_page(v: &TeraView, status: StatusCode, data: &Value) -> PageResult {
    let mut resp = render(v, status, "dashboard/key_created.html", data)?;
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

pub(super) async fn list(
    State(ctx): State<AppContext>,
    admin: SignedIn,
    ViewEngine(v): ViewEngine<TeraView>,
    Query(q): Query<Fields>,
) -> PageResult {
    let search = q
        .get("q")
        .map(|s| s.trim().to_lowercase())
        .unwrap_or_default();
    // Anything but a whole number from 1 up is the first page.
    let page = q
        .get("page")
        .and_then(|p| p.trim().parse::<u32>().ok())
        .filter(|p| *p >= 1)
        .map_or(1, u64::from);
    let offset = (page - 1) * KEYS_PER_PAGE;
    let found = api_keys::Model::page(&ctx.db, &search, offset, KEYS_PER_PAGE)
        .await
        .map_err(internal)?;
    let rows: Vec<Value> = found.keys.iter().map(key_row).collect();
    let shown = rows.len() as u64;
    // The search, carried by the page links (`&q=…`, encoded; the template escapes the `&`).
    let q_query = if search.is_empty() {
        String::new()
    } else {
        serde_urlencoded::to_string([("q", search.as_str())])
            .map(|q| format!("&{q}"))
            .unwrap_or_default()
    };
    render(
        &v,
        StatusCode::OK,
        "dashboard/keys.html",
        &admin.page(json!({
            "keys": rows,
            "q": search,
            "q_query": q_query,
            "page": page,
            "total": found.total,
            "first": offset + 1,
            "last": offset + shown,
            "prev_page": (page > 1).then_some(page - 1),
            "next_page": (offset + shown < found.total).then_some(page + 1),
        })),
    )
}

pub(super) async fn detail(
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
    // All of this key's jobs are its own: no prefixes to name.
    let jobs: Vec<Value> = jobs::Model::recent_for_key(&ctx.db, key.id, 20)
        .await
        .map_err(internal)?
        .iter()
        .map(|j| job_row(j, &HashMap::new()))
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

pub(super) async fn new_page(admin: SignedIn, ViewEngine(v): ViewEngine<TeraView>) -> PageResult {
    render(
        &v,
        StatusCode::OK,
        "dashboard/new_key.html",
        &admin.page(json!({"form": {}})),
    )
}

pub(super) async fn create(
    State(ctx): State<AppContext>,
    ViewEngine(v): ViewEngine<TeraView>,
    AdminForm { admin, fields }: AdminForm,
) -> PageResult {
    let again = |errors| {
        form_again(
            &v,
            &admin,
            "dashboard/new_key.html",
            json!({}),
            &fields,
            errors,
        )
    };
    let params = match key_params(&fields) {
        Ok(p) => p,
        Err(errors) => return again(errors.into()),
    };
    let issued = match api_keys::ActiveModel::issue(&ctx.db, params).await {
        Ok(i) => i,
        Err(ModelError::Invalid(m)) => return again(json!({"email": m})),
        Err(e) => return Err(internal(e)),
    };
    tracing::info!(prefix = %issued.key.prefix, admin = %admin.admin.email, "key issued from the dashboard");
    secret_page(
        &v,
        StatusCode::CREATED,
        &admin.page(json!({"key": key_row(&issued.key), "secret": issued.secret})),
    )
}

pub(super) async fn edit(
    State(ctx): State<AppContext>,
    ViewEngine(v): ViewEngine<TeraView>,
    Path(prefix): Path<String>,
    AdminForm { admin, fields }: AdminForm,
) -> PageResult {
    let again = |errors| {
        let data = json!({"prefix": prefix});
        form_again(&v, &admin, "dashboard/edit_key.html", data, &fields, errors)
    };
    let params = match key_params(&fields) {
        Ok(p) => p,
        Err(errors) => return again(errors.into()),
    };
    match api_keys::ActiveModel::edit(&ctx.db, &prefix, params).await {
        Ok(key) => {
            tracing::info!(prefix = %key.prefix, admin = %admin.admin.email, "key edited from the dashboard");
            Ok(see_other(&format!("/admin/keys/{}", key.prefix)))
        }
        Err(ModelError::Invalid(m)) => again(json!({"valid_until": m})),
        Err(ModelError::NotFound(_)) => Err(not_found_page("No such key.")),
        Err(e) => Err(internal(e)),
    }
}

pub(super) async fn rotate(
    State(ctx): State<AppContext>,
    ViewEngine(v): ViewEngine<TeraView>,
    Path(prefix): Path<String>,
    AdminForm { admin, .. }: AdminForm,
) -> PageResult {
    let issued = match api_keys::ActiveModel::rotate(&ctx.db, &prefix).await {
        Ok(i) => i,
        Err(ModelError::NotFound(_)) => return Err(not_found_page("No such key.")),
        Err(e) => return Err(internal(e)),
    };
    tracing::info!(old = %prefix, new = %issued.key.prefix, admin = %admin.admin.email, "key rotated from the dashboard");
    secret_page(
        &v,
        StatusCode::OK,
        &admin.page(json!({"key": key_row(&issued.key), "secret": issued.secret, "rotated": true})),
    )
}

async fn set_revoked(ctx: &AppContext, admin: &SignedIn, prefix: &str, revoke: bool) -> PageResult {
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
        Err(ModelError::NotFound(_)) => Err(not_found_page("No such key.")),
        Err(e) => Err(internal(e)),
    }
}

pub(super) async fn revoke(
    State(ctx): State<AppContext>,
    Path(prefix): Path<String>,
    form: AdminForm,
) -> PageResult {
    set_revoked(&ctx, &form.admin, &prefix, true).await
}

pub(super) async fn reactivate(
    State(ctx): State<AppContext>,
    Path(prefix): Path<String>,
    form: AdminForm,
) -> PageResult {
    set_revoked(&ctx, &form.admin, &prefix, false).await
}
