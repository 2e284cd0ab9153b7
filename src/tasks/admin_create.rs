//! `cargo loco task admin:create email=… password=…`

use loco_rs::{
    app::AppContext,
    task::{Task, TaskInfo, Vars},
    Result,
};

use super::{migrated, model_err};
use crate::models::admins;

pub struct AdminCreate;

#[async_trait::async_trait]
impl Task for AdminCreate {
    fn task(&self) -> TaskInfo {
        TaskInfo {
            name: "admin:create".into(),
            detail: "create a dashboard admin: email=… password=…".into(),
        }
    }

    async fn run(&self, ctx: &AppContext, vars: &Vars) -> Result<()> {
        migrated(ctx).await?;
        let email = vars.cli_arg("email")?;
        let password = vars.cli_arg("password")?;
        let admin = admins::ActiveModel::create(&ctx.db, email, password)
            .await
            .map_err(model_err)?;
        println!("admin {} created (id {})", admin.email, admin.id);
        Ok(())
    }
}
