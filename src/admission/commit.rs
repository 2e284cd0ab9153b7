//! The one step of admission with side effects: charge the call, reserve token budgets, record
//! the job (one transaction), then subscribe and push it to its model's queue.
//!
//! Admissions of one key that arrive while its previous ones commit are committed together
//! ([`KeyBatches`]): one `UPDATE` charges them all (all or none, under the quota), one reserves
//! their tokens, one `INSERT` records their jobs, and one commit makes them durable. A key's
//! charges take its one row in turn, so on Postgres a hot key is otherwise bound by one durable
//! commit per call. When the batch does not fit whole (the quota or a budget has room for only
//! some, a client id is taken, the key changed under one of them) or the database refuses it,
//! each admission commits on its own, as a batch of one always does: every refusal is then its
//! own, exactly as if it had come alone.

use std::{collections::HashMap, sync::Arc};

use futures::{future::join_all, FutureExt};
use sea_orm::{DatabaseConnection, DatabaseTransaction, TransactionTrait};
use tokio::sync::oneshot;
use tracing::Instrument;

use super::{batches::KeyBatches, budget_error, queue_unavailable, refusal_error, Follow};
use crate::{
    errors::ApiError,
    models::{
        api_keys,
        budgets::{self, Reservation},
        jobs,
    },
    notify::JobEvents,
    queue::{GenerationJob, JobQueue, Work},
};

/// Most admissions committed in one transaction.
const MOST_TOGETHER: usize = 64;

/// An admission waiting for its key's next batch, with where its outcome goes.
pub(super) type Pending = (Commit, oneshot::Sender<Committed>);

/// The per-key batches every admission of this process commits through.
pub(super) fn batches() -> KeyBatches<Pending> {
    KeyBatches::new(MOST_TOGETHER, Arc::new(|batch| commit_batch(batch).boxed()))
}

/// Everything the side-effecting step needs, owned, so it can run apart from the request (a
/// client that hangs up cannot stop it between the charge and the push).
pub(super) struct Commit {
    pub db: DatabaseConnection,
    pub events: JobEvents,
    pub queue: JobQueue,
    pub key: api_keys::Model,
    pub endpoint: &'static str,
    pub client_ref: Option<String>,
    pub echo: Option<String>,
    pub prompt_tokens: usize,
    pub work: Work,
    pub subscribe: Follow,
    pub request_id: Option<String>,
    /// The request's span, so that what the commit logs is the request's.
    pub span: tracing::Span,
}

/// How the side-effecting step ended.
pub(super) enum Committed {
    /// Charged, recorded, queued; with the subscriptions asked for.
    New(
        jobs::Model,
        Option<tokio::sync::broadcast::Receiver<String>>,
        Option<tokio::sync::oneshot::Receiver<jobs::Model>>,
    ),
    /// A concurrent repeat with the same client id won: follow its job (nothing charged).
    Existing(jobs::Model),
    /// Refused, with everything it spent given back.
    Refused(ApiError),
}

/// Commits a key's batch together when it fits whole, else each admission on its own.
async fn commit_batch(batch: Vec<Pending>) {
    if batch.len() > 1 {
        match record_together(&batch).await {
            Together::Recorded(records) => {
                // Pushed apart from the key's task: its next batch may commit meanwhile.
                for ((commit, answer), record) in batch.into_iter().zip(records) {
                    tokio::spawn(async move {
                        let span = commit.span.clone();
                        let _ = answer.send(commit.pushed(record).instrument(span).await);
                    });
                }
                return;
            }
            // The commit's outcome is unknown: committing again could charge twice, so each
            // hears the error (a job that did commit is failed and refunded by the reaper, as
            // one whose process died before its push).
            Together::Unknown(e) => {
                for (_, answer) in batch {
                    let _ = answer.send(Committed::Refused(e.clone()));
                }
                return;
            }
            Together::Alone => {}
        }
    }
    join_all(batch.into_iter().map(|(commit, answer)| async move {
        let span = commit.span.clone();
        let _ = answer.send(commit.run().instrument(span).await);
    }))
    .await;
}

/// How a batch's shared transaction ended.
enum Together {
    /// Charged, reserved and recorded, committed: the jobs in the batch's order.
    Recorded(Vec<jobs::Model>),
    /// Nothing changed: it did not fit whole, or a statement failed; each commits alone.
    Alone,
    /// The commit itself failed.
    Unknown(ApiError),
}

/// Charge → reserve → record for the whole batch in one transaction, all or nothing.
async fn record_together(batch: &[Pending]) -> Together {
    let Some((first, _)) = batch.first() else {
        return Together::Recorded(Vec::new());
    };
    let txn = match first.db.begin().await {
        Ok(txn) => txn,
        Err(e) => {
            tracing::warn!(error = %e, "a batch of admissions could not begin; each commits on its own");
            return Together::Alone;
        }
    };
    // Dropped without commit (every way but one): rolled back.
    match charge_and_record(&txn, &first.key, batch).await {
        Ok(Some(records)) => match txn.commit().await {
            Ok(()) => {
                crate::metrics::committed_together(records.len());
                Together::Recorded(records)
            }
            Err(e) => Together::Unknown(e.into()),
        },
        Ok(None) => Together::Alone,
        Err(e) => {
            tracing::warn!(error = %e, "a batch of admissions could not commit together; each commits on its own");
            Together::Alone
        }
    }
}

