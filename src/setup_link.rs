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

    /// Takes the link if `token` is it and unexpired, in one step: of two requests racing
    /// with it, only one gets it.
    #[must_use]
    pub fn take(&self, token: &str) -> Option<SetupClaim> {
        let hash = hash_secret(token);
        let mut slot = self.current.lock().ok()?;
        match slot.as_ref() {
            Some((h, until)) if *h == hash && Instant::now() < *until => {
                slot.take().map(|(hash, until)| SetupClaim { hash, until })
            }
            _ => None,
        }
    }

    /// Puts a taken link back (its form needs another try), unless another link was issued
    /// meanwhile.
    pub fn give_back(&self, claim: SetupClaim) {
        if let Ok(mut slot) = self.current.lock() {
            if slot.is_none() {
                *slot = Some((claim.hash, claim.until));
            }
        }
    }
}

/// A setup link taken by one request.
#[derive(Debug)]
pub struct SetupClaim {
    hash: String,
    until: Instant,
}

#[cfg(test)]
mod tests {
    use super::SetupLinks;

    #[test]
    fn a_link_is_taken_once_and_can_be_given_back() {
        let links = SetupLinks::new(std::time::Duration::from_secs(60));
        let token = links.issue();
        assert!(links.take("wrong").is_none());
        let claim = links.take(&token).expect("first take");
        assert!(links.take(&token).is_none(), "taken once");
        assert!(!links.is_valid(&token));
        links.give_back(claim);
        assert!(links.is_valid(&token), "given back for another try");
    }
}
