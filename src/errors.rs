//! The one error type of the HTTP API.
//!
//! Every rejection leaves as `{"error": {"message", "type", "code"}}` (OpenAI's shape, which the
//! other compatibility routes tolerate too) with a fixed, stable `code`. The service layer
//! (admission, serving) says *what* went wrong with an [`ErrorCode`]; the status and class each
//! code gets are decided here, in one table. Internal causes go to the log; the client only sees
//! a generic message for them.

use axum::{
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use serde_json::json;

/// Declares every stable error code with the HTTP status it is answered with: the one table
/// from which [`ErrorCode`], its wire name and its status come.
macro_rules! error_codes {
    ($($(#[$doc:meta])* $variant:ident = $name:literal => $status:ident,)*) => {
        /// Every stable error code Tollgate answers with. Clients and tests match on these
        /// names; the status each is answered with is fixed here, in one place.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $($(#[$doc])* $variant,)*
        }

        impl ErrorCode {
            /// Every code, for documentation and tests.
            pub const ALL: &'static [Self] = &[$(Self::$variant,)*];

            /// The code's wire name (`error.code`).
            #[must_use]
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $name,)*
                }
            }

            /// The HTTP status a request refused with this code gets.
            #[must_use]
            pub const fn status(self) -> StatusCode {
                match self {
                    $(Self::$variant => StatusCode::$status,)*
                }
            }
        }
    };
}

