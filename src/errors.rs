//! The one error type of the HTTP API.
//!
//! Every rejection leaves as `{"error": {"message", "type", "code"}}` (OpenAI's shape, which the
//! other compatibility routes tolerate too) with a fixed, stable `code`. Internal causes go to the
//! log; the client only sees a generic message for them.

use axum::{
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use serde_json::json;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    /// OpenAI-style error class (`invalid_request_error`, `authentication_error`, ...).
    pub kind: &'static str,
    /// Stable machine-readable code; tests and clients match on it.
    pub code: &'static str,
    pub message: String,
    /// Seconds for a `Retry-After` header (429/503).
    pub retry_after: Option<u64>,
}

pub type ApiResult<T> = std::result::Result<T, ApiError>;

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, code: &'static str, message: String) -> Self {
        Self {
            status,
            kind,
            code,
            message,
            retry_after: None,
        }
    }

    /// 400: the request cannot be parsed or breaks a hard limit.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            code,
            message.into(),
        )
    }

    /// 422: well-formed JSON whose fields are missing, mistyped or out of range.
    pub fn unprocessable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request_error",
            code,
            message.into(),
        )
    }

    /// 401: no key, an unknown key or a revoked key.
    pub fn unauthorized(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            code,
            message.into(),
        )
    }

    /// 403: a valid key used outside what it allows (its date window, a scope).
    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "permission_error",
            code,
            message.into(),
        )
    }

    /// 404.
    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found_error",
            code,
            message.into(),
        )
    }

    /// 409: the request conflicts with the current state (a taken name, a model in use).
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            "invalid_request_error",
            code,
            message.into(),
        )
    }

    /// 413: body over the configured limit.
    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "payload_too_large",
            format!("request body is larger than the limit of {limit} bytes"),
        )
    }

    /// 429: the key's call quota is used up.
    pub fn quota_exhausted(max_calls: i64) -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "insufficient_quota",
            "quota_exceeded",
            format!("this key has used all of its {max_calls} calls"),
        )
    }

    /// 429: the key sent requests faster than its rate limit allows; `Retry-After` says when
    /// the next one will be accepted. Nothing was spent.
    pub fn rate_limited(per_minute: u32, burst: u32, retry_after_secs: u64) -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "rate_limited",
            format!(
                "this key may send {per_minute} requests per minute (burst {burst}); retry in {retry_after_secs} s"
            ),
        );
        e.retry_after = Some(retry_after_secs);
        e
    }

    /// 429: a token budget (prompt or generation, of the key or of its user) cannot take the
    /// request. No `Retry-After`: budgets do not refill by themselves.
    pub fn token_budget_exceeded(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "insufficient_quota",
            "token_budget_exceeded",
            message.into(),
        )
    }

    /// 429 with `Retry-After`: too many attempts (failed logins) for now.
    pub fn too_many_attempts(
        code: &'static str,
        message: impl Into<String>,
        retry_after: u64,
    ) -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            code,
            message.into(),
        );
        e.retry_after = Some(retry_after.max(1));
        e
    }

    /// 500 with the job's failure reason (generation failed on the worker; the call was refunded).
    pub fn generation_failed(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "generation_failed",
            message.into(),
        )
    }

    /// 503: a dependency (queue, worker) is not available; nothing was spent.
    pub fn unavailable(code: &'static str, message: impl Into<String>) -> Self {
        let mut e = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            code,
            message.into(),
        );
        e.retry_after = Some(1);
        e
    }

    /// 500 for a cause the client should not see; the cause is logged here.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "internal_error",
            "internal server error".into(),
        )
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl From<sea_orm::DbErr> for ApiError {
    fn from(e: sea_orm::DbErr) -> Self {
        Self::internal(format!("database: {e}"))
    }
}

impl From<crate::models::ModelError> for ApiError {
    fn from(e: crate::models::ModelError) -> Self {
        Self::internal(e)
    }
}

impl From<crate::models::adapters::AdapterError> for ApiError {
    fn from(e: crate::models::adapters::AdapterError) -> Self {
        use crate::models::adapters::AdapterError as E;
        match e {
            E::InvalidName(m) => Self::unprocessable("invalid_adapter_name", m),
            E::InvalidPath(m) => Self::unprocessable("invalid_adapter_path", m),
            E::FileNotFound(m) => Self::unprocessable("adapter_file_not_found", m),
            E::NotLora(m) => Self::unprocessable("not_a_lora_adapter", m),
            E::InvalidScale(m) => Self::unprocessable("invalid_scale", m),
            E::Exists(name) => Self::conflict(
                "adapter_exists",
                format!("an adapter named {name:?} already exists; delete it first"),
            ),
            E::Db(e) => e.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "code": self.code,
            }
        });
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}
