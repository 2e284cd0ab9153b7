//! Client-chosen job ids (seed 001's `job_id`), unique per key, for idempotent submissions.
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Jobs {
    Table,
    ApiKeyId,
    ClientRef,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table(Jobs::Table)
                .add_column(ColumnDef::new(Jobs::ClientRef).string().null())
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("idx_jobs_key_client_ref")
                .table(Jobs::Table)
                .col(Jobs::ApiKeyId)
                .col(Jobs::ClientRef)
                .unique()
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_index(Index::drop().name("idx_jobs_key_client_ref").to_owned())
            .await?;
        m.alter_table(
            Table::alter()
                .table(Jobs::Table)
                .drop_column(Jobs::ClientRef)
                .to_owned(),
        )
        .await
    }
}
