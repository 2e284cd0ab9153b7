//! The one step of admission with side effects: charge the call, reserve token budgets, record
//! the job (one transaction), then subscribe and push it to its model's queue.
//!
//! Admissions that arrive while the previous ones commit are committed together ([`Batches`]),
//! of one key or of many: one `UPDATE` charges every key in the batch for all of its admissions
//! (calls and the key's token budgets, per key all or none), one per user reserves its budget,
//! one `INSERT` records the jobs, and one commit makes them durable. On Postgres each commit is
//! a durable WAL flush and a hot key's charges otherwise wait on its one row in turn. A key
//! whose admissions do not all fit (its quota or a budget has room for only some, it may not
//! call) is left out of the shared commit, as are the keys of a user whose budget refuses;
//! their admissions, and all of a batch whose `INSERT` fails (a client id taken), each commit
//! on their own (charge, reservations and job in separate statements, reading why a refusal
//! refused): every refusal is then its own, exactly as if it had come alone. A lone admission
//! takes the shared path too, as a batch of one: its charge and key reservation are one
//! statement there.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
};

use futures::{future::join_all, FutureExt};
use sea_orm::{DatabaseConnection, DatabaseTransaction, TransactionTrait};
use tokio::sync::oneshot;
use tracing::Instrument;

use super::{batches::Batches, budget_error, queue_unavailable, refusal_error, Follow};
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

/// An admission waiting for the next batch, with where its outcome goes.
pub(super) type Pending = (Commit, oneshot::Sender<Committed>);

