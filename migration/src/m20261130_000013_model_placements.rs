//! Desired state of models loaded at run time in production: an API instance records "load
//! this configuration" or "unload this model", and one worker process that accepts loads claims
//! the row and makes it so (API instances hold no engine there).
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum ModelPlacements {
    Table,
    ModelId,
    ConfigId,
    Desired,
    Holder,
    Error,
    CreatedAt,
    UpdatedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(ModelPlacements::Table)
                .if_not_exists()
                .col(
                    ColumnDef::new(ModelPlacements::ModelId)
                        .string()
                        .not_null()
                        .primary_key(),
                )
                .col(
                    ColumnDef::new(ModelPlacements::ConfigId)
                        .string()
                        .not_null(),
                )
                .col(ColumnDef::new(ModelPlacements::Desired).string().not_null())
                .col(ColumnDef::new(ModelPlacements::Holder).string().null())
                .col(ColumnDef::new(ModelPlacements::Error).text().null())
                .col(
                    ColumnDef::new(ModelPlacements::CreatedAt)
                        .timestamp_with_time_zone()
                        .not_null(),
                )
                .col(
                    ColumnDef::new(ModelPlacements::UpdatedAt)
                        .timestamp_with_time_zone()
                        .not_null(),
                )
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_table(Table::drop().table(ModelPlacements::Table).to_owned())
            .await
    }
}
