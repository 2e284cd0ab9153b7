//! Job records: the durable truth about every generation, whatever the queue does.
//!
//! Status moves `queued → running → done | failed`. Every transition is a conditional UPDATE,
//! so a job delivered twice by the queue (a retry after a crash) is never generated or charged
//! twice, and a refund happens at most once.

use sea_orm::{
    entity::prelude::*,
    sea_query::{Expr, ExprTrait},
    ActiveValue::Set,
    TransactionTrait,
};

pub use super::_entities::jobs::{self, ActiveModel, Column, Entity, Model};
use super::{_entities::usage_records, api_keys, budgets, now, ModelError};
use crate::engine::{text::count_words, Embeddings, Generation};

impl ActiveModelBehavior for ActiveModel {}

pub const QUEUED: &str = "queued";
pub const RUNNING: &str = "running";
pub const DONE: &str = "done";
pub const FAILED: &str = "failed";

/// Why the reaper picked a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stuck {
    Queued,
    Running,
}

/// What a finished job stores: its result text and token counts.
#[derive(Debug, Clone)]
pub struct JobOutput {
    /// The generated text, or for embeddings the vectors as a JSON array of arrays.
    pub result: String,
    pub prompt_tokens: u32,
    pub generated_tokens: u32,
    pub finish_reason: Option<&'static str>,
    /// Words of the output text.
    pub words: usize,
    /// Words of the request's input text (seed 003's `/usage/` counts these).
    pub input_words: usize,
    /// The generation's per-token log-probabilities as JSON, when asked for.
    pub logprobs: Option<String>,
    /// The other choices (`n` > 1) as JSON.
    pub choices: Option<String>,
    /// Prompt tokens the engine found in its KV cache (prefix reuse).
    pub cached_tokens: u32,
}

impl From<&Generation> for JobOutput {
    fn from(g: &Generation) -> Self {
        Self {
            result: g.text.clone(),
            prompt_tokens: g.prompt_tokens,
            generated_tokens: g.generated_tokens,
            finish_reason: Some(g.finish_reason.as_str()),
            words: count_words(&g.text),
            input_words: 0,
            // Finite numbers and bytes only: serialising cannot fail.
            logprobs: g
                .logprobs
                .as_ref()
                .and_then(|l| serde_json::to_string(l).ok()),
            choices: Some(&g.more)
                .filter(|m| !m.is_empty())
                .and_then(|m| serde_json::to_string(m).ok()),
            cached_tokens: g.cached_tokens,
        }
    }
}

impl JobOutput {
    /// # Errors
    /// When the vectors cannot be serialised (non-finite values; the engine never sends any).
    pub fn embeddings(e: &Embeddings) -> Result<Self, serde_json::Error> {
        Ok(Self {
            result: serde_json::to_string(&e.vectors)?,
            prompt_tokens: e.prompt_tokens,
            generated_tokens: 0,
            finish_reason: None,
            words: 0,
            input_words: 0,
            logprobs: None,
            choices: None,
            cached_tokens: 0,
        })
    }
}

/// A job about to be queued.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: String,
    pub api_key_id: i32,
    pub endpoint: String,
    pub model: String,
    pub request_json: String,
    pub prompt_tokens: i32,
    /// The client's own id for the job (seed 001's `job_id`), unique per key.
    pub client_ref: Option<String>,
    /// Tokens held against the key's (and its user's) budgets until the job settles.
    pub reservation: budgets::Reservation,
    /// What the route's answer repeats of its request and the job does not keep (JSON).
    pub echo: Option<String>,
}

impl Model {
    #[must_use]
    pub fn is_finished(&self) -> bool {
        self.status == DONE || self.status == FAILED
    }

    /// A job as seen by its own key; other keys' jobs are invisible (404, not 403).
    ///
    /// # Errors
    /// On database errors.
    pub async fn find_for_key<C: ConnectionTrait>(
        db: &C,
        id: &str,
        api_key_id: i32,
    ) -> Result<Option<Self>, ModelError> {
        Ok(Entity::find_by_id(id.to_string())
            .filter(Column::ApiKeyId.eq(api_key_id))
            .one(db)
            .await?)
    }

