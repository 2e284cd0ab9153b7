//! Dashboard sign-in sessions: only a hash of the cookie's token is stored, with the session's
//! CSRF token and expiry.
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum AdminSessions {
    Table,
    Id,
    AdminId,
    TokenHash,
    CsrfToken,
    CreatedAt,
    ExpiresAt,
}

#[derive(DeriveIden)]
enum Admins {
    Table,
    Id,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(AdminSessions::Table)
                .if_not_exists()
                .col(
                    ColumnDef::new(AdminSessions::Id)
                        .integer()
                        .not_null()
                        .auto_increment()
                        .primary_key(),
                )
                .col(ColumnDef::new(AdminSessions::AdminId).integer().not_null())
                .col(
                    ColumnDef::new(AdminSessions::TokenHash)
                        .string()
                        .not_null()
                        .unique_key(),
                )
                .col(ColumnDef::new(AdminSessions::CsrfToken).string().not_null())
                .col(
                    ColumnDef::new(AdminSessions::CreatedAt)
                        .timestamp_with_time_zone()
                        .not_null(),
                )
                .col(
                    ColumnDef::new(AdminSessions::ExpiresAt)
                        .timestamp_with_time_zone()
                        .not_null(),
                )
                .foreign_key(
                    ForeignKey::create()
                        .name("fk_admin_sessions_admin")
                        .from(AdminSessions::Table, AdminSessions::AdminId)
                        .to(Admins::Table, Admins::Id)
                        .on_delete(ForeignKeyAction::Cascade),
                )
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_table(Table::drop().table(AdminSessions::Table).to_owned())
            .await
    }
}
