//! API keys: issuing, looking up by secret, and the atomic charge that decides every call.
//!
//! A key's secret is `tg_<prefix>_<64 hex chars>` (256 random bits). Only its SHA-256 is stored;
//! the prefix is public and identifies the key in lists and logs.

use rand::RngCore;
use sea_orm::{
    entity::prelude::*,
    sea_query::{Expr, ExprTrait},
    ActiveValue::Set,
    Condition, QueryOrder,
};
use sha2::{Digest, Sha256};

pub use super::_entities::api_keys::{self, ActiveModel, Column, Entity, Model};
use super::{now, ModelError};

impl ActiveModelBehavior for ActiveModel {}

/// One page of [`Model::page`]: its keys and how many match in all.
#[derive(Debug)]
pub struct KeyPage {
    pub keys: Vec<Model>,
    pub total: u64,
}

/// Highest scheduling priority an admin may give a key.
pub const MAX_PRIORITY: i32 = 10;

fn checked_priority(priority: i32) -> Result<i32, ModelError> {
    if (0..=MAX_PRIORITY).contains(&priority) {
        Ok(priority)
    } else {
        Err(ModelError::Invalid(format!(
            "priority must be 0 to {MAX_PRIORITY}, got {priority}"
        )))
    }
}

/// What a new key may do; `None` means unlimited / open-ended.
#[derive(Debug, Clone, Default)]
pub struct KeyParams {
    pub name: String,
    pub email: String,
    pub organization: Option<String>,
    pub max_calls: Option<i64>,
    pub valid_from: Option<DateTimeWithTimeZone>,
    pub valid_until: Option<DateTimeWithTimeZone>,
    pub scope: Scope,
    /// Requests per minute; `None` takes the configured default.
    pub rate_limit_per_minute: Option<i32>,
    pub rate_limit_burst: Option<i32>,
    /// Models this key may use; empty = all.
    pub allowed_models: Vec<String>,
    /// LoRA adapters this key may use; empty = all.
    pub allowed_adapters: Vec<String>,
    /// The user this key acts for (seed 002 login tokens); their token budget applies too.
    pub user_id: Option<i32>,
    /// Prompt tokens this key may spend in all; `None` = unlimited.
    pub prompt_token_limit: Option<i64>,
    /// Generated tokens this key may spend in all; `None` = unlimited.
    pub gen_token_limit: Option<i64>,
    /// Scheduling priority (0 = normal, at most [`MAX_PRIORITY`]): p + 1 turns per round.
    pub priority: i32,
}

/// What a key may reach: `admin` keys also reach the management routes (seed 004's `/llm/*`,
/// adding users, registering adapters); `client` keys get 403 there.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Scope {
    #[default]
    Client,
    Admin,
}

impl Scope {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Admin => "admin",
        }
    }

    /// # Errors
    /// `Invalid` for anything but `client` or `admin`.
    pub fn parse(value: &str) -> Result<Self, ModelError> {
        match value.trim().to_ascii_lowercase().as_str() {
            "client" => Ok(Self::Client),
            "admin" => Ok(Self::Admin),
            other => Err(ModelError::Invalid(format!(
                "scope must be `client` or `admin`, got {other:?}"
            ))),
        }
    }
}

/// Stores an allow-list as a JSON array; an empty list is stored as NULL (= everything).
fn encode_list(items: &[String]) -> Option<String> {
    let items: Vec<&str> = items
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .collect();
    (!items.is_empty()).then(|| serde_json::Value::from(items).to_string())
}

fn decode_list(stored: Option<&str>) -> Vec<String> {
    stored
        .and_then(|s| serde_json::from_str::<Vec<String>>(s).ok())
        .unwrap_or_default()
}

/// A freshly issued key: the stored row and the plain secret, which exists only here.
#[derive(Debug)]
pub struct IssuedKey {
    pub key: Model,
    pub secret: String,
}

/// Why a key may not make a call right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Revoked,
    NotYetValid,
    Expired,
    QuotaExhausted {
        max_calls: i64,
    },
    /// The key row is gone (deleted between lookup and charge).
    Unknown,
}