    /// The job a key submitted under its own id, if any.
    ///
    /// # Errors
    /// On database errors.
    pub async fn find_by_client_ref<C: ConnectionTrait>(
        db: &C,
        api_key_id: i32,
        client_ref: &str,
    ) -> Result<Option<Self>, ModelError> {
        Ok(Entity::find()
            .filter(Column::ApiKeyId.eq(api_key_id))
            .filter(Column::ClientRef.eq(client_ref))
            .one(db)
            .await?)
    }

    /// Lookup without an owner check (workers and admins only).
    ///
    /// # Errors
    /// On database errors.
    pub async fn find_any<C: ConnectionTrait>(
        db: &C,
        id: &str,
    ) -> Result<Option<Self>, ModelError> {
        Ok(Entity::find_by_id(id.to_string()).one(db).await?)
    }

    /// The latest jobs of a key, newest first (dashboard).
    ///
    /// # Errors
    /// On database errors.
    pub async fn recent_for_key<C: ConnectionTrait>(
        db: &C,
        api_key_id: i32,
        limit: u64,
    ) -> Result<Vec<Self>, ModelError> {
        use sea_orm::{QueryOrder, QuerySelect};
        Ok(Entity::find()
            .filter(Column::ApiKeyId.eq(api_key_id))
            .order_by_desc(Column::QueuedAt)
            .limit(limit)
            .all(db)
            .await?)
    }

    /// The latest jobs across keys, newest first, optionally filtered (dashboard).
    ///
    /// # Errors
    /// On database errors.
    pub async fn recent<C: ConnectionTrait>(
        db: &C,
        status: Option<&str>,
        api_key_id: Option<i32>,
        model: Option<&str>,
        limit: u64,
    ) -> Result<Vec<Self>, ModelError> {
        use sea_orm::{sea_query::BinOper, QueryOrder, QuerySelect};
        // With a key, the key's index (key, queued_at) must lead: one key's jobs are few next
        // to all the jobs of a status or model, but SQLite keeps no statistics to know it and
        // may walk the status or model index through a million rows instead. `col || ''` is
        // the same value with no index matching it (harmless on Postgres, which plans by
        // statistics).
        let unindexed = |c: Column| -> Expr {
            if api_key_id.is_some() {
                Expr::col(c).binary(BinOper::Custom("||"), Expr::val(""))
            } else {
                Expr::col(c)
            }
        };
        let mut q = Entity::find();
        if let Some(s) = status {
            q = q.filter(unindexed(Column::Status).eq(s));
        }
        if let Some(k) = api_key_id {
            q = q.filter(Column::ApiKeyId.eq(k));
        }
        if let Some(m) = model {
            q = q.filter(unindexed(Column::Model).eq(m));
        }
        Ok(q.order_by_desc(Column::QueuedAt)
            .limit(limit)
            .all(db)
            .await?)
    }

    /// Jobs finished since `since`, newest first (dashboard throughput and latency).
    ///
    /// # Errors
    /// On database errors.
    pub async fn finished_since<C: ConnectionTrait>(
        db: &C,
        since: DateTimeWithTimeZone,
    ) -> Result<Vec<Self>, ModelError> {
        use sea_orm::QueryOrder;
        Ok(Entity::find()
            .filter(Column::FinishedAt.gte(since))
            .order_by_desc(Column::FinishedAt)
            .all(db)
            .await?)
    }

    /// Jobs of `model` still waiting for a worker.
    ///
    /// # Errors
    /// On database errors.
    pub async fn queued_for_model<C: ConnectionTrait>(
        db: &C,
        model: &str,
    ) -> Result<Vec<Self>, ModelError> {
        Ok(Entity::find()
            .filter(Column::Model.eq(model))
            .filter(Column::Status.eq(QUEUED))
            .all(db)
            .await?)
    }

