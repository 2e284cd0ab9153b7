//! The engine thread's supervisor: when the thread's loop dies (a Rust panic anywhere in it,
//! not only inside the per-job `catch_unwind` wrappers), the engine says it is not ready and
//! why, the jobs it held fail with that reason, and the loop starts again (the model loaded
//! anew) after a back-off, a bounded number of times in a row.
//!
//! Generic over the engine: [`spawn`] runs any *body* (load, then serve commands from a
//! channel) on a named OS thread; [`super::llama::LlamaEngine`] and
//! [`super::scripted::ScriptedEngine`] both run under it, so the scripted engine's fault
//! trigger exercises the very code that guards the model.
//!
//! Handles check [`Health`] before they queue a command, so while the engine is down clients get
//! an immediate answer with the reason instead of waiting on a thread that is reloading.

use std::{
    cell::RefCell,
    panic::{catch_unwind, AssertUnwindSafe},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc, Arc, Mutex, PoisonError,
    },
    thread,
    time::{Duration, Instant},
};

use tokio::sync::oneshot;

use super::EngineError;
use crate::settings::RestartSettings;

/// What a panicking engine says until the supervisor has caught it (public: no cause, which
/// goes to the log).
const PANICKED: &str = "the engine thread panicked";

/// Whether an engine serves, and if not, why; shared by the engine thread and its handles.
#[derive(Debug, Default)]
pub struct Health {
    ready: AtomicBool,
    restarts: AtomicU64,
    /// Why it does not serve (`None` while it serves, or before its first load).
    reason: Mutex<Option<String>>,
}

impl Health {
    #[must_use]
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Why the engine does not serve now; `None` while it does.
    #[must_use]
    pub fn reason(&self) -> Option<String> {
        if self.ready() {
            return None;
        }
        self.reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Times the engine's loop was started again after it died.
    #[must_use]
    pub fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Acquire)
    }

    /// `Err(Unavailable(reason))` while the engine is down: what a handle answers at once
    /// instead of queueing a job nobody will run soon.
    ///
    /// # Errors
    /// When the engine is not ready.
    pub fn check(&self) -> Result<(), EngineError> {
        if self.ready() {
            return Ok(());
        }
        Err(EngineError::Unavailable(
            self.reason()
                .unwrap_or_else(|| "the engine is starting".into()),
        ))
    }

    fn up(&self) {
        *self.reason.lock().unwrap_or_else(PoisonError::into_inner) = None;
        self.ready.store(true, Ordering::Release);
    }

    fn down(&self, reason: String) {
        // The reason first, so nobody sees "not ready" without one.
        *self.reason.lock().unwrap_or_else(PoisonError::into_inner) = Some(reason);
        self.ready.store(false, Ordering::Release);
    }
}

thread_local! {
    /// The health of the engine whose supervised thread this is (unset elsewhere).
    static SUPERVISED: RefCell<Option<Arc<Health>>> = const { RefCell::new(None) };
    /// How many [`contain`] wrappers this thread is inside: a panic under one is that job's
    /// failure, not the thread's.
    static CONTAINED: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Runs one job's step, catching a panic in it: the job fails, the engine carries on. A panic
/// outside every such wrapper ends the loop and is the supervisor's to handle.
pub fn contain<R>(f: impl FnOnce() -> R) -> thread::Result<R> {
    CONTAINED.with(|c| c.set(c.get() + 1));
    let result = catch_unwind(AssertUnwindSafe(f));
    CONTAINED.with(|c| c.set(c.get().saturating_sub(1)));
    result
}

/// Marks this thread's engine down, if it is a supervised one (`false` if not). Called while a
/// panic unwinds, before a job's waiter hears of it, so whoever asks next already sees the
/// engine down.
fn down_here(reason: &str) -> bool {
    SUPERVISED
        .try_with(|h| match h.borrow().as_ref() {
            Some(health) => {
                if health.ready() {
                    health.down(reason.to_string());
                }
                true
            }
            None => false,
        })
        .unwrap_or(false)
}

/// The answer channel of one job. Dropped unanswered — above all while the engine thread
/// unwinds from a panic — it answers with an error that says so, so no waiter is left with a
/// bare "channel closed" or, worse, waiting.
#[derive(Debug)]
pub struct Reply<T> {
    tx: Option<oneshot::Sender<Result<T, EngineError>>>,
}

impl<T> Reply<T> {
    /// A reply and the receiver its waiter awaits.
    #[must_use]
    pub fn new() -> (Self, oneshot::Receiver<Result<T, EngineError>>) {
        let (tx, rx) = oneshot::channel();
        (Self { tx: Some(tx) }, rx)
    }

    /// Answers the waiter (if it still waits).
    pub fn send(mut self, result: Result<T, EngineError>) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(result);
        }
    }

    /// Whether the waiter has gone (nobody reads the answer).
    #[must_use]
    pub fn is_closed(&self) -> bool {
        self.tx.as_ref().is_none_or(oneshot::Sender::is_closed)
    }
}

