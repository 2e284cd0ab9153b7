//! Delivering a finished job to the request that waits for it.
//!
//! The handler subscribes *before* it pushes the job, then awaits a oneshot; the worker
//! publishes the final job record when it settles the job. No polling on the request path.
//! The database record stays the source of truth: a waiter that misses the notification (e.g.
//! it timed out) reads the record instead.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use futures::Stream;
use tokio::sync::{broadcast, oneshot};

use crate::models::jobs;

/// Deltas kept for a late subscriber; older ones are dropped (it still gets the final record).
const STREAM_BUFFER: usize = 1024;

#[derive(Debug, Default, Clone)]
pub struct JobEvents {
    waiters: Arc<Mutex<HashMap<String, Vec<oneshot::Sender<jobs::Model>>>>>,
    streams: Arc<Mutex<HashMap<String, broadcast::Sender<String>>>>,
}

impl JobEvents {
    fn stream(&self, job_id: &str) -> Option<broadcast::Sender<String>> {
        let mut map = self.streams.lock().ok()?;
        Some(
            map.entry(job_id.to_string())
                .or_insert_with(|| broadcast::channel(STREAM_BUFFER).0)
                .clone(),
        )
    }

    /// Text deltas of a running job, from now on.
    pub fn subscribe_deltas(&self, job_id: &str) -> Option<broadcast::Receiver<String>> {
        self.stream(job_id).map(|tx| tx.subscribe())
    }

    /// Hands a text delta to the job's stream subscribers (none: dropped).
    pub fn publish_delta(&self, job_id: &str, delta: String) {
        if let Some(tx) = self.stream(job_id) {
            let _ = tx.send(delta);
        }
    }

    /// Registers interest in a job's final record.
    pub fn subscribe(&self, job_id: &str) -> oneshot::Receiver<jobs::Model> {
        let (tx, rx) = oneshot::channel();
        if let Ok(mut map) = self.waiters.lock() {
            map.entry(job_id.to_string()).or_default().push(tx);
        }
        rx
    }

    /// Hands the final record to everyone waiting for it.
    pub fn publish(&self, job: &jobs::Model) {
        let waiters = self
            .waiters
            .lock()
            .ok()
            .and_then(|mut map| map.remove(&job.id))
            .unwrap_or_default();
        for tx in waiters {
            let _ = tx.send(job.clone());
        }
        if let Ok(mut map) = self.streams.lock() {
            map.remove(&job.id);
        }
    }

    /// Drops subscriptions whose receiver is gone (a waiter that timed out).
    pub fn forget(&self, job_id: &str) {
        if let Ok(mut map) = self.waiters.lock() {
            if let Some(list) = map.get_mut(job_id) {
                list.retain(|tx| !tx.is_closed());
                if list.is_empty() {
                    map.remove(job_id);
                }
            }
        }
    }

    /// Number of jobs someone is waiting for (for tests and metrics).
    #[must_use]
    pub fn waiting(&self) -> usize {
        self.waiters.lock().map(|m| m.len()).unwrap_or(0)
    }
}

/// What a streaming client sees of a job: text deltas, then the settled record.
#[derive(Debug)]
pub enum JobUpdate {
    Delta(String),
    /// The client fell this many deltas behind and they were dropped; `Done` has the full text.
    Skipped(u64),
    Done(Box<jobs::Model>),
}

enum UpdateState {
    Live {
        deltas: broadcast::Receiver<String>,
        done: oneshot::Receiver<jobs::Model>,
    },
    WaitDone(oneshot::Receiver<jobs::Model>),
    End,
}

/// The updates of one job, from subscriptions taken before the job could settle. Every delta
/// published before the job settled comes out before `Done`. The stream ends after `Done`, or
/// without it if the registry is dropped (the database record still has the result).
pub fn job_updates(
    deltas: Option<broadcast::Receiver<String>>,
    done: oneshot::Receiver<jobs::Model>,
) -> impl Stream<Item = JobUpdate> + Send {
    let state = match deltas {
        Some(deltas) => UpdateState::Live { deltas, done },
        None => UpdateState::WaitDone(done),
    };
    futures::stream::unfold(state, |state| async move {
        match state {
            UpdateState::Live {
                mut deltas,
                mut done,
            } => {
                tokio::select! {
                    // Deltas first: the buffered ones precede the final record.
                    biased;
                    delta = deltas.recv() => match delta {
                        Ok(text) => Some((JobUpdate::Delta(text), UpdateState::Live { deltas, done })),
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            Some((JobUpdate::Skipped(n), UpdateState::Live { deltas, done }))
                        }
                        Err(broadcast::error::RecvError::Closed) => {
                            let job = done.await.ok()?;
                            Some((JobUpdate::Done(Box::new(job)), UpdateState::End))
                        }
                    },
                    job = &mut done => {
                        let job = job.ok()?;
                        Some((JobUpdate::Done(Box::new(job)), UpdateState::End))
                    }
                }
            }
            UpdateState::WaitDone(done) => {
                let job = done.await.ok()?;
                Some((JobUpdate::Done(Box::new(job)), UpdateState::End))
            }
            UpdateState::End => None,
        }
    })
}
