//! The first-run setup link: while there is no admin, the server logs a single-use link that
//! creates the first one in the browser. Only the token's hash is kept, in memory, so the link
//! works only on the instance that printed it (`cargo loco task admin:create` works anywhere).

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::models::api_keys::hash_secret;

/// The current setup token's hash and expiry (at most one at a time).
#[derive(Debug)]
pub struct SetupLinks {
    ttl: Duration,
    current: Mutex<Option<(String, Instant)>>,
}

impl SetupLinks {
    #[must_use]
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            current: Mutex::new(None),
        }
    }

    /// Makes a new token (replacing any earlier one) and returns it.
    #[must_use]
    pub fn issue(&self) -> String {
        let token = uuid::Uuid::new_v4().simple().to_string();
        if let Ok(mut slot) = self.current.lock() {
            *slot = Some((hash_secret(&token), Instant::now() + self.ttl));
        }
        token
    }

    /// Whether `token` is the current, unexpired setup token.
    #[must_use]
    pub fn is_valid(&self, token: &str) -> bool {
        let hash = hash_secret(token);
        self.current.lock().is_ok_and(|slot| {
            slot.as_ref()
                .is_some_and(|(h, until)| *h == hash && Instant::now() < *until)
        })
    }

    /// The link is single use.
    pub fn consume(&self) {
        if let Ok(mut slot) = self.current.lock() {
            *slot = None;
        }
    }
}
