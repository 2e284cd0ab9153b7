//! Per-key permissions: a scope (`client` or `admin`), a request-rate limit, and allow-lists of
//! models and LoRA adapters (JSON arrays; NULL = everything).
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum ApiKeys {
    Table,
    Scope,
    RateLimitPerMinute,
    RateLimitBurst,
    AllowedModels,
    AllowedAdapters,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        // SQLite accepts one column per ALTER TABLE.
        let columns = [
            ColumnDef::new(ApiKeys::Scope)
                .string()
                .not_null()
                .default("client")
                .to_owned(),
            ColumnDef::new(ApiKeys::RateLimitPerMinute)
                .integer()
                .null()
                .to_owned(),
            ColumnDef::new(ApiKeys::RateLimitBurst)
                .integer()
                .null()
                .to_owned(),
            ColumnDef::new(ApiKeys::AllowedModels)
                .text()
                .null()
                .to_owned(),
            ColumnDef::new(ApiKeys::AllowedAdapters)
                .text()
                .null()
                .to_owned(),
        ];
        for col in columns {
            m.alter_table(
                Table::alter()
                    .table(ApiKeys::Table)
                    .add_column(col)
                    .to_owned(),
            )
            .await?;
        }
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        for col in [
            ApiKeys::AllowedAdapters,
            ApiKeys::AllowedModels,
            ApiKeys::RateLimitBurst,
            ApiKeys::RateLimitPerMinute,
            ApiKeys::Scope,
        ] {
            m.alter_table(
                Table::alter()
                    .table(ApiKeys::Table)
                    .drop_column(col)
                    .to_owned(),
            )
            .await?;
        }
        Ok(())
    }
}
