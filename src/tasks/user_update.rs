//! `cargo loco task user:update username=… [enabled=true|false] [role=user|admin]
//! [password=…] [prompt_tokens=N|none] [gen_tokens=N|none] [reset=true]` and
//! `cargo loco task user:delete username=…`: seed 002's users from the shell, the same changes
//! as `PATCH`/`DELETE /api/users/{username}`.

use loco_rs::{
    app::AppContext,
    task::{Task, TaskInfo, Vars},
    Result,
};

use super::{migrated, model_err, opt_arg};
use crate::models::users::{self, Role, UserChanges};

pub struct UserUpdate;
pub struct UserDelete;

fn flag(vars: &Vars, key: &str) -> Result<Option<bool>> {
    opt_arg(vars, key)
        .map(|v| match v {
            "true" | "yes" | "1" => Ok(true),
            "false" | "no" | "0" => Ok(false),
            other => Err(loco_rs::Error::Message(format!(
                "{key} must be true or false, got {other:?}"
            ))),
        })
        .transpose()
}

/// `N` sets a limit, `none` removes it, absent leaves it.
fn limit(vars: &Vars, key: &str) -> Result<Option<Option<i64>>> {
    opt_arg(vars, key)
        .map(|v| {
            if v == "none" {
                Ok(None)
            } else {
                v.parse::<i64>().map(Some).map_err(|_| {
                    loco_rs::Error::Message(format!("{key} must be a whole number or none"))
                })
            }
        })
        .transpose()
}

#[async_trait::async_trait]
impl Task for UserUpdate {
    fn task(&self) -> TaskInfo {
        TaskInfo {
            name: "user:update".into(),
            detail: "change a seed 002 user: username=… [enabled=true|false] [role=user|admin] [password=…] [prompt_tokens=N|none] [gen_tokens=N|none] [reset=true]".into(),
        }
    }

    async fn run(&self, ctx: &AppContext, vars: &Vars) -> Result<()> {
        migrated(ctx).await?;
        let changes = UserChanges {
            enabled: flag(vars, "enabled")?,
            role: opt_arg(vars, "role")
                .map(Role::parse)
                .transpose()
                .map_err(model_err)?,
            password: opt_arg(vars, "password").map(str::to_string),
            prompt_token_limit: limit(vars, "prompt_tokens")?,
            gen_token_limit: limit(vars, "gen_tokens")?,
            reset_counters: flag(vars, "reset")?.unwrap_or(false),
        };
        let user = users::ActiveModel::change(&ctx.db, vars.cli_arg("username")?, changes)
            .await
            .map_err(model_err)?;
        println!(
            "user {} ({}, {}): prompt tokens {}/{}  generated {}/{}",
            user.username,
            user.role,
            if user.enabled { "enabled" } else { "disabled" },
            user.prompt_tokens_used,
            user.prompt_token_limit
                .map_or("unlimited".into(), |n| n.to_string()),
            user.gen_tokens_used,
            user.gen_token_limit
                .map_or("unlimited".into(), |n| n.to_string()),
        );
        Ok(())
    }
}

#[async_trait::async_trait]
impl Task for UserDelete {
    fn task(&self) -> TaskInfo {
        TaskInfo {
            name: "user:delete".into(),
            detail: "delete a seed 002 user (its tokens are revoked): username=…".into(),
        }
    }

    async fn run(&self, ctx: &AppContext, vars: &Vars) -> Result<()> {
        migrated(ctx).await?;
        let user = users::ActiveModel::remove(&ctx.db, vars.cli_arg("username")?)
            .await
            .map_err(model_err)?;
        println!("user {} deleted; its tokens are revoked", user.username);
        Ok(())
    }
}
