//! The worker runtime: unknown job types, uniqueness under concurrency,
//! settles, wake-ups, bad rows, and the quickstart example as a process.

use std::time::Duration;

use crate::support::{Process, TestDb, example, fast_config, wait_until};
use anyhow::Context as _;
use durable_jobs::{Job, JobContext, JobError, Merge, Registry, Unique};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Succeeds at once.
#[derive(Debug, Serialize, Deserialize)]
struct Noop;

impl Job for Noop {
    const NAME: &'static str = "engine_test_noop";
    type Context = PgPool;
    type Output = ();

    async fn run(self, _: JobContext<'_, PgPool>) -> Result<(), JobError> {
        Ok(())
    }
}

/// Fails its first attempt, then succeeds.
#[derive(Debug, Serialize, Deserialize)]
struct FailsOnce;

impl Job for FailsOnce {
    const NAME: &'static str = "engine_test_fails_once";
    type Context = PgPool;
    type Output = ();

    async fn run(self, job: JobContext<'_, PgPool>) -> Result<(), JobError> {
        if job.attempt() == 1 {
            return Err(JobError::retry("the first attempt fails"));
        }
        Ok(())
    }
}

/// At most one pending per key; the greatest `n` wins.
#[derive(Debug, Serialize, Deserialize)]
struct Latest {
    n: u32,
}

impl Job for Latest {
    const NAME: &'static str = "engine_test_latest";
    type Context = PgPool;
    type Output = ();

    fn unique(&self) -> Option<Unique> {
        Some(Unique::key("the-one").merge(Merge::KeepGreatest {
            order: format!("{:010}", self.n),
        }))
    }

    async fn run(self, _: JobContext<'_, PgPool>) -> Result<(), JobError> {
        Ok(())
    }
}

/// Runs a worker for `registry` on `db` until the returned token is cancelled.
fn start(
    db: &TestDb,
    registry: Registry<PgPool>,
    config: durable_jobs::WorkerConfig,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<Result<(), durable_jobs::Error>>,
) {
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(
        durable_jobs::Worker::new(db.pool.clone(), registry, db.pool.clone())
            .config(config)
            .run(shutdown.clone()),
    );
    (shutdown, worker)
}

#[tokio::test]
async fn a_registered_job_type_is_never_reaped_as_unknown() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let mut tx = db.pool.begin().await?;
    let ours = durable_jobs::enqueue(&mut tx, &Noop).await?.to_string();
    tx.commit().await?;
    // A job of a type this registry does not have, waiting long past the grace.
    let stranger: String = sqlx::query_scalar(
        "insert into apalis.jobs (id, job_type, job, status, max_attempts, run_at)
         values (apalis.generate_ulid(), 'engine_test_stranger', '\\x6e756c6c', 'Pending', 3,
                 now() - interval '1 hour')
         returning id",
    )
    .fetch_one(&db.pool)
    .await?;
    sqlx::query("update apalis.jobs set run_at = now() - interval '1 hour' where id = $1")
        .bind(&ours)
        .execute(&db.pool)
        .await?;

    let config = durable_jobs::WorkerConfig {
        unknown_grace: Duration::ZERO,
        ..fast_config()
    };
    let (shutdown, worker) = start(&db, Registry::new().register::<Noop>(), config);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while db.job_outcome(&stranger).await?.0 != "Killed" || db.job_outcome(&ours).await?.0 != "Done"
    {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "ours {:?}, stranger {:?}",
            db.job_outcome(&ours).await?,
            db.job_outcome(&stranger).await?
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reason = db.job_outcome(&stranger).await?.1.unwrap_or_default();
    assert!(
        reason.starts_with("no worker handles job type engine_test_stranger:")
            && reason.contains("engine_test_noop"),
        "the reason names the type and the types the fleet handles: {reason}"
    );
    shutdown.cancel();
    worker.await??;
    Ok(())
}

