//! Seed 002's users: a username and argon2 password for `POST /token`, a role (`user` or
//! `admin`), an enabled flag, and prompt/generation token budgets with their counters.
//!
//! A user never calls with the password: `/token` issues an ordinary API key linked to the user
//! (only its SHA-256 stored, valid for `settings.auth.token_ttl_minutes`), and every generation
//! made with it is reserved against both the key's and the user's budgets.

use argon2::{
    password_hash::{PasswordHash, PasswordVerifier},
    Argon2,
};
use sea_orm::{entity::prelude::*, ActiveValue::Set, SqlErr};

pub use super::_entities::users::{self, ActiveModel, Column, Entity, Model};
use super::{
    admins::hash_password,
    api_keys::{self, IssuedKey, KeyParams, Scope},
    now, ModelError,
};

impl ActiveModelBehavior for ActiveModel {}

pub const MAX_USERNAME_CHARS: usize = 64;
pub const MIN_PASSWORD_CHARS: usize = 8;
pub const MAX_PASSWORD_CHARS: usize = 1024;

/// What a user may do: `admin` users get `admin`-scope tokens (they can add users).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Role {
    #[default]
    User,
    Admin,
}

impl Role {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Admin => "admin",
        }
    }

    /// # Errors
    /// `Invalid` for anything but `user` or `admin`.
    pub fn parse(value: &str) -> Result<Self, ModelError> {
        match value.trim().to_ascii_lowercase().as_str() {
            "user" => Ok(Self::User),
            "admin" => Ok(Self::Admin),
            other => Err(ModelError::Invalid(format!(
                "role must be `user` or `admin`, got {other:?}"
            ))),
        }
    }
}

/// A user about to be created. Counters may start above zero (users migrated from seed 002
/// keep what they already spent).
#[derive(Debug, Clone, Default)]
pub struct NewUser {
    pub username: String,
    pub password: String,
    pub role: Role,
    pub enabled: bool,
    pub prompt_token_limit: Option<i64>,
    pub gen_token_limit: Option<i64>,
    pub prompt_tokens_used: i64,
    pub gen_tokens_used: i64,
    /// Shortest password accepted: [`MIN_PASSWORD_CHARS`] from the dashboard and the CLI; 1 on
    /// seed 002's `add_user`, whose admins chose passwords with no rule.
    pub min_password_chars: usize,
}

/// How a login attempt ended.
#[derive(Debug)]
pub enum Login {
    Ok(Model),
    /// Right password, but the user is disabled.
    Disabled(Model),
    /// Unknown user or wrong password (deliberately not told apart).
    Invalid,
}