/// The state shown for a key in lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    Active,
    Revoked,
    NotYetValid,
    Expired,
    Exhausted,
}

impl KeyState {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Revoked => "revoked",
            Self::NotYetValid => "not yet valid",
            Self::Expired => "expired",
            Self::Exhausted => "exhausted",
        }
    }
}

/// Changes made in this process to keys' standing, limits or secrets (and to their users):
/// identities cached by [`crate::extractors::KnownKeys`] before the latest one are not used.
static EDITS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many key edits this process has made; see [`EDITS`].
#[must_use]
pub fn edits() -> u64 {
    EDITS.load(std::sync::atomic::Ordering::Acquire)
}

/// Records a key edit (after it is written), so cached identities are read again.
pub(crate) fn edited() {
    EDITS.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
}

/// SHA-256 of the whole secret, hex-encoded: the only form in which a secret is stored.
#[must_use]
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Whether two secrets (tokens, CSRF values) are equal, in time that does not depend on where
/// they first differ.
#[must_use]
pub fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn new_secret() -> (String, String) {
    let mut rng = rand::rngs::OsRng;
    let mut prefix = [0u8; 4];
    let mut body = [0u8; 32];
    rng.fill_bytes(&mut prefix);
    rng.fill_bytes(&mut body);
    let prefix = hex::encode(prefix);
    let secret = format!("tg_{prefix}_{}", hex::encode(body));
    (prefix, secret)
}

impl Model {
    #[must_use]
    pub fn scope(&self) -> Scope {
        Scope::parse(&self.scope).unwrap_or_default()
    }

    #[must_use]
    pub fn is_admin(&self) -> bool {
        self.scope() == Scope::Admin
    }

    /// Models this key may use; empty means all.
    #[must_use]
    pub fn allowed_models(&self) -> Vec<String> {
        decode_list(self.allowed_models.as_deref())
    }

    /// LoRA adapters this key may use; empty means all.
    #[must_use]
    pub fn allowed_adapters(&self) -> Vec<String> {
        decode_list(self.allowed_adapters.as_deref())
    }

    #[must_use]
    pub fn permits_model(&self, model: &str) -> bool {
        let allowed = self.allowed_models();
        allowed.is_empty() || allowed.iter().any(|m| m == model)
    }

    #[must_use]
    pub fn permits_adapter(&self, adapter: &str) -> bool {
        let allowed = self.allowed_adapters();
        allowed.is_empty() || allowed.iter().any(|a| a == adapter)
    }

    /// The key whose secret this is, if any (revoked keys included: callers decide).
    ///
    /// # Errors
    /// On database errors.
    pub async fn find_by_secret<C: ConnectionTrait>(
        db: &C,
        secret: &str,
    ) -> Result<Option<Self>, ModelError> {
        Self::find_by_hash(db, &hash_secret(secret)).await
    }

    /// The key whose secret hashes to `hash` ([`hash_secret`]).
    ///
    /// # Errors
    /// On database errors.
    pub async fn find_by_hash<C: ConnectionTrait>(
        db: &C,
        hash: &str,
    ) -> Result<Option<Self>, ModelError> {
        Ok(Entity::find()
            .filter(Column::SecretHash.eq(hash))
            .one(db)
            .await?)
    }

    /// # Errors
    /// On database errors.
    pub async fn find_by_prefix<C: ConnectionTrait>(
        db: &C,
        prefix: &str,
    ) -> Result<Option<Self>, ModelError> {
        Ok(Entity::find()
            .filter(Column::Prefix.eq(prefix.trim()))
            .one(db)
            .await?)
    }

    /// All keys, newest first.
    ///
    /// # Errors
    /// On database errors.
    pub async fn list<C: ConnectionTrait>(db: &C) -> Result<Vec<Self>, ModelError> {
        Ok(Entity::find()
            .order_by_desc(Column::CreatedAt)
            .order_by_desc(Column::Id)
            .all(db)
            .await?)
    }

