//! Clients that hang up: admission runs to completion whatever the client does, and the reaper
//! settles any job that is stuck anyway. Afterwards every charged call belongs to a job, and no
//! job stays `queued` or `running`.
//!
//! Runs on the scripted engine: what is checked is the admission path, not the text.

mod common;

use std::time::Duration;

use common::{TestApp, TestKey};
use rand::Rng;
use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};
use serde_json::json;
use tollgate::{
    admission::reaper::{self, Bounds},
    engine::{GenerationRequest, Prompt},
    models::{_entities::jobs, api_keys, budgets::Reservation},
    notify::JobEvents,
};

/// Jobs of `key` by state: (unfinished, not refunded).
async fn tally(app: &TestApp, key: &TestKey) -> (u64, u64) {
    let of_key = || jobs::Entity::find().filter(jobs::Column::ApiKeyId.eq(key.id));
    let unfinished = of_key()
        .filter(jobs::Column::Status.is_in(["queued", "running"]))
        .count(&app.ctx.db)
        .await
        .expect("count");
    let kept = of_key()
        .filter(jobs::Column::Refunded.eq(false))
        .count(&app.ctx.db)
        .await
        .expect("count");
    (unfinished, kept)
}

#[tokio::test]
async fn clients_that_hang_up_mid_admission_leave_no_charge_without_a_job() {
    // A short queued bound, so the test can also wait it out: nothing may outlive it.
    let app = TestApp::spawn_scripted(|s| {
        s["queue"]["max_queued_seconds"] = json!(5);
        s["api"]["rate_limit"]["per_minute"] = json!(0);
    })
    .await;
    let key = app.key_with_calls(None).await;
    const REQUESTS: usize = 320;
    const WAVE: usize = 40;
    let mut hung_up = 0;
    for wave in 0..REQUESTS / WAVE {
        let mut tasks = Vec::new();
        for i in 0..WAVE {
            let req = app
                .request(reqwest::Method::POST, Some(&key), "/api/")
                .json(&json!({"text": format!("storm {wave}-{i}"), "max_tokens": 1}));
            let after = Duration::from_millis(rand::thread_rng().gen_range(1..=20));
            // Dropping the request future closes the connection: the client hangs up.
            tasks.push(tokio::spawn(async move {
                tokio::time::timeout(after, req.send()).await.is_err()
            }));
        }
        for t in tasks {
            if t.await.expect("task") {
                hung_up += 1;
            }
        }
    }
    assert!(
        hung_up >= REQUESTS / 4,
        "only {hung_up} of {REQUESTS} clients hung up before their answer; the storm did not test hang-ups"
    );
    // Bounded wait: past the reaper's queued bound plus a period, nothing may be unfinished.
    let bounds = Bounds {
        queued: Duration::from_secs(5),
        running: Duration::from_secs(3600),
    };
    let deadline =
        tokio::time::Instant::now() + bounds.queued + bounds.period() * 2 + Duration::from_secs(30);
    loop {
        let (unfinished, _) = tally(&app, &key).await;
        if unfinished == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{unfinished} jobs still queued or running past the reaper bound"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, kept) = tally(&app, &key).await;
    let used = app.calls_used(&key).await;
    assert_eq!(
        u64::try_from(used).expect("calls"),
        kept,
        "calls charged ({used}) must equal jobs not refunded ({kept}): a charge without a job was left behind"
    );
    assert!(kept > 0, "no request got as far as a job");
}

#[tokio::test]
async fn the_reaper_fails_and_refunds_a_stuck_job_exactly_once() {
    let app = TestApp::spawn_scripted(|_| {}).await;
    let key = app.key_with_calls(Some(5)).await;
    // A job charged and recorded but never pushed: what a process dying between the two leaves.
    api_keys::charge(&app.ctx.db, key.id, &api_keys::hash_secret(&key.secret))
        .await
        .expect("db")
        .expect("charged");
    let job = common::queued_job(
        &app,
        key.id,
        3,
        Reservation::default(),
        GenerationRequest {
            model: "smollm2".into(),
            prompt: Prompt::Raw { text: "x".into() },
            params: common::greedy(1),
            adapter: None,
        },
    )
    .await;
    assert_eq!(app.calls_used(&key).await, 1);
    let events = JobEvents::default();
    let tight = Bounds {
        queued: Duration::from_millis(1),
        running: Duration::from_millis(1),
    };
    let loose = Bounds {
        queued: Duration::from_secs(3600),
        running: Duration::from_secs(3600),
    };
    assert_eq!(
        reaper::sweep(&app.ctx.db, &events, loose)
            .await
            .expect("sweep"),
        0,
        "a job inside its bound is left alone"
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        reaper::sweep(&app.ctx.db, &events, tight)
            .await
            .expect("sweep"),
        1
    );
    assert_eq!(
        reaper::sweep(&app.ctx.db, &events, tight)
            .await
            .expect("sweep"),
        0
    );
    let row = jobs::Entity::find_by_id(job.job_id)
        .one(&app.ctx.db)
        .await
        .expect("db")
        .expect("job");
    assert_eq!(row.status, "failed");
    assert!(row.refunded);
    assert!(
        row.error
            .as_deref()
            .is_some_and(|e| e.contains("no worker took the job")),
        "{:?}",
        row.error
    );
    assert_eq!(app.calls_used(&key).await, 0, "refunded exactly once");
}