    /// Ids of jobs `queued` since before `queued_before` or `running` since before
    /// `running_before` (the reaper's candidates), at most 500 per call.
    ///
    /// # Errors
    /// On database errors.
    pub async fn stuck<C: ConnectionTrait>(
        db: &C,
        queued_before: DateTimeWithTimeZone,
        running_before: DateTimeWithTimeZone,
    ) -> Result<Vec<(String, Stuck)>, ModelError> {
        use sea_orm::{Condition, QuerySelect};
        let rows = Entity::find()
            .filter(
                Condition::any()
                    .add(
                        Condition::all()
                            .add(Column::Status.eq(QUEUED))
                            .add(Column::QueuedAt.lt(queued_before)),
                    )
                    .add(
                        Condition::all()
                            .add(Column::Status.eq(RUNNING))
                            .add(Column::StartedAt.lt(running_before)),
                    ),
            )
            .limit(500)
            .all(db)
            .await?;
        Ok(rows
            .into_iter()
            .map(|j| {
                let why = if j.status == QUEUED {
                    Stuck::Queued
                } else {
                    Stuck::Running
                };
                (j.id, why)
            })
            .collect())
    }

    /// # Errors
    /// On database errors.
    pub async fn count_all<C: ConnectionTrait>(db: &C) -> Result<u64, ModelError> {
        Ok(Entity::find().count(db).await?)
    }
}

impl ActiveModel {
    /// Records a job as queued (before it is pushed to the queue, so a worker never sees a job
    /// without its record).
    ///
    /// # Errors
    /// On database errors.
    pub async fn create_queued<C: ConnectionTrait>(
        db: &C,
        job: NewJob,
    ) -> Result<Model, ModelError> {
        Ok(Self::queued(job, now()).insert(db).await?)
    }

    /// Records several queued jobs in one `INSERT` (concurrent admissions of one key, committed
    /// together). All or none: a client id already taken fails the statement.
    ///
    /// # Errors
    /// On database errors.
    pub async fn create_queued_many<C: ConnectionTrait>(
        db: &C,
        jobs: Vec<NewJob>,
    ) -> Result<Vec<Model>, ModelError> {
        let ts = now();
        Ok(
            Entity::insert_many(jobs.into_iter().map(|job| Self::queued(job, ts)))
                .exec_with_returning(db)
                .await?,
        )
    }

    fn queued(job: NewJob, ts: DateTimeWithTimeZone) -> Self {
        Self {
            id: Set(job.id),
            api_key_id: Set(job.api_key_id),
            status: Set(QUEUED.to_string()),
            endpoint: Set(job.endpoint),
            model: Set(job.model),
            request: Set(job.request_json),
            result: Set(None),
            error: Set(None),
            prompt_tokens: Set(job.prompt_tokens),
            generated_tokens: Set(0),
            finish_reason: Set(None),
            attempts: Set(0),
            refunded: Set(false),
            worker: Set(None),
            queued_at: Set(ts),
            started_at: Set(None),
            finished_at: Set(None),
            client_ref: Set(job.client_ref),
            user_id: Set(job.reservation.user_id),
            reserved_prompt_tokens: Set(job.reservation.prompt_tokens),
            reserved_gen_tokens: Set(job.reservation.gen_tokens),
            logprobs: Set(None),
            choices: Set(None),
            cached_tokens: Set(0),
            echo: Set(job.echo),
            created_at: Set(ts),
            updated_at: Set(ts),
        }
    }
}

/// Claims a job for `worker`, in one conditional UPDATE: a `queued` job, or a `running` one
/// whose worker is gone (no live heartbeat within `gone_after`, stopped, or unknown) or is
/// this worker itself (restarted under the same name). `None` when the job is finished or
/// running on another live worker (a late or duplicate delivery): it is never run twice at
/// once.
///
/// # Errors
/// On database errors.
pub async fn mark_running<C: ConnectionTrait>(
    db: &C,
    id: &str,
    worker: &str,
    gone_after: std::time::Duration,
) -> Result<Option<Model>, ModelError> {
    use sea_orm::{sea_query::Query, Condition};

    use super::_entities::workers;
    let ts = now();
    let live_since = ts - chrono::Duration::from_std(gone_after).unwrap_or(chrono::Duration::MAX);
    let live_holder = Query::select()
        .expr(Expr::val(1))
        .from(workers::Entity)
        .and_where(
            Expr::col((workers::Entity, workers::Column::Id)).equals((Entity, Column::Worker)),
        )
        .and_where(Expr::col((workers::Entity, workers::Column::StoppedAt)).is_null())
        .and_where(Expr::col((workers::Entity, workers::Column::HeartbeatAt)).gt(live_since))
        .to_owned();
    let claimable = Condition::any().add(Column::Status.eq(QUEUED)).add(
        Condition::all().add(Column::Status.eq(RUNNING)).add(
            Condition::any()
                .add(Column::Worker.is_null())
                .add(Column::Worker.eq(worker))
                .add(Expr::exists(live_holder).not()),
        ),
    );
    let rows = Entity::update_many()
        .col_expr(Column::Status, Expr::value(RUNNING))
        .col_expr(Column::Attempts, Expr::col(Column::Attempts).add(1))
        .col_expr(Column::Worker, Expr::value(worker))
        .col_expr(Column::StartedAt, Expr::value(ts))
        .col_expr(Column::UpdatedAt, Expr::value(ts))
        .filter(Column::Id.eq(id))
        .filter(claimable)
        .exec_with_returning(db)
        .await?;
    Ok(rows.into_iter().next())
}