    /// One page of the keys admins issued (seed 002's per-login tokens are keys too, but not
    /// theirs to list), newest first, only those whose name, email or prefix contains `search`
    /// (case-insensitive) when it is not empty. Filtered, counted and cut in SQL, so a page
    /// costs about the same with 100,000 keys as with ten.
    ///
    /// # Errors
    /// On database errors.
    pub async fn page<C: ConnectionTrait>(
        db: &C,
        search: &str,
        offset: u64,
        limit: u64,
    ) -> Result<KeyPage, ModelError> {
        use sea_orm::{
            sea_query::{Func, LikeExpr},
            QuerySelect,
        };
        let mut q = Entity::find().filter(Column::UserId.is_null());
        let search = search.trim().to_lowercase();
        if !search.is_empty() {
            // `%` and `_` in the search are literal characters, not wildcards.
            let escaped = search
                .replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_");
            let pattern = || LikeExpr::new(format!("%{escaped}%")).escape('\\');
            let lower = |c: Column| Expr::from(Func::lower(Expr::col(c)));
            q = q.filter(
                Condition::any()
                    .add(lower(Column::Name).like(pattern()))
                    .add(lower(Column::Email).like(pattern()))
                    .add(Expr::col(Column::Prefix).like(pattern())),
            );
        }
        let total = q.clone().count(db).await?;
        // Ids grow with creation, so the primary key gives "newest first" without a sort.
        let keys = q
            .order_by_desc(Column::Id)
            .offset(offset)
            .limit(limit)
            .all(db)
            .await?;
        Ok(KeyPage { keys, total })
    }

    /// The prefixes of the keys `ids` (those that exist), in one query: what a list of jobs
    /// needs to name their keys, without reading every key.
    ///
    /// # Errors
    /// On database errors.
    pub async fn prefixes_of<C: ConnectionTrait>(
        db: &C,
        ids: impl IntoIterator<Item = i32>,
    ) -> Result<std::collections::HashMap<i32, String>, ModelError> {
        use sea_orm::QuerySelect;
        let mut ids: Vec<i32> = ids.into_iter().collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.is_empty() {
            return Ok(std::collections::HashMap::new());
        }
        let rows: Vec<(i32, String)> = Entity::find()
            .select_only()
            .column(Column::Id)
            .column(Column::Prefix)
            .filter(Column::Id.is_in(ids))
            .into_tuple()
            .all(db)
            .await?;
        Ok(rows.into_iter().collect())
    }

    /// Why this key may not make a call at `at`, judged from this (possibly stale) row.
    /// Advisory only: [`charge`] is what decides.
    #[must_use]
    pub fn refusal_at(&self, at: DateTimeWithTimeZone) -> Option<Refusal> {
        if self.revoked_at.is_some() {
            Some(Refusal::Revoked)
        } else if self.valid_from.is_some_and(|from| at < from) {
            Some(Refusal::NotYetValid)
        } else if self.valid_until.is_some_and(|until| at > until) {
            Some(Refusal::Expired)
        } else {
            self.max_calls
                .filter(|max| self.calls_used >= *max)
                .map(|max_calls| Refusal::QuotaExhausted { max_calls })
        }
    }

    #[must_use]
    pub fn state_at(&self, at: DateTimeWithTimeZone) -> KeyState {
        match self.refusal_at(at) {
            None => KeyState::Active,
            Some(Refusal::Revoked | Refusal::Unknown) => KeyState::Revoked,
            Some(Refusal::NotYetValid) => KeyState::NotYetValid,
            Some(Refusal::Expired) => KeyState::Expired,
            Some(Refusal::QuotaExhausted { .. }) => KeyState::Exhausted,
        }
    }
}

