//! `Authorization: Bearer <secret>` → the key's row.
//!
//! The extractor only identifies the key (401 for a missing, unknown or revoked key). Whether
//! the key may *spend* a call is decided later by the atomic charge, after the body is valid.

use axum::{extract::FromRequestParts, http::request::Parts};
use loco_rs::app::AppContext;

use crate::{
    errors::ApiError,
    models::{api_keys, users},
};

#[derive(Debug, Clone)]
pub struct ApiKey(pub api_keys::Model);

/// The secret from an `Authorization` header value, if it is a bearer token.
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

impl FromRequestParts<AppContext> for ApiKey {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        ctx: &AppContext,
    ) -> Result<Self, Self::Rejection> {
        let Some(header) = parts.headers.get(axum::http::header::AUTHORIZATION) else {
            return Err(ApiError::unauthorized(
                "missing_api_key",
                "send your API key as `Authorization: Bearer <key>`",
            ));
        };
        let Some(secret) = header.to_str().ok().and_then(bearer) else {
            return Err(ApiError::unauthorized(
                "invalid_authorization",
                "the Authorization header must be `Bearer <key>`",
            ));
        };
        let Some(key) = api_keys::Model::find_by_secret(&ctx.db, secret).await? else {
            return Err(ApiError::unauthorized("invalid_api_key", "unknown API key"));
        };
        if key.revoked_at.is_some() {
            return Err(ApiError::unauthorized(
                "key_revoked",
                "this API key has been revoked",
            ));
        }
        // A login token stops working the moment its user is disabled (generations are also
        // refused by the budget reservation, which checks `enabled` atomically).
        if let Some(user_id) = key.user_id {
            if !users::Model::find(&ctx.db, user_id)
                .await?
                .is_some_and(|u| u.enabled)
            {
                return Err(ApiError::forbidden(
                    "user_disabled",
                    "the user of this key is disabled",
                ));
            }
        }
        tracing::Span::current().record("api_key", key.prefix.as_str());
        Ok(Self(key))
    }
}

/// A key with `admin` scope, for the management routes; a `client` key gets 403.
#[derive(Debug, Clone)]
pub struct AdminKey(pub api_keys::Model);

impl FromRequestParts<AppContext> for AdminKey {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        ctx: &AppContext,
    ) -> Result<Self, Self::Rejection> {
        let ApiKey(key) = ApiKey::from_request_parts(parts, ctx).await?;
        if !key.is_admin() {
            return Err(ApiError::forbidden(
                "admin_scope_required",
                "this route needs a key with the `admin` scope; this key has `client` scope",
            ));
        }
        Ok(Self(key))
    }
}

#[cfg(test)]
mod tests {
    use super::bearer;

    #[test]
    fn bearer_scheme_is_case_insensitive_and_needs_a_token() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer("abc"), None);
    }
}
