//! Users (seed 002's accounts): the list with their token budgets, adding one, and the actions
//! the admin API has (`/api/users/{username}`): enable, disable, reset counters, delete.

use axum::{
    extract::{Path, State},
    http::StatusCode,
};
use loco_rs::{
    app::AppContext,
    controller::views::{engines::TeraView, ViewEngine},
};
use serde_json::{json, Map, Value};

use super::{internal, not_found_page, render, see_other, AdminForm, Fields, PageResult, SignedIn};
use crate::models::{
    users::{self, NewUser, Role, UserChanges},
    ModelError,
};

fn user_row(u: &users::Model) -> Value {
    json!({
        "username": u.username,
        "role": u.role,
        "enabled": u.enabled,
        "prompt_tokens_used": u.prompt_tokens_used,
        "prompt_token_limit": u.prompt_token_limit,
        "gen_tokens_used": u.gen_tokens_used,
        "gen_token_limit": u.gen_token_limit,
        "created": u.created_at.format("%Y-%m-%d").to_string(),
    })
}

pub(super) async fn page(
    State(ctx): State<AppContext>,
    admin: SignedIn,
    ViewEngine(v): ViewEngine<TeraView>,
) -> PageResult {
    view(
        &ctx,
        &admin,
        &v,
        StatusCode::OK,
        &Fields::new(),
        &Map::new(),
    )
    .await
}

async fn view(
    ctx: &AppContext,
    admin: &SignedIn,
    v: &TeraView,
    status: StatusCode,
    form: &Fields,
    errors: &Map<String, Value>,
) -> PageResult {
    let rows: Vec<Value> = users::list(&ctx.db)
        .await
        .map_err(internal)?
        .iter()
        .map(user_row)
        .collect();
    render(
        v,
        status,
        "dashboard/users.html",
        &admin.page(json!({"users": rows, "form": form, "errors": errors})),
    )
}

/// An optional whole number of 0 or more from the form; `Err` holds the message.
fn limit(fields: &Fields, name: &str) -> Result<Option<i64>, String> {
    match fields.get(name).map(|v| v.trim()).filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(raw) => match raw.parse::<i64>() {
            Ok(n) if n >= 0 => Ok(Some(n)),
            _ => Err("A whole number, 0 or more (empty: no limit).".into()),
        },
    }
}

pub(super) async fn create(
    State(ctx): State<AppContext>,
    ViewEngine(v): ViewEngine<TeraView>,
    AdminForm { admin, fields }: AdminForm,
) -> PageResult {
    let mut errors = Map::new();
    let mut take = |name: &str| {
        limit(&fields, name).unwrap_or_else(|m| {
            errors.insert(name.into(), json!(m));
            None
        })
    };
    let prompt_token_limit = take("prompt_token_limit");
    let gen_token_limit = take("gen_token_limit");
    let role = match Role::parse(fields.get("role").map_or("user", String::as_str)) {
        Ok(r) => r,
        Err(e) => {
            errors.insert("role".into(), json!(e.to_string()));
            Role::default()
        }
    };
    if !errors.is_empty() {
        return view(
            &ctx,
            &admin,
            &v,
            StatusCode::UNPROCESSABLE_ENTITY,
            &fields,
            &errors,
        )
        .await;
    }
    let new = NewUser {
        username: fields.get("username").cloned().unwrap_or_default(),
        password: fields.get("password").cloned().unwrap_or_default(),
        role,
        enabled: true,
        prompt_token_limit,
        gen_token_limit,
        prompt_tokens_used: 0,
        gen_tokens_used: 0,
        min_password_chars: users::MIN_PASSWORD_CHARS,
    };
    match users::ActiveModel::create(&ctx.db, new).await {
        Ok(user) => {
            tracing::info!(user = %user.username, admin = %admin.admin.email, "user added from the dashboard");
            Ok(see_other("/admin/users"))
        }
        Err(e @ (ModelError::Invalid(_) | ModelError::Conflict(_))) => {
            let target = if e.to_string().contains("password") {
                "password"
            } else {
                "username"
            };
            errors.insert(target.into(), json!(e.to_string()));
            let mut form = fields.clone();
            form.remove("password");
            view(
                &ctx,
                &admin,
                &v,
                StatusCode::UNPROCESSABLE_ENTITY,
                &form,
                &errors,
            )
            .await
        }
        Err(e) => Err(internal(e)),
    }
}

/// `POST /admin/users/{username}/{action}`: `enable`, `disable`, `reset` or `delete`.
pub(super) async fn act(
    State(ctx): State<AppContext>,
    Path((username, action)): Path<(String, String)>,
    AdminForm { admin, .. }: AdminForm,
) -> PageResult {
    let change = |changes| users::ActiveModel::change(&ctx.db, &username, changes);
    let done = match action.as_str() {
        "enable" | "disable" => change(UserChanges {
            enabled: Some(action == "enable"),
            ..UserChanges::default()
        })
        .await
        .map(|_| ()),
        "reset" => change(UserChanges {
            reset_counters: true,
            ..UserChanges::default()
        })
        .await
        .map(|_| ()),
        "delete" => users::ActiveModel::remove(&ctx.db, &username)
            .await
            .map(|_| ()),
        _ => return Err(not_found_page("No such action.")),
    };
    match done {
        Ok(()) => {
            tracing::info!(user = %username, action = %action, admin = %admin.admin.email, "user changed from the dashboard");
            Ok(see_other("/admin/users"))
        }
        Err(ModelError::NotFound(_)) => Err(not_found_page("No such user.")),
        Err(e) => Err(internal(e)),
    }
}
