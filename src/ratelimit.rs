//! Per-key request-rate limits (requests per minute with a burst), checked before a request may
//! spend anything.
//!
//! Each key gets its own GCRA limiter (`governor`), built from the key's own limit or the
//! configured default and rebuilt when an admin changes the limit. The state is per process: with
//! several API instances each enforces the limit on the requests it sees.

use std::{
    collections::HashMap,
    num::NonZeroU32,
    sync::{Arc, Mutex},
};

use governor::{clock::Clock, DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::{errors::ApiError, models::api_keys, settings::RateLimitSettings};

/// A limit as configured: requests per minute and how many may come at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Limit {
    per_minute: NonZeroU32,
    burst: NonZeroU32,
}

/// The limiters of all keys seen by this process.
pub struct RateLimits {
    default: Option<Limit>,
    limiters: Mutex<HashMap<i32, (Limit, Arc<DefaultDirectRateLimiter>)>>,
}

impl std::fmt::Debug for RateLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimits")
            .field("default", &self.default)
            .finish_non_exhaustive()
    }
}

fn limit(per_minute: Option<u32>, burst: Option<u32>) -> Option<Limit> {
    let per_minute = NonZeroU32::new(per_minute?)?;
    // Without a burst, allow a second's worth (at least one) at once.
    let burst = burst.and_then(NonZeroU32::new).unwrap_or_else(|| {
        NonZeroU32::new(per_minute.get().div_ceil(60)).unwrap_or(NonZeroU32::MIN)
    });
    Some(Limit { per_minute, burst })
}

impl RateLimits {
    #[must_use]
    pub fn new(settings: &RateLimitSettings) -> Self {
        Self {
            default: limit(Some(settings.per_minute), settings.burst),
            limiters: Mutex::new(HashMap::new()),
        }
    }

    /// The limit that applies to `key`: its own, else the default; `None` = unlimited.
    fn limit_for(&self, key: &api_keys::Model) -> Option<Limit> {
        match key.rate_limit_per_minute {
            Some(rpm) => limit(
                u32::try_from(rpm).ok(),
                key.rate_limit_burst.and_then(|b| u32::try_from(b).ok()),
            ),
            None => self.default,
        }
    }

    /// Takes one request from the key's allowance.
    ///
    /// # Errors
    /// 429 `rate_limited` with `Retry-After` (whole seconds, at least 1) when the key is over
    /// its rate.
    pub fn check(&self, key: &api_keys::Model) -> Result<(), ApiError> {
        let Some(limit) = self.limit_for(key) else {
            return Ok(());
        };
        let limiter = {
            let mut map = self
                .limiters
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let entry = map
                .entry(key.id)
                .or_insert_with(|| (limit, new_limiter(limit)));
            if entry.0 != limit {
                *entry = (limit, new_limiter(limit));
            }
            entry.1.clone()
        };
        limiter.check().map_err(|not_until| {
            let wait = not_until.wait_time_from(governor::clock::DefaultClock::default().now());
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            ApiError::rate_limited(limit.per_minute.get(), limit.burst.get(), secs.max(1))
        })
    }
}

fn new_limiter(limit: Limit) -> Arc<DefaultDirectRateLimiter> {
    Arc::new(RateLimiter::direct(
        Quota::per_minute(limit.per_minute).allow_burst(limit.burst),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: i32, rpm: Option<i32>, burst: Option<i32>) -> api_keys::Model {
        let ts = crate::models::now();
        api_keys::Model {
            created_at: ts,
            updated_at: ts,
            id,
            name: "k".into(),
            email: "k@example.com".into(),
            organization: None,
            prefix: format!("{id:08x}"),
            secret_hash: String::new(),
            max_calls: None,
            calls_used: 0,
            valid_from: None,
            valid_until: None,
            revoked_at: None,
            last_used_at: None,
            scope: "client".into(),
            rate_limit_per_minute: rpm,
            rate_limit_burst: burst,
            allowed_models: None,
            allowed_adapters: None,
            user_id: None,
            prompt_token_limit: None,
            gen_token_limit: None,
            prompt_tokens_used: 0,
            gen_tokens_used: 0,
        }
    }

    #[test]
    fn burst_then_refusal_with_retry_after() {
        let limits = RateLimits::new(&RateLimitSettings {
            per_minute: 0,
            burst: None,
        });
        let k = key(1, Some(6), Some(3));
        for _ in 0..3 {
            assert!(limits.check(&k).is_ok());
        }
        let err = limits
            .check(&k)
            .expect_err("fourth request within the burst window");
        assert_eq!(err.status.as_u16(), 429);
        // One request per 10 s at 6/min.
        let retry = err.retry_after.unwrap_or_default();
        assert!((1..=10).contains(&retry), "retry_after {retry}");
    }

    #[test]
    fn keys_are_limited_separately_and_default_applies() {
        let limits = RateLimits::new(&RateLimitSettings {
            per_minute: 60,
            burst: Some(1),
        });
        let a = key(1, None, None);
        let b = key(2, None, None);
        assert!(limits.check(&a).is_ok());
        assert!(limits.check(&a).is_err());
        assert!(limits.check(&b).is_ok());
    }

    #[test]
    fn no_limit_configured_means_unlimited() {
        let limits = RateLimits::new(&RateLimitSettings {
            per_minute: 0,
            burst: None,
        });
        let k = key(1, None, None);
        for _ in 0..1000 {
            assert!(limits.check(&k).is_ok());
        }
    }

    #[test]
    fn a_changed_limit_takes_effect() {
        let limits = RateLimits::new(&RateLimitSettings {
            per_minute: 0,
            burst: None,
        });
        assert!(limits.check(&key(1, Some(1), Some(1))).is_ok());
        assert!(limits.check(&key(1, Some(1), Some(1))).is_err());
        assert!(limits.check(&key(1, Some(600), Some(5))).is_ok());
    }
}