/// Inserts `count` pending jobs of `job_type` that have been due for two
/// hours (past the default grace of one); returns their ids.
async fn long_due_jobs(db: &TestDb, job_type: &str, count: i64) -> anyhow::Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "insert into apalis.jobs (id, job_type, job, status, max_attempts, run_at)
         select apalis.generate_ulid(), $1, '\\x6e756c6c', 'Pending', 3, now() - interval '2 hours'
         from generate_series(1, $2)
         returning id",
    )
    .bind(job_type)
    .bind(count)
    .fetch_all(&db.pool)
    .await?)
}

/// Waits until every job of `ids` has `status`.
async fn wait_for_all(db: &TestDb, ids: &[String], status: &str) -> anyhow::Result<()> {
    for id in ids {
        db.wait_for_status(id, status, Duration::from_secs(30))
            .await?;
    }
    Ok(())
}

#[tokio::test]
async fn two_run_calls_in_one_process_keep_each_others_long_waiting_jobs() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    // The other service: its run registers its worker, then stops (down, but
    // seen within the grace).
    let (other, other_run) = start(&db, Registry::new().register::<FailsOnce>(), fast_config());
    let give_up = tokio::time::Instant::now() + Duration::from_secs(30);
    while sqlx::query_scalar::<_, i64>("select count(*) from apalis.workers where worker_type = $1")
        .bind(FailsOnce::NAME)
        .fetch_one(&db.pool)
        .await?
        == 0
    {
        anyhow::ensure!(
            tokio::time::Instant::now() < give_up,
            "the other run never registered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    other.cancel();
    other_run.await??;
    // Its backlog has been due for two hours, longer than the grace.
    let theirs = long_due_jobs(&db, FailsOnce::NAME, 5).await?;
    // A type whose worker was last seen two hours ago, and one nobody ever ran.
    sqlx::query(
        "insert into apalis.workers (id, worker_type, storage_name, layers, last_seen)
         values ('gone@host-1-1-0', 'engine_test_retired', 'PgStorage', '', now() - interval '2 hours')",
    )
    .execute(&db.pool)
    .await?;
    let retired = long_due_jobs(&db, "engine_test_retired", 2).await?;
    let stranger = long_due_jobs(&db, "engine_test_stranger", 1).await?;

    // This service's run, with the default grace (an hour).
    let (shutdown, worker) = start(&db, Registry::new().register::<Noop>(), fast_config());
    wait_for_all(&db, &stranger, "Killed").await?;
    wait_for_all(&db, &retired, "Killed").await?;
    for id in &theirs {
        assert_eq!(
            db.job_outcome(id).await?,
            ("Pending".to_owned(), None),
            "the other service's job {id} is left alone"
        );
    }
    let reason = db.job_outcome(&stranger[0]).await?.1.unwrap_or_default();
    assert!(
        reason.contains("engine_test_stranger")
            && reason.contains("engine_test_noop")
            && reason.contains(FailsOnce::NAME)
            && !reason.contains("engine_test_retired,"),
        "the reason names the types the fleet handles: {reason}"
    );
    shutdown.cancel();
    worker.await??;
    Ok(())
}

/// Enqueues a `Noop` whose attempt was lost a day ago (running, claimed by
/// a worker that is gone): the next upkeep round returns it.
async fn lose_an_attempt(db: &TestDb) -> anyhow::Result<String> {
    let mut tx = db.pool.begin().await?;
    let lost = durable_jobs::enqueue(&mut tx, &Noop).await?.to_string();
    tx.commit().await?;
    sqlx::query(
        "update apalis.jobs set status = 'Running', lock_by = 'gone', lock_at = now() - interval '1 day',
                                attempts = 0
         where id = $1",
    )
    .bind(&lost)
    .execute(&db.pool)
    .await?;
    Ok(lost)
}

#[tokio::test]
async fn the_unknown_type_reaper_can_be_turned_off() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let stranger = long_due_jobs(&db, "engine_test_stranger", 1).await?;
    // An attempt lost long ago: the upkeep round that returns it is the one
    // that would also have killed the stranger.
    let lost = lose_an_attempt(&db).await?;
    let config = durable_jobs::WorkerConfig {
        unknown_grace: Duration::ZERO,
        kill_unhandled: false,
        ..fast_config()
    };
    let (shutdown, worker) = start(&db, Registry::new().register::<Noop>(), config);
    db.wait_for_status(&lost, "Done", Duration::from_secs(30))
        .await?;
    // The reaper would have run right after that round: once the next round
    // has returned another lost attempt, that one is over.
    let next = lose_an_attempt(&db).await?;
    db.wait_for_status(&next, "Done", Duration::from_secs(30))
        .await?;
    assert_eq!(db.job_outcome(&stranger[0]).await?.0, "Pending");
    shutdown.cancel();
    worker.await??;
    Ok(())
}

