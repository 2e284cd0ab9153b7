//! Dashboard sessions. The cookie holds a random token; the database holds its SHA-256, the
//! admin, a per-session CSRF token and the expiry. Signing out deletes the row.

use rand::RngCore;
use sea_orm::{entity::prelude::*, ActiveValue::Set};

pub use super::_entities::admin_sessions::{self, ActiveModel, Column, Entity, Model};
use super::{admins, api_keys::hash_secret, now, ModelError};

impl ActiveModelBehavior for ActiveModel {}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rngs::OsRng.fill_bytes(&mut buf);
    hex::encode(buf)
}

/// Starts a session for `admin_id`; returns the cookie token (only here in plain) and the row.
///
/// # Errors
/// On database errors.
pub async fn start<C: ConnectionTrait>(
    db: &C,
    admin_id: i32,
    ttl: chrono::Duration,
) -> Result<(String, Model), ModelError> {
    let token = random_hex(32);
    let ts = now();
    let row = ActiveModel {
        admin_id: Set(admin_id),
        token_hash: Set(hash_secret(&token)),
        csrf_token: Set(random_hex(16)),
        created_at: Set(ts),
        expires_at: Set(ts + ttl),
        ..Default::default()
    }
    .insert(db)
    .await?;
    Ok((token, row))
}

/// The unexpired session for a cookie token, with its admin.
///
/// # Errors
/// On database errors.
pub async fn find_valid<C: ConnectionTrait>(
    db: &C,
    token: &str,
) -> Result<Option<(Model, admins::Model)>, ModelError> {
    let Some(session) = Entity::find()
        .filter(Column::TokenHash.eq(hash_secret(token)))
        .filter(Column::ExpiresAt.gt(now()))
        .one(db)
        .await?
    else {
        return Ok(None);
    };
    let admin = admins::Entity::find_by_id(session.admin_id).one(db).await?;
    Ok(admin.map(|a| (session, a)))
}

/// Ends the session of a cookie token (no error when there is none).
///
/// # Errors
/// On database errors.
pub async fn end<C: ConnectionTrait>(db: &C, token: &str) -> Result<(), ModelError> {
    Entity::delete_many()
        .filter(Column::TokenHash.eq(hash_secret(token)))
        .exec(db)
        .await?;
    Ok(())
}
