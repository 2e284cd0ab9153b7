//! Seed 003's API: `POST /api/` (and its alias `POST /analyze/`) with `{"text": …}` →
//! `{"message": …}`, plus `GET /api/jobs/{id}` for results that outlived the wait.
//! Spec: ../shared/seeds/003 (djangollmapi).

use axum::{
    extract::{Path, State},
    http::{header, StatusCode},
    response::{
        sse::{Event, KeepAlive, Sse},
        IntoResponse, Response,
    },
    Json,
};
use futures::StreamExt;
use loco_rs::{app::AppContext, controller::Routes};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::{
    engine::{ChatMessage, GenerationRequest, Prompt},
    errors::{ApiError, ApiResult},
    extractors::{ApiKey, JsonBody},
    models::jobs,
    notify::{job_updates, JobUpdate},
    services::{Services, Submission},
    validation::{prompt_text, HeadInput, SamplingInput},
};

#[derive(Debug, Deserialize)]
struct ApiRequest {
    text: String,
    /// Optional `model` (`base` or `base:adapter`), `lora`/`head` and `scale`.
    #[serde(flatten)]
    head: HeadInput,
    #[serde(flatten)]
    sampling: SamplingInput,
}

/// `usage` in OpenAI's names, used by every route that reports tokens.
#[must_use]
pub fn usage_json(job: &jobs::Model) -> Value {
    json!({
        "prompt_tokens": job.prompt_tokens,
        "completion_tokens": job.generated_tokens,
        "total_tokens": job.prompt_tokens + job.generated_tokens,
    })
}

fn millis_between(
    a: Option<sea_orm::prelude::DateTimeWithTimeZone>,
    b: Option<sea_orm::prelude::DateTimeWithTimeZone>,
) -> Option<i64> {
    Some((b? - a?).num_milliseconds())
}

/// The public view of a job record.
#[must_use]
pub fn job_json(job: &jobs::Model) -> Value {
    json!({
        "job_id": job.id,
        "status": job.status,
        "model": job.model,
        "message": job.result,
        "error": job.error,
        "finish_reason": job.finish_reason,
        "usage": usage_json(job),
        "attempts": job.attempts,
        "queued_at": job.queued_at.to_rfc3339(),
        "started_at": job.started_at.map(|t| t.to_rfc3339()),
        "finished_at": job.finished_at.map(|t| t.to_rfc3339()),
        "timings": {
            "queue_ms": millis_between(Some(job.queued_at), job.started_at),
            "run_ms": millis_between(job.started_at, job.finished_at),
            "total_ms": millis_between(Some(job.queued_at), job.finished_at),
        },
    })
}

/// 202 with where to poll.
#[must_use]
pub fn accepted(job: &jobs::Model) -> Response {
    let location = format!("/api/jobs/{}", job.id);
    (
        StatusCode::ACCEPTED,
        [(header::LOCATION, location.clone())],
        Json(json!({
            "job_id": job.id,
            "status": job.status,
            "poll_url": location,
        })),
    )
        .into_response()
}

/// A settled job as the waiting request's answer, or the error it ended with.
///
/// # Errors
/// 500 `generation_failed` when the worker failed the job (its call was refunded).
pub fn settled(job: jobs::Model) -> ApiResult<jobs::Model> {
    if job.status == jobs::DONE {
        Ok(job)
    } else {
        Err(ApiError::generation_failed(format!(
            "job {} failed: {} (the call was refunded)",
            job.id,
            job.error.unwrap_or_default()
        )))
    }
}

/// Submits a request and answers with `body(job)` once it is done, 202 while it is pending, or
/// the failure. Every generation route goes through here.
///
/// # Errors
/// Whatever the submission or the job ended with.
pub async fn run(
    ctx: &AppContext,
    services: &Services,
    key: &crate::models::api_keys::Model,
    endpoint: &str,
    work: impl Into<crate::queue::Work>,
    client_ref: Option<&str>,
    body: impl FnOnce(&jobs::Model) -> Value,
) -> ApiResult<Response> {
    match services
        .submit_and_wait(&ctx.db, key, endpoint, work, client_ref)
        .await?
    {
        Submission::Pending(job) => Ok(accepted(&job)),
        Submission::Finished(job) => {
            let job = settled(job)?;
            Ok(Json(body(&job)).into_response())
        }
    }
}