#[tokio::test]
async fn two_hundred_concurrent_enqueues_of_one_key_leave_one_pending_job_with_the_greatest()
-> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let enqueues: Vec<_> = (0..200u32)
        .map(|n| {
            let pool = db.pool.clone();
            tokio::spawn(async move {
                let mut tx = pool.begin().await?;
                let id = durable_jobs::enqueue(&mut tx, &Latest { n }).await?;
                tx.commit().await?;
                anyhow::Ok(id)
            })
        })
        .collect();
    let mut ids = Vec::new();
    for enqueue in enqueues {
        ids.push(enqueue.await??);
    }
    ids.dedup();
    let pending: Vec<(String, serde_json::Value)> = sqlx::query_as(
        "select id, convert_from(job, 'UTF8')::jsonb from apalis.jobs where job_type = $1",
    )
    .bind(Latest::NAME)
    .fetch_all(&db.pool)
    .await?;
    assert_eq!(pending.len(), 1, "one pending job: {pending:?}");
    assert_eq!(ids.len(), 1, "every enqueue answered the same job");
    assert_eq!(pending[0].0, ids[0].to_string());
    assert_eq!(
        pending[0].1,
        serde_json::json!({"n": 199}),
        "the greatest wins"
    );
    Ok(())
}

#[tokio::test]
async fn a_failed_attempt_is_settled_in_one_write_with_its_acknowledgement() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    // Every write to the job's row, as the row changes.
    sqlx::raw_sql(
        "create table job_writes (
             n bigint generated always as identity, id text,
             old_status text, new_status text, old_attempts int, new_attempts int,
             old_run_at timestamptz, new_run_at timestamptz);
         create function log_job_write() returns trigger language plpgsql as $$
         begin
             insert into job_writes (id, old_status, new_status, old_attempts, new_attempts, old_run_at, new_run_at)
             values (new.id, old.status, new.status, old.attempts, new.attempts, old.run_at, new.run_at);
             return new;
         end $$;
         create trigger log_job_write after update on apalis.jobs
             for each row execute function log_job_write();",
    )
    .execute(&db.pool)
    .await?;
    let mut tx = db.pool.begin().await?;
    let id = durable_jobs::enqueue(&mut tx, &FailsOnce)
        .await?
        .to_string();
    tx.commit().await?;

    let (shutdown, worker) = start(&db, Registry::new().register::<FailsOnce>(), fast_config());
    db.wait_for_status(&id, "Done", Duration::from_secs(20))
        .await?;
    shutdown.cancel();
    worker.await??;

    type Write = (String, String, i32, i32, bool);
    let writes: Vec<Write> = sqlx::query_as(
        "select old_status, new_status, old_attempts, new_attempts, new_run_at > old_run_at
         from job_writes where id = $1 order by n",
    )
    .bind(&id)
    .fetch_all(&db.pool)
    .await?;
    let failing: Vec<&Write> = writes
        .iter()
        .take_while(|w| !(w.0 == "Failed" && w.1 == "Queued"))
        .filter(|w| w.0 != "Pending")
        .collect();
    // Claimed (Pending -> Queued, left out), then the start mark (Queued ->
    // Running, unless it went in the same round), then one write that ends
    // the attempt: Failed, attempt 1, run_at pushed out by the backoff.
    let settle = failing.last().expect("the failed attempt was written");
    assert_eq!(
        (settle.1.as_str(), settle.3, settle.4),
        ("Failed", 1, true),
        "the acknowledgement carries the backoff: {writes:?}"
    );
    assert!(
        failing.len() <= 2
            && failing
                .iter()
                .all(|w| w.1 == "Failed" || (w.0 == "Queued" && w.1 == "Running")),
        "one write settles the failure, no other touches the row: {writes:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_retry_starts_within_a_poll_of_falling_due_not_at_the_next_heartbeat()
-> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let mut tx = db.pool.begin().await?;
    let id = durable_jobs::enqueue(&mut tx, &FailsOnce)
        .await?
        .to_string();
    tx.commit().await?;
    // Heartbeats every 20 s (a third of the lease); the retry is due 0.2 s
    // after the failure, and the poll runs every 0.1 s: the queue's own poll
    // or the due-job waker (which wakes every process's workers on the same
    // interval) starts it, well before a heartbeat. With two job types in one
    // process, apalis's poll interval alone once did not wake the worker.
    let config = durable_jobs::WorkerConfig {
        lease: Duration::from_secs(60),
        poll_interval: Duration::from_millis(100),
        ..fast_config()
    };
    let registry = Registry::new().register::<FailsOnce>().register::<Noop>();
    let (shutdown, worker) = start(&db, registry, config);
    let took = db
        .wait_for_status(&id, "Done", Duration::from_secs(15))
        .await
        .context("the retry waited for a heartbeat (20 s)")?;
    println!("failed, retried and done in {took:?}");
    shutdown.cancel();
    worker.await??;
    Ok(())
}