impl<T> Drop for Reply<T> {
    fn drop(&mut self) {
        let Some(tx) = self.tx.take() else {
            return;
        };
        let error = if !thread::panicking() {
            EngineError::Unavailable("the engine dropped this job without an answer".into())
        } else if CONTAINED.try_with(std::cell::Cell::get).unwrap_or(0) > 0 {
            EngineError::Decode("the engine panicked on this job".into())
        } else if down_here(PANICKED) {
            EngineError::Unavailable(
                "the engine thread panicked while running this job; it restarts itself".into(),
            )
        } else {
            EngineError::Unavailable("the engine failed while holding this job".into())
        };
        let _ = tx.send(Err(error));
    }
}

/// Restarts in a row and the waits between them (`settings.engine.restart`).
#[derive(Debug, Clone, Copy)]
pub struct RestartPolicy {
    /// Restarts in a row before the engine gives up (stays down until the process restarts).
    pub max_attempts: u32,
    /// Wait before the first restart; it doubles for each further one in a row.
    pub backoff: Duration,
    /// The longest wait between two restarts.
    pub max_backoff: Duration,
    /// A loop that served this long before it died starts a fresh row of attempts.
    pub stable_after: Duration,
}

impl From<&RestartSettings> for RestartPolicy {
    fn from(s: &RestartSettings) -> Self {
        Self {
            max_attempts: s.max_attempts,
            backoff: Duration::from_millis(s.backoff_ms),
            max_backoff: Duration::from_secs(60).max(Duration::from_millis(s.backoff_ms)),
            stable_after: Duration::from_secs(300),
        }
    }
}

impl RestartPolicy {
    /// The wait before restart `n` of a row (1-based).
    fn backoff(&self, n: u32) -> Duration {
        let factor = 1u32 << n.saturating_sub(1).min(16);
        self.backoff.saturating_mul(factor).min(self.max_backoff)
    }
}

/// Given to a body: it calls [`Serving::ready`] once its model is loaded and it serves.
pub struct Serving<'a> {
    health: &'a Health,
    /// The first start's waiter ([`spawn`]), answered once.
    first: RefCell<Option<mpsc::Sender<Result<(), EngineError>>>>,
    since: RefCell<Option<Instant>>,
}

impl Serving<'_> {
    /// The body is loaded and serves from now on.
    pub fn ready(&self) {
        self.health.up();
        *self.since.borrow_mut() = Some(Instant::now());
        if let Some(first) = self.first.borrow_mut().take() {
            let _ = first.send(Ok(()));
        }
    }
}

