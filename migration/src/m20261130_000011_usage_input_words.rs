//! Words of each request's input text, beside the words of its output: seed 003's `/usage/`
//! reports the words clients sent per day.
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum UsageRecords {
    Table,
    InputWords,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table(UsageRecords::Table)
                .add_column(
                    ColumnDef::new(UsageRecords::InputWords)
                        .integer()
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
                .table(UsageRecords::Table)
                .drop_column(UsageRecords::InputWords)
                .to_owned(),
        )
        .await
    }
}
