//! `cargo loco task key:create email=… [name=…] [org=…] [calls=100] [from=2026-01-01]
//! [until=2026-12-31] [scope=admin] [rpm=60] [burst=10] [models=a,b] [adapters=x,y]
//! [prompt_tokens=N] [gen_tokens=N]`

use loco_rs::{
    app::AppContext,
    task::{Task, TaskInfo, Vars},
    Result,
};

use super::{list_arg, migrated, model_err, num_arg, opt_arg};
use crate::models::api_keys::{self, KeyParams, Scope};

pub struct KeyCreate;

#[async_trait::async_trait]
impl Task for KeyCreate {
    fn task(&self) -> TaskInfo {
        TaskInfo {
            name: "key:create".into(),
            detail: "issue an API key: email=… [name=…] [org=…] [calls=N] [from=DATE] [until=DATE] [scope=client|admin] [rpm=N] [burst=N] [models=a,b] [adapters=x,y] [prompt_tokens=N] [gen_tokens=N] [priority=0..10]; prints the secret once".into(),
        }
    }

    async fn run(&self, ctx: &AppContext, vars: &Vars) -> Result<()> {
        migrated(ctx).await?;
        let max_calls = num_arg::<i64>(vars, "calls")?;
        let scope = opt_arg(vars, "scope")
            .map(Scope::parse)
            .transpose()
            .map_err(model_err)?
            .unwrap_or_default();
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
                scope,
                rate_limit_per_minute: num_arg(vars, "rpm")?,
                rate_limit_burst: num_arg(vars, "burst")?,
                priority: num_arg(vars, "priority")?.unwrap_or(0),
                allowed_models: list_arg(vars, "models"),
                allowed_adapters: list_arg(vars, "adapters"),
                user_id: None,
                prompt_token_limit: num_arg(vars, "prompt_tokens")?,
                gen_token_limit: num_arg(vars, "gen_tokens")?,
            },
        )
        .await
        .map_err(model_err)?;
        let k = &issued.key;
        println!("key {} ({} scope) issued to {}", k.prefix, k.scope, k.email);
        println!(
            "calls: {}  valid: {} .. {}",
            k.max_calls.map_or("unlimited".into(), |m| m.to_string()),
            k.valid_from.map_or("open".into(), |t| t.to_rfc3339()),
            k.valid_until.map_or("open".into(), |t| t.to_rfc3339()),
        );
        let budget = |limit: Option<i64>| limit.map_or("unlimited".into(), |n| n.to_string());
        println!(
            "token budgets: prompt {}  generation {}",
            budget(k.prompt_token_limit),
            budget(k.gen_token_limit)
        );
        println!("secret (shown once, store it now): {}", issued.secret);
        Ok(())
    }
}
