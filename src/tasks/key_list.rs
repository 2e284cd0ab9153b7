//! `cargo loco task key:list`

use loco_rs::{
    app::AppContext,
    task::{Task, TaskInfo, Vars},
    Result,
};

use super::{migrated, model_err};
use crate::models::{api_keys, now};

pub struct KeyList;

#[async_trait::async_trait]
impl Task for KeyList {
    fn task(&self) -> TaskInfo {
        TaskInfo {
            name: "key:list".into(),
            detail: "list API keys with usage and state (never secrets)".into(),
        }
    }

    async fn run(&self, ctx: &AppContext, _vars: &Vars) -> Result<()> {
        migrated(ctx).await?;
        let keys = api_keys::Model::list(&ctx.db).await.map_err(model_err)?;
        let at = now();
        println!(
            "{:<10} {:<14} {:<28} {:>12} {:<26} {:<26}",
            "prefix", "state", "email", "calls", "valid_from", "valid_until"
        );
        for k in keys {
            let calls = match k.max_calls {
                Some(m) => format!("{}/{m}", k.calls_used),
                None => format!("{}/∞", k.calls_used),
            };
            println!(
                "{:<10} {:<14} {:<28} {:>12} {:<26} {:<26}",
                k.prefix,
                k.state_at(at).as_str(),
                k.email,
                calls,
                k.valid_from.map_or("-".into(), |t| t.to_rfc3339()),
                k.valid_until.map_or("-".into(), |t| t.to_rfc3339()),
            );
        }
        Ok(())
    }
}
