//! Flow control: delays, priorities, paused queues and limits that hold
//! across every worker process, enforced in the claim.

use std::time::Duration;

use durable_jobs::{Enqueue, Limits, Rate, Registry, admin};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::{
    jobs::{Limited, Record, create_runs_table},
    support::{DEFAULT_RESERVE, POOL_SIZE, Process, TestDb, fast_config, fast_env},
};

fn start(
    db: &TestDb,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<Result<(), durable_jobs::Error>>,
) {
    let shutdown = CancellationToken::new();
    let registry = Registry::new().register::<Record>().register::<Limited>();
    let worker = tokio::spawn(
        durable_jobs::Worker::new(db.pool.clone(), registry, db.pool.clone())
            .config(fast_config())
            .run(shutdown.clone()),
    );
    (shutdown, worker)
}

async fn enqueue_limited(pool: &PgPool, jobs: &[Limited], options: Enqueue) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    durable_jobs::enqueue_many_with(&mut tx, jobs, options).await?;
    tx.commit().await?;
    Ok(())
}

fn limited(tenant: &str, n: u32, sleep_millis: u64) -> Limited {
    Limited {
        tenant: tenant.to_owned(),
        n,
        sleep_millis,
    }
}

/// The most runs in progress at once, from the runs' start and end times.
async fn peak_overlap(pool: &PgPool, key_like: &str) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "select coalesce(max(overlap), 0) from (
             select (select count(*) from engine_test_runs b
                     where b.key like $1 and b.started_at <= a.started_at
                       and coalesce(b.finished_at, 'infinity') > a.started_at) as overlap
             from engine_test_runs a where a.key like $1) as per_start",
    )
    .bind(key_like)
    .fetch_one(pool)
    .await?)
}

async fn runs_done(pool: &PgPool, key_like: &str) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "select count(*) from engine_test_runs where key like $1 and finished_at is not null",
    )
    .bind(key_like)
    .fetch_one(pool)
    .await?)
}

#[tokio::test]
async fn a_declared_concurrency_limit_holds_across_three_worker_processes() -> anyhow::Result<()> {
    // Ours, and three worker processes (each a pool of 11, bookkeeping 6).
    let db = TestDb::reserving(POOL_SIZE + 3 * 17, POOL_SIZE).await?;
    create_runs_table(&db.pool).await?;
    let env = fast_env();
    let mut workers = Vec::new();
    for _ in 0..3 {
        workers.push(Process::started_worker(&db, &env).await?);
    }
    let jobs: Vec<Limited> = (0..30).map(|n| limited(&format!("t{n}"), n, 150)).collect();
    enqueue_limited(&db.pool, &jobs, Enqueue::new()).await?;
    db.wait_until_idle(Duration::from_secs(60)).await?;
    let peak = peak_overlap(&db.pool, "%").await?;
    let done = runs_done(&db.pool, "%").await?;
    println!("30 jobs of 150 ms on 3 processes, declared concurrency 3: peak {peak} at once");
    assert_eq!(done, 30);
    assert!(
        peak <= 3,
        "the limit of 3 held across processes: peak {peak}"
    );
    assert_eq!(peak, 3, "and the queue used it");
    for worker in workers {
        assert!(worker.terminate(Duration::from_secs(30)).await?.success());
    }
    Ok(())
}

#[tokio::test]
async fn a_paused_queue_starts_nothing_until_resumed() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    create_runs_table(&db.pool).await?;
    admin::pause(&db.pool, <Limited as durable_jobs::Job>::NAME).await?;
    assert!(
        admin::queue_controls_of(&db.pool, <Limited as durable_jobs::Job>::NAME)
            .await?
            .paused
    );
    let (shutdown, worker) = start(&db);
    let jobs: Vec<Limited> = (0..5).map(|n| limited("p", n, 10)).collect();
    enqueue_limited(&db.pool, &jobs, Enqueue::new()).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(runs_done(&db.pool, "%").await?, 0, "paused: nothing ran");
    admin::resume(&db.pool, <Limited as durable_jobs::Job>::NAME).await?;
    db.wait_until_idle(Duration::from_secs(30)).await?;
    assert_eq!(runs_done(&db.pool, "%").await?, 5, "resumed: all ran");
    shutdown.cancel();
    worker.await??;
    Ok(())
}

#[tokio::test]
async fn with_key_concurrency_a_key_with_one_job_is_not_starved_by_one_with_twenty()
-> anyhow::Result<()> {
    let db = TestDb::new().await?;
    create_runs_table(&db.pool).await?;
    // One per tenant, two at once in all.
    admin::set_limits(
        &db.pool,
        <Limited as durable_jobs::Job>::NAME,
        Limits::none().concurrency(2).key_concurrency(1),
    )
    .await?;
    let big: Vec<Limited> = (0..20).map(|n| limited("big", n, 100)).collect();
    enqueue_limited(&db.pool, &big, Enqueue::new()).await?;
    enqueue_limited(&db.pool, &[limited("small", 0, 100)], Enqueue::new()).await?;
    let (shutdown, worker) = start(&db);
    db.wait_until_idle(Duration::from_secs(60)).await?;
    shutdown.cancel();
    worker.await??;
    let big_peak = peak_overlap(&db.pool, "big/%").await?;
    // How many of big's jobs started before small's one.
    let big_before: i64 = sqlx::query_scalar(
        "select count(*) from engine_test_runs where key like 'big/%'
         and started_at < (select started_at from engine_test_runs where key = 'small/0')",
    )
    .fetch_one(&db.pool)
    .await?;
    println!("big's peak {big_peak}; big's jobs started before small's: {big_before}");
    assert_eq!(big_peak, 1, "one of big's at a time");
    assert!(
        big_before <= 1,
        "small's job went in the first round: {big_before} of big's before it"
    );
    Ok(())
}

