//! Failed-login throttling for `POST /token` and the dashboard sign-in, in memory: one instance
//! per username and one per client address (which stops one client from trying a password on
//! thousands of usernames).
//!
//! Every attempt is counted as a failure *before* the password is checked and forgiven when it
//! succeeds, so concurrent guesses cannot slip past the limit: after `max_failures` attempts
//! that did not succeed within the window, the username is locked for `lockout`, and attempts
//! during the lock get 429 without any password check. State is per process (a restart or
//! another API instance starts afresh), which bounds guessing per instance.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

/// Usernames tracked at most; beyond this, entries that no longer matter are dropped.
const MAX_TRACKED: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    since: Instant,
    locked_until: Option<Instant>,
}

#[derive(Debug)]
pub struct LoginThrottle {
    max_failures: u32,
    lockout: Duration,
    entries: Mutex<HashMap<String, Entry>>,
}

impl LoginThrottle {
    #[must_use]
    pub fn new(max_failures: u32, lockout: Duration) -> Self {
        Self {
            max_failures: max_failures.max(1),
            lockout,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// Admits an attempt for `username` (counting it as a failure until [`Self::succeeded`]),
    /// or says how long the username stays locked.
    ///
    /// # Errors
    /// The time left on the lock.
    pub fn begin(&self, username: &str) -> Result<(), Duration> {
        self.begin_at(username, Instant::now())
    }

    fn begin_at(&self, username: &str, now: Instant) -> Result<(), Duration> {
        let Ok(mut entries) = self.entries.lock() else {
            return Ok(());
        };
        if entries.len() >= MAX_TRACKED && !entries.contains_key(username) {
            let window = self.lockout;
            entries.retain(|_, e| {
                e.locked_until.is_some_and(|t| t > now) || now.duration_since(e.since) < window
            });
            // Still full of live entries (a flood of names): drop the oldest one.
            if entries.len() >= MAX_TRACKED {
                if let Some(oldest) = entries
                    .iter()
                    .min_by_key(|(_, e)| e.since)
                    .map(|(name, _)| name.clone())
                {
                    entries.remove(&oldest);
                }
            }
        }
        let entry = entries.entry(username.to_string()).or_insert(Entry {
            failures: 0,
            since: now,
            locked_until: None,
        });
        if let Some(until) = entry.locked_until {
            if until > now {
                return Err(until - now);
            }
            *entry = Entry {
                failures: 0,
                since: now,
                locked_until: None,
            };
        }
        if now.duration_since(entry.since) >= self.lockout {
            entry.failures = 0;
            entry.since = now;
        }
        entry.failures += 1;
        if entry.failures >= self.max_failures {
            entry.locked_until = Some(now + self.lockout);
        }
        Ok(())
    }

    /// The attempt had the right password: its failure is forgiven, and so are earlier ones.
    pub fn succeeded(&self, username: &str) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.remove(username);
        }
    }

    /// Forgives only this attempt's failure: for a client address, where one right password
    /// must not wipe out the failures of other usernames tried from the same place.
    pub fn forgive_one(&self, key: &str) {
        if let Ok(mut entries) = self.entries.lock() {
            if let Some(entry) = entries.get_mut(key) {
                if entry.locked_until.is_none() {
                    entry.failures = entry.failures.saturating_sub(1);
                }
            }
        }
    }

    /// Entries held now (for tests of the bound).
    #[must_use]
    pub fn len(&self) -> usize {
        self.entries.lock().map_or(0, |e| e.len())
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The two throttles every password sign-in passes: per username (or email) and per client
/// address.
#[derive(Debug)]
pub struct Logins {
    by_name: LoginThrottle,
    by_address: LoginThrottle,
}

impl Logins {
    #[must_use]
    pub fn new(per_name: u32, per_address: u32, lockout: Duration) -> Self {
        Self {
            by_name: LoginThrottle::new(per_name, lockout),
            by_address: LoginThrottle::new(per_address, lockout),
        }
    }

    /// Admits an attempt for `name` from `address`, counting it as a failure on both until
    /// [`Self::succeeded`].
    ///
    /// # Errors
    /// How long the address or the name stays locked.
    pub fn begin(&self, address: &str, name: &str) -> Result<(), Duration> {
        self.by_address.begin(address)?;
        self.by_name.begin(name)
    }

    /// The right password: the name's failures are forgiven, and this one attempt of the
    /// address's.
    pub fn succeeded(&self, address: &str, name: &str) {
        self.by_name.succeeded(name);
        self.by_address.forgive_one(address);
    }

    /// Entries held by the two throttles (each bounded).
    #[must_use]
    pub fn tracked(&self) -> (usize, usize) {
        (self.by_name.len(), self.by_address.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_names_tracked_are_bounded_even_in_a_flood() {
        let t = LoginThrottle::new(3, Duration::from_secs(60));
        let start = Instant::now();
        for i in 0..MAX_TRACKED + 100 {
            assert!(t.begin_at(&format!("user{i}"), start).is_ok());
        }
        let tracked = t.entries.lock().map(|m| m.len()).unwrap_or(usize::MAX);
        assert!(tracked <= MAX_TRACKED, "{tracked} names tracked");
    }

    #[test]
    fn locks_after_max_failures_until_the_lockout_ends() {
        let t = LoginThrottle::new(3, Duration::from_secs(60));
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(t.begin_at("alice", t0).is_ok());
        }
        let wait = t.begin_at("alice", t0 + Duration::from_secs(1));
        assert_eq!(wait, Err(Duration::from_secs(59)));
        assert!(
            t.begin_at("bob", t0).is_ok(),
            "other usernames are not locked"
        );
        assert!(t.begin_at("alice", t0 + Duration::from_secs(61)).is_ok());
    }

    #[test]
    fn a_success_forgives_earlier_failures_and_old_failures_expire() {
        let t = LoginThrottle::new(3, Duration::from_secs(60));
        let t0 = Instant::now();
        assert!(t.begin_at("alice", t0).is_ok());
        assert!(t.begin_at("alice", t0).is_ok());
        t.succeeded("alice");
        assert!(t.begin_at("alice", t0).is_ok());
        assert!(t.begin_at("alice", t0).is_ok());
        // Two failures long ago do not count towards a new lock.
        let later = t0 + Duration::from_secs(120);
        assert!(t.begin_at("alice", later).is_ok());
        assert!(t.begin_at("alice", later).is_ok());
        assert!(t.begin_at("alice", later).is_ok());
        assert!(t.begin_at("alice", later).is_err());
    }
}
