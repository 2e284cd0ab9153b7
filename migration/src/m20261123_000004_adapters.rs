//! Registered LoRA heads: a name clients use, a file inside the configured adapters folder, the
//! base model it was made for, and the scale applied when a request names none.
use loco_rs::schema::*;
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Adapters {
    Table,
    Id,
    Name,
    File,
    BaseModel,
    DefaultScale,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            table_auto_tz(Adapters::Table)
                .col(pk_auto(Adapters::Id))
                .col(string_uniq(Adapters::Name))
                .col(string(Adapters::File))
                .col(string(Adapters::BaseModel))
                .col(double(Adapters::DefaultScale).default(1.0))
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_table(Table::drop().table(Adapters::Table).to_owned())
            .await
    }
}