#[tokio::test]
async fn the_quickstart_example_runs_as_a_process_and_its_job_completes() -> anyhow::Result<()> {
    // The example's own pool (10) and bookkeeping (5), and ours.
    let db = TestDb::reserving(20, crate::support::POOL_SIZE).await?;
    let mut command = tokio::process::Command::new(example("quickstart")?);
    command
        .env("DATABASE_URL", &db.url)
        .env("BIND", "127.0.0.1:0")
        .env("RUST_LOG", "info");
    let mut app = Process::start("quickstart", command)?;
    let line = app
        .wait_for_line("quickstart: http://", Duration::from_secs(60))
        .await?;
    let url = line.trim_start_matches("quickstart: ").trim().to_owned();

    let page = reqwest::get(&url).await?;
    assert_eq!(page.status(), 200);
    let text = page.text().await?;
    assert!(text.contains("written; job"), "{text}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (delivered, done): (bool, bool) = sqlx::query_as(
            "select (select bool_and(delivered_at is not null) from notes),
                    (select bool_and(status = 'Done') from apalis.jobs where job_type = 'deliver_note')",
        )
        .fetch_one(&db.pool)
        .await?;
        if delivered && done {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the note was not delivered:\n{}",
            app.output().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let dashboard = reqwest::get(format!("{url}jobs")).await?;
    assert_eq!(dashboard.status(), 200);
    let dashboard = dashboard.text().await?;
    assert!(
        dashboard.contains(r#"data-queue="deliver_note""#),
        "the dashboard lists the queue: {dashboard}"
    );
    assert!(app.terminate(Duration::from_secs(30)).await?.success());
    Ok(())
}

#[tokio::test]
async fn a_dead_job_retried_by_an_operator_runs_at_once() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    // Heartbeats every 20 s and polls (with the due-job wake-up) every hour:
    // only the retry's own notification can start it soon.
    let config = durable_jobs::WorkerConfig {
        lease: Duration::from_secs(60),
        poll_interval: Duration::from_secs(3600),
        ..fast_config()
    };
    let registry = Registry::new().register::<Noop>().register::<FailsOnce>();
    let (shutdown, worker) = start(&db, registry, config);
    // The worker is up, and parked on an empty queue: it ran a first job
    // (woken by its insert), and the process listens.
    let mut tx = db.pool.begin().await?;
    let id = durable_jobs::enqueue(&mut tx, &Noop).await?.to_string();
    tx.commit().await?;
    db.wait_for_status(&id, "Done", Duration::from_secs(20))
        .await?;
    wait_until(
        Duration::from_secs(20),
        "the worker never listened",
        || async {
            Ok(sqlx::query_scalar::<_, bool>(
                "select exists (select 1 from pg_stat_activity
                            where datname = current_database() and query ilike 'listen%')",
            )
            .fetch_one(&db.pool)
            .await?)
        },
    )
    .await?;
    sqlx::query(
        "update apalis.jobs set status = 'Killed', attempts = 20, done_at = now() where id = $1",
    )
    .bind(&id)
    .execute(&db.pool)
    .await?;
    durable_jobs::admin::retry(&db.pool, &id).await?;
    let took = db
        .wait_for_status(&id, "Done", Duration::from_secs(10))
        .await
        .context("the retried job waited")?;
    println!("retried job done {took:?} after the retry");
    shutdown.cancel();
    worker.await??;
    Ok(())
}

