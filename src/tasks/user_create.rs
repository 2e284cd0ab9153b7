//! `cargo loco task user:create username=… password=… [role=admin] [prompt_tokens=N]
//! [gen_tokens=N]`: seed 002 users from the shell (e.g. the first admin user, who can then add
//! the others through `POST /db_request/add_user/`).

use loco_rs::{
    app::AppContext,
    task::{Task, TaskInfo, Vars},
    Result,
};

use super::{migrated, model_err, num_arg, opt_arg};
use crate::models::users::{self, NewUser, Role};

pub struct UserCreate;

#[async_trait::async_trait]
impl Task for UserCreate {
    fn task(&self) -> TaskInfo {
        TaskInfo {
            name: "user:create".into(),
            detail: "create a seed 002 user: username=… password=… [role=user|admin] [prompt_tokens=N] [gen_tokens=N]".into(),
        }
    }

    async fn run(&self, ctx: &AppContext, vars: &Vars) -> Result<()> {
        migrated(ctx).await?;
        let role = opt_arg(vars, "role")
            .map(Role::parse)
            .transpose()
            .map_err(model_err)?
            .unwrap_or_default();
        let user = users::ActiveModel::create(
            &ctx.db,
            NewUser {
                username: vars.cli_arg("username")?.to_string(),
                password: vars.cli_arg("password")?.to_string(),
                role,
                enabled: true,
                prompt_token_limit: num_arg(vars, "prompt_tokens")?,
                gen_token_limit: num_arg(vars, "gen_tokens")?,
                prompt_tokens_used: 0,
                gen_tokens_used: 0,
                min_password_chars: users::MIN_PASSWORD_CHARS,
            },
        )
        .await
        .map_err(model_err)?;
        println!(
            "user {} created (id {}, role {})",
            user.username, user.id, user.role
        );
        Ok(())
    }
}
