//! The reaper looks for unfinished jobs by status and age every few seconds; without an index
//! that is a scan of every job ever run.
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Jobs {
    Table,
    Status,
    QueuedAt,
}

const INDEX: &str = "idx_jobs_status_queued_at";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_index(
            Index::create()
                .name(INDEX)
                .table(Jobs::Table)
                .col(Jobs::Status)
                .col(Jobs::QueuedAt)
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_index(Index::drop().name(INDEX).table(Jobs::Table).to_owned())
            .await
    }
}