error_codes! {
    // 400: the request cannot be parsed or breaks a hard limit.
    InvalidJson = "invalid_json" => BAD_REQUEST,
    EmptyBody = "empty_body" => BAD_REQUEST,
    InvalidEncoding = "invalid_encoding" => BAD_REQUEST,
    UnsupportedContentType = "unsupported_content_type" => BAD_REQUEST,
    ContentPolicyViolation = "content_policy_violation" => BAD_REQUEST,
    ContextLengthExceeded = "context_length_exceeded" => BAD_REQUEST,
    InvalidN = "invalid_n" => BAD_REQUEST,
    UnsupportedGrantType = "unsupported_grant_type" => BAD_REQUEST,
    AdapterNotSupported = "adapter_not_supported" => BAD_REQUEST,
    UnsupportedParameter = "unsupported_parameter" => BAD_REQUEST,
    /// `response_format`'s JSON schema uses keywords the output grammar cannot enforce.
    UnsupportedSchema = "unsupported_schema" => BAD_REQUEST,
    /// `response_format` is not usable (a schema that is not one, a `$ref` to nowhere).
    InvalidResponseFormat = "invalid_response_format" => BAD_REQUEST,
    /// `tools`, `tool_choice` or a message's `tool_calls` are not usable (a bad name, a
    /// `tool_choice` naming no tool, a tool of another type than `function`).
    InvalidTools = "invalid_tools" => BAD_REQUEST,
    // 401: no key, an unknown key, a revoked key, wrong credentials.
    MissingApiKey = "missing_api_key" => UNAUTHORIZED,
    InvalidAuthorization = "invalid_authorization" => UNAUTHORIZED,
    InvalidApiKey = "invalid_api_key" => UNAUTHORIZED,
    KeyRevoked = "key_revoked" => UNAUTHORIZED,
    InvalidCredentials = "invalid_credentials" => UNAUTHORIZED,
    // 403: a valid key used outside what it allows.
    KeyNotYetValid = "key_not_yet_valid" => FORBIDDEN,
    KeyExpired = "key_expired" => FORBIDDEN,
    UserDisabled = "user_disabled" => FORBIDDEN,
    AdminScopeRequired = "admin_scope_required" => FORBIDDEN,
    ModelNotAllowed = "model_not_allowed" => FORBIDDEN,
    AdapterNotAllowed = "adapter_not_allowed" => FORBIDDEN,
    // 404.
    ModelNotFound = "model_not_found" => NOT_FOUND,
    AdapterNotFound = "adapter_not_found" => NOT_FOUND,
    JobNotFound = "job_not_found" => NOT_FOUND,
    ConfigNotFound = "config_not_found" => NOT_FOUND,
    ModelNotLoaded = "model_not_loaded" => NOT_FOUND,
    UserNotFound = "user_not_found" => NOT_FOUND,
    EmbeddingsDisabled = "embeddings_disabled" => NOT_FOUND,
    // 409: conflicts with the current state.
    UserExists = "user_exists" => CONFLICT,
    AdapterExists = "adapter_exists" => CONFLICT,
    ModelPinned = "model_pinned" => CONFLICT,
    ModelIdReserved = "model_id_reserved" => CONFLICT,
    ConfigInUse = "config_in_use" => CONFLICT,
    NoLocalWorker = "no_local_worker" => CONFLICT,
    /// A job (a stored response) that cannot be changed until it has finished.
    JobNotFinished = "job_not_finished" => CONFLICT,
    /// A job that has finished cannot be cancelled.
    JobFinished = "job_finished" => CONFLICT,
    /// The job was cancelled by its client before it finished (its call was refunded).
    JobCancelled = "job_cancelled" => CONFLICT,
    // 413.
    PayloadTooLarge = "payload_too_large" => PAYLOAD_TOO_LARGE,
    // 422: well-formed JSON whose fields are missing, mistyped or out of range.
    InvalidBody = "invalid_body" => UNPROCESSABLE_ENTITY,
    InvalidQuery = "invalid_query" => UNPROCESSABLE_ENTITY,
    EmptyPrompt = "empty_prompt" => UNPROCESSABLE_ENTITY,
    InvalidPrompt = "invalid_prompt" => UNPROCESSABLE_ENTITY,
    InvalidMessages = "invalid_messages" => UNPROCESSABLE_ENTITY,
    InvalidRole = "invalid_role" => UNPROCESSABLE_ENTITY,
    UnsupportedContent = "unsupported_content" => UNPROCESSABLE_ENTITY,
    InvalidMaxTokens = "invalid_max_tokens" => UNPROCESSABLE_ENTITY,
    InvalidTokensLimit = "invalid_tokens_limit" => UNPROCESSABLE_ENTITY,
    InvalidTemperature = "invalid_temperature" => UNPROCESSABLE_ENTITY,
    InvalidTopP = "invalid_top_p" => UNPROCESSABLE_ENTITY,
    InvalidSeed = "invalid_seed" => UNPROCESSABLE_ENTITY,
    InvalidStop = "invalid_stop" => UNPROCESSABLE_ENTITY,
    InvalidSampling = "invalid_sampling" => UNPROCESSABLE_ENTITY,
    InvalidJobId = "invalid_job_id" => UNPROCESSABLE_ENTITY,
    InvalidScale = "invalid_scale" => UNPROCESSABLE_ENTITY,
    ScaleWithoutAdapter = "scale_without_adapter" => UNPROCESSABLE_ENTITY,
    ConflictingAdapter = "conflicting_adapter" => UNPROCESSABLE_ENTITY,
    InvalidAdapterName = "invalid_adapter_name" => UNPROCESSABLE_ENTITY,
    InvalidAdapterPath = "invalid_adapter_path" => UNPROCESSABLE_ENTITY,
    AdapterFileNotFound = "adapter_file_not_found" => UNPROCESSABLE_ENTITY,
    NotALoraAdapter = "not_a_lora_adapter" => UNPROCESSABLE_ENTITY,
    UnknownBaseModel = "unknown_base_model" => UNPROCESSABLE_ENTITY,
    EmptyInput = "empty_input" => UNPROCESSABLE_ENTITY,
    InvalidInput = "invalid_input" => UNPROCESSABLE_ENTITY,
    TooManyInputs = "too_many_inputs" => UNPROCESSABLE_ENTITY,
    InvalidEncodingFormat = "invalid_encoding_format" => UNPROCESSABLE_ENTITY,
    InvalidDimensions = "invalid_dimensions" => UNPROCESSABLE_ENTITY,
    InvalidUser = "invalid_user" => UNPROCESSABLE_ENTITY,
    ConversationNumberRequired = "conversation_number_required" => UNPROCESSABLE_ENTITY,
    InvalidConfig = "invalid_config" => UNPROCESSABLE_ENTITY,
    InvalidModelKwargs = "invalid_model_kwargs" => UNPROCESSABLE_ENTITY,
    ModelNotLoadable = "model_not_loadable" => UNPROCESSABLE_ENTITY,
    InvalidDate = "invalid_date" => UNPROCESSABLE_ENTITY,
    InvalidRange = "invalid_range" => UNPROCESSABLE_ENTITY,
    // 429: a limit is reached; nothing was spent.
    QuotaExceeded = "quota_exceeded" => TOO_MANY_REQUESTS,
    TokenBudgetExceeded = "token_budget_exceeded" => TOO_MANY_REQUESTS,
    RateLimited = "rate_limited" => TOO_MANY_REQUESTS,
    TooManyLoginAttempts = "too_many_login_attempts" => TOO_MANY_REQUESTS,
    // 500.
    GenerationFailed = "generation_failed" => INTERNAL_SERVER_ERROR,
    InternalError = "internal_error" => INTERNAL_SERVER_ERROR,
    // 502/504: a remote model's upstream failed or did not answer in time (call refunded).
    UpstreamError = "upstream_error" => BAD_GATEWAY,
    UpstreamTimeout = "upstream_timeout" => GATEWAY_TIMEOUT,
    // 503: a dependency is not available; nothing was spent.
    Starting = "starting" => SERVICE_UNAVAILABLE,
    ServerBusy = "server_busy" => SERVICE_UNAVAILABLE,
    QueueUnavailable = "queue_unavailable" => SERVICE_UNAVAILABLE,
    ModelUnavailable = "model_unavailable" => SERVICE_UNAVAILABLE,
    AdapterUnavailable = "adapter_unavailable" => SERVICE_UNAVAILABLE,
}

