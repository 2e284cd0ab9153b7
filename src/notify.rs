//! Delivering a finished job to the request that waits for it.
//!
//! The handler subscribes *before* it pushes the job, then awaits a oneshot; the worker
//! publishes the final job record when it settles the job. No polling on the request path.
//! The database record stays the source of truth: a waiter that misses the notification (e.g.
//! it timed out) reads the record instead.
//!
//! With workers in other processes (production), the same events cross processes through Redis
//! pub/sub ([`EventBus`]): a worker publishes its deltas and "settled" on one channel, and every
//! API instance hands those to whichever of its requests waits for that job. A settled job is
//! re-read from the database, so what a client gets is always the durable record.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, oneshot};

use crate::models::jobs;

/// Deltas kept for a subscriber that falls behind; older ones are dropped (it is told how many,
/// and still gets the final record with the whole text). Each stream allocates its slots up
/// front (~12 KiB at 256).
const STREAM_BUFFER: usize = 256;

/// Jobs one process awaits at most, and streams at most (each stream holds its buffer). Entries
/// live only while a request waits for or streams a job; past a bound, entries nobody listens
/// to any more are swept first, and if the map is still full the new subscription is refused
/// (its receiver closes at once, and the caller falls back to the job's database record).
pub const MAX_FOLLOWED: usize = 50_000;
pub const MAX_STREAMS: usize = 10_000;

#[derive(Debug, Default, Clone)]
pub struct JobEvents {
    waiters: Arc<Mutex<HashMap<String, Vec<oneshot::Sender<jobs::Model>>>>>,
    streams: Arc<Mutex<HashMap<String, broadcast::Sender<String>>>>,
    /// Cross-process relay (production); `None` in embedded mode.
    bus: Option<Arc<EventBus>>,
}

impl JobEvents {
    fn stream(&self, job_id: &str) -> Option<broadcast::Sender<String>> {
        let mut map = self.streams.lock().ok()?;
        if map.len() >= MAX_STREAMS && !map.contains_key(job_id) {
            map.retain(|_, tx| tx.receiver_count() > 0);
            if map.len() >= MAX_STREAMS {
                tracing::warn!("job events: {MAX_STREAMS} streams open; refusing another");
                return None;
            }
        }
        Some(
            map.entry(job_id.to_string())
                .or_insert_with(|| broadcast::channel(STREAM_BUFFER).0)
                .clone(),
        )
    }

    /// The job's delta channel if someone here streams it; never creates one.
    fn existing_stream(&self, job_id: &str) -> Option<broadcast::Sender<String>> {
        self.streams
            .lock()
            .ok()
            .and_then(|map| map.get(job_id).cloned())
    }

    /// Text deltas of a running job, from now on.
    pub fn subscribe_deltas(&self, job_id: &str) -> Option<broadcast::Receiver<String>> {
        self.stream(job_id).map(|tx| tx.subscribe())
    }

    /// Hands a text delta to the job's stream subscribers (none: dropped), here and, with a
    /// bus, in every API process.
    pub fn publish_delta(&self, job_id: &str, delta: String) {
        if let Some(bus) = &self.bus {
            bus.send(job_id, Some(delta.clone()));
        }
        // Streams are opened by subscribers before their job is queued; a job nobody streams
        // gets no channel.
        if let Some(tx) = self.existing_stream(job_id) {
            let _ = tx.send(delta);
        }
    }

    /// A delta from another process: only for jobs someone here follows.
    fn deliver_remote_delta(&self, job_id: &str, delta: String) {
        if let Some(tx) = self.existing_stream(job_id) {
            let _ = tx.send(delta);
        }
    }

    /// Whether a request in this process follows `job_id`.
    fn follows(&self, job_id: &str) -> bool {
        self.waiters.lock().is_ok_and(|m| m.contains_key(job_id))
            || self.streams.lock().is_ok_and(|m| m.contains_key(job_id))
    }

