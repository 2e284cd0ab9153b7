//! Dashboard administrators: email + argon2 password hash.

use argon2::{
    password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString},
    Argon2,
};
use sea_orm::{entity::prelude::*, ActiveValue::Set};

pub use super::_entities::admins::{self, ActiveModel, Entity, Model};
use super::{now, ModelError};

impl ActiveModelBehavior for ActiveModel {}

/// Hashes a password with argon2id and a fresh random salt.
///
/// # Errors
/// When argon2 rejects its parameters (never with the defaults).
pub fn hash_password(password: &str) -> Result<String, ModelError> {
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| ModelError::Hash(e.to_string()))
}

impl Model {
    /// Finds an admin by email (case-insensitive: emails are stored lower-case).
    ///
    /// # Errors
    /// On database errors.
    pub async fn find_by_email(
        db: &DatabaseConnection,
        email: &str,
    ) -> Result<Option<Self>, ModelError> {
        Ok(Entity::find()
            .filter(admins::Column::Email.eq(email.trim().to_lowercase()))
            .one(db)
            .await?)
    }

    /// True when `password` matches the stored argon2 hash. (Blocking: argon2 on purpose.)
    #[must_use]
    pub fn verify_password(&self, password: &str) -> bool {
        PasswordHash::new(&self.password_hash).is_ok_and(|parsed| {
            Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        })
    }
}

/// A hash to verify against when the account is unknown (admins and seed 002 users alike), so
/// that a sign-in for a missing account costs the same argon2 work as a wrong password.
pub fn decoy_hash() -> &'static str {
    use std::sync::OnceLock;
    static DECOY: OnceLock<String> = OnceLock::new();
    DECOY.get_or_init(|| hash_password("decoy password, never matches").unwrap_or_default())
}

/// Runs the same argon2 check as a real sign-in against [`decoy_hash`].
pub fn verify_decoy(password: &str) {
    if let Ok(parsed) = PasswordHash::new(decoy_hash()) {
        let _ = Argon2::default().verify_password(password.as_bytes(), &parsed);
    }
}

impl ActiveModel {
    /// Creates an admin; rejects a malformed email, a short password or a duplicate.
    ///
    /// # Errors
    /// `Invalid` for bad input or a duplicate email, or a database error.
    pub async fn create(
        db: &DatabaseConnection,
        email: &str,
        password: &str,
    ) -> Result<Model, ModelError> {
        let email = email.trim().to_lowercase();
        if !email.contains('@') || email.len() < 3 {
            return Err(ModelError::Invalid(format!(
                "not an email address: {email:?}"
            )));
        }
        if password.chars().count() < 8 {
            return Err(ModelError::Invalid(
                "password must have at least 8 characters".into(),
            ));
        }
        if Model::find_by_email(db, &email).await?.is_some() {
            return Err(ModelError::Invalid(format!("admin {email} already exists")));
        }
        let ts = now();
        let am = Self {
            email: Set(email),
            password_hash: Set(hash_password(password)?),
            created_at: Set(ts),
            updated_at: Set(ts),
            ..Default::default()
        };
        Ok(am.insert(db).await?)
    }
}
