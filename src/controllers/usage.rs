//! `GET /usage/`: the calling key's usage per day (seed 003 reported words per day), and its
//! token budgets (and its user's, for seed 002 login tokens).

use axum::{
    extract::{Query, State},
    response::{IntoResponse, Response},
    Json,
};
use chrono::{Duration, NaiveDate};
use loco_rs::{app::AppContext, controller::Routes};
use serde::Deserialize;
use serde_json::json;

use crate::{
    errors::{ApiError, ApiResult},
    extractors::ApiKey,
    models::{now, usage_records, users},
};

/// Longest range one request may ask for.
const MAX_DAYS: i64 = 366;

#[derive(Debug, Deserialize)]
struct UsageQuery {
    from: Option<String>,
    to: Option<String>,
}

fn parse_day(field: &str, value: Option<&str>, default: NaiveDate) -> ApiResult<NaiveDate> {
    value.map_or(Ok(default), |v| {
        NaiveDate::parse_from_str(v, "%Y-%m-%d").map_err(|_| {
            ApiError::unprocessable(
                "invalid_date",
                format!("`{field}` must be a date like 2026-01-31, got {v:?}"),
            )
        })
    })
}

async fn usage(
    State(ctx): State<AppContext>,
    ApiKey(key): ApiKey,
    query: Result<Query<UsageQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let Query(query) =
        query.map_err(|e| ApiError::unprocessable("invalid_query", e.body_text()))?;
    let today = now().date_naive();
    let to = parse_day("to", query.to.as_deref(), today)?;
    let from = parse_day("from", query.from.as_deref(), to - Duration::days(29))?;
    if from > to || (to - from).num_days() >= MAX_DAYS {
        return Err(ApiError::unprocessable(
            "invalid_range",
            format!("`from` must be on or before `to` and at most {MAX_DAYS} days apart"),
        ));
    }
    let days = usage_records::daily(&ctx.db, key.id, from, to).await?;
    let user = match key.user_id {
        Some(id) => users::Model::find(&ctx.db, id).await?.map(|u| {
            json!({
                "username": u.username,
                "role": u.role,
                "prompt_token_limit": u.prompt_token_limit,
                "prompt_tokens_used": u.prompt_tokens_used,
                "gen_token_limit": u.gen_token_limit,
                "gen_tokens_used": u.gen_tokens_used,
            })
        }),
        None => None,
    };
    let total = |f: fn(&usage_records::DailyUsage) -> i64| days.iter().map(f).sum::<i64>();
    Ok(Json(json!({
        "key": {
            "prefix": key.prefix,
            "name": key.name,
            "calls_used": key.calls_used,
            "max_calls": key.max_calls,
            "valid_from": key.valid_from.map(|t| t.to_rfc3339()),
            "valid_until": key.valid_until.map(|t| t.to_rfc3339()),
            "prompt_token_limit": key.prompt_token_limit,
            "prompt_tokens_used": key.prompt_tokens_used,
            "gen_token_limit": key.gen_token_limit,
            "gen_tokens_used": key.gen_tokens_used,
        },
        "user": user,
        "from": from,
        "to": to,
        "days": days,
        "total": {
            "requests": total(|d| d.requests),
            "prompt_tokens": total(|d| d.prompt_tokens),
            "generated_tokens": total(|d| d.generated_tokens),
            "words": total(|d| d.words),
        },
    }))
    .into_response())
}

pub fn routes() -> Routes {
    Routes::new().add("/usage", axum::routing::get(usage))
}
