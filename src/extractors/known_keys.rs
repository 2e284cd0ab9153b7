//! Keys recently identified, by the hash of their secret, for the routes that spend a call.
//!
//! Those routes charge the key in one statement that checks the secret's hash, revocation, date
//! window and quota ([`crate::models::api_keys::charge`]), and the budget reservation after it
//! checks the user. So the identity read before the body is validated (for 401/403 first, the
//! rate limit and the allow-lists) may come from a short-lived cache instead of a `SELECT` on
//! every request: a key revoked, rotated or out of its window a moment ago is still refused by
//! the charge. Edits made in this process ([`crate::models::api_keys::edits`]) drop every
//! cached identity at once; another API process sees them within the time to live.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::models::api_keys;

/// At most this many identities are kept (a few hundred bytes each).
const BOUND: usize = 10_000;

struct Known {
    key: api_keys::Model,
    at: Instant,
    /// [`api_keys::edits`] when the row was read.
    edits: u64,
}

/// A bounded map from secret hash to key row, each entry valid for `ttl`.
pub struct KnownKeys {
    ttl: Duration,
    map: Mutex<HashMap<String, Known>>,
}

impl KnownKeys {
    /// `ttl` zero turns the cache off: every request reads its key.
    #[must_use]
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            map: Mutex::new(HashMap::new()),
        }
    }

    /// The key whose secret hashes to `hash`, if it was read less than `ttl` ago and no key
    /// was edited in this process since.
    pub fn get(&self, hash: &str) -> Option<api_keys::Model> {
        if self.ttl.is_zero() {
            return None;
        }
        let mut map = self.map.lock().ok()?;
        let fresh = map
            .get(hash)
            .is_some_and(|k| k.at.elapsed() < self.ttl && k.edits == api_keys::edits());
        if fresh {
            map.get(hash).map(|k| k.key.clone())
        } else {
            map.remove(hash);
            None
        }
    }

    /// Remembers `key`, read when [`api_keys::edits`] was `edits` (taken before the read, so
    /// an edit racing with it leaves the entry stale, not wrong for long).
    pub fn put(&self, hash: String, key: api_keys::Model, edits: u64) {
        if self.ttl.is_zero() {
            return;
        }
        let Ok(mut map) = self.map.lock() else {
            return;
        };
        if map.len() >= BOUND && !map.contains_key(&hash) {
            let ttl = self.ttl;
            let now = api_keys::edits();
            map.retain(|_, k| k.at.elapsed() < ttl && k.edits == now);
            if map.len() >= BOUND {
                map.clear();
            }
        }
        map.insert(
            hash,
            Known {
                key,
                at: Instant::now(),
                edits,
            },
        );
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.lock().map_or(0, |m| m.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// These tests move the process-wide edit count; run them one at a time.
    static SERIAL: Mutex<()> = Mutex::new(());

    fn key(id: i32) -> api_keys::Model {
        api_keys::test_key(id)
    }

    #[test]
    fn an_identity_is_served_until_its_time_to_live_ends() {
        let _serial = SERIAL
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let cache = KnownKeys::new(Duration::from_millis(1000));
        cache.put("h1".into(), key(1), api_keys::edits());
        assert_eq!(cache.get("h1").map(|k| k.id), Some(1));
        assert!(cache.get("h2").is_none());
        std::thread::sleep(Duration::from_millis(1100));
        assert!(cache.get("h1").is_none(), "expired entry served");
        assert_eq!(cache.len(), 0, "an expired entry is dropped when met");
    }

    #[test]
    fn an_edit_in_this_process_drops_every_identity_read_before_it() {
        let _serial = SERIAL
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let cache = KnownKeys::new(Duration::from_secs(60));
        cache.put("h1".into(), key(1), api_keys::edits());
        api_keys::edited();
        assert!(
            cache.get("h1").is_none(),
            "identity read before an edit served"
        );
        // Read before the edit, stored after it: stale from the start.
        let before = api_keys::edits();
        api_keys::edited();
        cache.put("h2".into(), key(2), before);
        assert!(cache.get("h2").is_none());
    }

    #[test]
    fn zero_time_to_live_caches_nothing_and_the_size_is_bounded() {
        let _serial = SERIAL
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let off = KnownKeys::new(Duration::ZERO);
        off.put("h1".into(), key(1), api_keys::edits());
        assert!(off.get("h1").is_none());
        let cache = KnownKeys::new(Duration::from_secs(60));
        let edits = api_keys::edits();
        for i in 0..(BOUND + 10) {
            cache.put(format!("h{i}"), key(1), edits);
        }
        assert!(cache.len() <= BOUND, "{} entries", cache.len());
    }
}