/// Runs `body` on a thread named `name` under the supervisor and waits for its first start.
///
/// The body loads what it needs, calls [`Serving::ready`], then serves commands from the
/// channel until it closes (`Ok(())`, the engine stops). A panic anywhere in it, or an error
/// from a reload, is caught here: `health` goes down with the reason, commands that arrive are
/// answered with `fail`, and after a back-off the body runs again, at most
/// `policy.max_attempts` times in a row. A failure of the *first* load is returned instead, as
/// before there was a supervisor: a worker whose model cannot load does not start.
///
/// # Errors
/// When the thread cannot be spawned or the first load fails.
pub fn spawn<C, B>(
    name: String,
    policy: RestartPolicy,
    health: Arc<Health>,
    fail: fn(C, EngineError),
    mut body: B,
) -> Result<mpsc::Sender<C>, EngineError>
where
    C: Send + 'static,
    B: FnMut(&mpsc::Receiver<C>, &Serving<'_>) -> Result<(), EngineError> + Send + 'static,
{
    let (tx, rx) = mpsc::channel();
    let (first_tx, first_rx) = mpsc::channel();
    thread::Builder::new()
        .name(name)
        .spawn(move || {
            SUPERVISED.with(|h| *h.borrow_mut() = Some(health.clone()));
            supervise(&rx, &health, policy, fail, &mut body, first_tx);
        })
        .map_err(|e| EngineError::Load(format!("cannot spawn engine thread: {e}")))?;
    first_rx
        .recv()
        .map_err(|_| EngineError::Load("engine thread exited during load".into()))??;
    Ok(tx)
}

fn supervise<C, B>(
    rx: &mpsc::Receiver<C>,
    health: &Health,
    policy: RestartPolicy,
    fail: fn(C, EngineError),
    body: &mut B,
    first: mpsc::Sender<Result<(), EngineError>>,
) where
    B: FnMut(&mpsc::Receiver<C>, &Serving<'_>) -> Result<(), EngineError>,
{
    let mut first = Some(first);
    // Restarts in this row (reset once a loop has served for `stable_after`).
    let mut row = 0u32;
    loop {
        let serving = Serving {
            health,
            first: RefCell::new(first.take()),
            since: RefCell::new(None),
        };
        // Whatever wrappers the dead loop was inside are gone with it.
        CONTAINED.with(|c| c.set(0));
        let outcome = catch_unwind(AssertUnwindSafe(|| body(rx, &serving)));
        let served_for = serving.since.borrow().map(|t| t.elapsed());
        first = serving.first.into_inner();
        let why = match outcome {
            Ok(Ok(())) => {
                health.down("the engine has stopped".into());
                return;
            }
            Ok(Err(e)) => {
                if let Some(first) = first.take() {
                    let _ = first.send(Err(e));
                    return;
                }
                tracing::error!(error = %e, "the engine could not start again");
                "the engine could not load its model again"
            }
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                tracing::error!(panic = %message, "the engine thread panicked");
                if let Some(first) = first.take() {
                    let _ = first.send(Err(EngineError::Load(
                        "the engine thread panicked while loading".into(),
                    )));
                    return;
                }
                PANICKED
            }
        };
        if served_for.is_some_and(|d| d >= policy.stable_after) {
            row = 0;
        }
        row += 1;
        if row > policy.max_attempts {
            let reason = format!(
                "{why}; gave up after {} restarts in a row (restart the worker)",
                policy.max_attempts
            );
            tracing::error!(%reason, "the engine stays down");
            health.down(reason.clone());
            while let Ok(cmd) = rx.recv() {
                fail(cmd, EngineError::Unavailable(reason.clone()));
            }
            return;
        }
        let wait = policy.backoff(row);
        let reason = format!(
            "{why}; restarting (attempt {row} of {})",
            policy.max_attempts
        );
        tracing::warn!(%reason, wait_ms = wait.as_millis() as u64, "restarting the engine");
        health.down(reason.clone());
        // Wait out the back-off, answering what arrives meanwhile (a handle that queued just
        // before the engine went down).
        let until = Instant::now() + wait;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match rx.recv_timeout(left) {
                Ok(cmd) => fail(cmd, EngineError::Unavailable(reason.clone())),
                Err(mpsc::RecvTimeoutError::Timeout) => break,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
        health.restarts.fetch_add(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A command: panic, or answer with the number of loads so far.
    enum Cmd {
        Panic,
        Ask(Reply<u64>),
    }

    fn fail(cmd: Cmd, e: EngineError) {
        if let Cmd::Ask(reply) = cmd {
            reply.send(Err(e));
        }
    }

    fn policy(max_attempts: u32, backoff_ms: u64) -> RestartPolicy {
        RestartPolicy {
            max_attempts,
            backoff: Duration::from_millis(backoff_ms),
            max_backoff: Duration::from_secs(1),
            stable_after: Duration::from_secs(300),
        }
    }

    /// An engine whose loop panics on `Cmd::Panic` outside any per-job wrapper, holding the
    /// job that asked just before in a local (an in-flight job).
    fn start(policy: RestartPolicy) -> (mpsc::Sender<Cmd>, Arc<Health>) {
        let health = Arc::new(Health::default());
        let mut loads = 0u64;
        let tx = spawn(
            "test-engine".into(),
            policy,
            health.clone(),
            fail,
            move |rx, serving| {
                loads += 1;
                serving.ready();
                let mut held: Option<Reply<u64>> = None;
                while let Ok(cmd) = rx.recv() {
                    match cmd {
                        Cmd::Panic => panic!("injected"),
                        Cmd::Ask(reply) => {
                            if let Some(earlier) = held.replace(reply) {
                                earlier.send(Ok(loads));
                            }
                        }
                    }
                }
                Ok(())
            },
        )
        .unwrap();
        (tx, health)
    }

    fn wait_until(what: &str, f: impl Fn() -> bool) {
        let until = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < until, "timed out waiting until {what}");
            thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_panic_fails_the_held_job_marks_the_engine_down_and_it_comes_back() {
        let (tx, health) = start(policy(3, 300));
        assert!(health.ready());
        let (held, held_rx) = Reply::new();
        tx.send(Cmd::Ask(held)).unwrap();
        tx.send(Cmd::Panic).unwrap();
        let err = held_rx.blocking_recv().unwrap().unwrap_err();
        assert!(err.to_string().contains("panicked"), "{err}");
        // Down before the held job's waiter heard of it, with the reason.
        assert!(!health.ready());
        let reason = health.reason().unwrap();
        assert!(reason.contains("panicked"), "{reason}");
        let err = health.check().unwrap_err();
        assert!(matches!(err, EngineError::Unavailable(_)), "{err}");
        wait_until("restarted", || health.ready());
        assert_eq!(health.restarts(), 1);
        assert_eq!(health.reason(), None);
        // The restarted loop loaded again and serves.
        let (first, first_rx) = Reply::new();
        let (second, _second_rx) = Reply::new();
        tx.send(Cmd::Ask(first)).unwrap();
        tx.send(Cmd::Ask(second)).unwrap();
        assert_eq!(first_rx.blocking_recv().unwrap().unwrap(), 2);
    }

    #[test]
    fn commands_that_arrive_while_it_is_down_are_answered_at_once() {
        let (tx, health) = start(policy(3, 2_000));
        tx.send(Cmd::Panic).unwrap();
        wait_until("down", || {
            health.reason().is_some_and(|r| r.contains("attempt 1"))
        });
        let asked = Instant::now();
        let (reply, rx) = Reply::new();
        tx.send(Cmd::Ask(reply)).unwrap();
        let err = rx.blocking_recv().unwrap().unwrap_err();
        assert!(
            asked.elapsed() < Duration::from_secs(1),
            "waited for the restart"
        );
        assert!(err.to_string().contains("restarting"), "{err}");
    }

    #[test]
    fn it_gives_up_after_the_bounded_restarts_and_says_so() {
        let (tx, health) = start(policy(2, 10));
        for n in 1..=2 {
            tx.send(Cmd::Panic).unwrap();
            wait_until("restarted", || health.restarts() == n && health.ready());
        }
        tx.send(Cmd::Panic).unwrap();
        wait_until("given up", || {
            health.reason().is_some_and(|r| r.contains("gave up"))
        });
        let (reply, rx) = Reply::new();
        tx.send(Cmd::Ask(reply)).unwrap();
        let err = rx.blocking_recv().unwrap().unwrap_err();
        assert!(err.to_string().contains("gave up"), "{err}");
        assert_eq!(health.restarts(), 2);
        assert!(!health.ready());
    }

    #[test]
    fn a_failed_first_load_is_returned_and_nothing_restarts() {
        let health = Arc::new(Health::default());
        let err = spawn::<Cmd, _>(
            "test-engine".into(),
            policy(3, 10),
            health.clone(),
            fail,
            |_, _| Err(EngineError::Load("no weights".into())),
        )
        .unwrap_err();
        assert!(err.to_string().contains("no weights"), "{err}");
        assert_eq!(health.restarts(), 0);
    }

    #[test]
    fn a_panic_contained_to_one_job_fails_that_job_only() {
        let health = Arc::new(Health::default());
        let tx = spawn(
            "test-engine".into(),
            policy(3, 10),
            health.clone(),
            fail,
            |rx, serving| {
                serving.ready();
                while let Ok(cmd) = rx.recv() {
                    if let Cmd::Ask(reply) = cmd {
                        let _ = contain(move || {
                            let _held = reply;
                            panic!("one job's bug");
                        });
                    }
                }
                Ok(())
            },
        )
        .unwrap();
        let (reply, rx) = Reply::new();
        tx.send(Cmd::Ask(reply)).unwrap();
        let err = rx.blocking_recv().unwrap().unwrap_err();
        assert!(matches!(err, EngineError::Decode(_)), "{err}");
        assert!(health.ready(), "{:?}", health.reason());
        assert_eq!(health.restarts(), 0);
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let p = policy(10, 100);
        let waits: Vec<u64> = (1..=6).map(|n| p.backoff(n).as_millis() as u64).collect();
        assert_eq!(waits, vec![100, 200, 400, 800, 1000, 1000]);
    }
}