/// Spends one call of key `key_id` if, at this instant, the key is not revoked, is inside its
/// date window and has quota left. The check and the increment are one `UPDATE … RETURNING`
/// statement, so concurrent requests can never overspend a quota.
///
/// # Errors
/// `Ok(Err(refusal))` when the key may not call; `Err` on database errors.
pub async fn charge<C: ConnectionTrait>(
    db: &C,
    key_id: i32,
    secret_hash: &str,
) -> Result<Result<Model, Refusal>, ModelError> {
    // The batch statement with one key: one place decides whether a key may call.
    let one = BatchCharge {
        key_id,
        secret_hash: secret_hash.to_string(),
        calls: 1,
        prompt_tokens: 0,
        gen_tokens: 0,
    };
    if let Some(key) = charge_many(db, &[one]).await?.into_iter().next() {
        return Ok(Ok(key));
    }
    // Refused: read the row only to say why.
    let at = now();
    let refusal = match Entity::find_by_id(key_id).one(db).await? {
        None => Refusal::Unknown,
        Some(key) if key.secret_hash != secret_hash => Refusal::Unknown,
        Some(key) => key.refusal_at(at).unwrap_or(Refusal::QuotaExhausted {
            max_calls: key.max_calls.unwrap_or_default(),
        }),
    };
    Ok(Err(refusal))
}

/// One key's share of a batch charged by [`charge_many`].
#[derive(Clone, Debug)]
pub struct BatchCharge {
    pub key_id: i32,
    /// The secret its callers were identified by (a key rotated since is not charged).
    pub secret_hash: String,
    pub calls: u32,
    /// Tokens reserved on the key's own budgets (the user's are reserved apart).
    pub prompt_tokens: i64,
    pub gen_tokens: i64,
}

/// Charges many keys in one statement, each all or none: its calls and its token reservation
/// when the key may call (the checks of [`charge`]) and all of them fit its quota and token
/// budgets. Concurrent admissions are committed together this way, of one key or of many: one
/// statement and one commit where each would take its own. Returns the rows of the keys
/// charged; a key absent from them was left as it was, and its callers then charge one by one
/// to learn where they stand.
///
/// On Postgres the rows are locked in id order before they change, so two batches over the same
/// keys (two API instances) wait for each other instead of deadlocking; SQLite has one writer.
///
/// # Errors
/// `Invalid` when a key appears twice; otherwise on database errors.
pub async fn charge_many<C: ConnectionTrait>(
    db: &C,
    charges: &[BatchCharge],
) -> Result<Vec<Model>, ModelError> {
    let mut ids: Vec<i32> = charges.iter().map(|c| c.key_id).collect();
    ids.sort_unstable();
    ids.dedup();
    if ids.len() != charges.len() {
        return Err(ModelError::Invalid(
            "a batch charges each key once".to_string(),
        ));
    }
    if charges.is_empty() {
        return Ok(Vec::new());
    }
    let backend = db.get_database_backend();
    let postgres = backend == sea_orm::DatabaseBackend::Postgres;
    let mut values: Vec<sea_orm::Value> = Vec::with_capacity(charges.len() * 5 + 3);
    let mut bind = |value: sea_orm::Value| {
        values.push(value);
        if postgres {
            format!("${}", values.len())
        } else {
            "?".to_string()
        }
    };
    let rows: Vec<String> = charges
        .iter()
        .map(|c| {
            format!(
                "({}, {}, {}, {}, {})",
                bind(c.key_id.into()),
                bind(c.secret_hash.clone().into()),
                bind(i64::from(c.calls).into()),
                bind(c.prompt_tokens.into()),
                bind(c.gen_tokens.into()),
            )
        })
        .collect();
    let at = now();
    let (set_at, from_at, until_at) = (bind(at.into()), bind(at.into()), bind(at.into()));
    let (lock, from, returning) = if postgres {
        (
            ", locked AS MATERIALIZED (SELECT id FROM api_keys WHERE id IN (SELECT id FROM v) \
             ORDER BY id FOR UPDATE)",
            "FROM v, locked WHERE k.id = v.id AND locked.id = v.id",
            "k.*",
        )
    } else {
        ("", "FROM v WHERE k.id = v.id", "*")
    };
    let sql = format!(
        "WITH v(id, secret_hash, calls, prompt, gen) AS (VALUES {rows}){lock} \
         UPDATE api_keys AS k SET calls_used = k.calls_used + v.calls, \
         prompt_tokens_used = k.prompt_tokens_used + v.prompt, \
         gen_tokens_used = k.gen_tokens_used + v.gen, last_used_at = {set_at} \
         {from} AND k.secret_hash = v.secret_hash AND k.revoked_at IS NULL \
         AND (k.valid_from IS NULL OR k.valid_from <= {from_at}) \
         AND (k.valid_until IS NULL OR k.valid_until >= {until_at}) \
         AND (k.max_calls IS NULL OR k.calls_used + v.calls <= k.max_calls) \
         AND (k.prompt_token_limit IS NULL OR k.prompt_tokens_used + v.prompt <= k.prompt_token_limit) \
         AND (k.gen_token_limit IS NULL OR k.gen_tokens_used + v.gen <= k.gen_token_limit) \
         RETURNING {returning}",
        rows = rows.join(", "),
    );
    Ok(Entity::find()
        .from_raw_sql(sea_orm::Statement::from_sql_and_values(
            backend, sql, values,
        ))
        .all(db)
        .await?)
}

