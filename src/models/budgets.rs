//! Token budgets of keys and users (seed 002's `prompt_token_limit` / `gen_token_limit`).
//!
//! A request reserves its prompt tokens (exact, counted with the model's tokenizer; an upper
//! bound for a remote model) and its `max_tokens` before it is queued: on the key, then on the
//! key's user. Each reservation is one `UPDATE … SET used = used + n WHERE id = ? AND (limit IS
//! NULL OR used + n <= limit) RETURNING`, so concurrent requests can never overspend. The job
//! row keeps what it reserved; when the job settles, the unused part of the generation
//! reservation is given back and the prompt reservation is brought to the engine's count
//! ([`settle`], in `jobs::complete`), or the whole reservation is given back when the job fails
//! ([`release`], in `jobs::fail`). Counters therefore end equal to the tokens actually read and
//! generated.

use sea_orm::{
    entity::prelude::*,
    sea_query::{Expr, ExprTrait},
    Condition,
};

use super::{
    _entities::{api_keys, jobs, users},
    now, ModelError,
};

/// What one request holds against the budgets until its job settles.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reservation {
    /// The user charged besides the key (the key's user), if any.
    pub user_id: Option<i32>,
    pub prompt_tokens: i64,
    pub gen_tokens: i64,
}

/// Whose budget refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    Key,
    User,
}

/// Which of the two budgets refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Prompt,
    Generation,
}

/// Why a request may not reserve its tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BudgetRefusal {
    Exceeded {
        holder: Holder,
        kind: Kind,
        limit: i64,
        used: i64,
        needed: i64,
    },
    /// The key's user is disabled (or was deleted).
    UserDisabled,
}

impl std::fmt::Display for BudgetRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exceeded {
                holder,
                kind,
                limit,
                used,
                needed,
            } => {
                let holder = match holder {
                    Holder::Key => "this key's",
                    Holder::User => "your user's",
                };
                let (kind, hint) = match kind {
                    Kind::Prompt => ("prompt", ""),
                    Kind::Generation => (
                        "generation",
                        " (max_tokens is reserved in full until the reply is done; ask for fewer)",
                    ),
                };
                write!(
                    f,
                    "{holder} {kind} token budget is exceeded: {used} of {limit} used, this \
                     request needs {needed}{hint}"
                )
            }
            Self::UserDisabled => write!(f, "the user of this key is disabled"),
        }
    }
}

/// `used + n <= limit`, or no limit.
fn fits<C: ColumnTrait>(used: C, limit: C, n: i64) -> Condition {
    Condition::any()
        .add(limit.is_null())
        .add(Expr::col(used).add(n).lte(Expr::col(limit)))
}

/// Names the budget that cannot take `prompt` + `gen` more tokens, judged from a row read after
/// the refusal (advisory: the UPDATE decided).
fn which(
    holder: Holder,
    limits: (Option<i64>, Option<i64>),
    used: (i64, i64),
    prompt: i64,
    gen: i64,
) -> BudgetRefusal {
    let (prompt_limit, gen_limit) = limits;
    if let Some(limit) = prompt_limit.filter(|l| used.0 + prompt > *l) {
        return BudgetRefusal::Exceeded {
            holder,
            kind: Kind::Prompt,
            limit,
            used: used.0,
            needed: prompt,
        };
    }
    BudgetRefusal::Exceeded {
        holder,
        kind: Kind::Generation,
        limit: gen_limit.unwrap_or_default(),
        used: used.1,
        needed: gen,
    }
}

async fn reserve_key<C: ConnectionTrait>(
    db: &C,
    key_id: i32,
    prompt: i64,
    gen: i64,
) -> Result<Result<(), BudgetRefusal>, ModelError> {
    use api_keys::Column as K;
    let updated = api_keys::Entity::update_many()
        .col_expr(
            K::PromptTokensUsed,
            Expr::col(K::PromptTokensUsed).add(prompt),
        )
        .col_expr(K::GenTokensUsed, Expr::col(K::GenTokensUsed).add(gen))
        .filter(K::Id.eq(key_id))
        .filter(fits(K::PromptTokensUsed, K::PromptTokenLimit, prompt))
        .filter(fits(K::GenTokensUsed, K::GenTokenLimit, gen))
        .exec_with_returning(db)
        .await?;
    if !updated.is_empty() {
        return Ok(Ok(()));
    }
    let Some(key) = api_keys::Entity::find_by_id(key_id).one(db).await? else {
        return Err(ModelError::NotFound(format!("key {key_id}")));
    };
    Ok(Err(which(
        Holder::Key,
        (key.prompt_token_limit, key.gen_token_limit),
        (key.prompt_tokens_used, key.gen_tokens_used),
        prompt,
        gen,
    )))
}

