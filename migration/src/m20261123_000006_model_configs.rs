//! Seed 004's model configurations: named recipes for loading a model on a worker.
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum ModelConfigs {
    Table,
    Id,
    ConfigId,
    ModelId,
    ModelName,
    ModelType,
    ModelKwargs,
    CreatedAt,
    UpdatedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(ModelConfigs::Table)
                .if_not_exists()
                .col(
                    ColumnDef::new(ModelConfigs::Id)
                        .integer()
                        .not_null()
                        .auto_increment()
                        .primary_key(),
                )
                .col(
                    ColumnDef::new(ModelConfigs::ConfigId)
                        .string()
                        .not_null()
                        .unique_key(),
                )
                .col(ColumnDef::new(ModelConfigs::ModelId).string().not_null())
                .col(ColumnDef::new(ModelConfigs::ModelName).string().not_null())
                .col(ColumnDef::new(ModelConfigs::ModelType).string().not_null())
                .col(ColumnDef::new(ModelConfigs::ModelKwargs).text().not_null())
                .col(
                    ColumnDef::new(ModelConfigs::CreatedAt)
                        .timestamp_with_time_zone()
                        .not_null(),
                )
                .col(
                    ColumnDef::new(ModelConfigs::UpdatedAt)
                        .timestamp_with_time_zone()
                        .not_null(),
                )
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("idx_model_configs_model_id")
                .table(ModelConfigs::Table)
                .col(ModelConfigs::ModelId)
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_table(Table::drop().table(ModelConfigs::Table).to_owned())
            .await
    }
}
