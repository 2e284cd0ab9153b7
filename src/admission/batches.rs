//! Work that arrives at once for one key, handed over a batch at a time.
//!
//! Every charge of a key updates the key's one row, so the database runs a key's concurrent
//! charges one after another, each holding the row until its commit; on Postgres a hot key is
//! then bound by one durable commit per call. [`KeyBatches`] lets one task per busy key take
//! whatever has queued for it while its previous batch committed and hand it over whole, so that
//! those calls share one transaction ([`super::commit`]). Nothing waits to fill a batch: a lone
//! request is a batch of one, at once.

use std::{
    collections::{hash_map::Entry, HashMap},
    panic::AssertUnwindSafe,
    sync::{Arc, Mutex},
};

use futures::{future::BoxFuture, FutureExt};

/// What runs each batch: it owns the items (and with them whatever answers their callers).
pub type RunBatch<T> = Arc<dyn Fn(Vec<T>) -> BoxFuture<'static, ()> + Send + Sync>;

/// Items queued per key, each key drained by its own task while it has any.
///
/// Bounded by the requests in flight: a key has an entry only while items of it wait or run,
/// and each item is a request whose caller waits for it.
pub struct KeyBatches<T> {
    pending: Arc<Mutex<HashMap<i32, Vec<T>>>>,
    run: RunBatch<T>,
    /// Most items in one batch (one transaction).
    most: usize,
}

impl<T> Clone for KeyBatches<T> {
    fn clone(&self) -> Self {
        Self {
            pending: self.pending.clone(),
            run: self.run.clone(),
            most: self.most,
        }
    }
}

impl<T: Send + 'static> KeyBatches<T> {
    #[must_use]
    pub fn new(most: usize, run: RunBatch<T>) -> Self {
        Self {
            pending: Arc::default(),
            run,
            most: most.max(1),
        }
    }

    /// Queues `item` for `key`: it joins the batch its key's task takes next, or starts that
    /// task (then it is a batch of one at once). Must be called inside a tokio runtime.
    pub fn submit(&self, key: i32, item: T) {
        let mut pending = lock(&self.pending);
        match pending.entry(key) {
            // Its key's task is running a batch and takes this one with the next.
            Entry::Occupied(mut queued) => queued.get_mut().push(item),
            Entry::Vacant(free) => {
                free.insert(vec![item]);
                drop(pending);
                tokio::spawn(self.clone().drain(key));
            }
        }
    }

    /// Runs `key`'s batches until none is left, then removes its entry (under the same lock a
    /// submit takes, so an item is never left without a task).
    async fn drain(self, key: i32) {
        loop {
            let batch = {
                let mut pending = lock(&self.pending);
                let Some(queued) = pending.get_mut(&key) else {
                    return;
                };
                if queued.is_empty() {
                    pending.remove(&key);
                    return;
                }
                let take = queued.len().min(self.most);
                queued.drain(..take).collect::<Vec<_>>()
            };
            // A batch that panics loses only its own items (their callers see their answer
            // channels close); the key's task goes on with the next.
            if AssertUnwindSafe((self.run)(batch))
                .catch_unwind()
                .await
                .is_err()
            {
                tracing::error!(key, "a batch of admissions panicked");
            }
        }
    }

    /// Keys with items waiting or running (for tests of the bound).
    #[must_use]
    pub fn busy_keys(&self) -> usize {
        lock(&self.pending).len()
    }
}

/// The map is only ever held for a push or a take, never across an await; a panic while held
/// cannot leave it half-changed, so a poisoned lock is taken as is.
fn lock<T>(
    pending: &Mutex<HashMap<i32, Vec<T>>>,
) -> std::sync::MutexGuard<'_, HashMap<i32, Vec<T>>> {
    pending
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use tokio::sync::{mpsc, oneshot, Semaphore};

    use super::*;

    type Item = (u32, oneshot::Sender<()>);

    /// Each batch says its items when it starts, then waits for a permit of `gate` before it
    /// answers them.
    fn gated(gate: Arc<Semaphore>) -> (KeyBatches<Item>, mpsc::UnboundedReceiver<Vec<u32>>) {
        let (seen, batches) = mpsc::unbounded_channel();
        let run: RunBatch<Item> = Arc::new(move |batch: Vec<Item>| {
            let (seen, gate) = (seen.clone(), gate.clone());
            async move {
                let _ = seen.send(batch.iter().map(|(n, _)| *n).collect());
                let _permit = gate.acquire().await;
                for (_, done) in batch {
                    let _ = done.send(());
                }
            }
            .boxed()
        });
        (KeyBatches::new(4, run), batches)
    }

    async fn until_idle(batches: &KeyBatches<Item>) {
        for _ in 0..1000 {
            if batches.busy_keys() == 0 {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("a key's entry outlived its last batch");
    }

    #[tokio::test]
    async fn what_arrives_while_a_batch_runs_goes_together_in_the_next_and_a_lone_item_alone() {
        let gate = Arc::new(Semaphore::new(0));
        let (batches, mut seen) = gated(gate.clone());
        let mut waiters = Vec::new();
        let (done, wait) = oneshot::channel();
        batches.submit(1, (0, done));
        waiters.push(wait);
        // Nothing waits to fill a batch: the first runs alone.
        assert_eq!(seen.recv().await.unwrap(), vec![0]);
        for n in 1..7 {
            let (done, wait) = oneshot::channel();
            batches.submit(1, (n, done));
            waiters.push(wait);
        }
        gate.add_permits(100);
        // The six that came while it ran go four (the most) and two, in their order.
        assert_eq!(seen.recv().await.unwrap(), vec![1, 2, 3, 4]);
        assert_eq!(seen.recv().await.unwrap(), vec![5, 6]);
        for wait in waiters {
            wait.await.unwrap();
        }
        // Each key's entry goes with its last batch.
        until_idle(&batches).await;
    }

    #[tokio::test]
    async fn keys_are_batched_apart_and_run_at_the_same_time() {
        let gate = Arc::new(Semaphore::new(0));
        let (batches, mut seen) = gated(gate.clone());
        let (a, wait_a) = oneshot::channel();
        let (b, wait_b) = oneshot::channel();
        batches.submit(1, (1, a));
        batches.submit(2, (2, b));
        assert_eq!(batches.busy_keys(), 2);
        // Both batches start while neither may finish: one key does not wait for another.
        let mut got = vec![seen.recv().await.unwrap(), seen.recv().await.unwrap()];
        got.sort();
        assert_eq!(got, vec![vec![1], vec![2]]);
        gate.add_permits(2);
        wait_a.await.unwrap();
        wait_b.await.unwrap();
        until_idle(&batches).await;
    }

    #[tokio::test]
    async fn a_batch_that_panics_closes_its_callers_and_the_key_goes_on() {
        let run: RunBatch<(u32, oneshot::Sender<u32>)> = Arc::new(|batch| {
            async move {
                assert!(
                    batch.iter().all(|(n, _)| *n != 0),
                    "item 0 breaks its batch"
                );
                for (n, done) in batch {
                    let _ = done.send(n);
                }
            }
            .boxed()
        });
        let batches = KeyBatches::new(8, run);
        let (zero, broken) = oneshot::channel();
        batches.submit(7, (0, zero));
        assert!(broken.await.is_err(), "its answer channel closed");
        let (one, answer) = oneshot::channel();
        batches.submit(7, (1, one));
        assert_eq!(answer.await.unwrap(), 1);
    }
}