/// Reserves `prompt` + `gen` tokens on user `user_id`'s budget alone (a batch of admissions
/// reserves its keys' tokens with their charge, `api_keys::charge_many`, and its users' here).
///
/// # Errors
/// `Ok(Err(refusal))` when the budget cannot take them or the user is disabled; `Err` on
/// database errors.
pub async fn reserve_user<C: ConnectionTrait>(
    db: &C,
    user_id: i32,
    prompt: i64,
    gen: i64,
) -> Result<Result<(), BudgetRefusal>, ModelError> {
    use users::Column as U;
    let updated = users::Entity::update_many()
        .col_expr(
            U::PromptTokensUsed,
            Expr::col(U::PromptTokensUsed).add(prompt),
        )
        .col_expr(U::GenTokensUsed, Expr::col(U::GenTokensUsed).add(gen))
        .col_expr(U::UpdatedAt, Expr::value(now()))
        .filter(U::Id.eq(user_id))
        .filter(U::Enabled.eq(true))
        .filter(fits(U::PromptTokensUsed, U::PromptTokenLimit, prompt))
        .filter(fits(U::GenTokensUsed, U::GenTokenLimit, gen))
        .exec_with_returning(db)
        .await?;
    if !updated.is_empty() {
        return Ok(Ok(()));
    }
    Ok(Err(
        match users::Entity::find_by_id(user_id).one(db).await? {
            Some(user) if user.enabled => which(
                Holder::User,
                (user.prompt_token_limit, user.gen_token_limit),
                (user.prompt_tokens_used, user.gen_tokens_used),
                prompt,
                gen,
            ),
            _ => BudgetRefusal::UserDisabled,
        },
    ))
}

/// Reserves `prompt` + `gen` tokens on the key's budget and, when the key acts for a user, on
/// the user's. Run inside the caller's transaction (admission's charge + reservation + job):
/// when the user's budget refuses, the key's reservation goes with the transaction's rollback.
///
/// # Errors
/// `Ok(Err(refusal))` when a budget cannot take the request; `Err` on database errors.
pub async fn reserve<C: ConnectionTrait>(
    db: &C,
    key: &api_keys::Model,
    prompt: i64,
    gen: i64,
) -> Result<Result<Reservation, BudgetRefusal>, ModelError> {
    if let Err(refusal) = reserve_key(db, key.id, prompt, gen).await? {
        return Ok(Err(refusal));
    }
    if let Some(user_id) = key.user_id {
        if let Err(refusal) = reserve_user(db, user_id, prompt, gen).await? {
            return Ok(Err(refusal));
        }
    }
    Ok(Ok(Reservation {
        user_id: key.user_id,
        prompt_tokens: prompt,
        gen_tokens: gen,
    }))
}

/// `col - n`, never below zero (an admin may have reset the counter meanwhile).
fn minus<C: ColumnTrait>(col: C, n: i64) -> Expr {
    Expr::case(Expr::col(col).gte(n), Expr::col(col).sub(n))
        .finally(0)
        .into()
}

async fn give_back_key<C: ConnectionTrait>(
    db: &C,
    key_id: i32,
    prompt: i64,
    gen: i64,
) -> Result<(), ModelError> {
    use api_keys::Column as K;
    if prompt == 0 && gen == 0 {
        return Ok(());
    }
    api_keys::Entity::update_many()
        .col_expr(K::PromptTokensUsed, minus(K::PromptTokensUsed, prompt))
        .col_expr(K::GenTokensUsed, minus(K::GenTokensUsed, gen))
        .filter(K::Id.eq(key_id))
        .exec(db)
        .await?;
    Ok(())
}

async fn give_back_user<C: ConnectionTrait>(
    db: &C,
    user_id: i32,
    prompt: i64,
    gen: i64,
) -> Result<(), ModelError> {
    use users::Column as U;
    if prompt == 0 && gen == 0 {
        return Ok(());
    }
    users::Entity::update_many()
        .col_expr(U::PromptTokensUsed, minus(U::PromptTokensUsed, prompt))
        .col_expr(U::GenTokensUsed, minus(U::GenTokensUsed, gen))
        .col_expr(U::UpdatedAt, Expr::value(now()))
        .filter(U::Id.eq(user_id))
        .exec(db)
        .await?;
    Ok(())
}

/// Gives a whole reservation back (the request was refused later, or its job failed).
///
/// # Errors
/// On database errors.
pub async fn release<C: ConnectionTrait>(
    db: &C,
    key_id: i32,
    reservation: &Reservation,
) -> Result<(), ModelError> {
    give_back_key(
        db,
        key_id,
        reservation.prompt_tokens,
        reservation.gen_tokens,
    )
    .await?;
    if let Some(user_id) = reservation.user_id {
        give_back_user(
            db,
            user_id,
            reservation.prompt_tokens,
            reservation.gen_tokens,
        )
        .await?;
    }
    Ok(())
}

/// The reservation a job row holds.
#[must_use]
pub fn of_job(job: &jobs::Model) -> Reservation {
    Reservation {
        user_id: job.user_id,
        prompt_tokens: job.reserved_prompt_tokens,
        gen_tokens: job.reserved_gen_tokens,
    }
}

/// Settles a finished job: the generation tokens it reserved but did not generate go back,
/// and the prompt reservation becomes the prompt tokens the engine reported (the same number
/// for a local model; for a remote one the upstream's `usage`, read against an upper-bound
/// reservation — should the upstream count more, the difference is charged). Call once, in
/// the transaction that marks the job done.
///
/// # Errors
/// On database errors.
pub async fn settle<C: ConnectionTrait>(db: &C, job: &jobs::Model) -> Result<(), ModelError> {
    let unused = std::cmp::max(job.reserved_gen_tokens - i64::from(job.generated_tokens), 0);
    let prompt_back = job.reserved_prompt_tokens - i64::from(Ord::max(job.prompt_tokens, 0));
    if unused == 0 && prompt_back == 0 {
        return Ok(());
    }
    give_back_key(db, job.api_key_id, prompt_back, unused).await?;
    if let Some(user_id) = job.user_id {
        give_back_user(db, user_id, prompt_back, unused).await?;
    }
    Ok(())
}