/// Stores a finished job's output and its usage row, and gives back the generation tokens
/// it reserved but did not use, in one transaction.
///
/// # Errors
/// On database errors.
pub async fn complete(
    db: &DatabaseConnection,
    id: &str,
    output: &JobOutput,
) -> Result<Option<Model>, ModelError> {
    let ts = now();
    let txn = db.begin().await?;
    let rows = Entity::update_many()
        .col_expr(Column::Status, Expr::value(DONE))
        .col_expr(Column::Result, Expr::value(output.result.clone()))
        .col_expr(
            Column::PromptTokens,
            Expr::value(i32::try_from(output.prompt_tokens).unwrap_or(i32::MAX)),
        )
        .col_expr(
            Column::GeneratedTokens,
            Expr::value(i32::try_from(output.generated_tokens).unwrap_or(i32::MAX)),
        )
        .col_expr(
            Column::FinishReason,
            Expr::value(output.finish_reason.map(str::to_string)),
        )
        .col_expr(Column::Logprobs, Expr::value(output.logprobs.clone()))
        .col_expr(Column::Choices, Expr::value(output.choices.clone()))
        .col_expr(
            Column::CachedTokens,
            Expr::value(i32::try_from(output.cached_tokens).unwrap_or(i32::MAX)),
        )
        .col_expr(Column::FinishedAt, Expr::value(ts))
        .col_expr(Column::UpdatedAt, Expr::value(ts))
        .filter(Column::Id.eq(id))
        .filter(Column::Status.eq(RUNNING))
        .exec_with_returning(&txn)
        .await?;
    let Some(job) = rows.into_iter().next() else {
        txn.rollback().await?;
        return Ok(None);
    };
    usage_records::ActiveModel {
        api_key_id: Set(job.api_key_id),
        job_id: Set(job.id.clone()),
        day: Set(ts.date_naive()),
        prompt_tokens: Set(job.prompt_tokens),
        generated_tokens: Set(job.generated_tokens),
        words: Set(i32::try_from(output.words).unwrap_or(i32::MAX)),
        input_words: Set(i32::try_from(output.input_words).unwrap_or(i32::MAX)),
        created_at: Set(ts),
        updated_at: Set(ts),
        ..Default::default()
    }
    .insert(&txn)
    .await?;
    budgets::settle(&txn, &job).await?;
    count_outcome(&txn, DONE, &job).await?;
    txn.commit().await?;
    Ok(Some(job))
}

/// Marks a job failed and refunds its call and its whole token reservation, all at most once.
///
/// # Errors
/// On database errors.
pub async fn fail(
    db: &DatabaseConnection,
    id: &str,
    reason: &str,
) -> Result<Option<Model>, ModelError> {
    fail_where(db, id, reason, None).await
}

/// What a job cancelled by its client records as its error (`job_cancelled`, so a client
/// waiting for it is told so).
pub const CANCELLED: &str = "job_cancelled: cancelled by its client before it finished";

