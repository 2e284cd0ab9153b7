//! Seed 002's users, managed (admin keys only): `GET /api/users`, `GET`/`PATCH`/`DELETE
//! /api/users/{username}`, `POST /api/users/{username}/reset`. Seed 002 adds users with
//! `POST /db_request/add_user/` ([`crate::controllers::compat::seed002`]); these routes do the
//! rest its database held: enable or disable (a disabled user's tokens stop at once), change
//! the role, password or token limits, reset the counters, delete (its tokens revoked).

use axum::{
    extract::{Path, State},
    response::{IntoResponse, Response},
    Json,
};
use loco_rs::{app::AppContext, controller::Routes};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::{
    errors::{ApiError, ApiResult, ErrorCode},
    extractors::{AdminCaller, JsonBody},
    models::{
        users::{self, Role, UserChanges},
        ModelError,
    },
};

/// A user as the admin API shows it (never the password hash).
fn user_json(u: &users::Model) -> Value {
    json!({
        "username": u.username,
        "role": u.role,
        "enabled": u.enabled,
        "prompt_token_limit": u.prompt_token_limit,
        "prompt_token_number": u.prompt_tokens_used,
        "gen_token_limit": u.gen_token_limit,
        "gen_token_number": u.gen_tokens_used,
        "created_at": u.created_at.to_rfc3339(),
        "updated_at": u.updated_at.to_rfc3339(),
    })
}

fn user_error(e: ModelError) -> ApiError {
    match e {
        ModelError::NotFound(m) => ApiError::new(ErrorCode::UserNotFound, m),
        ModelError::Invalid(m) => ApiError::new(ErrorCode::InvalidUser, m),
        other => other.into(),
    }
}

/// A field that may be set to a number, set to `null` (no limit), or left out.
fn limit(value: Option<Value>, field: &str) -> ApiResult<Option<Option<i64>>> {
    match value {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(None)),
        Some(v) => v.as_i64().map(|n| Some(Some(n))).ok_or_else(|| {
            ApiError::new(
                ErrorCode::InvalidUser,
                format!("`{field}` must be a whole number or null"),
            )
        }),
    }
}

/// A field that was sent, `null` included (serde reads a `null` `Option` as absent).
fn sent<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ChangeRequest {
    enabled: Option<bool>,
    role: Option<String>,
    password: Option<String>,
    #[serde(default, deserialize_with = "sent")]
    #[schema(value_type = Option<i64>)]
    prompt_token_limit: Option<Value>,
    #[serde(default, deserialize_with = "sent")]
    #[schema(value_type = Option<i64>)]
    gen_token_limit: Option<Value>,
}

#[tracing::instrument(skip_all, fields(api_key))]
async fn list(
    State(ctx): State<AppContext>,
    AdminCaller(_key): AdminCaller,
) -> ApiResult<Response> {
    let all = users::list(&ctx.db).await?;
    let data: Vec<Value> = all.iter().map(user_json).collect();
    Ok(Json(json!({"object": "list", "data": data})).into_response())
}

#[tracing::instrument(skip_all, fields(api_key, user = %username))]
async fn show(
    State(ctx): State<AppContext>,
    AdminCaller(_key): AdminCaller,
    Path(username): Path<String>,
) -> ApiResult<Response> {
    let user = users::Model::find_by_username(&ctx.db, &username)
        .await?
        .ok_or_else(|| user_error(ModelError::NotFound(format!("no user {username:?}"))))?;
    Ok(Json(user_json(&user)).into_response())
}

/// `PATCH /api/users/{username}`: any of `enabled`, `role`, `password`,
/// `prompt_token_limit`, `gen_token_limit` (`null` removes a limit).
#[tracing::instrument(skip_all, fields(api_key, user = %username))]
async fn change(
    State(ctx): State<AppContext>,
    AdminCaller(key): AdminCaller,
    Path(username): Path<String>,
    body: Result<JsonBody<ChangeRequest>, ApiError>,
) -> ApiResult<Response> {
    let JsonBody(body) = body?;
    let changes = UserChanges {
        enabled: body.enabled,
        role: body
            .role
            .as_deref()
            .map(Role::parse)
            .transpose()
            .map_err(user_error)?,
        password: body.password,
        prompt_token_limit: limit(body.prompt_token_limit, "prompt_token_limit")?,
        gen_token_limit: limit(body.gen_token_limit, "gen_token_limit")?,
        reset_counters: false,
    };
    let user = users::ActiveModel::change(&ctx.db, &username, changes)
        .await
        .map_err(user_error)?;
    tracing::info!(admin = %key.prefix, enabled = user.enabled, "user changed");
    Ok(Json(user_json(&user)).into_response())
}

/// `POST /api/users/{username}/reset`: both token counters back to zero.
#[tracing::instrument(skip_all, fields(api_key, user = %username))]
async fn reset(
    State(ctx): State<AppContext>,
    AdminCaller(key): AdminCaller,
    Path(username): Path<String>,
) -> ApiResult<Response> {
    let changes = UserChanges {
        reset_counters: true,
        ..UserChanges::default()
    };
    let user = users::ActiveModel::change(&ctx.db, &username, changes)
        .await
        .map_err(user_error)?;
    tracing::info!(admin = %key.prefix, "user counters reset");
    Ok(Json(user_json(&user)).into_response())
}

/// `DELETE /api/users/{username}`: its tokens revoked, the user and its conversations gone.
#[tracing::instrument(skip_all, fields(api_key, user = %username))]
async fn remove(
    State(ctx): State<AppContext>,
    AdminCaller(key): AdminCaller,
    Path(username): Path<String>,
) -> ApiResult<Response> {
    let user = users::ActiveModel::remove(&ctx.db, &username)
        .await
        .map_err(user_error)?;
    tracing::info!(admin = %key.prefix, "user deleted");
    Ok(Json(json!({"deleted": user_json(&user)})).into_response())
}

pub fn routes() -> Routes {
    Routes::new()
        .add("/api/users", axum::routing::get(list))
        .add(
            "/api/users/{username}",
            axum::routing::get(show).patch(change).delete(remove),
        )
        .add("/api/users/{username}/reset", axum::routing::post(reset))
}