/// Gives back one call (a generation that failed on the server side).
///
/// # Errors
/// On database errors.
pub async fn refund<C: ConnectionTrait>(db: &C, key_id: i32) -> Result<(), ModelError> {
    Entity::update_many()
        .col_expr(Column::CallsUsed, Expr::col(Column::CallsUsed).sub(1))
        .filter(Column::Id.eq(key_id))
        .filter(Column::CallsUsed.gt(0))
        .exec(db)
        .await?;
    Ok(())
}

impl ActiveModel {
    /// Issues a new key. The plain secret is returned once and never stored.
    ///
    /// # Errors
    /// `Invalid` for bad parameters, or a database error.
    pub async fn issue<C: ConnectionTrait>(
        db: &C,
        params: KeyParams,
    ) -> Result<IssuedKey, ModelError> {
        let (prefix, secret) = new_secret();
        let key = Self::store(db, params, prefix, &secret, 0).await?;
        Ok(IssuedKey { key, secret })
    }

    /// Brings over a key issued by another system (djangollmapi's 40-hex-character keys), so
    /// its clients keep working: only the secret's hash is stored. Its public prefix is the
    /// secret's first 8 characters (another random one when those are taken), and its
    /// `calls_used` carries over.
    ///
    /// # Errors
    /// `Invalid` for a secret that is too short, too long or holds spaces, one already stored,
    /// or bad parameters; or a database error.
    pub async fn import<C: ConnectionTrait>(
        db: &C,
        params: KeyParams,
        secret: &str,
        calls_used: i64,
    ) -> Result<Model, ModelError> {
        if !(16..=256).contains(&secret.len()) || !secret.chars().all(|c| c.is_ascii_graphic()) {
            return Err(ModelError::Invalid(
                "a key to import must be 16 to 256 printable characters without spaces".into(),
            ));
        }
        if calls_used < 0 {
            return Err(ModelError::Invalid("calls used must be 0 or more".into()));
        }
        if Model::find_by_secret(db, secret).await?.is_some() {
            return Err(ModelError::Invalid(
                "this key is already stored (imported or issued before)".into(),
            ));
        }
        let mut prefix: String = secret.chars().take(8).collect();
        if Model::find_by_prefix(db, &prefix).await?.is_some() {
            prefix = new_secret().0;
        }
        Self::store(db, params, prefix, secret, calls_used).await
    }

