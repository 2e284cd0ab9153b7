//! Keys issued straight into a test's database, and the rows a test reads back.

use sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, PaginatorTrait, QueryFilter};
use tollgate::models::{
    _entities::{api_keys, jobs},
    api_keys::{ActiveModel as KeyActive, KeyParams, Model as KeyModel, Scope},
};

use super::TestApp;

/// A key issued for a test, with its plain secret.
pub struct TestKey {
    pub id: i32,
    pub prefix: String,
    pub secret: String,
}

/// Issues a key in `db` (a test server's or a deployment's) and keeps its secret.
pub async fn issue_key(db: &DatabaseConnection, params: KeyParams) -> TestKey {
    let issued = KeyActive::issue(db, params).await.expect("issue key");
    TestKey {
        id: issued.key.id,
        prefix: issued.key.prefix,
        secret: issued.secret,
    }
}

/// The key behind a bearer secret the server handed out (a login token is an ordinary key).
pub async fn key_of(app: &TestApp, secret: &str) -> TestKey {
    let row = KeyModel::find_by_secret(&app.ctx.db, secret)
        .await
        .expect("db")
        .expect("the token is a stored key");
    TestKey {
        id: row.id,
        prefix: row.prefix,
        secret: secret.to_string(),
    }
}

/// What an operator's admin key is issued with.
pub fn admin_params() -> KeyParams {
    KeyParams {
        name: "ops".into(),
        email: "ops@example.com".into(),
        scope: Scope::Admin,
        ..Default::default()
    }
}

/// The stored row of `key`.
pub async fn key_row(db: &DatabaseConnection, key: &TestKey) -> api_keys::Model {
    api_keys::Entity::find_by_id(key.id)
        .one(db)
        .await
        .expect("db")
        .expect("key row")
}

/// Every job `key` has queued.
pub async fn jobs_of(db: &DatabaseConnection, key: &TestKey) -> Vec<jobs::Model> {
    jobs::Entity::find()
        .filter(jobs::Column::ApiKeyId.eq(key.id))
        .all(db)
        .await
        .expect("db")
}

impl TestApp {
    pub async fn issue_key(&self, params: KeyParams) -> TestKey {
        issue_key(&self.ctx.db, params).await
    }

    pub async fn key_with_calls(&self, max_calls: Option<i64>) -> TestKey {
        self.issue_key(KeyParams {
            name: "test".into(),
            email: "client@example.com".into(),
            max_calls,
            ..Default::default()
        })
        .await
    }

    /// An admin-scope key (the management routes need one).
    pub async fn admin_key(&self) -> TestKey {
        self.issue_key(admin_params()).await
    }

    pub async fn key_row(&self, key: &TestKey) -> api_keys::Model {
        key_row(&self.ctx.db, key).await
    }

    pub async fn calls_used(&self, key: &TestKey) -> i64 {
        self.key_row(key).await.calls_used
    }

    pub async fn jobs_of(&self, key: &TestKey) -> Vec<jobs::Model> {
        jobs_of(&self.ctx.db, key).await
    }

    pub async fn key_count(&self) -> u64 {
        api_keys::Entity::find()
            .count(&self.ctx.db)
            .await
            .expect("count keys")
    }

    pub async fn job_count(&self) -> u64 {
        jobs::Entity::find().count(&self.ctx.db).await.expect("db")
    }
}
