//! Tollgate's own API, which is seed 003's (djangollmapi): `POST /api/` (and its alias
//! `POST /analyze/`) with `{"text": …}` → `{"message": …}`; `POST /api/jobs` answering 202 at
//! once; `GET /api/jobs/{id}` and its server-sent events for results that outlive a request;
//! `GET /usage/` for the calling key's usage. Spec: ../shared/seeds/003.

use axum::{
    extract::{Path, Query, State},
    response::{
        sse::{Event, KeepAlive, Sse},
        IntoResponse, Response,
    },
    Json,
};
use chrono::{Datelike, Duration, NaiveDate};
use futures::StreamExt;
use loco_rs::{app::AppContext, controller::Routes};
use serde::Deserialize;
use serde_json::json;

use super::respond::{accepted, admit, answer, job_json, usage_json};
use crate::{
    admission::{Admitted, Follow, GenerationInput, HeadInput, SamplingInput, Ticket},
    errors::{ApiError, ApiResult, ErrorCode},
    extractors::{Caller, JsonBody, MeteredCaller},
    models::{jobs, now, usage_records, users},
    notify::{job_updates, JobUpdate},
    services::Services,
};

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub(crate) struct ApiRequest {
    text: String,
    /// Optional `model` (`base` or `base:adapter`), `lora`/`head` and `scale`.
    #[serde(flatten)]
    head: HeadInput,
    #[serde(flatten)]
    sampling: SamplingInput,
}

impl TryFrom<ApiRequest> for GenerationInput {
    type Error = ApiError;

    /// `text` as one user turn of the chat template.
    fn try_from(body: ApiRequest) -> Result<Self, ApiError> {
        Self::user_turn("text", body.text, body.sampling, body.head.into())
    }
}

#[tracing::instrument(skip_all, fields(api_key))]
async fn generate(
    State(ctx): State<AppContext>,
    MeteredCaller(key): MeteredCaller,
    body: Result<JsonBody<ApiRequest>, ApiError>,
) -> ApiResult<Response> {
    let ticket = Ticket::wait("/api/");
    let admitted = admit::<_, GenerationInput>(&ctx, &key, body, ticket).await?;
    answer(admitted, |job| {
        json!({
            "message": job.result.clone().unwrap_or_default(),
            "job_id": job.id,
            "model": job.model,
            "finish_reason": job.finish_reason,
            "usage": usage_json(job),
        })
    })
}

/// `GET /api/`: djangollmapi's answer to a GET, for clients that probe the route.
#[tracing::instrument(skip_all, fields(api_key))]
async fn use_post(Caller(_key): Caller) -> Json<serde_json::Value> {
    Json(json!({"message": "Use a post request."}))
}

/// `POST /api/jobs`: the same request as `POST /api/`, answered at once with 202 and the job
/// id; the client polls `GET /api/jobs/{id}`.
#[tracing::instrument(skip_all, fields(api_key))]
async fn submit_job(
    State(ctx): State<AppContext>,
    MeteredCaller(key): MeteredCaller,
    body: Result<JsonBody<ApiRequest>, ApiError>,
) -> ApiResult<Response> {
    let ticket = Ticket::wait("/api/jobs").follow(Follow::Nothing);
    match admit::<_, GenerationInput>(&ctx, &key, body, ticket).await? {
        Admitted::Pending(job) | Admitted::Finished(job) => Ok(accepted(&job)),
        Admitted::Streaming(stream) => Ok(accepted(&stream.job)),
    }
}

#[tracing::instrument(skip_all, fields(api_key, job_id = %id))]
async fn job_status(
    State(ctx): State<AppContext>,
    Caller(key): Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let Some(job) = jobs::Model::find_for_key(&ctx.db, &id, key.id).await? else {
        return Err(ApiError::new(
            ErrorCode::JobNotFound,
            format!("no job {id} for this key"),
        ));
    };
    Ok(Json(job_json(&job)).into_response())
}

fn done_event(job: &jobs::Model) -> Event {
    Event::default()
        .event("done")
        .data(job_json(job).to_string())
}

fn token_event(text: &str) -> Event {
    Event::default()
        .event("token")
        .data(json!({ "text": text }).to_string())
}