    /// Checks `params` and stores a key row holding only `secret`'s hash.
    async fn store<C: ConnectionTrait>(
        db: &C,
        params: KeyParams,
        prefix: String,
        secret: &str,
        calls_used: i64,
    ) -> Result<Model, ModelError> {
        let email = params.email.trim().to_lowercase();
        if !email.contains('@') {
            return Err(ModelError::Invalid(format!(
                "not an email address: {email:?}"
            )));
        }
        if params.max_calls.is_some_and(|m| m < 0) {
            return Err(ModelError::Invalid("calls must be 0 or more".into()));
        }
        if params.prompt_token_limit.is_some_and(|m| m < 0)
            || params.gen_token_limit.is_some_and(|m| m < 0)
        {
            return Err(ModelError::Invalid(
                "token budgets must be 0 or more".into(),
            ));
        }
        if params.rate_limit_per_minute.is_some_and(|r| r < 1)
            || params.rate_limit_burst.is_some_and(|b| b < 1)
        {
            return Err(ModelError::Invalid(
                "rate limit and burst must be 1 or more".into(),
            ));
        }
        checked_priority(params.priority)?;
        let name = checked_name(&params, &email)?;
        let ts = now();
        Ok(Self {
            name: Set(name),
            email: Set(email),
            organization: Set(params
                .organization
                .map(|o| o.trim().to_string())
                .filter(|o| !o.is_empty())),
            prefix: Set(prefix),
            secret_hash: Set(hash_secret(secret)),
            max_calls: Set(params.max_calls),
            calls_used: Set(calls_used),
            valid_from: Set(params.valid_from),
            valid_until: Set(params.valid_until),
            revoked_at: Set(None),
            last_used_at: Set(None),
            scope: Set(params.scope.as_str().to_string()),
            rate_limit_per_minute: Set(params.rate_limit_per_minute),
            rate_limit_burst: Set(params.rate_limit_burst),
            allowed_models: Set(encode_list(&params.allowed_models)),
            allowed_adapters: Set(encode_list(&params.allowed_adapters)),
            user_id: Set(params.user_id),
            prompt_token_limit: Set(params.prompt_token_limit),
            gen_token_limit: Set(params.gen_token_limit),
            prompt_tokens_used: Set(0),
            gen_tokens_used: Set(0),
            priority: Set(params.priority),
            created_at: Set(ts),
            updated_at: Set(ts),
            ..Default::default()
        }
        .insert(db)
        .await?)
    }

    /// Revokes the key with this prefix; revoking twice keeps the first time.
    ///
    /// # Errors
    /// `NotFound` for an unknown prefix, or a database error.
    pub async fn revoke<C: ConnectionTrait>(db: &C, prefix: &str) -> Result<Model, ModelError> {
        let key = Model::find_by_prefix(db, prefix)
            .await?
            .ok_or_else(|| ModelError::NotFound(format!("no key with prefix {prefix:?}")))?;
        if key.revoked_at.is_some() {
            return Ok(key);
        }
        let ts = now();
        let mut am: Self = key.into();
        am.revoked_at = Set(Some(ts));
        am.updated_at = Set(ts);
        let key = am
            .update(db)
            .await
            .map_err(|e| ModelError::gone_as(e, || format!("no key with prefix {prefix:?}")))?;
        edited();
        Ok(key)
    }
}

impl ActiveModel {
    /// A new secret for an existing key: same row, limits, counters and history; the old
    /// secret stops working at once. The new plain secret is returned once.
    ///
    /// # Errors
    /// `NotFound` for an unknown prefix, or a database error.
    pub async fn rotate<C: ConnectionTrait>(db: &C, prefix: &str) -> Result<IssuedKey, ModelError> {
        let key = Model::find_by_prefix(db, prefix)
            .await?
            .ok_or_else(|| ModelError::NotFound(format!("no key with prefix {prefix:?}")))?;
        let (new_prefix, secret) = new_secret();
        let mut am: Self = key.into();
        am.prefix = Set(new_prefix);
        am.secret_hash = Set(hash_secret(&secret));
        am.updated_at = Set(now());
        let key = am
            .update(db)
            .await
            .map_err(|e| ModelError::gone_as(e, || format!("no key with prefix {prefix:?}")))?;
        edited();
        Ok(IssuedKey { key, secret })
    }