/// The batch's statements inside `txn`, charged to `key` (every admission's); `None` when it
/// does not fit whole.
async fn charge_and_record(
    txn: &DatabaseTransaction,
    key: &api_keys::Model,
    batch: &[Pending],
) -> Result<Option<Vec<jobs::Model>>, ApiError> {
    // A key rotated between its callers' identification: each learns its own standing.
    if batch
        .iter()
        .any(|(c, _)| c.key.secret_hash != key.secret_hash)
    {
        return Ok(None);
    }
    let calls = u32::try_from(batch.len()).unwrap_or(u32::MAX);
    let Some(charged) = api_keys::charge_calls(txn, key.id, &key.secret_hash, calls).await? else {
        return Ok(None);
    };
    let tokens: Vec<(i64, i64)> = batch.iter().map(|(c, _)| c.tokens()).collect();
    let (prompt, gen) = tokens.iter().fold((0i64, 0i64), |(p, g), (cp, cg)| {
        (p.saturating_add(*cp), g.saturating_add(*cg))
    });
    if budgets::reserve(txn, &charged, prompt, gen).await?.is_err() {
        return Ok(None);
    }
    let mut new = Vec::with_capacity(batch.len());
    for ((commit, _), (prompt, gen)) in batch.iter().zip(tokens) {
        new.push(commit.new_job(Reservation {
            user_id: charged.user_id,
            prompt_tokens: prompt,
            gen_tokens: gen,
        })?);
    }
    let ids: Vec<String> = new.iter().map(|job| job.id.clone()).collect();
    // A client id taken (by an earlier job or within the batch) fails the one INSERT: each on
    // its own then finds which.
    let Ok(records) = jobs::ActiveModel::create_queued_many(txn, new).await else {
        return Ok(None);
    };
    // The rows of a multi-row INSERT come back in an order the database does not promise.
    let mut by_id: HashMap<String, jobs::Model> =
        records.into_iter().map(|r| (r.id.clone(), r)).collect();
    Ok(ids
        .iter()
        .map(|id| by_id.remove(id))
        .collect::<Option<Vec<_>>>())
}

impl Commit {
    /// Charge → reserve → record in one transaction (a refusal or an error at any step,
    /// including a busy database, leaves no charge and no reservation behind), then subscribe
    /// → push (a failed push fails and refunds the recorded job).
    async fn run(self) -> Committed {
        match self.steps().await {
            Ok(c) => c,
            Err(e) => Committed::Refused(e),
        }
    }

    /// The tokens this admission reserves: its prompt and the most it may generate.
    fn tokens(&self) -> (i64, i64) {
        (
            i64::try_from(self.prompt_tokens).unwrap_or(i64::MAX),
            i64::from(self.work.max_new_tokens()),
        )
    }

    /// The job this admission records, under a new id.
    fn new_job(&self, reservation: Reservation) -> Result<jobs::NewJob, ApiError> {
        Ok(jobs::NewJob {
            id: uuid::Uuid::new_v4().to_string(),
            api_key_id: self.key.id,
            endpoint: self.endpoint.to_string(),
            model: self.work.display_model(),
            request_json: self.work.to_json().map_err(ApiError::internal)?,
            prompt_tokens: i32::try_from(self.prompt_tokens).unwrap_or(i32::MAX),
            client_ref: self.client_ref.clone(),
            reservation,
            echo: self.echo.clone(),
        })
    }

    async fn steps(self) -> Result<Committed, ApiError> {
        let db = &self.db;
        let key_id = self.key.id;
        // Dropped without commit on every early return: rolled back.
        let txn = db.begin().await?;
        let charged = match api_keys::charge(&txn, key_id, &self.key.secret_hash).await? {
            Ok(charged) => charged,
            Err(refusal) => return Err(refusal_error(refusal, Some(&self.key))),
        };
        let (prompt, gen) = self.tokens();
        let reservation = match budgets::reserve(&txn, &charged, prompt, gen).await? {
            Ok(reservation) => reservation,
            Err(refusal) => return Err(budget_error(&refusal)),
        };
        let created = jobs::ActiveModel::create_queued(&txn, self.new_job(reservation)?).await;
        let record = match created {
            Ok(r) => r,
            Err(e) => {
                txn.rollback().await.ok();
                if let Some(r) = &self.client_ref {
                    if let Some(existing) = jobs::Model::find_by_client_ref(db, key_id, r).await? {
                        return Ok(Committed::Existing(existing));
                    }
                }
                return Err(e.into());
            }
        };
        txn.commit().await?;
        Ok(self.pushed(record).await)
    }

    /// [`Self::push`] in the job's span, its refusal as the outcome.
    async fn pushed(self, record: jobs::Model) -> Committed {
        let span = tracing::info_span!("job", job_id = %record.id);
        match self.push(record).instrument(span).await {
            Ok(c) => c,
            Err(e) => Committed::Refused(e),
        }
    }

    /// Subscribes as asked *before* the push, so a fast worker's result is never missed.
    async fn push(self, record: jobs::Model) -> Result<Committed, ApiError> {
        let job_id = record.id.clone();
        let deltas = (self.subscribe == Follow::Updates)
            .then(|| self.events.subscribe_deltas(&job_id))
            .flatten();
        let done = (self.subscribe != Follow::Nothing).then(|| self.events.subscribe(&job_id));
        let job = GenerationJob {
            job_id: job_id.clone(),
            api_key_id: self.key.id,
            work: self.work,
            request_id: self.request_id,
            priority: self.key.priority,
        };
        if let Err(e) = self.queue.push(job).await {
            tracing::error!(error = %e, "could not queue job");
            self.events.forget(&job_id);
            jobs::fail(&self.db, &job_id, "the queue is unavailable")
                .await
                .ok();
            return Err(queue_unavailable());
        }
        Ok(Committed::New(record, deltas, done))
    }
}
