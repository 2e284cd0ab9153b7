//! Wiring: routes, tasks, and the services a running server starts.

use std::{path::Path, sync::Arc};

use async_trait::async_trait;
use loco_rs::{
    app::{AppContext, Hooks},
    bgworker::Queue,
    boot::{create_app, BootResult, StartMode},
    config::Config,
    controller::AppRoutes,
    db::truncate_table,
    environment::Environment,
    task::Tasks,
    Result,
};
use migration::Migrator;

use crate::{controllers, models::_entities, services::Services, tasks};

pub struct App;

/// Creates the parent folder of a `sqlite://` file URL (the embedded default keeps its
/// databases under `data/`, which a fresh checkout does not have).
fn ensure_sqlite_dir(url: &str) {
    let Some(rest) = url.strip_prefix("sqlite://") else {
        return;
    };
    let path = rest.split('?').next().unwrap_or_default();
    if path.is_empty() || path == ":memory:" {
        return;
    }
    if let Some(parent) = Path::new(path).parent() {
        if !parent.as_os_str().is_empty() {
            if let Err(e) = std::fs::create_dir_all(parent) {
                tracing::warn!(dir = %parent.display(), error = %e, "cannot create data folder");
            }
        }
    }
}

#[async_trait]
impl Hooks for App {
    fn app_name() -> &'static str {
        env!("CARGO_CRATE_NAME")
    }

    fn app_version() -> String {
        env!("CARGO_PKG_VERSION").to_string()
    }

    async fn boot(
        mode: StartMode,
        environment: &Environment,
        config: Config,
    ) -> Result<BootResult> {
        create_app::<Self, Migrator>(mode, environment, config).await
    }

    async fn load_config(env: &Environment) -> Result<Config> {
        let config = env.load()?;
        ensure_sqlite_dir(&config.database.uri);
        if let Ok(settings) = crate::settings::Settings::from_config(&config) {
            ensure_sqlite_dir(&settings.queue.url);
        }
        Ok(config)
    }

    fn routes(_ctx: &AppContext) -> AppRoutes {
        AppRoutes::with_default_routes()
            .add_route(controllers::ping::routes())
            .add_route(controllers::api::routes())
            .add_route(controllers::usage::routes())
    }

    /// Runs for `start` (not for tasks): loads the model, opens the queue, starts the
    /// embedded worker, and makes them available to handlers.
    async fn before_run(ctx: &AppContext) -> Result<()> {
        let services = Services::start(ctx).await?;
        ctx.shared_store.insert::<Arc<Services>>(services);
        Ok(())
    }

    async fn on_shutdown(ctx: &AppContext) {
        if let Some(services) = ctx.shared_store.get::<Arc<Services>>() {
            services.shutdown().await;
        }
    }

    async fn connect_workers(_ctx: &AppContext, _queue: &Queue) -> Result<()> {
        // Generation jobs go through apalis (src/queue.rs), not Loco's worker queue.
        Ok(())
    }

    fn register_tasks(tasks: &mut Tasks) {
        tasks.register(tasks::admin_create::AdminCreate);
        tasks.register(tasks::key_create::KeyCreate);
        tasks.register(tasks::key_list::KeyList);
        tasks.register(tasks::key_revoke::KeyRevoke);
    }

    async fn truncate(ctx: &AppContext) -> Result<()> {
        truncate_table(&ctx.db, _entities::usage_records::Entity).await?;
        truncate_table(&ctx.db, _entities::jobs::Entity).await?;
        truncate_table(&ctx.db, _entities::api_keys::Entity).await?;
        truncate_table(&ctx.db, _entities::admins::Entity).await?;
        Ok(())
    }

    async fn seed(_ctx: &AppContext, _base: &Path) -> Result<()> {
        Ok(())
    }
}
