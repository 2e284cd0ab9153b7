//! Work that arrives at once, handed over a batch at a time.
//!
//! Every admission commits a charge, its token reservations and its job: on Postgres one
//! durable WAL flush and a handful of statements each, and a hot key's charges wait on its one
//! row in turn. [`Batches`] lets one task take whatever has queued while the previous batch
//! committed and hand it over whole, so that those admissions, of one key or of many, share one
//! transaction ([`super::commit`]). Nothing waits to fill a batch: a lone request is a batch of
//! one, at once.

use std::{
    panic::AssertUnwindSafe,
    sync::{Arc, Mutex},
};

use futures::{future::BoxFuture, FutureExt};

/// What runs each batch: it owns the items (and with them whatever answers their callers).
pub type RunBatch<T> = Arc<dyn Fn(Vec<T>) -> BoxFuture<'static, ()> + Send + Sync>;

/// Items queued for the one task that runs their batches, one after another.
///
/// Bounded by the requests in flight: each item is a request whose caller waits for it.
pub struct Batches<T> {
    lane: Arc<Mutex<Lane<T>>>,
    run: RunBatch<T>,
    /// Most items in one batch (one transaction).
    most: usize,
}

/// What waits, and whether a task is running batches (then it takes what waits next).
struct Lane<T> {
    queued: Vec<T>,
    running: bool,
}

impl<T> Clone for Batches<T> {
    fn clone(&self) -> Self {
        Self {
            lane: self.lane.clone(),
            run: self.run.clone(),
            most: self.most,
        }
    }
}

impl<T: Send + 'static> Batches<T> {
    #[must_use]
    pub fn new(most: usize, run: RunBatch<T>) -> Self {
        Self {
            lane: Arc::new(Mutex::new(Lane {
                queued: Vec::new(),
                running: false,
            })),
            run,
            most: most.max(1),
        }
    }

    /// Queues `item`: it joins the batch the running task takes next, or starts that task
    /// (then it is a batch of one at once). Must be called inside a tokio runtime.
    pub fn submit(&self, item: T) {
        let mut lane = lock(&self.lane);
        lane.queued.push(item);
        if !lane.running {
            lane.running = true;
            drop(lane);
            tokio::spawn(self.clone().drain());
        }
    }

    /// Runs batches until none is left, then stops (under the same lock a submit takes, so an
    /// item is never left without a task).
    async fn drain(self) {
        loop {
            let batch = {
                let mut lane = lock(&self.lane);
                if lane.queued.is_empty() {
                    lane.running = false;
                    return;
                }
                let take = lane.queued.len().min(self.most);
                lane.queued.drain(..take).collect::<Vec<_>>()
            };
            // A batch that panics loses only its own items (their callers see their answer
            // channels close); the task goes on with the next.
            if AssertUnwindSafe((self.run)(batch))
                .catch_unwind()
                .await
                .is_err()
            {
                tracing::error!("a batch of admissions panicked");
            }
        }
    }

    /// Items waiting, plus one while a task runs (for tests of the bound).
    #[must_use]
    pub fn busy(&self) -> usize {
        let lane = lock(&self.lane);
        lane.queued.len() + usize::from(lane.running)
    }
}

/// The lane is only ever held for a push or a take, never across an await; a panic while held
/// cannot leave it half-changed, so a poisoned lock is taken as is.
fn lock<T>(lane: &Mutex<Lane<T>>) -> std::sync::MutexGuard<'_, Lane<T>> {
    lane.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use tokio::sync::{mpsc, oneshot, Semaphore};

    use super::*;

    type Item = (u32, oneshot::Sender<()>);

    /// Each batch says its items when it starts, then waits for a permit of `gate` before it
    /// answers them.
    fn gated(gate: Arc<Semaphore>) -> (Batches<Item>, mpsc::UnboundedReceiver<Vec<u32>>) {
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
        (Batches::new(4, run), batches)
    }

    async fn until_idle(batches: &Batches<Item>) {
        for _ in 0..1000 {
            if batches.busy() == 0 {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("the lane stayed busy after its last batch");
    }

    #[tokio::test]
    async fn what_arrives_while_a_batch_runs_goes_together_in_the_next_and_a_lone_item_alone() {
        let gate = Arc::new(Semaphore::new(0));
        let (batches, mut seen) = gated(gate.clone());
        let mut waiters = Vec::new();
        let (done, wait) = oneshot::channel();
        batches.submit((0, done));
        waiters.push(wait);
        // Nothing waits to fill a batch: the first runs alone.
        assert_eq!(seen.recv().await.unwrap(), vec![0]);
        for n in 1..7 {
            let (done, wait) = oneshot::channel();
            batches.submit((n, done));
            waiters.push(wait);
        }
        gate.add_permits(100);
        // The six that came while it ran go four (the most) and two, in their order.
        assert_eq!(seen.recv().await.unwrap(), vec![1, 2, 3, 4]);
        assert_eq!(seen.recv().await.unwrap(), vec![5, 6]);
        for wait in waiters {
            wait.await.unwrap();
        }
        // The task stops with its last batch.
        until_idle(&batches).await;
    }

    #[tokio::test]
    async fn after_the_task_stops_the_next_item_starts_one_at_once() {
        let gate = Arc::new(Semaphore::new(0));
        let (batches, mut seen) = gated(gate.clone());
        let (a, wait_a) = oneshot::channel();
        batches.submit((1, a));
        assert_eq!(seen.recv().await.unwrap(), vec![1]);
        gate.add_permits(1);
        wait_a.await.unwrap();
        until_idle(&batches).await;
        let (b, wait_b) = oneshot::channel();
        batches.submit((2, b));
        assert_eq!(seen.recv().await.unwrap(), vec![2]);
        gate.add_permits(1);
        wait_b.await.unwrap();
        until_idle(&batches).await;
    }

    #[tokio::test]
    async fn a_batch_that_panics_closes_its_callers_and_the_lane_goes_on() {
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
        let batches = Batches::new(8, run);
        let (zero, broken) = oneshot::channel();
        batches.submit((0, zero));
        assert!(broken.await.is_err(), "its answer channel closed");
        let (one, answer) = oneshot::channel();
        batches.submit((1, one));
        assert_eq!(answer.await.unwrap(), 1);
    }
}
