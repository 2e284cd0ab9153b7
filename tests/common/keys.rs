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

/// `api_keys::charge_many` against `app`'s database: each key all or none (one that fits, one
/// over its quota, one whose secret changed, one over its generation budget, one revoked: only
/// the first is charged, the others untouched), then two batches over the same six keys in
/// opposite orders at once, forty times, each holding its transaction a moment: on Postgres rows
/// locked in id order let neither deadlock, and every call is counted.
pub async fn charge_many_is_all_or_none_per_key_and_concurrent_batches_do_not_deadlock(
    app: &TestApp,
) {
    use sea_orm::TransactionTrait;
    use tollgate::models::api_keys::{charge_many, BatchCharge};

    let fits = app.key_with_calls(Some(3)).await;
    let over = app.key_with_calls(Some(2)).await;
    let rotated = app.key_with_calls(None).await;
    let budget = app
        .issue_key(KeyParams {
            email: "budget@example.com".into(),
            gen_token_limit: Some(10),
            ..Default::default()
        })
        .await;
    let revoked = app.key_with_calls(None).await;
    KeyActive::revoke(&app.ctx.db, &revoked.prefix)
        .await
        .expect("revoke");
    let charge = |row: &KeyModel, calls: u32, gen_tokens: i64| BatchCharge {
        key_id: row.id,
        secret_hash: row.secret_hash.clone(),
        calls,
        prompt_tokens: 4,
        gen_tokens,
    };
    let rows = [
        app.key_row(&fits).await,
        app.key_row(&over).await,
        app.key_row(&rotated).await,
        app.key_row(&budget).await,
        app.key_row(&revoked).await,
    ];
    let mut wrong_secret = charge(&rows[2], 1, 1);
    wrong_secret.secret_hash = "not its secret".into();
    let charged = charge_many(
        &app.ctx.db,
        &[
            charge(&rows[1], 3, 1),
            charge(&rows[0], 3, 2),
            wrong_secret,
            charge(&rows[3], 1, 11),
            charge(&rows[4], 1, 1),
        ],
    )
    .await
    .expect("charge");
    assert_eq!(
        charged.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![fits.id]
    );
    let after = app.key_row(&fits).await;
    assert_eq!(
        (
            after.calls_used,
            after.prompt_tokens_used,
            after.gen_tokens_used
        ),
        (3, 4, 2)
    );
    assert!(after.last_used_at.is_some());
    for (key, row) in [&over, &rotated, &budget, &revoked]
        .into_iter()
        .zip(&rows[1..])
    {
        assert_eq!(&app.key_row(key).await, row, "a key left out changed");
    }
    // A key twice in one batch is refused before anything is sent.
    assert!(charge_many(
        &app.ctx.db,
        &[charge(&rows[2], 1, 0), charge(&rows[2], 1, 0)]
    )
    .await
    .is_err());

    let mut keys = Vec::new();
    for _ in 0..6 {
        keys.push(app.key_row(&app.key_with_calls(None).await).await);
    }
    let runs = [false, true].map(|reversed| {
        let db = app.ctx.db.clone();
        let mut batch: Vec<BatchCharge> = keys.iter().map(|k| charge(k, 1, 0)).collect();
        if reversed {
            batch.reverse();
        }
        tokio::spawn(async move {
            for _ in 0..40 {
                let txn = db.begin().await.expect("begin");
                let charged = charge_many(&txn, &batch).await.expect("no deadlock");
                assert_eq!(charged.len(), batch.len());
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                txn.commit().await.expect("commit");
            }
        })
    });
    for run in runs {
        run.await.expect("batches");
    }
    for key in &keys {
        let row = api_keys::Entity::find_by_id(key.id)
            .one(&app.ctx.db)
            .await
            .expect("db")
            .expect("key");
        assert_eq!(row.calls_used, 80);
    }
}