/// Cancels one of `api_key_id`'s jobs that has not finished: settled as [`fail`] settles (its
/// call and reservation refunded, at most once), with [`CANCELLED`] as its error. A worker
/// running it sees the record change and stops the generation. `None` when there is no such
/// unfinished job (finished meanwhile, or not this key's).
///
/// # Errors
/// On database errors.
pub async fn cancel(
    db: &DatabaseConnection,
    id: &str,
    api_key_id: i32,
) -> Result<Option<Model>, ModelError> {
    fail_where(db, id, CANCELLED, Some(api_key_id)).await
}

async fn fail_where(
    db: &DatabaseConnection,
    id: &str,
    reason: &str,
    api_key_id: Option<i32>,
) -> Result<Option<Model>, ModelError> {
    let ts = now();
    let txn = db.begin().await?;
    let mut update = Entity::update_many()
        .col_expr(Column::Status, Expr::value(FAILED))
        .col_expr(Column::Error, Expr::value(reason))
        .col_expr(Column::Refunded, Expr::value(true))
        .col_expr(Column::FinishedAt, Expr::value(ts))
        .col_expr(Column::UpdatedAt, Expr::value(ts))
        .filter(Column::Id.eq(id))
        .filter(Column::Status.is_in([QUEUED, RUNNING]))
        .filter(Column::Refunded.eq(false));
    if let Some(key) = api_key_id {
        update = update.filter(Column::ApiKeyId.eq(key));
    }
    let rows = update.exec_with_returning(&txn).await?;
    let Some(job) = rows.into_iter().next() else {
        txn.rollback().await?;
        return Ok(None);
    };
    api_keys::refund(&txn, job.api_key_id).await?;
    budgets::release(&txn, job.api_key_id, &budgets::of_job(&job)).await?;
    count_outcome(&txn, FAILED, &job).await?;
    txn.commit().await?;
    Ok(Some(job))
}

/// Erases the texts of jobs that finished before `before` (the request, the result and its
/// other choices and per-token log-probabilities, the error, what the answer echoed); returns
/// how many it erased. Counts, timings and usage records stay. One statement, so a purge
/// running on several API instances at once erases each job once.
///
/// # Errors
/// On database errors.
pub async fn purge_texts<C: ConnectionTrait>(
    db: &C,
    before: DateTimeWithTimeZone,
) -> Result<u64, ModelError> {
    let res = erase_texts(Entity::update_many())
        .filter(Column::Status.is_in([DONE, FAILED]))
        .filter(Column::FinishedAt.lt(before))
        .filter(Column::Request.ne(PURGED))
        .exec(db)
        .await?;
    Ok(res.rows_affected)
}

/// Erases the texts of one finished job of `api_key_id` now, as the retention purge would
/// later (a client deleting its stored response). `false` when there is no such finished job
/// with texts left: none of this key's, one not finished yet, or one already erased.
///
/// # Errors
/// On database errors.
pub async fn erase_finished<C: ConnectionTrait>(
    db: &C,
    id: &str,
    api_key_id: i32,
) -> Result<bool, ModelError> {
    let res = erase_texts(Entity::update_many())
        .filter(Column::Id.eq(id))
        .filter(Column::ApiKeyId.eq(api_key_id))
        .filter(Column::Status.is_in([DONE, FAILED]))
        .filter(Column::Request.ne(PURGED))
        .exec(db)
        .await?;
    Ok(res.rows_affected > 0)
}

/// Whether `worker` runs job `id` now (a cancelled, reaped or taken-over job is no longer).
/// Reads two short columns of the row, not its texts: workers ask this every second of every
/// job they run.
///
/// # Errors
/// On database errors.
pub async fn runs_on<C: ConnectionTrait>(
    db: &C,
    id: &str,
    worker: &str,
) -> Result<bool, ModelError> {
    use sea_orm::QuerySelect;
    let row: Option<(String, Option<String>)> = Entity::find_by_id(id.to_string())
        .select_only()
        .column(Column::Status)
        .column(Column::Worker)
        .into_tuple()
        .one(db)
        .await?;
    Ok(row.is_some_and(|(status, on)| status == RUNNING && on.as_deref() == Some(worker)))
}