impl ErrorCode {
    /// OpenAI's error class (`error.type`) for this code.
    #[must_use]
    pub const fn kind(self) -> &'static str {
        match self {
            Self::QuotaExceeded | Self::TokenBudgetExceeded => "insufficient_quota",
            Self::RateLimited | Self::TooManyLoginAttempts => "rate_limit_error",
            _ => match self.status() {
                StatusCode::UNAUTHORIZED => "authentication_error",
                StatusCode::FORBIDDEN => "permission_error",
                StatusCode::NOT_FOUND => "not_found_error",
                StatusCode::INTERNAL_SERVER_ERROR
                | StatusCode::BAD_GATEWAY
                | StatusCode::SERVICE_UNAVAILABLE
                | StatusCode::GATEWAY_TIMEOUT => "server_error",
                _ => "invalid_request_error",
            },
        }
    }
}

impl ErrorCode {
    /// The code a failed job is answered with: a remote model's failures keep their code as
    /// the first word of the job's reason (`upstream_error: …`, see `engine::remote`), every
    /// other failure is `generation_failed`.
    #[must_use]
    pub fn of_job_failure(reason: &str) -> Self {
        [
            Self::UpstreamError,
            Self::UpstreamTimeout,
            Self::ContextLengthExceeded,
            Self::JobCancelled,
        ]
        .into_iter()
        .find(|c| {
            reason
                .strip_prefix(c.as_str())
                .is_some_and(|rest| rest.starts_with(": "))
        })
        .unwrap_or(Self::GenerationFailed)
    }
}

/// Why a request was refused: a stable code, a message for people, and when to retry. The
/// code decides the HTTP status ([`ErrorCode::status`]).
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    /// Seconds for a `Retry-After` header (429/503).
    pub retry_after: Option<u64>,
}

pub type ApiResult<T> = std::result::Result<T, ApiError>;