#[tokio::test]
async fn a_row_that_breaks_a_constraint_ends_alone_and_its_queue_keeps_running()
-> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let mut tx = db.pool.begin().await?;
    let mut ids = Vec::new();
    for _ in 0..12 {
        ids.push(durable_jobs::enqueue(&mut tx, &Noop).await?.to_string());
    }
    tx.commit().await?;
    let (unchangeable, unclaimable, good) = (&ids[0], &ids[1], &ids[2..]);
    // Every new version of this row breaks a check added NOT VALID over it:
    // it cannot be claimed, nor marked dead.
    sqlx::query("update apalis.jobs set max_attempts = 100, run_at = now() - interval '1 minute' where id = $1")
        .bind(unchangeable)
        .execute(&db.pool)
        .await?;
    sqlx::query("alter table apalis.jobs add constraint at_most_25_attempts check (max_attempts <= 25) not valid")
        .execute(&db.pool)
        .await?;
    // This one breaks a check only once claimed (and comes first: higher priority).
    sqlx::query("update apalis.jobs set priority = 5 where id = $1")
        .bind(unclaimable)
        .execute(&db.pool)
        .await?;
    sqlx::query(
        "alter table apalis.jobs add constraint no_claimed_priority_5
         check (priority <> 5 or status <> 'Queued')",
    )
    .execute(&db.pool)
    .await?;

    let (shutdown, worker) = start(&db, Registry::new().register::<Noop>(), fast_config());
    for id in good {
        db.wait_for_status(id, "Done", Duration::from_secs(20))
            .await?;
    }
    let (status, reason) = db.job_outcome(unclaimable).await?;
    assert_eq!(status, "Killed");
    let reason = reason.unwrap_or_default();
    assert!(
        reason.starts_with("job row cannot be claimed") && reason.contains("no_claimed_priority_5"),
        "{reason}"
    );
    let quarantined: (i64, String) = sqlx::query_as(
        "select (select count(*) from apalis.jobs where id = $1),
                (select reason from apalis.quarantined_jobs where id = $1)",
    )
    .bind(unchangeable)
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(quarantined.0, 0, "moved out of the queue");
    assert!(
        quarantined.1.contains("at_most_25_attempts"),
        "{}",
        quarantined.1
    );
    // New jobs of the queue still run.
    let mut tx = db.pool.begin().await?;
    let later = durable_jobs::enqueue(&mut tx, &Noop).await?.to_string();
    tx.commit().await?;
    db.wait_for_status(&later, "Done", Duration::from_secs(20))
        .await?;
    shutdown.cancel();
    worker.await??;
    Ok(())
}
