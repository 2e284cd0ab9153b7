//! A fresh Postgres database per test, on the machine's test server.

use sea_orm::ConnectionTrait;

/// Server of the test Postgres (trust auth on this machine kind; override for elsewhere).
pub fn pg_server() -> String {
    std::env::var("TOLLGATE_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// Creates an empty database named `{prefix}_{uuid}` and returns its name.
pub async fn create_database(prefix: &str) -> String {
    let name = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
    let admin = sea_orm::Database::connect(format!("{}/postgres", pg_server()))
        .await
        .expect("connect to the test Postgres");
    admin
        .execute_unprepared(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create test database");
    admin.close().await.ok();
    name
}

/// Drops a database made by [`create_database`], closing its connections (best effort: this
/// runs from `Drop`).
pub fn drop_database(name: &str) {
    let _ = std::process::Command::new("psql")
        .arg(format!("{}/postgres", pg_server()))
        .args([
            "-q",
            "-c",
            &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        ])
        .status();
}
