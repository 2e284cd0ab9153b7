//! Running totals of finished jobs per outcome, so `/metrics` reads a few counter rows instead
//! of scanning every job ever run (and the totals survive when old jobs are purged).
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum JobTotals {
    Table,
    Outcome,
    Jobs,
    PromptTokens,
    GeneratedTokens,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(JobTotals::Table)
                .if_not_exists()
                .col(
                    ColumnDef::new(JobTotals::Outcome)
                        .string()
                        .not_null()
                        .primary_key(),
                )
                .col(
                    ColumnDef::new(JobTotals::Jobs)
                        .big_integer()
                        .not_null()
                        .default(0),
                )
                .col(
                    ColumnDef::new(JobTotals::PromptTokens)
                        .big_integer()
                        .not_null()
                        .default(0),
                )
                .col(
                    ColumnDef::new(JobTotals::GeneratedTokens)
                        .big_integer()
                        .not_null()
                        .default(0),
                )
                .to_owned(),
        )
        .await?;
        // Jobs finished before this migration: counted once, here.
        m.get_connection()
            .execute_unprepared(
                "INSERT INTO job_totals (outcome, jobs, prompt_tokens, generated_tokens) \
                 SELECT status, COUNT(*), COALESCE(SUM(prompt_tokens), 0), \
                 COALESCE(SUM(generated_tokens), 0) FROM jobs \
                 WHERE status IN ('done', 'failed') GROUP BY status",
            )
            .await?;
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_table(Table::drop().table(JobTotals::Table).to_owned())
            .await
    }
}
