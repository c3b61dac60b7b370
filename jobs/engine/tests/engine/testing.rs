//! `durable_jobs::testing`: drains and enqueue assertions, and the
//! quickstart's job tested with them.

use std::time::Duration;

use durable_jobs::{Error, Job, JobContext, JobError, Registry, testing};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use crate::support::TestDb;

#[allow(dead_code, missing_docs, unreachable_pub)]
#[path = "../../examples/quickstart.rs"]
mod quickstart;

#[tokio::test]
async fn the_quickstarts_welcome_enqueues_a_delivery_that_runs() -> anyhow::Result<()> {
    use quickstart::{DeliverNote, NOTES, welcome};
    let db = TestDb::new().await?;
    sqlx::raw_sql(NOTES).execute(&db.pool).await?;
    let page = welcome(axum::extract::State(db.pool.clone())).await;
    assert!(page.is_ok_and(|text| text.starts_with("note 1 written")));
    let enqueued = testing::enqueued::<DeliverNote>(&db.pool).await?;
    assert_eq!(enqueued, [DeliverNote { note_id: 1 }]);

    let registry = Registry::new().register::<DeliverNote>();
    let drained = testing::drain(&db.pool, registry, db.pool.clone()).await?;
    assert!(drained.all_done() && drained.jobs.len() == 1, "{drained:?}");
    let delivered = "select count(*) from notes where delivered_at is not null";
    let delivered: i64 = sqlx::query_scalar(delivered).fetch_one(&db.pool).await?;
    assert_eq!(delivered, 1, "the job delivered the note");
    Ok(())
}

/// Fails its first attempt, then enqueues `then` more of itself (each
/// enqueuing none), in its own transaction.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Chain {
    then: u32,
}

impl Job for Chain {
    const NAME: &'static str = "testing_test_chain";
    type Context = PgPool;
    type Output = u32;

    async fn run(self, job: JobContext<'_, PgPool>) -> Result<u32, JobError> {
        if job.attempt() == 1 {
            return Err(JobError::retry("the first attempt fails"));
        }
        let mut tx = job.context().begin().await?;
        for _ in 0..self.then {
            durable_jobs::enqueue(&mut tx, &Chain { then: 0 }).await?;
        }
        tx.commit().await?;
        Ok(self.then)
    }
}

/// Dies at once, or sleeps for `sleep_millis` and succeeds.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Outcome {
    sleep_millis: u64,
    dies: bool,
}

impl Job for Outcome {
    const NAME: &'static str = "testing_test_outcome";
    type Context = PgPool;
    type Output = ();
    const TIMEOUT: Duration = Duration::from_secs(60);

    async fn run(self, _: JobContext<'_, PgPool>) -> Result<(), JobError> {
        if self.dies {
            return Err(JobError::fatal("dies as asked"));
        }
        tokio::time::sleep(Duration::from_millis(self.sleep_millis)).await;
        Ok(())
    }
}

fn registry() -> Registry<PgPool> {
    Registry::new().register::<Chain>().register::<Outcome>()
}

async fn enqueue<J: Job>(db: &TestDb, job: &J) -> anyhow::Result<String> {
    let mut tx = db.pool.begin().await?;
    let id = durable_jobs::enqueue(&mut tx, job).await?;
    tx.commit().await?;
    Ok(id.to_string())
}

#[tokio::test]
async fn a_drain_runs_retries_and_the_jobs_jobs_enqueue_until_the_queue_is_empty()
-> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let first = enqueue(&db, &Chain { then: 3 }).await?;
    let drained = testing::drain(&db.pool, registry(), db.pool.clone()).await?;
    assert!(drained.all_done(), "{drained:?}");
    let chain = drained.of(Chain::NAME);
    assert_eq!(
        chain.len(),
        4,
        "the first job and the three it enqueued: {drained:?}"
    );
    let first = drained.job(&first).expect("the first job ran");
    assert_eq!(first.attempts, 2, "retried at once");
    assert_eq!(first.result, Some(serde_json::json!(3)), "its output");
    let open: i64 = sqlx::query_scalar(
        "select count(*) from apalis.job_states where state not in ('done', 'dead')",
    )
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(open, 0, "nothing left to run");
    Ok(())
}