/// `GET /api/jobs/{id}/events`: server-sent events, `token` (`{"text": delta}`) as the job
/// generates, then one `done` with the job record. A client that connects (or reconnects)
/// after the job settled gets the `done` event at once.
#[tracing::instrument(skip_all, fields(api_key, job_id = %id))]
async fn job_events(
    State(ctx): State<AppContext>,
    Caller(key): Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let services = Services::from_ctx(&ctx)?;
    if jobs::Model::find_for_key(&ctx.db, &id, key.id)
        .await?
        .is_none()
    {
        return Err(ApiError::new(
            ErrorCode::JobNotFound,
            format!("no job {id} for this key"),
        ));
    }
    // Subscribe first, then read: a job settling in between is still seen.
    let deltas = services.events.subscribe_deltas(&id);
    let done = services.events.subscribe(&id);
    let current = jobs::Model::find_for_key(&ctx.db, &id, key.id)
        .await?
        .ok_or_else(|| {
            ApiError::new(ErrorCode::JobNotFound, format!("no job {id} for this key"))
        })?;
    let updates: std::pin::Pin<Box<dyn futures::Stream<Item = JobUpdate> + Send>> =
        if current.is_finished() {
            drop((deltas, done));
            services.events.forget(&id);
            Box::pin(futures::stream::once(async move {
                JobUpdate::Done(Box::new(current))
            }))
        } else {
            Box::pin(job_updates(deltas, done))
        };
    let stream = updates
        .map(|update| match update {
            JobUpdate::Delta(text) => token_event(&text),
            JobUpdate::Skipped(n) => Event::default().comment(format!(
                "{n} deltas skipped; the done event has the full text"
            )),
            JobUpdate::Done(job) => done_event(&job),
        })
        .map(Ok::<Event, std::convert::Infallible>);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// Longest range one request may ask for.
const MAX_DAYS: i64 = 366;
/// Longest range of seed 003's `/usage/` (whose default is the key's whole life).
const SEED_MAX_DAYS: i64 = 3660;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub(crate) struct UsageQuery {
    /// First day, `YYYY-MM-DD`.
    #[param(format = Date)]
    from: Option<String>,
    /// Last day, `YYYY-MM-DD` (default: today).
    #[param(format = Date)]
    to: Option<String>,
}

fn parse_day(field: &str, value: Option<&str>, default: NaiveDate) -> ApiResult<NaiveDate> {
    let Some(v) = value else {
        return Ok(default);
    };
    NaiveDate::parse_from_str(v, "%Y-%m-%d")
        .ok()
        .filter(|d| (1970..=9999).contains(&d.year()))
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::InvalidDate,
                format!("`{field}` must be a date from 1970-01-01 to 9999-12-31 like 2026-01-31, got {v:?}"),
            )
        })
}

/// `from`..`to` of a usage query: `to` defaults to today, `from` to `default_from(to)`; at
/// most `max_days` apart.
fn day_range(
    query: Result<Query<UsageQuery>, axum::extract::rejection::QueryRejection>,
    default_from: impl FnOnce(NaiveDate) -> Option<NaiveDate>,
    max_days: i64,
) -> ApiResult<(NaiveDate, NaiveDate)> {
    let Query(query) = query.map_err(|e| ApiError::new(ErrorCode::InvalidQuery, e.body_text()))?;
    let to = parse_day("to", query.to.as_deref(), now().date_naive())?;
    let fallback = default_from(to).ok_or_else(|| {
        ApiError::new(
            ErrorCode::InvalidDate,
            format!("`to` is out of range: {to}"),
        )
    })?;
    let from = parse_day("from", query.from.as_deref(), fallback)?;
    if from > to || (to - from).num_days() >= max_days {
        return Err(ApiError::new(
            ErrorCode::InvalidRange,
            format!("`from` must be on or before `to` and at most {max_days} days apart"),
        ));
    }
    Ok((from, to))
}

/// `GET /usage/`, as seed 003 (djangollmapi) answered it: a list of `{"day", "total_words"}`,
/// oldest first, one entry per day with requests, `day` being that day's midnight (UTC) and
/// `total_words` the words of the texts the key sent that day. Optional `from`/`to` dates;
/// by default every day since the key was created.
#[tracing::instrument(skip_all, fields(api_key))]
async fn seed_usage(
    State(ctx): State<AppContext>,
    Caller(key): Caller,
    query: Result<Query<UsageQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let created = key.created_at.date_naive();
    let (from, to) = day_range(query, |to| Some(created.min(to)), SEED_MAX_DAYS)?;
    let days: Vec<_> = usage_records::daily_input_words(&ctx.db, key.id, from, to)
        .await?
        .into_iter()
        .map(|d| {
            json!({
                "day": format!("{}T00:00:00Z", d.day.format("%Y-%m-%d")),
                "total_words": d.total_words,
            })
        })
        .collect();
    Ok(Json(days).into_response())
}

/// `GET /api/usage`: the calling key's usage per day (requests, prompt and generated tokens,
/// output words) over `from`..`to` (default: the last 30 days), its counters and token budgets
/// (and its user's, for seed 002 login tokens).
#[tracing::instrument(skip_all, fields(api_key))]
async fn usage_report(
    State(ctx): State<AppContext>,
    Caller(key): Caller,
    query: Result<Query<UsageQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let (from, to) = day_range(
        query,
        |to| to.checked_sub_signed(Duration::days(29)),
        MAX_DAYS,
    )?;
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
    Routes::new()
        // Trailing-slash forms (`/api/`, seed 003's URL) reach these through
        // `app::into_service`, which trims the slash before routing.
        .add("/api", axum::routing::get(use_post).post(generate))
        .add("/analyze", axum::routing::post(generate))
        .add("/api/jobs", axum::routing::post(submit_job))
        .add("/api/jobs/{id}", axum::routing::get(job_status))
        .add("/api/jobs/{id}/events", axum::routing::get(job_events))
        .add("/usage", axum::routing::get(seed_usage))
        .add("/api/usage", axum::routing::get(usage_report))
}
