//! The worker registry: every worker process (or embedded worker) upserts its row on each
//! heartbeat, so the API and the dashboard see which workers are alive, what they hold and what
//! they run, across processes and hosts.
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Workers {
    Table,
    Id,
    Host,
    Pid,
    Device,
    Models,
    Adapters,
    Engine,
    CurrentJob,
    JobsServed,
    TokensPerSecond,
    StartedAt,
    HeartbeatAt,
    StoppedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(Workers::Table)
                .if_not_exists()
                .col(
                    ColumnDef::new(Workers::Id)
                        .string()
                        .not_null()
                        .primary_key(),
                )
                .col(ColumnDef::new(Workers::Host).string().not_null())
                .col(ColumnDef::new(Workers::Pid).integer().not_null())
                .col(ColumnDef::new(Workers::Device).string().not_null())
                .col(ColumnDef::new(Workers::Models).text().not_null())
                .col(ColumnDef::new(Workers::Adapters).text().not_null())
                .col(ColumnDef::new(Workers::Engine).text().not_null())
                .col(ColumnDef::new(Workers::CurrentJob).string().null())
                .col(
                    ColumnDef::new(Workers::JobsServed)
                        .big_integer()
                        .not_null()
                        .default(0),
                )
                .col(ColumnDef::new(Workers::TokensPerSecond).double().null())
                .col(
                    ColumnDef::new(Workers::StartedAt)
                        .timestamp_with_time_zone()
                        .not_null(),
                )
                .col(
                    ColumnDef::new(Workers::HeartbeatAt)
                        .timestamp_with_time_zone()
                        .not_null(),
                )
                .col(
                    ColumnDef::new(Workers::StoppedAt)
                        .timestamp_with_time_zone()
                        .null(),
                )
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_table(Table::drop().table(Workers::Table).to_owned())
            .await
    }
}