    /// Changes a key's label, owner, limits and window (the dashboard's edit form); counters
    /// and secret stay.
    ///
    /// # Errors
    /// `Invalid` for bad values, `NotFound` for an unknown prefix, or a database error.
    pub async fn edit<C: ConnectionTrait>(
        db: &C,
        prefix: &str,
        params: KeyParams,
    ) -> Result<Model, ModelError> {
        let key = Model::find_by_prefix(db, prefix)
            .await?
            .ok_or_else(|| ModelError::NotFound(format!("no key with prefix {prefix:?}")))?;
        let email = params.email.trim().to_lowercase();
        if !email.contains('@') {
            return Err(ModelError::Invalid(format!(
                "not an email address: {email:?}"
            )));
        }
        let name = checked_name(&params, &email)?;
        let mut am: Self = key.into();
        am.name = Set(name);
        am.email = Set(email);
        am.organization = Set(params
            .organization
            .map(|o| o.trim().to_string())
            .filter(|o| !o.is_empty()));
        am.max_calls = Set(params.max_calls);
        am.prompt_token_limit = Set(params.prompt_token_limit);
        am.gen_token_limit = Set(params.gen_token_limit);
        am.valid_from = Set(params.valid_from);
        am.valid_until = Set(params.valid_until);
        am.priority = Set(checked_priority(params.priority)?);
        am.updated_at = Set(now());
        let key = am
            .update(db)
            .await
            .map_err(|e| ModelError::gone_as(e, || format!("no key with prefix {prefix:?}")))?;
        edited();
        Ok(key)
    }

    /// Takes back a revocation (the dashboard's "reactivate").
    ///
    /// # Errors
    /// `NotFound` for an unknown prefix, or a database error.
    pub async fn reactivate<C: ConnectionTrait>(db: &C, prefix: &str) -> Result<Model, ModelError> {
        let key = Model::find_by_prefix(db, prefix)
            .await?
            .ok_or_else(|| ModelError::NotFound(format!("no key with prefix {prefix:?}")))?;
        let mut am: Self = key.into();
        am.revoked_at = Set(None);
        am.updated_at = Set(now());
        let key = am
            .update(db)
            .await
            .map_err(|e| ModelError::gone_as(e, || format!("no key with prefix {prefix:?}")))?;
        edited();
        Ok(key)
    }
}

/// The key's display name (the email when none is given), after checking its window.
fn checked_name(params: &KeyParams, email: &str) -> Result<String, ModelError> {
    if let (Some(from), Some(until)) = (params.valid_from, params.valid_until) {
        if until < from {
            return Err(ModelError::Invalid(
                "valid_until is before valid_from".into(),
            ));
        }
    }
    Ok(if params.name.trim().is_empty() {
        email.to_string()
    } else {
        params.name.trim().to_string()
    })
}

/// Parses a window bound given as a date (`2026-12-31`) or an RFC 3339 instant. A date means
/// the start of that day (UTC) for `valid_from` and its last instant for `valid_until`, so
/// `until=2026-12-31` includes the 31st.
///
/// # Errors
/// `Invalid` naming the accepted formats.
pub fn parse_bound(value: &str, end_of_day: bool) -> Result<DateTimeWithTimeZone, ModelError> {
    let value = value.trim();
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(value) {
        return Ok(t.with_timezone(&chrono::Utc).fixed_offset());
    }
    let day = chrono::NaiveDate::parse_from_str(value, "%Y-%m-%d").map_err(|_| {
        ModelError::Invalid(format!(
            "{value:?} is not a date (YYYY-MM-DD) or an RFC 3339 time"
        ))
    })?;
    let time = if end_of_day {
        chrono::NaiveTime::from_hms_milli_opt(23, 59, 59, 999)
    } else {
        chrono::NaiveTime::from_hms_opt(0, 0, 0)
    }
    .unwrap_or_default();
    Ok(day.and_time(time).and_utc().fixed_offset())
}

/// A key row for unit tests of code that reads keys (no database).
#[cfg(test)]
pub(crate) fn test_key(id: i32) -> Model {
    let ts = now();
    Model {
        created_at: ts,
        updated_at: ts,
        id,
        name: "k".into(),
        email: "k@example.com".into(),
        organization: None,
        prefix: format!("{id:08x}"),
        secret_hash: format!("hash{id}"),
        max_calls: None,
        calls_used: 0,
        valid_from: None,
        valid_until: None,
        revoked_at: None,
        last_used_at: None,
        scope: "client".into(),
        rate_limit_per_minute: None,
        rate_limit_burst: None,
        allowed_models: None,
        allowed_adapters: None,
        user_id: None,
        prompt_token_limit: None,
        gen_token_limit: None,
        prompt_tokens_used: 0,
        gen_tokens_used: 0,
        priority: 0,
    }
}