    /// Jobs that requests in this process wait for.
    fn followed(&self) -> Vec<String> {
        self.waiters
            .lock()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Registers interest in a job's final record.
    pub fn subscribe(&self, job_id: &str) -> oneshot::Receiver<jobs::Model> {
        let (tx, rx) = oneshot::channel();
        if let Ok(mut map) = self.waiters.lock() {
            if map.len() >= MAX_FOLLOWED && !map.contains_key(job_id) {
                map.retain(|_, list| {
                    list.retain(|tx| !tx.is_closed());
                    !list.is_empty()
                });
                if map.len() >= MAX_FOLLOWED {
                    tracing::warn!("job events: {MAX_FOLLOWED} jobs awaited; refusing another");
                    return rx;
                }
            }
            map.entry(job_id.to_string()).or_default().push(tx);
        }
        rx
    }

    /// Hands the final record to everyone waiting for it, here and, with a bus, in every API
    /// process.
    pub fn publish(&self, job: &jobs::Model) {
        if let Some(bus) = &self.bus {
            bus.send(&job.id, None);
        }
        self.publish_local(job);
    }

    fn publish_local(&self, job: &jobs::Model) {
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

    /// Drops subscriptions whose receiver is gone (a waiter that timed out, a stream whose
    /// client left or that was opened for a job already settled), so nothing lingers for a job
    /// nobody follows.
    pub fn forget(&self, job_id: &str) {
        if let Ok(mut map) = self.waiters.lock() {
            if let Some(list) = map.get_mut(job_id) {
                list.retain(|tx| !tx.is_closed());
                if list.is_empty() {
                    map.remove(job_id);
                }
            }
        }
        if let Ok(mut map) = self.streams.lock() {
            if map.get(job_id).is_some_and(|tx| tx.receiver_count() == 0) {
                map.remove(job_id);
            }
        }
    }

    /// Jobs with a delta channel open (for tests and metrics).
    #[must_use]
    pub fn streaming(&self) -> usize {
        self.streams.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Number of jobs someone is waiting for (for tests and metrics).
    #[must_use]
    pub fn waiting(&self) -> usize {
        self.waiters.lock().map(|m| m.len()).unwrap_or(0)
    }
}

/// One event on the bus: a text delta of a job, or (`delta: None`) "the job settled".
#[derive(Debug, Serialize, Deserialize)]
struct BusMessage {
    origin: String,
    job_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    delta: Option<String>,
}

/// Relays job events between processes over one Redis pub/sub channel, `<prefix>.events`.
#[derive(Debug)]
pub struct EventBus {
    /// This process's id: its own messages come back to it and are skipped.
    origin: String,
    /// Publishing is one ordered task, so a job's deltas arrive in order and before "settled".
    tx: tokio::sync::mpsc::UnboundedSender<BusMessage>,
}

impl EventBus {
    fn send(&self, job_id: &str, delta: Option<String>) {
        let _ = self.tx.send(BusMessage {
            origin: self.origin.clone(),
            job_id: job_id.to_string(),
            delta,
        });
    }
}

impl JobEvents {
    /// Job events shared with other processes through Redis: everything published here also
    /// goes to the channel; with `listen`, events from other processes (workers) reach the
    /// requests of this one. Redis going away loses no result: the subscriber reconnects by
    /// itself and then re-reads the records of every job still waited for.
    ///
    /// # Errors
    /// When Redis cannot be reached now.
    pub async fn with_redis(
        url: &str,
        prefix: &str,
        timeout: std::time::Duration,
        db: sea_orm::DatabaseConnection,
        listen: bool,
    ) -> Result<Self, crate::queue::QueueError> {
        let (client, conn) = crate::queue::redis_connect(url, timeout).await?;
        let channel = format!("{prefix}.events");
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let bus = Arc::new(EventBus {
            origin: uuid::Uuid::new_v4().simple().to_string(),
            tx,
        });
        let events = Self {
            bus: Some(bus.clone()),
            ..Self::default()
        };
        tokio::spawn(publish_loop(conn, channel.clone(), rx));
        if listen {
            let local = Self {
                bus: None,
                ..events.clone()
            };
            tokio::spawn(listen_loop(client, channel, bus.origin.clone(), local, db));
        }
        Ok(events)
    }
}

impl JobEvents {
    /// The job events of a process with these settings: over Redis when the queue is there
    /// (`listen`: this process has requests waiting for workers elsewhere), else in-process.
    ///
    /// # Errors
    /// When Redis cannot be reached now.
    pub async fn for_settings(
        settings: &crate::settings::QueueSettings,
        db: &sea_orm::DatabaseConnection,
        listen: bool,
    ) -> Result<Self, crate::queue::QueueError> {
        if !settings.is_redis() {
            return Ok(Self::default());
        }
        Self::with_redis(
            &settings.url,
            &settings.prefix,
            std::time::Duration::from_millis(settings.redis_timeout_ms),
            db.clone(),
            listen,
        )
        .await
    }
}

async fn publish_loop(
    mut conn: redis::aio::ConnectionManager,
    channel: String,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<BusMessage>,
) {
    while let Some(message) = rx.recv().await {
        let Ok(payload) = serde_json::to_string(&message) else {
            continue;
        };
        let sent = redis::cmd("PUBLISH")
            .arg(&channel)
            .arg(payload)
            .query_async::<i64>(&mut conn)
            .await;
        if let Err(e) = sent {
            // Waiters elsewhere fall back on the database record; nothing is lost.
            tracing::warn!(error = %e, job_id = %message.job_id, "could not publish a job event");
        }
    }
}

async fn listen_loop(
    client: redis::Client,
    channel: String,
    origin: String,
    events: JobEvents,
    db: sea_orm::DatabaseConnection,
) {
    let mut pause = std::time::Duration::from_millis(100);
    loop {
        let subscribed = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        }
        .await;
        let pubsub = match subscribed {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "job events: cannot subscribe; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_secs(2));
                continue;
            }
        };
        pause = std::time::Duration::from_millis(100);
        // Whatever settled while we were not listening is in the database.
        for id in events.followed() {
            settle_from_db(&events, &db, &id).await;
        }
        let mut messages = pubsub.into_on_message();
        while let Some(msg) = messages.next().await {
            let Ok(payload) = msg.get_payload::<String>() else {
                continue;
            };
            let Ok(message) = serde_json::from_str::<BusMessage>(&payload) else {
                continue;
            };
            if message.origin == origin || !events.follows(&message.job_id) {
                continue;
            }
            match message.delta {
                Some(delta) => events.deliver_remote_delta(&message.job_id, delta),
                None => settle_from_db(&events, &db, &message.job_id).await,
            }
        }
        tracing::warn!("job events: subscription lost; reconnecting");
    }
}

async fn settle_from_db(events: &JobEvents, db: &sea_orm::DatabaseConnection, job_id: &str) {
    match jobs::Model::find_any(db, job_id).await {
        Ok(Some(job)) if job.is_finished() => events.publish_local(&job),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, job_id, "job events: cannot read the job"),
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

/// A job's text as a route streams it: the pieces the client has not seen, then the settled
/// record with the rest of the text (what a gap skipped, or all of it when held).
#[derive(Debug)]
pub enum TextUpdate {
    Piece(String),
    /// The settled record and the part of its result the pieces did not carry.
    Settled(Box<jobs::Model>, String),
    /// The updates ended before the job settled (its record will still have it).
    Ended,
}

/// [`job_updates`] as text: pieces as they come (none when `hold`, for answers sent whole),
/// nothing more after a gap, and the settled record with the text not yet sent. The one place
/// the streaming routes keep what the client has.
pub fn text_updates(
    deltas: Option<broadcast::Receiver<String>>,
    done: oneshot::Receiver<jobs::Model>,
    hold: bool,
) -> impl Stream<Item = TextUpdate> + Send {
    job_updates(deltas, done)
        .map(Some)
        .chain(futures::stream::once(async { None }))
        .scan(
            (String::new(), false, hold),
            |(sent, settled, quiet), update| {
                let out = match update {
                    Some(JobUpdate::Delta(_)) if *quiet => None,
                    Some(JobUpdate::Delta(text)) => {
                        sent.push_str(&text);
                        Some(TextUpdate::Piece(text))
                    }
                    Some(JobUpdate::Skipped(_)) => {
                        *quiet = true;
                        None
                    }
                    Some(JobUpdate::Done(job)) => {
                        *settled = true;
                        let rest = job
                            .result
                            .as_deref()
                            .unwrap_or_default()
                            .strip_prefix(sent.as_str())
                            .unwrap_or_default()
                            .to_string();
                        Some(TextUpdate::Settled(job, rest))
                    }
                    None if *settled => None,
                    None => Some(TextUpdate::Ended),
                };
                futures::future::ready(Some(out))
            },
        )
        .filter_map(futures::future::ready)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn followed_jobs_are_bounded_and_abandoned_ones_are_swept_first() {
        let events = JobEvents::default();
        // Waiters whose requests went away are swept when the map is full.
        for i in 0..MAX_FOLLOWED + 10 {
            drop(events.subscribe(&format!("gone-{i}")));
        }
        assert!(events.waiting() <= MAX_FOLLOWED);
        // Live waiters fill it; one more is refused (its receiver is closed at once).
        let live: Vec<_> = (0..MAX_FOLLOWED)
            .map(|i| events.subscribe(&format!("live-{i}")))
            .collect();
        assert_eq!(events.waiting(), MAX_FOLLOWED);
        let mut refused = events.subscribe("one-too-many");
        assert!(refused.try_recv().is_err());
        assert_eq!(events.waiting(), MAX_FOLLOWED);
        drop(live);

        for i in 0..MAX_STREAMS + 10 {
            drop(events.subscribe_deltas(&format!("s-{i}")));
        }
        assert!(events.streaming() <= MAX_STREAMS);
        let live: Vec<_> = (0..MAX_STREAMS)
            .filter_map(|i| events.subscribe_deltas(&format!("live-{i}")))
            .collect();
        assert_eq!(live.len(), MAX_STREAMS);
        assert!(events.subscribe_deltas("one-too-many").is_none());
    }

    #[test]
    fn deltas_of_a_job_nobody_streams_open_no_channel() {
        let events = JobEvents::default();
        for i in 0..100 {
            events.publish_delta(&format!("job-{i}"), "token".into());
        }
        assert_eq!(events.streaming(), 0);
        let mut rx = events.subscribe_deltas("job-7").expect("stream");
        events.publish_delta("job-7", "hello".into());
        assert_eq!(rx.try_recv().ok().as_deref(), Some("hello"));
    }
}
