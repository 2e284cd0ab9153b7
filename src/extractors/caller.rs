//! Who is calling, and whether they may: `Authorization: Bearer <secret>` → the key's row,
//! checked for standing before the handler runs.
//!
//! Every keyed route takes one of these, so identity and standing are decided in one place for
//! all of them: an unknown or revoked key is 401; a key outside its date window, or whose user
//! is disabled, is 403 — on every route, admin routes included. [`AdminCaller`] also needs the
//! `admin` scope (403). [`MeteredCaller`], for routes that spend a call, also refuses a key whose
//! calls were used up as last read (429) and one over its request rate (429 with
//! `Retry-After`); the atomic charge in admission still decides the quota. Header extractors
//! run before the body is read, so key problems are reported before body problems.
//! [`MeteredCaller`] may take the key's row from [`KnownKeys`] (read by a request moments ago):
//! its charge checks secret, revocation, window and quota again in the same statement, so a
//! key revoked meanwhile is still refused, only after its body was read.

use axum::{extract::FromRequestParts, http::request::Parts};
use loco_rs::app::AppContext;

use crate::{
    admission::refusal_error,
    errors::{ApiError, ErrorCode},
    extractors::KnownKeys,
    models::{
        api_keys::{self, Refusal},
        users,
    },
    services::Services,
};

/// A key in good standing.
#[derive(Debug, Clone)]
pub struct Caller(pub api_keys::Model);

/// A key in good standing with the `admin` scope, for the management routes.
#[derive(Debug, Clone)]
pub struct AdminCaller(pub api_keys::Model);

/// A key in good standing that may spend a call now, as far as can be told before the charge.
#[derive(Debug, Clone)]
pub struct MeteredCaller(pub api_keys::Model);

/// Schemes a key may come under: `Bearer`, and the `Token` / `Api-Key` words that Django REST
/// framework clients (djangollmapi's, whose server read any scheme) send.
const SCHEMES: [&str; 4] = ["bearer", "token", "api-key", "apikey"];

/// The secret from an `Authorization` header value, if it is a bearer token.
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (SCHEMES.iter().any(|s| scheme.eq_ignore_ascii_case(s)) && !token.is_empty()).then_some(token)
}

/// The secret of the request's `Authorization: Bearer` header.
fn presented_secret(parts: &Parts) -> Result<&str, ApiError> {
    let Some(header) = parts.headers.get(axum::http::header::AUTHORIZATION) else {
        return Err(ApiError::new(
            ErrorCode::MissingApiKey,
            "send your API key as `Authorization: Bearer <key>`",
        ));
    };
    header.to_str().ok().and_then(bearer).ok_or_else(|| {
        ApiError::new(
            ErrorCode::InvalidAuthorization,
            "the Authorization header must be `Bearer <key>`",
        )
    })
}

/// The key's standing at this instant: revoked, outside its window, or its user disabled.
/// Quota is not standing: it is decided by the charge (or, for [`MeteredCaller`], as read).
async fn identify(parts: &Parts, ctx: &AppContext) -> Result<api_keys::Model, ApiError> {
    let secret = presented_secret(parts)?;
    let Some(key) = api_keys::Model::find_by_secret(&ctx.db, secret).await? else {
        return Err(ApiError::new(ErrorCode::InvalidApiKey, "unknown API key"));
    };
    standing(ctx, key).await
}

/// [`identify`] for the routes that spend a call: the identity may come from [`KnownKeys`]
/// (read by an earlier request moments ago), since their charge checks the secret's hash,
/// revocation, window and quota again in one statement, and the budget reservation the user.
async fn identify_spender(
    parts: &Parts,
    ctx: &AppContext,
    known: &KnownKeys,
) -> Result<api_keys::Model, ApiError> {
    let hash = api_keys::hash_secret(presented_secret(parts)?);
    if let Some(key) = known.get(&hash) {
        // The window may have closed since it was read.
        return in_standing(key);
    }
    let edits = api_keys::edits();
    let Some(key) = api_keys::Model::find_by_hash(&ctx.db, &hash).await? else {
        return Err(ApiError::new(ErrorCode::InvalidApiKey, "unknown API key"));
    };
    let key = standing(ctx, key).await?;
    known.put(hash, key.clone(), edits);
    Ok(key)
}

/// Refuses a key that is revoked or outside its window, as this row says (and names it in the
/// request's log lines).
fn in_standing(key: api_keys::Model) -> Result<api_keys::Model, ApiError> {
    tracing::Span::current().record("api_key", key.prefix.as_str());
    match key.refusal_at(crate::models::now()) {
        None | Some(Refusal::QuotaExhausted { .. }) => Ok(key),
        Some(refusal) => Err(refusal_error(refusal, Some(&key))),
    }
}

/// [`in_standing`], and refuses a key whose user is disabled.
async fn standing(ctx: &AppContext, key: api_keys::Model) -> Result<api_keys::Model, ApiError> {
    let key = in_standing(key)?;
    // A login token stops working the moment its user is disabled (generations are also
    // refused by the budget reservation, which checks `enabled` atomically).
    if let Some(user_id) = key.user_id {
        if !users::Model::find(&ctx.db, user_id)
            .await?
            .is_some_and(|u| u.enabled)
        {
            return Err(ApiError::new(
                ErrorCode::UserDisabled,
                "the user of this key is disabled",
            ));
        }
    }
    Ok(key)
}

/// The admin key a request carries, if it carries one in good standing: for public routes that
/// show operators more. Never an error (a bad key just gets the public answer).
pub async fn admin_if_any(parts: &Parts, ctx: &AppContext) -> Option<api_keys::Model> {
    if !parts
        .headers
        .contains_key(axum::http::header::AUTHORIZATION)
    {
        return None;
    }
    identify(parts, ctx)
        .await
        .ok()
        .filter(api_keys::Model::is_admin)
}

/// Each caller type: [`identify`], then what that type adds.
macro_rules! caller {
    ($ty:ident, |$key:ident, $ctx:ident| $check:block) => {
        impl FromRequestParts<AppContext> for $ty {
            type Rejection = ApiError;

            async fn from_request_parts(
                parts: &mut Parts,
                $ctx: &AppContext,
            ) -> Result<Self, Self::Rejection> {
                let $key = identify(parts, $ctx).await?;
                $check
                Ok(Self($key))
            }
        }
    };
}

caller!(Caller, |_key, _ctx| {});

caller!(AdminCaller, |key, _ctx| {
    if !key.is_admin() {
        return Err(ApiError::new(
            ErrorCode::AdminScopeRequired,
            "this route needs a key with the `admin` scope; this key has `client` scope",
        ));
    }
});

impl FromRequestParts<AppContext> for MeteredCaller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        ctx: &AppContext,
    ) -> Result<Self, Self::Rejection> {
        let services = Services::from_ctx(ctx)?;
        let key = identify_spender(parts, ctx, &services.known_keys).await?;
        if let Some(refusal @ Refusal::QuotaExhausted { .. }) = key.refusal_at(crate::models::now())
        {
            return Err(refusal_error(refusal, Some(&key)));
        }
        services.rate_limits.check(&key).await?;
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
        assert_eq!(bearer("Token abc"), Some("abc"));
        assert_eq!(bearer("Api-Key abc"), Some("abc"));
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer("abc"), None);
    }
}