#[tokio::test]
async fn a_rate_limit_spaces_the_starts() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    create_runs_table(&db.pool).await?;
    admin::set_limits(
        &db.pool,
        <Limited as durable_jobs::Job>::NAME,
        Limits::none().rate(Rate::per_second(5.0).burst(1)),
    )
    .await?;
    let jobs: Vec<Limited> = (0..8).map(|n| limited(&format!("r{n}"), n, 1)).collect();
    enqueue_limited(&db.pool, &jobs, Enqueue::new()).await?;
    let (shutdown, worker) = start(&db);
    db.wait_until_idle(Duration::from_secs(60)).await?;
    shutdown.cancel();
    worker.await??;
    let span: f64 = sqlx::query_scalar(
        "select extract(epoch from max(started_at) - min(started_at))::float8 from engine_test_runs",
    )
    .fetch_one(&db.pool)
    .await?;
    println!("8 starts at 5/s, burst 1: over {span:.2} s");
    // 7 gaps of 0.2 s: 1.4 s at least (a poll late, more).
    assert!(span >= 1.3, "starts spaced by the rate: {span:.2} s");
    Ok(())
}

#[tokio::test]
async fn a_delayed_job_is_scheduled_until_due_and_priority_orders_the_claims() -> anyhow::Result<()>
{
    let db = TestDb::reserving(DEFAULT_RESERVE, POOL_SIZE).await?;
    create_runs_table(&db.pool).await?;
    let (shutdown, worker) = start(&db);
    let enqueued = chrono::Utc::now();
    enqueue_limited(
        &db.pool,
        &[limited("later", 0, 1)],
        Enqueue::new().delay(Duration::from_millis(1500)),
    )
    .await?;
    let state: String =
        sqlx::query_scalar("select state from apalis.job_states where job_type = $1")
            .bind(<Limited as durable_jobs::Job>::NAME)
            .fetch_one(&db.pool)
            .await?;
    assert_eq!(state, "scheduled");
    db.wait_until_idle(Duration::from_secs(30)).await?;
    let started: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("select started_at from engine_test_runs where key = 'later/0'")
            .fetch_one(&db.pool)
            .await?;
    let after = (started - enqueued).to_std()?;
    println!("delayed 1.5 s: started after {after:?}");
    assert!(
        after >= Duration::from_millis(1500),
        "not before it was due: {after:?}"
    );
    assert!(after < Duration::from_secs(5), "woken when due: {after:?}");

    // Priority: with one at a time, the high one waiting behind low ones runs first.
    admin::pause(&db.pool, <Limited as durable_jobs::Job>::NAME).await?;
    admin::set_limits(
        &db.pool,
        <Limited as durable_jobs::Job>::NAME,
        Limits::none().concurrency(1),
    )
    .await?;
    let low: Vec<Limited> = (0..3).map(|n| limited("low", n, 20)).collect();
    enqueue_limited(&db.pool, &low, Enqueue::new()).await?;
    enqueue_limited(
        &db.pool,
        &[limited("high", 0, 20)],
        Enqueue::new().priority(5),
    )
    .await?;
    admin::resume(&db.pool, <Limited as durable_jobs::Job>::NAME).await?;
    db.wait_until_idle(Duration::from_secs(30)).await?;
    let order: Vec<String> = sqlx::query_scalar(
        "select key from engine_test_runs where key <> 'later/0' order by started_at",
    )
    .fetch_all(&db.pool)
    .await?;
    assert_eq!(
        order.first().map(String::as_str),
        Some("high/0"),
        "{order:?}"
    );
    shutdown.cancel();
    worker.await??;
    Ok(())
}

#[tokio::test]
async fn purge_ends_waiting_jobs_and_leaves_running_ones() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    create_runs_table(&db.pool).await?;
    admin::set_limits(
        &db.pool,
        <Limited as durable_jobs::Job>::NAME,
        Limits::none().concurrency(1),
    )
    .await?;
    let jobs: Vec<Limited> = (0..4).map(|n| limited("x", n, 1500)).collect();
    enqueue_limited(&db.pool, &jobs, Enqueue::new()).await?;
    let (shutdown, worker) = start(&db);
    crate::support::wait_until(Duration::from_secs(20), "one job started", || async {
        Ok(
            sqlx::query_scalar::<_, i64>("select count(*) from engine_test_runs")
                .fetch_one(&db.pool)
                .await?
                == 1,
        )
    })
    .await?;
    let purged = admin::purge(&db.pool, <Limited as durable_jobs::Job>::NAME).await?;
    assert_eq!(purged, 3, "the three waiting");
    db.wait_until_idle(Duration::from_secs(30)).await?;
    let statuses: Vec<(String, i64)> = sqlx::query_as(
        "select status, count(*) from apalis.jobs where job_type = $1 group by status order by status",
    )
    .bind(<Limited as durable_jobs::Job>::NAME)
    .fetch_all(&db.pool)
    .await?;
    assert_eq!(statuses, [("Done".to_owned(), 1), ("Killed".to_owned(), 3)]);
    shutdown.cancel();
    worker.await??;
    Ok(())
}