#[tokio::test]
async fn a_drain_reports_a_dead_job_with_its_error() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let dead = enqueue(
        &db,
        &Outcome {
            sleep_millis: 0,
            dies: true,
        },
    )
    .await?;
    let drained = testing::drain(&db.pool, registry(), db.pool.clone()).await?;
    assert!(!drained.all_done());
    let ran = drained.dead();
    assert_eq!(ran.len(), 1, "{drained:?}");
    assert_eq!(ran[0].id, dead);
    assert_eq!(ran[0].error.as_deref(), Some("dies as asked"));
    Ok(())
}

#[tokio::test]
async fn a_drain_past_its_deadline_names_each_unfinished_job() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let slow = enqueue(
        &db,
        &Outcome {
            sleep_millis: 30_000,
            dies: false,
        },
    )
    .await?;
    let started = tokio::time::Instant::now();
    let drained = testing::Drain::new(registry(), db.pool.clone())
        // Long enough for the job to be claimed on a loaded machine (at
        // 0.5 s it was once still pending); far short of its 30 s.
        .deadline(Duration::from_secs(3))
        .run(&db.pool)
        .await;
    let Err(Error::Unfinished { after, jobs }) = drained else {
        panic!("the drain gives up: {drained:?}");
    };
    assert_eq!(after, Duration::from_secs(3));
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert!(
        jobs[0].starts_with(&format!("{slow} {} ", Outcome::NAME))
            && (jobs[0].contains("running") || jobs[0].contains("claimed")),
        "{jobs:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "it stopped its worker within the shutdown grace"
    );
    Ok(())
}

#[tokio::test]
async fn a_drain_until_one_job_ends_returns_while_others_still_run() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    enqueue(
        &db,
        &Outcome {
            sleep_millis: 30_000,
            dies: false,
        },
    )
    .await?;
    let quick = enqueue(
        &db,
        &Outcome {
            sleep_millis: 0,
            dies: false,
        },
    )
    .await?;
    let drained = testing::Drain::new(registry(), db.pool.clone())
        .until(&quick)
        .deadline(Duration::from_secs(20))
        .run(&db.pool)
        .await?;
    assert_eq!(drained.jobs.len(), 1, "{drained:?}");
    assert_eq!(drained.jobs[0].id, quick);
    assert_eq!(drained.jobs[0].state, "done");
    Ok(())
}

#[tokio::test]
async fn enqueued_sees_a_transactions_own_uncommitted_jobs_and_nobody_else_does()
-> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let mut tx = db.pool.begin().await?;
    durable_jobs::enqueue(&mut tx, &Chain { then: 1 }).await?;
    durable_jobs::enqueue(&mut tx, &Chain { then: 2 }).await?;
    durable_jobs::enqueue(
        &mut tx,
        &Outcome {
            sleep_millis: 0,
            dies: false,
        },
    )
    .await?;
    assert_eq!(
        testing::enqueued::<Chain>(&mut *tx).await?,
        [Chain { then: 1 }, Chain { then: 2 }],
        "of the type asked, oldest first"
    );
    assert!(
        testing::enqueued::<Chain>(&db.pool).await?.is_empty(),
        "not committed yet"
    );
    tx.commit().await?;
    assert_eq!(testing::enqueued::<Chain>(&db.pool).await?.len(), 2);
    // Run, they are no longer waiting.
    testing::drain(&db.pool, registry(), db.pool.clone()).await?;
    assert!(testing::enqueued::<Outcome>(&db.pool).await?.is_empty());
    Ok(())
}