/// The trimmed username, or why it is not acceptable.
///
/// # Errors
/// `Invalid` for an empty, too long or control-character username.
pub fn normalize_username(username: &str) -> Result<String, ModelError> {
    let name = username.trim();
    if name.is_empty() || name.chars().count() > MAX_USERNAME_CHARS {
        return Err(ModelError::Invalid(format!(
            "username must be 1 to {MAX_USERNAME_CHARS} characters"
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(ModelError::Invalid(
            "username must not contain control characters".into(),
        ));
    }
    Ok(name.to_string())
}

fn verify(hash: &str, password: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|parsed| {
        Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok()
    })
}

impl Model {
    #[must_use]
    pub fn role(&self) -> Role {
        Role::parse(&self.role).unwrap_or_default()
    }

    #[must_use]
    pub fn is_admin(&self) -> bool {
        self.role() == Role::Admin
    }

    /// # Errors
    /// On database errors.
    pub async fn find_by_username<C: ConnectionTrait>(
        db: &C,
        username: &str,
    ) -> Result<Option<Self>, ModelError> {
        Ok(Entity::find()
            .filter(Column::Username.eq(username.trim()))
            .one(db)
            .await?)
    }

    /// # Errors
    /// On database errors.
    pub async fn find<C: ConnectionTrait>(db: &C, id: i32) -> Result<Option<Self>, ModelError> {
        Ok(Entity::find_by_id(id).one(db).await?)
    }
}

/// Checks a username and password. The argon2 check runs off the async runtime, and runs
/// against a decoy hash for unknown users, so the answer's timing does not reveal which
/// usernames exist.
///
/// # Errors
/// On database errors.
pub async fn authenticate<C: ConnectionTrait>(
    db: &C,
    username: &str,
    password: &str,
) -> Result<Login, ModelError> {
    let user = Model::find_by_username(db, username).await?;
    let hash = user.as_ref().map_or_else(
        || super::admins::decoy_hash().to_string(),
        |u| u.password_hash.clone(),
    );
    let password = password.to_string();
    let matches = tokio::task::spawn_blocking(move || verify(&hash, &password))
        .await
        .map_err(|e| ModelError::Hash(e.to_string()))?;
    Ok(match user {
        Some(user) if matches && user.enabled => Login::Ok(user),
        Some(user) if matches => Login::Disabled(user),
        _ => Login::Invalid,
    })
}

/// Issues a login token for `user`: an API key linked to the user, `admin` scope for admin
/// users, valid for `ttl` from now. The secret is returned once and stored only as a hash.
///
/// # Errors
/// On database errors.
pub async fn issue_token<C: ConnectionTrait>(
    db: &C,
    user: &Model,
    ttl: chrono::Duration,
) -> Result<IssuedKey, ModelError> {
    api_keys::ActiveModel::issue(
        db,
        KeyParams {
            name: format!("login:{}", user.username),
            // Keys need an address; `.invalid` (RFC 2606) marks it as not deliverable.
            email: format!("user-{}@users.invalid", user.id),
            scope: if user.is_admin() {
                Scope::Admin
            } else {
                Scope::Client
            },
            valid_until: Some(now() + ttl),
            user_id: Some(user.id),
            ..Default::default()
        },
    )
    .await
}

impl ActiveModel {
    /// Creates a user with an argon2 password hash.
    ///
    /// # Errors
    /// `Invalid` for a bad username, password or negative number; `Conflict` when the username
    /// is taken; a database error otherwise.
    pub async fn create<C: ConnectionTrait>(db: &C, new: NewUser) -> Result<Model, ModelError> {
        let username = normalize_username(&new.username)?;
        let len = new.password.chars().count();
        let min = new.min_password_chars.max(1);
        if !(min..=MAX_PASSWORD_CHARS).contains(&len) {
            return Err(ModelError::Invalid(format!(
                "password must be {min} to {MAX_PASSWORD_CHARS} characters"
            )));
        }
        for (field, value) in [
            ("prompt_token_limit", new.prompt_token_limit),
            ("gen_token_limit", new.gen_token_limit),
            ("prompt_token_number", Some(new.prompt_tokens_used)),
            ("gen_token_number", Some(new.gen_tokens_used)),
        ] {
            if value.is_some_and(|v| v < 0) {
                return Err(ModelError::Invalid(format!("{field} must be 0 or more")));
            }
        }
        if Model::find_by_username(db, &username).await?.is_some() {
            return Err(ModelError::Conflict(format!(
                "user {username:?} already exists"
            )));
        }
        let password = new.password;
        let hash = tokio::task::spawn_blocking(move || hash_password(&password))
            .await
            .map_err(|e| ModelError::Hash(e.to_string()))??;
        let ts = now();
        let row = Self {
            username: Set(username.clone()),
            password_hash: Set(hash),
            role: Set(new.role.as_str().to_string()),
            enabled: Set(new.enabled),
            prompt_token_limit: Set(new.prompt_token_limit),
            gen_token_limit: Set(new.gen_token_limit),
            prompt_tokens_used: Set(new.prompt_tokens_used),
            gen_tokens_used: Set(new.gen_tokens_used),
            created_at: Set(ts),
            updated_at: Set(ts),
            ..Default::default()
        };
        match row.insert(db).await {
            Ok(user) => Ok(user),
            // A concurrent request created the same username between the check and the insert.
            Err(e) if matches!(e.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))) => Err(
                ModelError::Conflict(format!("user {username:?} already exists")),
            ),
            Err(e) => Err(e.into()),
        }
    }

    /// Enables or disables a user. A disabled user cannot log in, and generations with keys
    /// already issued to them are refused (403).
    ///
    /// # Errors
    /// `NotFound` for an unknown username, or a database error.
    pub async fn set_enabled<C: ConnectionTrait>(
        db: &C,
        username: &str,
        enabled: bool,
    ) -> Result<Model, ModelError> {
        let user = Model::find_by_username(db, username)
            .await?
            .ok_or_else(|| ModelError::NotFound(format!("no user {username:?}")))?;
        let mut am: Self = user.into();
        am.enabled = Set(enabled);
        am.updated_at = Set(now());
        let user = am
            .update(db)
            .await
            .map_err(|e| ModelError::gone_as(e, || format!("no user {username:?}")))?;
        super::api_keys::edited();
        Ok(user)
    }
}

