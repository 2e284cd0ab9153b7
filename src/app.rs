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
use sea_orm::ConnectionTrait;

use crate::{controllers, models::_entities, services::Services, tasks};

pub struct App;

/// What the server runs: the router behind the two request rewrites below.
pub type Served = tower::util::MapRequest<
    tower_http::normalize_path::NormalizePath<axum::Router>,
    fn(axum::extract::Request) -> axum::extract::Request,
>;

/// The router as served: trailing slashes are trimmed *before* routing, so `/api/` (seed 003's
/// URL) and `/api` reach the same handler (Loco registers routes without the slash); and a key
/// may ride in the base URL (see [`key_in_path`]).
pub fn into_service(
    router: axum::Router,
) -> axum::extract::connect_info::IntoMakeServiceWithConnectInfo<Served, std::net::SocketAddr> {
    let normalized = tower::Layer::layer(
        &tower_http::normalize_path::NormalizePathLayer::trim_trailing_slash(),
        router,
    );
    let service: Served = tower::util::MapRequest::new(
        normalized,
        key_in_path as fn(axum::extract::Request) -> axum::extract::Request,
    );
    axum::ServiceExt::<axum::extract::Request>::into_make_service_with_connect_info::<
        std::net::SocketAddr,
    >(service)
}

/// `/k/<secret>/<route>` is `/<route>` with `Authorization: Bearer <secret>`.
///
/// Seed 001's and seed 004's clients send no `Authorization` header; with this they work
/// against Tollgate by changing only their base URL (`http://host/k/tg_…`). The prefix is
/// removed before routing and logging, so Tollgate's own logs never see the secret; a proxy in
/// front logs URLs, which is why clients that can send a header should (HOWTO.md says how to
/// keep nginx's access log clean). The key in the path wins over any `Authorization` header:
/// seed 002's OpenAI-SDK clients send `api_key="EMPTY"`, and their base URL is where their key
/// can go.
fn key_in_path(mut req: axum::extract::Request) -> axum::extract::Request {
    let Some(rest) = req.uri().path().strip_prefix("/k/") else {
        return req;
    };
    let (secret, route) = rest.split_once('/').unwrap_or((rest, ""));
    if secret.is_empty() {
        return req;
    }
    let path_and_query = match req.uri().query() {
        Some(q) => format!("/{route}?{q}"),
        None => format!("/{route}"),
    };
    let mut parts = req.uri().clone().into_parts();
    let Ok(pq) = path_and_query.parse() else {
        return req;
    };
    parts.path_and_query = Some(pq);
    let Ok(uri) = axum::http::Uri::from_parts(parts) else {
        return req;
    };
    let bearer = axum::http::HeaderValue::from_str(&format!("Bearer {secret}")).ok();
    *req.uri_mut() = uri;
    if let Some(value) = bearer {
        req.headers_mut()
            .insert(axum::http::header::AUTHORIZATION, value);
    }
    req
}

/// With no admin yet, logs a single-use link that creates the first one in the browser.
async fn announce_setup_link(ctx: &AppContext, services: &Services) -> Result<()> {
    use sea_orm::{EntityTrait, PaginatorTrait};
    if _entities::admins::Entity::find().count(&ctx.db).await? == 0 {
        let token = services.setup.issue();
        tracing::warn!(
            "no admin yet: open {}/admin/setup?token={token} within {} minutes to create the first admin (single use; `cargo loco task admin:create` works too)",
            ctx.config.server.full_url(),
            services.settings.auth.setup_link_minutes
        );
    }
    Ok(())
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

    /// The embedded database gets its SQLite settings on every pooled connection
    /// ([`crate::sqlite`]), not only on the one Loco happened to configure.
    async fn after_context(mut ctx: AppContext) -> Result<AppContext> {
        if ctx.db.get_database_backend() == sea_orm::DatabaseBackend::Sqlite {
            let pool = crate::sqlite::connect(&ctx.config.database).await?;
            let loco_pool = std::mem::replace(&mut ctx.db, pool);
            loco_pool.close().await.ok();
        }
        Ok(ctx)
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
            .add_route(controllers::native::routes())
            .add_route(controllers::openai::routes())
            .add_route(controllers::openapi::routes())
            .add_route(controllers::compat::seed000::routes())
            .add_route(controllers::compat::seed001::routes())
            .add_route(controllers::compat::seed002::routes())
            .add_route(controllers::compat::seed004::routes())
            .add_route(controllers::compat::llama_server::routes())
            .add_route(controllers::compat::ollama::routes())
            .add_route(controllers::admin::adapters::routes())
            .add_route(controllers::admin::ops::routes())
            .add_route(controllers::admin::users::routes())
            .add_route(controllers::dashboard::routes())
    }

    /// Runs for `start` (not for tasks): loads the model, opens the queue, starts the
    /// embedded worker, and makes them available to handlers.
    async fn before_run(ctx: &AppContext) -> Result<()> {
        let services = Services::start(ctx).await?;
        announce_setup_link(ctx, &services).await?;
        ctx.shared_store.insert::<Arc<Services>>(services);
        Ok(())
    }

    /// The dashboard's templates (`assets/views`) for every handler.
    async fn after_routes(router: axum::Router, _ctx: &AppContext) -> Result<axum::Router> {
        let views = loco_rs::controller::views::engines::TeraView::build()?;
        Ok(router
            .route_layer(axum::middleware::from_fn(crate::request_id::scope))
            .route_layer(axum::middleware::from_fn(crate::metrics::track))
            .layer(axum::Extension(
                loco_rs::controller::views::ViewEngine::from(views),
            )))
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
        tasks.register(tasks::key_import::KeyImport);
        tasks.register(tasks::key_list::KeyList);
        tasks.register(tasks::key_revoke::KeyRevoke);
        tasks.register(tasks::user_create::UserCreate);
        tasks.register(tasks::user_update::UserUpdate);
        tasks.register(tasks::user_update::UserDelete);
        tasks.register(tasks::worker::Worker);
    }

    async fn truncate(ctx: &AppContext) -> Result<()> {
        truncate_table(&ctx.db, _entities::conversation_messages::Entity).await?;
        truncate_table(&ctx.db, _entities::usage_records::Entity).await?;
        truncate_table(&ctx.db, _entities::jobs::Entity).await?;
        truncate_table(&ctx.db, _entities::api_keys::Entity).await?;
        truncate_table(&ctx.db, _entities::users::Entity).await?;
        truncate_table(&ctx.db, _entities::admins::Entity).await?;
        truncate_table(&ctx.db, _entities::adapters::Entity).await?;
        ctx.db.execute_unprepared("DELETE FROM job_totals").await?;
        Ok(())
    }

    async fn seed(_ctx: &AppContext, _base: &Path) -> Result<()> {
        Ok(())
    }
}
