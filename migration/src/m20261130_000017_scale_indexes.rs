//! Indexes for the reads that would otherwise scan every job ever run (issue 16, item 5): the
//! dashboard's jobs list newest first, unfiltered or by model; the overview's jobs finished in
//! the last minutes (and the retention purge's finished-before cut). `idx_jobs_status` goes: it
//! is the leading column of `idx_jobs_status_queued_at` (migration 000010), so it only cost every
//! job insert and status change a write.
//!
//! A key's usage per day (`/usage/`, `/api/usage`, the key's charts) sums its usage rows; the
//! key-and-day index now carries the summed columns too, so those sums read the index alone
//! instead of one table row per request the key ever made (it replaces `idx_usage_key_day`:
//! the same number of index writes per request).
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Jobs {
    Table,
    Status,
    Model,
    QueuedAt,
    FinishedAt,
}

#[derive(DeriveIden)]
enum UsageRecords {
    Table,
    ApiKeyId,
    Day,
    PromptTokens,
    GeneratedTokens,
    Words,
    InputWords,
}

const USAGE_BY_DAY: &str = "idx_usage_key_day";
const USAGE_TOTALS: &str = "idx_usage_key_day_totals";

/// `(name, columns)` of each index this migration adds.
fn added() -> [(&'static str, Vec<Jobs>); 3] {
    [
        ("idx_jobs_queued_at", vec![Jobs::QueuedAt]),
        (
            "idx_jobs_model_queued_at",
            vec![Jobs::Model, Jobs::QueuedAt],
        ),
        ("idx_jobs_finished_at", vec![Jobs::FinishedAt]),
    ]
}

const REDUNDANT: &str = "idx_jobs_status";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        for (name, cols) in added() {
            let mut index = Index::create();
            index.name(name).table(Jobs::Table);
            for col in cols {
                index.col(col);
            }
            m.create_index(index.to_owned()).await?;
        }
        m.drop_index(Index::drop().name(REDUNDANT).table(Jobs::Table).to_owned())
            .await?;
        m.create_index(
            Index::create()
                .name(USAGE_TOTALS)
                .table(UsageRecords::Table)
                .col(UsageRecords::ApiKeyId)
                .col(UsageRecords::Day)
                .col(UsageRecords::PromptTokens)
                .col(UsageRecords::GeneratedTokens)
                .col(UsageRecords::Words)
                .col(UsageRecords::InputWords)
                .to_owned(),
        )
        .await?;
        m.drop_index(
            Index::drop()
                .name(USAGE_BY_DAY)
                .table(UsageRecords::Table)
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_index(
            Index::create()
                .name(USAGE_BY_DAY)
                .table(UsageRecords::Table)
                .col(UsageRecords::ApiKeyId)
                .col(UsageRecords::Day)
                .to_owned(),
        )
        .await?;
        m.drop_index(
            Index::drop()
                .name(USAGE_TOTALS)
                .table(UsageRecords::Table)
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name(REDUNDANT)
                .table(Jobs::Table)
                .col(Jobs::Status)
                .to_owned(),
        )
        .await?;
        for (name, _) in added() {
            m.drop_index(Index::drop().name(name).table(Jobs::Table).to_owned())
                .await?;
        }
        Ok(())
    }
}
