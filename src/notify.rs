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

use tokio::sync::oneshot;

use crate::models::jobs;

#[derive(Debug, Default, Clone)]
pub struct JobEvents {
    waiters: Arc<Mutex<HashMap<String, Vec<oneshot::Sender<jobs::Model>>>>>,
}

impl JobEvents {
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
