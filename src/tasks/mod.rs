//! `cargo loco task <name> k=v …`: admin chores from the shell, reusing the model methods.

#![allow(
    clippy::result_large_err,
    reason = "loco_rs::Error is Loco's own type for every task; its size is not ours to change"
)]

pub mod admin_create;
pub mod key_create;
pub mod key_import;
pub mod key_list;
pub mod key_revoke;
pub mod user_create;
pub mod user_update;
pub mod worker;

use loco_rs::task::Vars;

/// An optional `k=v` argument; an empty value counts as absent.
fn opt_arg<'a>(vars: &'a Vars, key: &str) -> Option<&'a str> {
    vars.cli_arg(key)
        .ok()
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

/// Applies pending migrations, so a task works on a fresh database (e.g. `key:create` run
/// before the server was ever started), as `start` does with `auto_migrate`.
async fn migrated(ctx: &loco_rs::app::AppContext) -> loco_rs::Result<()> {
    use migration::MigratorTrait;
    migration::Migrator::up(&ctx.db, None).await?;
    Ok(())
}

fn model_err(e: crate::models::ModelError) -> loco_rs::Error {
    loco_rs::Error::Message(e.to_string())
}

/// An optional comma-separated list argument (`models=a,b`).
fn list_arg(vars: &Vars, key: &str) -> Vec<String> {
    opt_arg(vars, key)
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// An optional whole-number argument.
fn num_arg<T: std::str::FromStr>(vars: &Vars, key: &str) -> loco_rs::Result<Option<T>> {
    opt_arg(vars, key)
        .map(|v| {
            v.parse::<T>().map_err(|_| {
                loco_rs::Error::Message(format!("{key} must be a whole number, got {v:?}"))
            })
        })
        .transpose()
}
