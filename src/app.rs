//! Wiring: routes, tasks, and the services a running server starts.

use std::{path::Path, sync::Arc};

use async_trait::async_trait;
use loco_rs::{
    app::{AppContext, Hooks},
    bgworker::Queue,
    boot::{create_app, shutdown_signal, BootResult, ServeParams, StartMode},
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

/// The router as served: trailing slashes are trimmed *before* routing, so `/api/` (seed 003's
/// URL) and `/api` reach the same handler. Loco registers routes without the slash.
pub fn into_service(
    router: axum::Router,
) -> axum::extract::connect_info::IntoMakeServiceWithConnectInfo<
    tower_http::normalize_path::NormalizePath<axum::Router>,
    std::net::SocketAddr,
> {
    let service = tower::Layer::layer(
        &tower_http::normalize_path::NormalizePathLayer::trim_trailing_slash(),
        router,
    );
    axum::ServiceExt::<axum::extract::Request>::into_make_service_with_connect_info::<
        std::net::SocketAddr,
    >(service)
}

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

    async fn serve(app: axum::Router, ctx: &AppContext, params: &ServeParams) -> Result<()> {
        let listener =
            tokio::net::TcpListener::bind(&format!("{}:{}", params.binding, params.port)).await?;
        let ctx = ctx.clone();
        axum::serve(listener, into_service(app))
            .with_graceful_shutdown(async move {
                shutdown_signal().await;
                tracing::info!("shutting down: draining requests, finishing the current job");
                Self::on_shutdown(&ctx).await;
            })
            .await?;
        Ok(())
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
            .add_route(controllers::openai::routes())
            .add_route(controllers::queue_api::routes())
            .add_route(controllers::llm::routes())
            .add_route(controllers::llm::vllm_routes())
            .add_route(controllers::adapters::routes())
            .add_route(controllers::embeddings::routes())
            .add_route(controllers::accounts::routes())
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
        tasks.register(tasks::user_create::UserCreate);
    }

    async fn truncate(ctx: &AppContext) -> Result<()> {
        truncate_table(&ctx.db, _entities::conversation_messages::Entity).await?;
        truncate_table(&ctx.db, _entities::usage_records::Entity).await?;
        truncate_table(&ctx.db, _entities::jobs::Entity).await?;
        truncate_table(&ctx.db, _entities::api_keys::Entity).await?;
        truncate_table(&ctx.db, _entities::users::Entity).await?;
        truncate_table(&ctx.db, _entities::admins::Entity).await?;
        truncate_table(&ctx.db, _entities::adapters::Entity).await?;
        Ok(())
    }

    async fn seed(_ctx: &AppContext, _base: &Path) -> Result<()> {
        Ok(())
    }
}