/// Every column that holds text a client sent or the model wrote.
fn erase_texts(update: sea_orm::UpdateMany<Entity>) -> sea_orm::UpdateMany<Entity> {
    let none = || Expr::value(Option::<String>::None);
    update
        .col_expr(Column::Request, Expr::value(PURGED))
        .col_expr(Column::Result, none())
        .col_expr(Column::Error, none())
        .col_expr(Column::Logprobs, none())
        .col_expr(Column::Choices, none())
        .col_expr(Column::Echo, none())
}

impl Model {
    /// Whether this job's texts were erased (by the retention purge, or deleted by its key).
    #[must_use]
    pub fn is_purged(&self) -> bool {
        self.request == PURGED
    }

    /// Whether its client cancelled it ([`cancel`]).
    #[must_use]
    pub fn is_cancelled(&self) -> bool {
        self.status == FAILED && self.error.as_deref() == Some(CANCELLED)
    }
}

/// What a purged job's request reads.
pub const PURGED: &str = "{\"purged\":true}";

/// Adds a job that just settled to the running totals `/metrics` reports (migration 000012), in
/// the settling transaction so each job is counted exactly once.
async fn count_outcome<C: ConnectionTrait>(
    txn: &C,
    outcome: &'static str,
    job: &Model,
) -> Result<(), ModelError> {
    // Only constants and integers read from the row go into the text: nothing from a client.
    let sql = format!(
        "INSERT INTO job_totals (outcome, jobs, prompt_tokens, generated_tokens, cached_tokens) \
         VALUES ('{outcome}', 1, {}, {}, {}) ON CONFLICT (outcome) DO UPDATE SET \
         jobs = job_totals.jobs + 1, \
         prompt_tokens = job_totals.prompt_tokens + excluded.prompt_tokens, \
         generated_tokens = job_totals.generated_tokens + excluded.generated_tokens, \
         cached_tokens = job_totals.cached_tokens + excluded.cached_tokens",
        i64::from(Ord::max(job.prompt_tokens, 0)),
        i64::from(Ord::max(job.generated_tokens, 0)),
        i64::from(Ord::max(job.cached_tokens, 0)),
    );
    txn.execute_unprepared(&sql).await?;
    Ok(())
}

/// Jobs by status for `/metrics`: unfinished ones counted through the status index, finished
/// ones read from the running totals, so a scrape costs the same with a million finished jobs.
///
/// # Errors
/// On database errors.
pub async fn status_counts<C: ConnectionTrait>(db: &C) -> Result<StatusCounts, ModelError> {
    let backend = db.get_database_backend();
    let mut counts = StatusCounts::default();
    for status in [QUEUED, RUNNING] {
        let rows = db
            .query_all_raw(sea_orm::Statement::from_string(
                backend,
                format!("SELECT COUNT(*) AS n FROM jobs WHERE status = '{status}'"),
            ))
            .await?;
        let n: i64 = rows
            .first()
            .and_then(|r| r.try_get("", "n").ok())
            .unwrap_or_default();
        counts.by_status.push((status, n));
    }
    let rows = db
        .query_all_raw(sea_orm::Statement::from_string(
            backend,
            "SELECT outcome, jobs, prompt_tokens, generated_tokens, cached_tokens FROM job_totals"
                .to_string(),
        ))
        .await?;
    for status in [DONE, FAILED] {
        let row = rows.iter().find(|r| {
            r.try_get::<String>("", "outcome")
                .is_ok_and(|o| o == status)
        });
        let get = |col: &str| -> i64 {
            row.and_then(|r| r.try_get::<i64>("", col).ok())
                .unwrap_or_default()
        };
        counts.by_status.push((status, get("jobs")));
        if status == DONE {
            counts.prompt_tokens = get("prompt_tokens");
            counts.generated_tokens = get("generated_tokens");
            counts.cached_tokens = get("cached_tokens");
        }
    }
    Ok(counts)
}

/// What [`status_counts`] reads.
#[derive(Debug, Default)]
pub struct StatusCounts {
    /// `(status, jobs)` for queued, running, done and failed.
    pub by_status: Vec<(&'static str, i64)>,
    /// Prompt tokens of finished (`done`) jobs.
    pub prompt_tokens: i64,
    /// Tokens generated by finished (`done`) jobs.
    pub generated_tokens: i64,
    /// Prompt tokens of finished (`done`) jobs that the engine found in its KV cache.
    pub cached_tokens: i64,
}