impl ApiError {
    /// A refusal with `code`; 503s say to retry in a second.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after: (code.status() == StatusCode::SERVICE_UNAVAILABLE).then_some(1),
        }
    }

    #[must_use]
    pub const fn status(&self) -> StatusCode {
        self.code.status()
    }

    /// 400 `unsupported_parameter` naming each field (sorted) a route would otherwise ignore:
    /// a client must not believe a field was honoured when it was not.
    #[must_use]
    pub fn unsupported_fields<S: AsRef<str>>(names: &[S]) -> Self {
        let mut names: Vec<&str> = names.iter().map(AsRef::as_ref).collect();
        names.sort_unstable();
        let one = names.len() == 1;
        Self::new(
            ErrorCode::UnsupportedParameter,
            format!(
                "this server does not support {}: {}; leave {} out",
                if one { "the field" } else { "the fields" },
                names.join(", "),
                if one { "it" } else { "them" }
            ),
        )
    }

    /// 413: body over the configured limit.
    #[must_use]
    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            ErrorCode::PayloadTooLarge,
            format!("request body is larger than the limit of {limit} bytes"),
        )
    }

    /// 429: the key's call quota is used up.
    #[must_use]
    pub fn quota_exhausted(max_calls: i64) -> Self {
        Self::new(
            ErrorCode::QuotaExceeded,
            format!("this key has used all of its {max_calls} calls"),
        )
    }

    /// 429: the key sent requests faster than its rate limit allows; `Retry-After` says when
    /// the next one will be accepted. Nothing was spent.
    #[must_use]
    pub fn rate_limited(per_minute: u32, burst: u32, retry_after_secs: u64) -> Self {
        Self::new(
            ErrorCode::RateLimited,
            format!(
                "this key may send {per_minute} requests per minute (burst {burst}); retry in {retry_after_secs} s"
            ),
        )
        .retry_after(retry_after_secs)
    }

    /// Adds a `Retry-After` of at least a second.
    #[must_use]
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs.max(1));
        self
    }

    /// 500 with the job's failure reason (generation failed on the worker; the call was refunded).
    pub fn generation_failed(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::GenerationFailed, message)
    }

    /// 500 for a cause the client should not see; the cause is logged here.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(ErrorCode::InternalError, "internal server error")
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status().as_u16(),
            self.code.as_str(),
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
            E::InvalidName(m) => Self::new(ErrorCode::InvalidAdapterName, m),
            E::InvalidPath(m) => Self::new(ErrorCode::InvalidAdapterPath, m),
            E::FileNotFound(m) => Self::new(ErrorCode::AdapterFileNotFound, m),
            E::NotLora(m) => Self::new(ErrorCode::NotALoraAdapter, m),
            E::InvalidScale(m) => Self::new(ErrorCode::InvalidScale, m),
            E::Exists(name) => Self::new(
                ErrorCode::AdapterExists,
                format!("an adapter named {name:?} already exists; delete it first"),
            ),
            E::Db(e) => e.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // OpenAI's shape (`param` included, as its SDKs read it), and the message again as
        // `detail`, where the FastAPI and Django REST framework services this replaces put it
        // and their clients read it.
        let body = json!({
            "error": {
                "message": self.message,
                "type": self.code.kind(),
                "param": null,
                "code": self.code.as_str(),
            },
            "detail": self.message,
        });
        let mut resp = (self.status(), Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::ErrorCode;

    #[test]
    fn every_code_is_documented_in_the_readme() {
        let readme = include_str!("../README.md");
        let missing: Vec<&str> = ErrorCode::ALL
            .iter()
            .map(|c| c.as_str())
            .filter(|c| !readme.contains(&format!("`{c}`")))
            .collect();
        assert!(
            missing.is_empty(),
            "README's Errors table lacks {missing:?}"
        );
    }

    #[test]
    fn remote_failures_keep_their_code_and_the_rest_are_generation_failures() {
        assert_eq!(
            ErrorCode::of_job_failure("upstream_timeout: no answer in 5 s"),
            ErrorCode::UpstreamTimeout
        );
        assert_eq!(
            ErrorCode::of_job_failure("upstream_error: cannot connect"),
            ErrorCode::UpstreamError
        );
        assert_eq!(
            ErrorCode::of_job_failure("llama.cpp decode failed: x"),
            ErrorCode::GenerationFailed
        );
        assert_eq!(ErrorCode::UpstreamError.kind(), "server_error");
    }

    #[test]
    fn every_code_has_one_unique_wire_name_and_an_error_status() {
        let mut names: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        let all = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), all, "two codes share a wire name");
        for code in ErrorCode::ALL {
            assert!(
                code.status().is_client_error() || code.status().is_server_error(),
                "{code:?}"
            );
        }
    }
}
