//! Per-request usage rows, summed per day for `GET /usage/`.

use sea_orm::{entity::prelude::*, FromQueryResult, QueryOrder, QuerySelect};
use serde::Serialize;

pub use super::_entities::usage_records::{self, ActiveModel, Column, Entity, Model};
use super::ModelError;

impl ActiveModelBehavior for ActiveModel {}

/// One day of one key's usage.
#[derive(Debug, Clone, Serialize, FromQueryResult, PartialEq, Eq)]
pub struct DailyUsage {
    pub day: Date,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub generated_tokens: i64,
    pub words: i64,
}

/// Usage of a key per day between `from` and `to` (inclusive), oldest first.
///
/// # Errors
/// On database errors.
pub async fn daily<C: ConnectionTrait>(
    db: &C,
    api_key_id: i32,
    from: Date,
    to: Date,
) -> Result<Vec<DailyUsage>, ModelError> {
    use sea_orm::sea_query::{Expr, Func};
    // SUM is BIGINT on Postgres and INTEGER on SQLite; the cast makes both decode as i64.
    let sum = |c: Column| -> sea_orm::sea_query::Expr {
        Func::cast_as(
            Func::coalesce([Expr::from(Func::sum(Expr::col(c))), Expr::val(0)]),
            sea_orm::sea_query::Alias::new("BIGINT"),
        )
        .into()
    };
    Ok(Entity::find()
        .select_only()
        .column(Column::Day)
        // COUNT(*), not COUNT(id): the key-and-day index (migration 000017) covers every
        // column this reads, and `id` is not among them on Postgres.
        .column_as(Expr::cust("COUNT(*)"), "requests")
        .column_as(sum(Column::PromptTokens), "prompt_tokens")
        .column_as(sum(Column::GeneratedTokens), "generated_tokens")
        .column_as(sum(Column::Words), "words")
        .filter(Column::ApiKeyId.eq(api_key_id))
        .filter(Column::Day.gte(from))
        .filter(Column::Day.lte(to))
        .group_by(Column::Day)
        .order_by_asc(Column::Day)
        .into_model::<DailyUsage>()
        .all(db)
        .await?)
}

/// One day of seed 003's `/usage/`: words the key's requests sent that day.
#[derive(Debug, Clone, Serialize, FromQueryResult, PartialEq, Eq)]
pub struct DailyWords {
    pub day: Date,
    pub total_words: i64,
}

/// Words of each day's request inputs for a key between `from` and `to` (inclusive), oldest
/// first; days without requests are left out, as seed 003 did.
///
/// # Errors
/// On database errors.
pub async fn daily_input_words<C: ConnectionTrait>(
    db: &C,
    api_key_id: i32,
    from: Date,
    to: Date,
) -> Result<Vec<DailyWords>, ModelError> {
    use sea_orm::sea_query::{Expr, Func};
    let total: Expr = Func::cast_as(
        Func::coalesce([
            Expr::from(Func::sum(Expr::col(Column::InputWords))),
            Expr::val(0),
        ]),
        sea_orm::sea_query::Alias::new("BIGINT"),
    )
    .into();
    Ok(Entity::find()
        .select_only()
        .column(Column::Day)
        .column_as(total, "total_words")
        .filter(Column::ApiKeyId.eq(api_key_id))
        .filter(Column::Day.gte(from))
        .filter(Column::Day.lte(to))
        .group_by(Column::Day)
        .order_by_asc(Column::Day)
        .into_model::<DailyWords>()
        .all(db)
        .await?)
}
