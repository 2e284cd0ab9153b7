//! Per-key request-rate limits (requests per minute with a burst), checked before a request may
//! spend anything.
//!
//! Each key gets its own GCRA limiter, from the key's own limit or the configured default, except
//! keys that act for a user (seed 002's `/token` logins): those share one limiter per user, so
//! logging in three times does not triple a user's rate. In
//! embedded mode the state lives in this process (`governor`). With Redis (production) it lives
//! in Redis, updated by one Lua script per request on Redis's clock, so any number of API
//! instances enforce one limit together; if Redis cannot answer, the local limiter decides (and
//! the request then meets the queue's own 503 anyway).

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

/// Keys whose limiter one process keeps; beyond this an arbitrary other key's limiter is
/// dropped (that key starts afresh: a full burst again, never a wrong refusal).
const MAX_LIMITERS: usize = 10_000;

/// Who one limiter belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Holder {
    Key(i32),
    /// Every key acting for this user.
    User(i32),
}

impl Holder {
    fn of(key: &api_keys::Model) -> Self {
        key.user_id.map_or(Self::Key(key.id), Self::User)
    }

    fn redis_key(self, prefix: &str) -> String {
        match self {
            Self::Key(id) => format!("{prefix}.ratelimit.{id}"),
            Self::User(id) => format!("{prefix}.ratelimit.user.{id}"),
        }
    }
}

/// The limiters of all keys seen by this process (at most [`MAX_LIMITERS`]).
pub struct RateLimits {
    default: Option<Limit>,
    limiters: Mutex<HashMap<Holder, (Limit, Arc<DefaultDirectRateLimiter>)>>,
    shared: Option<Shared>,
}

/// GCRA state in Redis, shared by every API instance.
struct Shared {
    conn: redis::aio::ConnectionManager,
    prefix: String,
    timeout: std::time::Duration,
    script: redis::Script,
}

/// GCRA on Redis's clock, in microseconds. KEYS[1]: the key's theoretical arrival time;
/// ARGV[1]: interval between requests; ARGV[2]: burst tolerance = interval × (burst − 1).
/// Returns 0 when the request may pass (and records it), else the wait in microseconds.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
if tat - now > tolerance then
  return tat - tolerance - now
end
local new_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1000)
return 0
";

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
            shared: None,
        }
    }

    /// Keeps the limiters' state in Redis (keys `<prefix>.ratelimit.<key id>`), shared by every
    /// API instance of the deployment.
    #[must_use]
    pub fn shared_in_redis(
        mut self,
        conn: redis::aio::ConnectionManager,
        prefix: &str,
        timeout: std::time::Duration,
    ) -> Self {
        self.shared = Some(Shared {
            conn,
            prefix: prefix.to_string(),
            timeout,
            script: redis::Script::new(GCRA),
        });
        self
    }

    /// Takes one request from the key's allowance: in Redis when shared, else here.
    ///
    /// # Errors
    /// 429 `rate_limited` with `Retry-After` when the key is over its rate.
    pub async fn check(&self, key: &api_keys::Model) -> Result<(), ApiError> {
        let Some(limit) = self.limit_for(key) else {
            return Ok(());
        };
        let Some(shared) = &self.shared else {
            return self.check_local(key);
        };
        let interval_us = 60_000_000 / u64::from(limit.per_minute.get());
        let tolerance_us = interval_us * u64::from(limit.burst.get() - 1);
        let mut conn = shared.conn.clone();
        let mut invocation = shared.script.key(Holder::of(key).redis_key(&shared.prefix));
        invocation.arg(interval_us).arg(tolerance_us);
        let verdict =
            tokio::time::timeout(shared.timeout, invocation.invoke_async::<u64>(&mut conn)).await;
        match verdict {
            Ok(Ok(0)) => Ok(()),
            Ok(Ok(wait_us)) => Err(ApiError::rate_limited(
                limit.per_minute.get(),
                limit.burst.get(),
                wait_us.div_ceil(1_000_000).max(1),
            )),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "shared rate limit unavailable; limiting locally");
                self.check_local(key)
            }
            Err(_) => {
                tracing::warn!("shared rate limit timed out; limiting locally");
                self.check_local(key)
            }
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
    pub fn check_local(&self, key: &api_keys::Model) -> Result<(), ApiError> {
        let Some(limit) = self.limit_for(key) else {
            return Ok(());
        };
        let limiter = {
            let mut map = self
                .limiters
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let holder = Holder::of(key);
            if map.len() >= MAX_LIMITERS && !map.contains_key(&holder) {
                if let Some(other) = map.keys().next().copied() {
                    map.remove(&other);
                }
            }
            let entry = map
                .entry(holder)
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
        api_keys::Model {
            rate_limit_per_minute: rpm,
            rate_limit_burst: burst,
            ..api_keys::test_key(id)
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
            assert!(limits.check_local(&k).is_ok());
        }
        let err = limits
            .check_local(&k)
            .expect_err("fourth request within the burst window");
        assert_eq!(err.status().as_u16(), 429);
        // One request per 10 s at 6/min.
        let retry = err.retry_after.unwrap_or_default();
        assert!((1..=10).contains(&retry), "retry_after {retry}");
    }

    #[test]
    fn the_limiters_kept_are_bounded() {
        let limits = RateLimits::new(&RateLimitSettings {
            per_minute: 60,
            burst: Some(1),
        });
        for id in 0..i32::try_from(MAX_LIMITERS + 50).unwrap_or(i32::MAX) {
            assert!(limits.check_local(&key(id, None, None)).is_ok());
        }
        let kept = limits
            .limiters
            .lock()
            .map(|m| m.len())
            .unwrap_or(usize::MAX);
        assert!(kept <= MAX_LIMITERS, "{kept} limiters kept");
    }

    #[test]
    fn keys_are_limited_separately_and_default_applies() {
        let limits = RateLimits::new(&RateLimitSettings {
            per_minute: 60,
            burst: Some(1),
        });
        let a = key(1, None, None);
        let b = key(2, None, None);
        assert!(limits.check_local(&a).is_ok());
        assert!(limits.check_local(&a).is_err());
        assert!(limits.check_local(&b).is_ok());
    }

    #[test]
    fn keys_acting_for_one_user_share_the_users_limit() {
        let limits = RateLimits::new(&RateLimitSettings {
            per_minute: 60,
            burst: Some(2),
        });
        let login = |id| api_keys::Model {
            user_id: Some(7),
            ..key(id, None, None)
        };
        assert!(limits.check_local(&login(1)).is_ok());
        assert!(limits.check_local(&login(2)).is_ok());
        assert!(
            limits.check_local(&login(3)).is_err(),
            "a third login token of the same user has no allowance of its own"
        );
        let other_user = api_keys::Model {
            user_id: Some(8),
            ..key(4, None, None)
        };
        assert!(limits.check_local(&other_user).is_ok());
    }

    #[test]
    fn no_limit_configured_means_unlimited() {
        let limits = RateLimits::new(&RateLimitSettings {
            per_minute: 0,
            burst: None,
        });
        let k = key(1, None, None);
        for _ in 0..1000 {
            assert!(limits.check_local(&k).is_ok());
        }
    }

    #[test]
    fn a_changed_limit_takes_effect() {
        let limits = RateLimits::new(&RateLimitSettings {
            per_minute: 0,
            burst: None,
        });
        assert!(limits.check_local(&key(1, Some(1), Some(1))).is_ok());
        assert!(limits.check_local(&key(1, Some(1), Some(1))).is_err());
        assert!(limits.check_local(&key(1, Some(600), Some(5))).is_ok());
    }
}
