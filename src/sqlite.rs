//! The embedded database's connection pool, with SQLite's settings on every connection.
//!
//! Loco runs its SQLite `PRAGMA`s (`database.run_on_start`, or its defaults: WAL,
//! `synchronous = NORMAL`, `busy_timeout`, …) once, on whichever pooled connection answers first.
//! `synchronous` and `busy_timeout` are per connection, so every other connection kept sqlx's
//! `synchronous = FULL`: an fsync per commit on some requests and not others. The pool is
//! rebuilt here with the same statements run as each connection opens.

use std::time::Duration;

use loco_rs::config;
use sea_orm::{ConnectOptions, Database, DatabaseConnection, DbErr};

/// Loco's default SQLite settings (`loco_rs::db::connect`), used when the config names none.
/// `synchronous = NORMAL` in WAL mode: a commit survives a crash of the process; a power cut may
/// lose the last commits but never corrupts the file (SQLite's documented trade-off; set
/// `database.run_on_start` with `PRAGMA synchronous = FULL;` to fsync every commit).
const DEFAULT_PRAGMAS: &str = "
PRAGMA foreign_keys = ON;
PRAGMA journal_mode = WAL;
PRAGMA synchronous = NORMAL;
PRAGMA mmap_size = 134217728;
PRAGMA journal_size_limit = 67108864;
PRAGMA cache_size = 2000;
PRAGMA busy_timeout = 5000;
";

/// A pool for `config.uri` (a `sqlite:` URL) whose every connection runs `config.run_on_start`
/// (or [`DEFAULT_PRAGMAS`]) when it opens.
///
/// # Errors
/// When the database cannot be opened or a statement fails.
pub async fn connect(config: &config::Database) -> Result<DatabaseConnection, DbErr> {
    let pragmas = config
        .run_on_start
        .clone()
        .unwrap_or_else(|| DEFAULT_PRAGMAS.to_string());
    let mut opt = ConnectOptions::new(&config.uri);
    opt.max_connections(config.max_connections)
        .min_connections(config.min_connections)
        .connect_timeout(Duration::from_millis(config.connect_timeout))
        .idle_timeout(Duration::from_millis(config.idle_timeout))
        .sqlx_logging(config.enable_logging);
    if let Some(acquire_timeout) = config.acquire_timeout {
        opt.acquire_timeout(Duration::from_millis(acquire_timeout));
    }
    opt.map_sqlx_sqlite_pool_opts(move |pool| {
        let pragmas = pragmas.clone();
        pool.after_connect(move |conn, _meta| {
            let pragmas = pragmas.clone();
            Box::pin(async move {
                sqlx::raw_sql(sqlx::AssertSqlSafe(pragmas))
                    .execute(&mut *conn)
                    .await
                    .map(|_| ())
            })
        })
    });
    Database::connect(opt).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use sea_orm::{ConnectionTrait, Statement};

    /// Every pooled connection, not only the first, runs with the configured settings.
    #[tokio::test]
    async fn every_connection_of_the_pool_has_the_settings() {
        let dir = std::env::temp_dir().join(format!("tollgate-sqlite-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let config = config::Database {
            uri: format!("sqlite://{}/t.sqlite?mode=rwc", dir.display()),
            enable_logging: false,
            min_connections: 4,
            max_connections: 4,
            connect_timeout: 5000,
            idle_timeout: 5000,
            acquire_timeout: None,
            auto_migrate: false,
            dangerously_truncate: false,
            dangerously_recreate: false,
            run_on_start: None,
        };
        let db = connect(&config).await.expect("pool");
        // Hold four transactions at once: each is on its own connection.
        let mut txns = Vec::new();
        for _ in 0..4 {
            txns.push(sea_orm::TransactionTrait::begin(&db).await.expect("begin"));
        }
        for txn in &txns {
            let row = txn
                .query_one_raw(Statement::from_string(
                    sea_orm::DatabaseBackend::Sqlite,
                    "PRAGMA synchronous",
                ))
                .await
                .expect("query")
                .expect("a row");
            // 1 = NORMAL (sqlx's own default is 2 = FULL).
            assert_eq!(row.try_get_by_index::<i32>(0).expect("int"), 1);
            let row = txn
                .query_one_raw(Statement::from_string(
                    sea_orm::DatabaseBackend::Sqlite,
                    "PRAGMA busy_timeout",
                ))
                .await
                .expect("query")
                .expect("a row");
            assert_eq!(row.try_get_by_index::<i32>(0).expect("int"), 5000);
        }
        drop(txns);
        db.close().await.ok();
        let _ = std::fs::remove_dir_all(dir);
    }
}
