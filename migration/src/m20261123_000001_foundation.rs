//! Keys, admins, jobs and usage: the tables the foundation stands on.
use loco_rs::schema::*;
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Admins {
    Table,
    Id,
    Email,
    PasswordHash,
}

#[derive(DeriveIden)]
enum ApiKeys {
    Table,
    Id,
    Name,
    Email,
    Organization,
    Prefix,
    SecretHash,
    MaxCalls,
    CallsUsed,
    ValidFrom,
    ValidUntil,
    RevokedAt,
    LastUsedAt,
}

#[derive(DeriveIden)]
enum Jobs {
    Table,
    Id,
    ApiKeyId,
    Status,
    Endpoint,
    Model,
    Request,
    Result,
    Error,
    PromptTokens,
    GeneratedTokens,
    FinishReason,
    Attempts,
    Refunded,
    Worker,
    QueuedAt,
    StartedAt,
    FinishedAt,
}

#[derive(DeriveIden)]
enum UsageRecords {
    Table,
    Id,
    ApiKeyId,
    JobId,
    Day,
    PromptTokens,
    GeneratedTokens,
    Words,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            table_auto_tz(Admins::Table)
                .col(pk_auto(Admins::Id))
                .col(string_uniq(Admins::Email))
                .col(string(Admins::PasswordHash))
                .to_owned(),
        )
        .await?;

        m.create_table(
            table_auto_tz(ApiKeys::Table)
                .col(pk_auto(ApiKeys::Id))
                .col(string(ApiKeys::Name))
                .col(string(ApiKeys::Email))
                .col(string_null(ApiKeys::Organization))
                .col(string_uniq(ApiKeys::Prefix))
                .col(string_uniq(ApiKeys::SecretHash))
                .col(big_integer_null(ApiKeys::MaxCalls))
                .col(big_integer(ApiKeys::CallsUsed).default(0))
                .col(timestamp_with_time_zone_null(ApiKeys::ValidFrom))
                .col(timestamp_with_time_zone_null(ApiKeys::ValidUntil))
                .col(timestamp_with_time_zone_null(ApiKeys::RevokedAt))
                .col(timestamp_with_time_zone_null(ApiKeys::LastUsedAt))
                .to_owned(),
        )
        .await?;

        m.create_table(
            table_auto_tz(Jobs::Table)
                .col(string(Jobs::Id).primary_key())
                .col(integer(Jobs::ApiKeyId))
                .col(string(Jobs::Status))
                .col(string(Jobs::Endpoint))
                .col(string(Jobs::Model))
                .col(text(Jobs::Request))
                .col(text_null(Jobs::Result))
                .col(text_null(Jobs::Error))
                .col(integer(Jobs::PromptTokens).default(0))
                .col(integer(Jobs::GeneratedTokens).default(0))
                .col(string_null(Jobs::FinishReason))
                .col(integer(Jobs::Attempts).default(0))
                .col(boolean(Jobs::Refunded).default(false))
                .col(string_null(Jobs::Worker))
                .col(timestamp_with_time_zone(Jobs::QueuedAt))
                .col(timestamp_with_time_zone_null(Jobs::StartedAt))
                .col(timestamp_with_time_zone_null(Jobs::FinishedAt))
                .foreign_key(
                    ForeignKey::create()
                        .name("fk_jobs_api_key")
                        .from(Jobs::Table, Jobs::ApiKeyId)
                        .to(ApiKeys::Table, ApiKeys::Id)
                        .on_delete(ForeignKeyAction::Cascade),
                )
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("idx_jobs_key_created")
                .table(Jobs::Table)
                .col(Jobs::ApiKeyId)
                .col(Jobs::QueuedAt)
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("idx_jobs_status")
                .table(Jobs::Table)
                .col(Jobs::Status)
                .to_owned(),
        )
        .await?;

        m.create_table(
            table_auto_tz(UsageRecords::Table)
                .col(pk_auto(UsageRecords::Id))
                .col(integer(UsageRecords::ApiKeyId))
                .col(string_uniq(UsageRecords::JobId))
                .col(date(UsageRecords::Day))
                .col(integer(UsageRecords::PromptTokens))
                .col(integer(UsageRecords::GeneratedTokens))
                .col(integer(UsageRecords::Words))
                .foreign_key(
                    ForeignKey::create()
                        .name("fk_usage_api_key")
                        .from(UsageRecords::Table, UsageRecords::ApiKeyId)
                        .to(ApiKeys::Table, ApiKeys::Id)
                        .on_delete(ForeignKeyAction::Cascade),
                )
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("idx_usage_key_day")
                .table(UsageRecords::Table)
                .col(UsageRecords::ApiKeyId)
                .col(UsageRecords::Day)
                .to_owned(),
        )
        .await?;
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_table(Table::drop().table(UsageRecords::Table).to_owned())
            .await?;
        m.drop_table(Table::drop().table(Jobs::Table).to_owned())
            .await?;
        m.drop_table(Table::drop().table(ApiKeys::Table).to_owned())
            .await?;
        m.drop_table(Table::drop().table(Admins::Table).to_owned())
            .await?;
        Ok(())
    }
}