/// Seed 003's body as an engine request: `text` as one user turn of the chat template, on the
/// served model or the LoRA head the body names.
async fn api_request(
    ctx: &AppContext,
    services: &Services,
    key: &crate::models::api_keys::Model,
    body: ApiRequest,
) -> ApiResult<GenerationRequest> {
    prompt_text("text", &body.text)?;
    let params = body.sampling.into_params(&services.settings.api)?;
    let resolved = services
        .resolve_model(&ctx.db, key, body.head.into_choice())
        .await?;
    let prompt = Prompt::Chat {
        messages: vec![ChatMessage {
            role: "user".into(),
            content: body.text,
        }],
    };
    Ok(resolved.request(prompt, params))
}

#[tracing::instrument(skip_all, fields(api_key))]
async fn generate(
    State(ctx): State<AppContext>,
    ApiKey(key): ApiKey,
    body: Result<JsonBody<ApiRequest>, ApiError>,
) -> ApiResult<Response> {
    let services = Services::from_ctx(&ctx)?;
    services.precheck(&key).await?;
    let JsonBody(body) = body?;
    let request = api_request(&ctx, &services, &key, body).await?;
    run(&ctx, &services, &key, "/api/", request, None, |job| {
        json!({
            "message": job.result.clone().unwrap_or_default(),
            "job_id": job.id,
            "model": job.model,
            "finish_reason": job.finish_reason,
            "usage": usage_json(job),
        })
    })
    .await
}

/// `POST /api/jobs`: the same request as `POST /api/`, answered at once with 202 and the job
/// id; the client polls `GET /api/jobs/{id}`.
#[tracing::instrument(skip_all, fields(api_key))]
async fn submit_job(
    State(ctx): State<AppContext>,
    ApiKey(key): ApiKey,
    body: Result<JsonBody<ApiRequest>, ApiError>,
) -> ApiResult<Response> {
    let services = Services::from_ctx(&ctx)?;
    services.precheck(&key).await?;
    let JsonBody(body) = body?;
    let request = api_request(&ctx, &services, &key, body).await?;
    match services
        .submit(&ctx.db, &key, "/api/jobs", request, None, false)
        .await?
    {
        Submission::Pending(job) | Submission::Finished(job) => Ok(accepted(&job)),
    }
}

#[tracing::instrument(skip_all, fields(api_key, job_id = %id))]
async fn job_status(
    State(ctx): State<AppContext>,
    ApiKey(key): ApiKey,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let Some(job) = jobs::Model::find_for_key(&ctx.db, &id, key.id).await? else {
        return Err(ApiError::not_found(
            "job_not_found",
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
    ApiKey(key): ApiKey,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let services = Services::from_ctx(&ctx)?;
    if jobs::Model::find_for_key(&ctx.db, &id, key.id)
        .await?
        .is_none()
    {
        return Err(ApiError::not_found(
            "job_not_found",
            format!("no job {id} for this key"),
        ));
    }
    // Subscribe first, then read: a job settling in between is still seen.
    let deltas = services.events.subscribe_deltas(&id);
    let done = services.events.subscribe(&id);
    let current = jobs::Model::find_for_key(&ctx.db, &id, key.id)
        .await?
        .ok_or_else(|| ApiError::not_found("job_not_found", format!("no job {id} for this key")))?;
    let updates: std::pin::Pin<Box<dyn futures::Stream<Item = JobUpdate> + Send>> =
        if current.is_finished() {
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

pub fn routes() -> Routes {
    Routes::new()
        // Trailing-slash forms (`/api/`, seed 003's URL) reach these through
        // `app::into_service`, which trims the slash before routing.
        .add("/api", axum::routing::post(generate))
        .add("/analyze", axum::routing::post(generate))
        .add("/api/jobs", axum::routing::post(submit_job))
        .add("/api/jobs/{id}", axum::routing::get(job_status))
        .add("/api/jobs/{id}/events", axum::routing::get(job_events))
}
