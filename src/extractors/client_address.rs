//! The client's network address, for the per-address login throttle.

use std::{convert::Infallible, net::SocketAddr};

use axum::{
    extract::{ConnectInfo, FromRequestParts},
    http::{request::Parts, HeaderMap},
};
use loco_rs::app::AppContext;

use crate::services::Services;

/// The address a request came from: the socket's peer, or, when
/// `settings.auth.trust_forwarded_for` is on (behind a reverse proxy), the last
/// `X-Forwarded-For` entry, which is the one that proxy appended. `"unknown"` when neither is
/// there, so such requests share one throttle rather than escaping it.
#[derive(Debug, Clone)]
pub struct ClientAddress(pub String);

impl ClientAddress {
    /// Reads the address from a request's parts (headers and connection info).
    #[must_use]
    pub fn of(
        headers: &HeaderMap,
        extensions: &axum::http::Extensions,
        trust_forwarded_for: bool,
    ) -> Self {
        if trust_forwarded_for {
            let forwarded = headers
                .get_all("x-forwarded-for")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .map(str::trim)
                .rfind(|v| !v.is_empty());
            if let Some(addr) = forwarded {
                return Self(addr.chars().take(64).collect());
            }
        }
        Self(extensions.get::<ConnectInfo<SocketAddr>>().map_or_else(
            || "unknown".to_string(),
            |ConnectInfo(a)| a.ip().to_string(),
        ))
    }
}

impl FromRequestParts<AppContext> for ClientAddress {
    type Rejection = Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        ctx: &AppContext,
    ) -> Result<Self, Self::Rejection> {
        let trust = Services::from_ctx(ctx).is_ok_and(|s| s.settings.auth.trust_forwarded_for);
        Ok(Self::of(&parts.headers, &parts.extensions, trust))
    }
}
