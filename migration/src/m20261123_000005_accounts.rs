//! Seed 002's accounts: users (argon2 password, role, enabled, token budgets), keys linked to a
//! user and carrying their own token budgets, the reservation each job holds against those
//! budgets, and server-side conversation memory for `/llm_request`.
use loco_rs::schema::*;
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Users {
    Table,
    Id,
    Username,
    PasswordHash,
    Role,
    Enabled,
    PromptTokenLimit,
    GenTokenLimit,
    PromptTokensUsed,
    GenTokensUsed,
}

#[derive(DeriveIden)]
enum ApiKeys {
    Table,
    Id,
    UserId,
    PromptTokenLimit,
    GenTokenLimit,
    PromptTokensUsed,
    GenTokensUsed,
}

#[derive(DeriveIden)]
enum Jobs {
    Table,
    UserId,
    ReservedPromptTokens,
    ReservedGenTokens,
}

#[derive(DeriveIden)]
enum ConversationMessages {
    Table,
    Id,
    UserId,
    ApiKeyId,
    ConversationNumber,
    Role,
    Content,
    JobId,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            table_auto_tz(Users::Table)
                .col(pk_auto(Users::Id))
                .col(string_uniq(Users::Username))
                .col(string(Users::PasswordHash))
                .col(string(Users::Role).default("user"))
                .col(boolean(Users::Enabled).default(true))
                .col(big_integer_null(Users::PromptTokenLimit))
                .col(big_integer_null(Users::GenTokenLimit))
                .col(big_integer(Users::PromptTokensUsed).default(0))
                .col(big_integer(Users::GenTokensUsed).default(0))
                .to_owned(),
        )
        .await?;

        // SQLite accepts one column per ALTER TABLE (and no foreign key on an added column;
        // the user link is enforced by the code that sets it).
        let key_columns = [
            ColumnDef::new(ApiKeys::UserId).integer().null().to_owned(),
            ColumnDef::new(ApiKeys::PromptTokenLimit)
                .big_integer()
                .null()
                .to_owned(),
            ColumnDef::new(ApiKeys::GenTokenLimit)
                .big_integer()
                .null()
                .to_owned(),
            ColumnDef::new(ApiKeys::PromptTokensUsed)
                .big_integer()
                .not_null()
                .default(0)
                .to_owned(),
            ColumnDef::new(ApiKeys::GenTokensUsed)
                .big_integer()
                .not_null()
                .default(0)
                .to_owned(),
        ];
        for col in key_columns {
            m.alter_table(
                Table::alter()
                    .table(ApiKeys::Table)
                    .add_column(col)
                    .to_owned(),
            )
            .await?;
        }
        m.create_index(
            Index::create()
                .name("idx_api_keys_user")
                .table(ApiKeys::Table)
                .col(ApiKeys::UserId)
                .to_owned(),
        )
        .await?;

        let job_columns = [
            ColumnDef::new(Jobs::UserId).integer().null().to_owned(),
            ColumnDef::new(Jobs::ReservedPromptTokens)
                .big_integer()
                .not_null()
                .default(0)
                .to_owned(),
            ColumnDef::new(Jobs::ReservedGenTokens)
                .big_integer()
                .not_null()
                .default(0)
                .to_owned(),
        ];
        for col in job_columns {
            m.alter_table(Table::alter().table(Jobs::Table).add_column(col).to_owned())
                .await?;
        }

        m.create_table(
            table_auto_tz(ConversationMessages::Table)
                .col(pk_auto(ConversationMessages::Id))
                .col(integer_null(ConversationMessages::UserId))
                .col(integer_null(ConversationMessages::ApiKeyId))
                .col(big_integer(ConversationMessages::ConversationNumber))
                .col(string(ConversationMessages::Role))
                .col(text(ConversationMessages::Content))
                .col(string_null(ConversationMessages::JobId))
                .foreign_key(
                    ForeignKey::create()
                        .name("fk_conversation_user")
                        .from(ConversationMessages::Table, ConversationMessages::UserId)
                        .to(Users::Table, Users::Id)
                        .on_delete(ForeignKeyAction::Cascade),
                )
                .foreign_key(
                    ForeignKey::create()
                        .name("fk_conversation_api_key")
                        .from(ConversationMessages::Table, ConversationMessages::ApiKeyId)
                        .to(ApiKeys::Table, ApiKeys::Id)
                        .on_delete(ForeignKeyAction::Cascade),
                )
                .to_owned(),
        )
        .await?;
        for (name, owner) in [
            ("idx_conversation_user", ConversationMessages::UserId),
            ("idx_conversation_key", ConversationMessages::ApiKeyId),
        ] {
            m.create_index(
                Index::create()
                    .name(name)
                    .table(ConversationMessages::Table)
                    .col(owner)
                    .col(ConversationMessages::ConversationNumber)
                    .col(ConversationMessages::Id)
                    .to_owned(),
            )
            .await?;
        }
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_table(Table::drop().table(ConversationMessages::Table).to_owned())
            .await?;
        for col in [
            Jobs::ReservedGenTokens,
            Jobs::ReservedPromptTokens,
            Jobs::UserId,
        ] {
            m.alter_table(
                Table::alter()
                    .table(Jobs::Table)
                    .drop_column(col)
                    .to_owned(),
            )
            .await?;
        }
        m.drop_index(
            Index::drop()
                .name("idx_api_keys_user")
                .table(ApiKeys::Table)
                .to_owned(),
        )
        .await?;
        for col in [
            ApiKeys::GenTokensUsed,
            ApiKeys::PromptTokensUsed,
            ApiKeys::GenTokenLimit,
            ApiKeys::PromptTokenLimit,
            ApiKeys::UserId,
        ] {
            m.alter_table(
                Table::alter()
                    .table(ApiKeys::Table)
                    .drop_column(col)
                    .to_owned(),
            )
            .await?;
        }
        m.drop_table(Table::drop().table(Users::Table).to_owned())
            .await?;
        Ok(())
    }
}
