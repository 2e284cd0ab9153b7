//! `cargo loco task key:create email=… [name=…] [org=…] [calls=100] [from=2026-01-01] [until=2026-12-31]`

use loco_rs::{
    app::AppContext,
    task::{Task, TaskInfo, Vars},
    Result,
};

use super::{migrated, model_err, opt_arg};
use crate::models::api_keys::{self, KeyParams};

pub struct KeyCreate;

#[async_trait::async_trait]
impl Task for KeyCreate {
    fn task(&self) -> TaskInfo {
        TaskInfo {
            name: "key:create".into(),
            detail: "issue an API key: email=… [name=…] [org=…] [calls=N] [from=DATE] [until=DATE]; prints the secret once".into(),
        }
    }

    async fn run(&self, ctx: &AppContext, vars: &Vars) -> Result<()> {
        migrated(ctx).await?;
        let max_calls = opt_arg(vars, "calls")
            .map(|c| {
                c.parse::<i64>().map_err(|_| {
                    loco_rs::Error::Message(format!("calls must be a whole number, got {c:?}"))
                })
            })
            .transpose()?;
        let valid_from = opt_arg(vars, "from")
            .map(|v| api_keys::parse_bound(v, false))
            .transpose()
            .map_err(model_err)?;
        let valid_until = opt_arg(vars, "until")
            .map(|v| api_keys::parse_bound(v, true))
            .transpose()
            .map_err(model_err)?;
        let issued = api_keys::ActiveModel::issue(
            &ctx.db,
            KeyParams {
                name: opt_arg(vars, "name").unwrap_or_default().to_string(),
                email: vars.cli_arg("email")?.to_string(),
                organization: opt_arg(vars, "org").map(str::to_string),
                max_calls,
                valid_from,
                valid_until,
            },
        )
        .await
        .map_err(model_err)?;
        let k = &issued.key;
        println!("key {} issued to {}", k.prefix, k.email);
        println!(
            "calls: {}  valid: {} .. {}",
            k.max_calls.map_or("unlimited".into(), |m| m.to_string()),
            k.valid_from.map_or("open".into(), |t| t.to_rfc3339()),
            k.valid_until.map_or("open".into(), |t| t.to_rfc3339()),
        );
        println!("secret (shown once, store it now): {}", issued.secret);
        Ok(())
    }
}