/// What an admin may change about a user; `None` leaves a field as it is (for a limit,
/// `Some(None)` removes it).
#[derive(Debug, Clone, Default)]
pub struct UserChanges {
    pub enabled: Option<bool>,
    pub role: Option<Role>,
    pub password: Option<String>,
    pub prompt_token_limit: Option<Option<i64>>,
    pub gen_token_limit: Option<Option<i64>>,
    /// Sets both token counters back to zero.
    pub reset_counters: bool,
}

impl ActiveModel {
    /// Applies `changes` to a user. Disabling one stops every token it holds at once (the
    /// caller extractor checks `enabled` whenever it reads a key, and a change here makes it read
    /// again; generations are also refused by the budget reservation).
    ///
    /// # Errors
    /// `NotFound` for an unknown username, `Invalid` for a negative limit or a bad password,
    /// or a database error.
    pub async fn change<C: ConnectionTrait>(
        db: &C,
        username: &str,
        changes: UserChanges,
    ) -> Result<Model, ModelError> {
        let user = Model::find_by_username(db, username)
            .await?
            .ok_or_else(|| ModelError::NotFound(format!("no user {username:?}")))?;
        for (field, value) in [
            ("prompt_token_limit", changes.prompt_token_limit.flatten()),
            ("gen_token_limit", changes.gen_token_limit.flatten()),
        ] {
            if value.is_some_and(|v| v < 0) {
                return Err(ModelError::Invalid(format!("{field} must be 0 or more")));
            }
        }
        let hash = match changes.password {
            Some(password) => {
                let len = password.chars().count();
                if !(MIN_PASSWORD_CHARS..=MAX_PASSWORD_CHARS).contains(&len) {
                    return Err(ModelError::Invalid(format!(
                        "password must be {MIN_PASSWORD_CHARS} to {MAX_PASSWORD_CHARS} characters"
                    )));
                }
                Some(
                    tokio::task::spawn_blocking(move || hash_password(&password))
                        .await
                        .map_err(|e| ModelError::Hash(e.to_string()))??,
                )
            }
            None => None,
        };
        let mut am: Self = user.into();
        if let Some(enabled) = changes.enabled {
            am.enabled = Set(enabled);
        }
        if let Some(role) = changes.role {
            am.role = Set(role.as_str().to_string());
        }
        if let Some(hash) = hash {
            am.password_hash = Set(hash);
        }
        if let Some(limit) = changes.prompt_token_limit {
            am.prompt_token_limit = Set(limit);
        }
        if let Some(limit) = changes.gen_token_limit {
            am.gen_token_limit = Set(limit);
        }
        if changes.reset_counters {
            am.prompt_tokens_used = Set(0);
            am.gen_tokens_used = Set(0);
        }
        am.updated_at = Set(now());
        let user = am
            .update(db)
            .await
            .map_err(|e| ModelError::gone_as(e, || format!("no user {username:?}")))?;
        super::api_keys::edited();
        Ok(user)
    }

    /// Deletes a user: every token issued to it is revoked first (its jobs and usage stay, as
    /// records), then the user and its stored conversations go.
    ///
    /// # Errors
    /// `NotFound` for an unknown username, or a database error.
    pub async fn remove<C: ConnectionTrait>(db: &C, username: &str) -> Result<Model, ModelError> {
        use sea_orm::{sea_query::Expr, QueryFilter};
        let user = Model::find_by_username(db, username)
            .await?
            .ok_or_else(|| ModelError::NotFound(format!("no user {username:?}")))?;
        let ts = now();
        super::_entities::api_keys::Entity::update_many()
            .col_expr(
                super::_entities::api_keys::Column::RevokedAt,
                Expr::value(ts),
            )
            .col_expr(
                super::_entities::api_keys::Column::UpdatedAt,
                Expr::value(ts),
            )
            .filter(super::_entities::api_keys::Column::UserId.eq(user.id))
            .filter(super::_entities::api_keys::Column::RevokedAt.is_null())
            .exec(db)
            .await?;
        Entity::delete_by_id(user.id).exec(db).await?;
        super::api_keys::edited();
        Ok(user)
    }
}

/// Every user, by name.
///
/// # Errors
/// On database errors.
pub async fn list<C: ConnectionTrait>(db: &C) -> Result<Vec<Model>, ModelError> {
    use sea_orm::QueryOrder;
    Ok(Entity::find()
        .order_by_asc(Column::Username)
        .all(db)
        .await?)
}
