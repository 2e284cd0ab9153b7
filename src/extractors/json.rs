//! A JSON body extractor with Tollgate's limits and error shapes.
//!
//! Differences from axum's `Json`: the size limit comes from the config and answers 413 in the
//! API's error shape; malformed JSON is 400 and well-formed JSON of the wrong shape is 422; and
//! a body sent without a JSON content type is still read when it *is* JSON, because
//! `curl -d '{…}'` (seed 003's documented client) labels it `x-www-form-urlencoded`; and a real
//! form body (`requests.post(url, data={"text": …})`, which djangollmapi's Django REST
//! framework parsed) is read as an object of its string fields.

use axum::{
    body::Body,
    extract::{FromRequest, Request},
    http::header,
};
use loco_rs::app::AppContext;
use serde::de::DeserializeOwned;

use crate::{
    errors::{ApiError, ErrorCode},
    services::Services,
    settings::ApiSettings,
};

#[derive(Debug, Clone)]
pub struct JsonBody<T>(pub T);

fn content_type_allows_json(value: Option<&str>) -> bool {
    let Some(value) = value else { return true };
    let mime = value
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    mime.is_empty()
        || mime == "application/json"
        || (mime.starts_with("application/") && mime.ends_with("+json"))
        || mime == "application/x-www-form-urlencoded"
}

/// Reads and parses a JSON body under `limit` bytes.
///
/// # Errors
/// 400 for a wrong content type, an empty body or invalid JSON; 413 over the limit; 422 when
/// the JSON does not match `T`.
pub async fn read_json<T: DeserializeOwned>(
    req: Request<Body>,
    limit: usize,
) -> Result<T, ApiError> {
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if !content_type_allows_json(content_type.as_deref()) {
        return Err(ApiError::new(
            ErrorCode::UnsupportedContentType,
            format!(
                "expected a JSON body (Content-Type: application/json), got {}",
                content_type.unwrap_or_default()
            ),
        ));
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::payload_too_large(limit));
    }
    let bytes = axum::body::to_bytes(req.into_body(), limit)
        .await
        .map_err(|_| ApiError::payload_too_large(limit))?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::new(
            ErrorCode::EmptyBody,
            "the request body is empty; send a JSON object",
        ));
    }
    let is_form = content_type.as_deref().is_some_and(|v| {
        v.split(';').next().is_some_and(|m| {
            m.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        })
    });
    let value: serde_json::Value = match serde_json::from_slice(&bytes) {
        Ok(value) => value,
        Err(_) if is_form && bytes.first() != Some(&b'{') => form_object(&bytes)?,
        Err(e) => {
            return Err(ApiError::new(
                ErrorCode::InvalidJson,
                format!("the body is not valid JSON: {e}"),
            ))
        }
    };
    if !value.is_object() {
        return Err(ApiError::new(
            ErrorCode::InvalidBody,
            "the body must be a JSON object",
        ));
    }
    serde_json::from_value(value)
        .map_err(|e| ApiError::new(ErrorCode::InvalidBody, format!("invalid request: {e}")))
}

/// A form body's fields as a JSON object of strings (a repeated field keeps its last value).
fn form_object(bytes: &[u8]) -> Result<serde_json::Value, ApiError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(bytes).map_err(|e| {
        ApiError::new(
            ErrorCode::InvalidJson,
            format!("the body is neither JSON nor a form: {e}"),
        )
    })?;
    Ok(serde_json::Value::Object(
        pairs
            .into_iter()
            .map(|(k, v)| (k, serde_json::Value::String(v)))
            .collect(),
    ))
}

impl<T: DeserializeOwned + Send> FromRequest<AppContext> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request<Body>, ctx: &AppContext) -> Result<Self, Self::Rejection> {
        let limit = Services::from_ctx(ctx).map_or_else(
            |_| ApiSettings::default().max_body_bytes,
            |s| s.settings.api.max_body_bytes,
        );
        read_json(req, limit).await.map(JsonBody)
    }
}

#[cfg(test)]
mod tests {
    use super::{content_type_allows_json, form_object};

    #[test]
    fn a_form_body_is_an_object_of_strings() {
        let v = form_object(b"text=hello+world&n=2").expect("a form");
        assert_eq!(v, serde_json::json!({"text": "hello world", "n": "2"}));
    }

    #[test]
    fn json_and_curl_default_content_types_are_read_others_are_not() {
        assert!(content_type_allows_json(None));
        assert!(content_type_allows_json(Some(
            "application/json; charset=utf-8"
        )));
        assert!(content_type_allows_json(Some(
            "application/x-www-form-urlencoded"
        )));
        assert!(content_type_allows_json(Some("application/vnd.api+json")));
        assert!(!content_type_allows_json(Some(
            "multipart/form-data; boundary=x"
        )));
        assert!(!content_type_allows_json(Some("application/xml")));
    }
}
