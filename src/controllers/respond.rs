//! What every route family's handlers share: admitting a converted body ([`admit`]), and
//! shaping admitted jobs into answers: the job as JSON, 202 for a job still pending, the
//! failure of a job that failed, and OpenAI-named `usage`.

use axum::{
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use serde_json::{json, Value};

use loco_rs::app::AppContext;

use crate::{
    admission::{Admitted, Input, Ticket},
    errors::{ApiError, ApiResult},
    extractors::JsonBody,
    models::{api_keys, jobs},
    services::Services,
};

/// Converts a route's JSON body into the admission input `I` and admits it for `key`.
///
/// # Errors
/// The body's own rejection (400/413/422), its conversion's, or the admission's.
pub async fn admit<B, I>(
    ctx: &AppContext,
    key: &api_keys::Model,
    body: ApiResult<JsonBody<B>>,
    ticket: Ticket,
) -> ApiResult<Admitted>
where
    I: TryFrom<B, Error = ApiError> + Into<Input>,
{
    let services = Services::from_ctx(ctx)?;
    let JsonBody(body) = body?;
    services
        .admission
        .admit(key, I::try_from(body)?, ticket)
        .await
}

/// `usage` in OpenAI's names, used by every route that reports tokens; prompt tokens found in
/// the engine's KV cache (prefix reuse) are in `prompt_tokens_details.cached_tokens`.
#[must_use]
pub fn usage_json(job: &jobs::Model) -> Value {
    json!({
        "prompt_tokens": job.prompt_tokens,
        "completion_tokens": job.generated_tokens,
        "total_tokens": job.prompt_tokens + job.generated_tokens,
        "prompt_tokens_details": {"cached_tokens": job.cached_tokens},
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
/// 500 `generation_failed` when the worker failed the job (its call was refunded); a remote
/// model's `upstream_error` (502), `upstream_timeout` (504) or `context_length_exceeded` (400).
pub fn settled(job: jobs::Model) -> ApiResult<jobs::Model> {
    if job.status == jobs::DONE {
        Ok(job)
    } else {
        let reason = job.error.unwrap_or_default();
        // A remote model's upstream failures keep their own code (502/504/400).
        Err(ApiError::new(
            crate::errors::ErrorCode::of_job_failure(&reason),
            format!("job {} failed: {reason} (the call was refunded)", job.id),
        ))
    }
}

/// An admitted job as a route's answer: `body(job)` once done, 202 while pending, or the
/// failure. (A streaming admission is answered by its route; here it counts as pending.)
///
/// # Errors
/// 500 `generation_failed` when the job failed.
pub fn answer(admitted: Admitted, body: impl FnOnce(&jobs::Model) -> Value) -> ApiResult<Response> {
    try_answer(admitted, |job| Ok(body(job)))
}

/// [`answer`] with a body that may fail (a stored result that does not parse).
///
/// # Errors
/// 500 `generation_failed` when the job failed, or what `body` returns.
pub fn try_answer(
    admitted: Admitted,
    body: impl FnOnce(&jobs::Model) -> ApiResult<Value>,
) -> ApiResult<Response> {
    match admitted {
        Admitted::Finished(job) => {
            let job = settled(job)?;
            Ok(Json(body(&job)?).into_response())
        }
        Admitted::Pending(job) => Ok(accepted(&job)),
        Admitted::Streaming(stream) => Ok(accepted(&stream.job)),
    }
}
