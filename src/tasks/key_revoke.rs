//! `cargo loco task key:revoke prefix=…`

use loco_rs::{
    app::AppContext,
    task::{Task, TaskInfo, Vars},
    Result,
};

use super::{migrated, model_err};
use crate::models::api_keys;

pub struct KeyRevoke;

#[async_trait::async_trait]
impl Task for KeyRevoke {
    fn task(&self) -> TaskInfo {
        TaskInfo {
            name: "key:revoke".into(),
            detail: "revoke an API key: prefix=…".into(),
        }
    }

    async fn run(&self, ctx: &AppContext, vars: &Vars) -> Result<()> {
        migrated(ctx).await?;
        let key = api_keys::ActiveModel::revoke(&ctx.db, vars.cli_arg("prefix")?)
            .await
            .map_err(model_err)?;
        println!(
            "key {} revoked at {}",
            key.prefix,
            key.revoked_at.map(|t| t.to_rfc3339()).unwrap_or_default()
        );
        Ok(())
    }
}
