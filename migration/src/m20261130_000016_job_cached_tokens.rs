//! Prompt tokens a job found already in the engine's KV cache (prefix reuse; OpenAI's
//! `prompt_tokens_details.cached_tokens`), per job and in the running totals `/metrics` reads.
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Jobs {
    Table,
    CachedTokens,
}

#[derive(DeriveIden)]
enum JobTotals {
    Table,
    CachedTokens,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        // One column per statement: SQLite alters one at a time.
        m.alter_table(
            Table::alter()
                .table(Jobs::Table)
                .add_column(
                    ColumnDef::new(Jobs::CachedTokens)
                        .integer()
                        .not_null()
                        .default(0),
                )
                .to_owned(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table(JobTotals::Table)
                .add_column(
                    ColumnDef::new(JobTotals::CachedTokens)
                        .big_integer()
                        .not_null()
                        .default(0),
                )
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table(JobTotals::Table)
                .drop_column(JobTotals::CachedTokens)
                .to_owned(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table(Jobs::Table)
                .drop_column(Jobs::CachedTokens)
                .to_owned(),
        )
        .await
    }
}