/// The batches every admission of this process commits through.
pub(super) fn batches() -> Batches<Pending> {
    Batches::new(MOST_TOGETHER, Arc::new(|batch| commit_batch(batch).boxed()))
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

/// Commits a batch together where it fits, and each admission that does not on its own.
async fn commit_batch(batch: Vec<Pending>) {
    // A lone admission too: its charge and its key's token reservation are one statement
    // here, two on its own.
    let shares = record_together(&batch).await;
    let mut alone = Vec::new();
    for ((commit, answer), share) in batch.into_iter().zip(shares) {
        match share {
            // Pushed apart from the commit task: its next batch may commit meanwhile.
            Share::Recorded(record) => {
                tokio::spawn(async move {
                    let span = commit.span.clone();
                    let _ = answer.send(commit.pushed(*record).instrument(span).await);
                });
            }
            // The commit's outcome is unknown: committing again could charge twice, so it hears
            // the error (a job that did commit is failed and refunded by the reaper, as one
            // whose process died before its push).
            Share::Failed(e) => {
                let _ = answer.send(Committed::Refused(e));
            }
            Share::Alone => alone.push((commit, answer)),
        }
    }
    join_all(alone.into_iter().map(|(commit, answer)| async move {
        let span = commit.span.clone();
        let _ = answer.send(commit.run().instrument(span).await);
    }))
    .await;
}

/// What the shared transaction did for one admission of a batch.
enum Share {
    /// Charged, reserved and recorded, committed.
    Recorded(Box<jobs::Model>),
    /// Nothing of it changed (its key may not call, its quota or a budget has no room for all
    /// of its key's admissions in the batch, a client id is taken, …): it commits on its own,
    /// and a refusal is then its own, exactly as if it had come alone.
    Alone,
    /// It was in the shared commit, which failed.
    Failed(ApiError),
}

/// Most tries of a batch's transaction: each try after the first leaves out the keys whose
/// users' budgets refused the one before.
const TRIES: usize = 3;

/// Charge → reserve → record as many of the batch as fit, in one transaction: per key all of
/// its admissions or none, keys in id order.
async fn record_together(batch: &[Pending]) -> Vec<Share> {
    let mut shares: Vec<Share> = batch.iter().map(|_| Share::Alone).collect();
    let Some((first, _)) = batch.first() else {
        return shares;
    };
    // Each key's admissions, keys in id order; a key rotated between its callers'
    // identification is left out (each caller then learns its own standing).
    let mut keys: BTreeMap<i32, Vec<usize>> = BTreeMap::new();
    for (i, (commit, _)) in batch.iter().enumerate() {
        keys.entry(commit.key.id).or_default().push(i);
    }
    keys.retain(|_, admissions| {
        let hash = &batch[admissions[0]].0.key.secret_hash;
        admissions
            .iter()
            .all(|&i| &batch[i].0.key.secret_hash == hash)
    });
    for _ in 0..TRIES {
        if keys.is_empty() {
            return shares;
        }
        let txn = match first.db.begin().await {
            Ok(txn) => txn,
            Err(e) => {
                tracing::warn!(error = %e, "a batch of admissions could not begin; each commits on its own");
                return shares;
            }
        };
        let tried = charge_and_record(&txn, batch, &keys).await;
        if let Ok(Tried::Recorded(records)) = tried {
            match txn.commit().await {
                Ok(()) => {
                    if records.len() > 1 {
                        crate::metrics::committed_together(records.len());
                    }
                    for (i, record) in records {
                        shares[i] = Share::Recorded(Box::new(record));
                    }
                }
                Err(e) => {
                    let e = ApiError::from(e);
                    for (i, _) in records {
                        shares[i] = Share::Failed(e.clone());
                    }
                }
            }
            return shares;
        }
        // Rolled back now, not when the dropped transaction's connection is next used: what
        // runs next (a try without some keys, or each alone) locks the same rows.
        txn.rollback().await.ok();
        match tried {
            Ok(Tried::LeaveOut(refused)) => keys.retain(|key_id, _| !refused.contains(key_id)),
            Ok(_) => return shares,
            Err(e) => {
                tracing::warn!(error = %e, "a batch of admissions could not commit together; each commits on its own");
                return shares;
            }
        }
    }
    shares
}

/// How one try of a batch's statements ended.
enum Tried {
    /// Recorded, to be committed: (the admission's place in the batch, its job).
    Recorded(Vec<(usize, jobs::Model)>),
    /// These keys' users had no room in their budgets: try again without these keys.
    LeaveOut(BTreeSet<i32>),
    /// Nothing to commit together: each commits on its own.
    Nothing,
}

/// The batch's statements inside `txn`: one charge of every key's admissions (calls and the
/// keys' token budgets), each user's budget, one `INSERT` of the jobs.
async fn charge_and_record(
    txn: &DatabaseTransaction,
    batch: &[Pending],
    keys: &BTreeMap<i32, Vec<usize>>,
) -> Result<Tried, ApiError> {
    let tokens: Vec<(i64, i64)> = batch.iter().map(|(c, _)| c.tokens()).collect();
    let sum = |admissions: &[usize]| {
        admissions.iter().fold((0i64, 0i64), |(p, g), &i| {
            (p.saturating_add(tokens[i].0), g.saturating_add(tokens[i].1))
        })
    };
    let charges: Vec<api_keys::BatchCharge> = keys
        .iter()
        .map(|(&key_id, admissions)| {
            let (prompt_tokens, gen_tokens) = sum(admissions);
            api_keys::BatchCharge {
                key_id,
                secret_hash: batch[admissions[0]].0.key.secret_hash.clone(),
                calls: u32::try_from(admissions.len()).unwrap_or(u32::MAX),
                prompt_tokens,
                gen_tokens,
            }
        })
        .collect();
    // A key left out here changed nothing: its admissions commit on their own.
    let charged: BTreeMap<i32, api_keys::Model> = api_keys::charge_many(txn, &charges)
        .await?
        .into_iter()
        .map(|row| (row.id, row))
        .collect();
    if charged.is_empty() {
        return Ok(Tried::Nothing);
    }
    // Users' budgets, users in id order.
    let mut users: BTreeMap<i32, (i64, i64)> = BTreeMap::new();
    for (key_id, row) in &charged {
        if let (Some(user), Some(admissions)) = (row.user_id, keys.get(key_id)) {
            let (p, g) = sum(admissions);
            let total = users.entry(user).or_default();
            *total = (total.0.saturating_add(p), total.1.saturating_add(g));
        }
    }
    let mut refused = BTreeSet::new();
    for (&user, &(prompt, gen)) in &users {
        if budgets::reserve_user(txn, user, prompt, gen)
            .await?
            .is_err()
        {
            refused.extend(
                charged
                    .values()
                    .filter(|row| row.user_id == Some(user))
                    .map(|row| row.id),
            );
        }
    }
    if !refused.is_empty() {
        return Ok(Tried::LeaveOut(refused));
    }
    let mut new = Vec::new();
    let mut places = Vec::new();
    for (key_id, row) in &charged {
        for &i in keys.get(key_id).map(Vec::as_slice).unwrap_or_default() {
            let (prompt_tokens, gen_tokens) = tokens[i];
            new.push(batch[i].0.new_job(Reservation {
                user_id: row.user_id,
                prompt_tokens,
                gen_tokens,
            })?);
            places.push(i);
        }
    }
    let ids: Vec<String> = new.iter().map(|job| job.id.clone()).collect();
    // A client id taken (by an earlier job or within the batch) fails the one INSERT: each on
    // its own then finds which.
    let Ok(records) = jobs::ActiveModel::create_queued_many(txn, new).await else {
        return Ok(Tried::Nothing);
    };
    // The rows of a multi-row INSERT come back in an order the database does not promise.
    let mut by_id: HashMap<String, jobs::Model> =
        records.into_iter().map(|r| (r.id.clone(), r)).collect();
    Ok(places
        .into_iter()
        .zip(&ids)
        .map(|(i, id)| by_id.remove(id).map(|record| (i, record)))
        .collect::<Option<Vec<_>>>()
        .map_or(Tried::Nothing, Tried::Recorded))
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
