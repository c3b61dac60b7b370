//! Flow control: delays, priorities, paused queues and limits that hold
//! across every worker process, enforced in the claim.

use std::time::Duration;

use chrono::{DateTime, Utc};
use durable_jobs::{Enqueue, Job as _, Limits, Rate, WorkerConfig, admin};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::{
    jobs::{Aging, Limited, Record, Snoozing, create_runs_table},
    support::{
        POOL_SIZE, Process, TestDb, default_reserve, enqueue, fast_config, fast_env,
        process_connections, wait_until,
    },
};

pub(crate) type Running = (
    CancellationToken,
    tokio::task::JoinHandle<Result<(), durable_jobs::Error>>,
);

fn start(db: &TestDb) -> Running {
    start_with(db, fast_config())
}

pub(crate) fn start_with(db: &TestDb, config: WorkerConfig) -> Running {
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(
        durable_jobs::Worker::new(db.pool.clone(), crate::jobs::registry(), db.pool.clone())
            .config(config)
            .run(shutdown.clone()),
    );
    (shutdown, worker)
}

pub(crate) async fn stop((shutdown, worker): Running) -> anyhow::Result<()> {
    shutdown.cancel();
    worker.await??;
    Ok(())
}

const LIMITED: &str = Limited::NAME;

/// The database's clock (the runs' times are the database's).
pub(crate) async fn db_now(pool: &PgPool) -> anyhow::Result<DateTime<Utc>> {
    Ok(sqlx::query_scalar("select clock_timestamp()")
        .fetch_one(pool)
        .await?)
}

/// The runs' start times under `key_like`, in order.
async fn starts(pool: &PgPool, key_like: &str) -> anyhow::Result<Vec<DateTime<Utc>>> {
    Ok(sqlx::query_scalar(
        "select started_at from engine_test_runs where key like $1 order by started_at",
    )
    .bind(key_like)
    .fetch_all(pool)
    .await?)
}

/// The runs' keys under `key_like`, in the order they started.
async fn start_order(pool: &PgPool, key_like: &str) -> anyhow::Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "select key from engine_test_runs where key like $1 order by started_at, id",
    )
    .bind(key_like)
    .fetch_all(pool)
    .await?)
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
    peak_overlap_by(pool, key_like, false).await
}

/// The most runs of one key (`<tenant>/…`) in progress at once.
async fn peak_overlap_per_key(pool: &PgPool, key_like: &str) -> anyhow::Result<i64> {
    peak_overlap_by(pool, key_like, true).await
}

async fn peak_overlap_by(pool: &PgPool, key_like: &str, per_key: bool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "select coalesce(max(overlap), 0) from (
             select (select count(*) from engine_test_runs b
                     where b.key like $1 and b.started_at <= a.started_at
                       and coalesce(b.finished_at, 'infinity') > a.started_at
                       and (not $2 or split_part(b.key, '/', 1) = split_part(a.key, '/', 1)))
                    as overlap
             from engine_test_runs a where a.key like $1) as per_start",
    )
    .bind(key_like)
    .bind(per_key)
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

/// Whether some window of the starts holds more than `rate · t + burst`
/// starts (t the window's length). Starts are the jobs' own records, a few
/// milliseconds after their claims took the tokens: each window is given
/// `jitter` more.
fn worst_window(starts: &[DateTime<Utc>], rate: f64, burst: f64, jitter: f64) -> Option<String> {
    for (i, first) in starts.iter().enumerate() {
        for (j, last) in starts.iter().enumerate().skip(i) {
            let t = (*last - *first).as_seconds_f64();
            let count = (j - i + 1) as f64;
            if count > rate * (t + jitter) + burst {
                return Some(format!("{count} starts within {t:.3} s"));
            }
        }
    }
    None
}

#[tokio::test]
async fn limits_hold_across_three_worker_processes_concurrency_rate_and_key() -> anyhow::Result<()>
{
    // Ours, and three worker processes (each a pool of 11, bookkeeping 6).
    let db = TestDb::reserving(POOL_SIZE + 3 * process_connections(), POOL_SIZE).await?;
    create_runs_table(&db.pool).await?;
    let env = fast_env();
    let mut workers = Vec::new();
    for _ in 0..3 {
        workers.push(Process::started_worker(&db, &env).await?);
    }

    // Declared concurrency(4), 12 slots in the three processes.
    let jobs: Vec<Limited> = (0..300).map(|n| limited(&format!("c{n}"), n, 50)).collect();
    enqueue_limited(&db.pool, &jobs, Enqueue::new()).await?;
    db.wait_until_idle(Duration::from_secs(120)).await?;
    let peak = peak_overlap(&db.pool, "c%").await?;
    println!("300 jobs of 50 ms on 3 processes, declared concurrency 4: peak {peak} at once");
    assert_eq!(runs_done(&db.pool, "c%").await?, 300);
    assert!(
        peak <= 4,
        "the limit of 4 held across processes: peak {peak}"
    );
    assert_eq!(peak, 4, "and the queue used it");

    // A token bucket of 10/s with a burst of 5, overriding the declared limit.
    admin::set_limits(
        &db.pool,
        LIMITED,
        Limits::none().rate(Rate::per_second(10.0).burst(5)),
    )
    .await?;
    let enqueued = db_now(&db.pool).await?;
    let jobs: Vec<Limited> = (0..100).map(|n| limited(&format!("r{n}"), n, 1)).collect();
    enqueue_limited(&db.pool, &jobs, Enqueue::new()).await?;
    db.wait_until_idle(Duration::from_secs(60)).await?;
    let rated = starts(&db.pool, "r%").await?;
    let took = (rated.last().copied().unwrap_or(enqueued) - enqueued).as_seconds_f64();
    println!("100 jobs at 10/s, burst 5, on 3 processes: the last started after {took:.2} s");
    assert_eq!(rated.len(), 100);
    if let Some(window) = worst_window(&rated, 10.0, 5.0, 0.05) {
        panic!("more than 10·t + 5 starts in a window: {window}");
    }
    assert!(took < 12.0, "the 100 ran within 12 s: {took:.2} s");

    // One at a time per key, 10 keys.
    admin::set_limits(&db.pool, LIMITED, Limits::none().key_concurrency(1)).await?;
    let jobs: Vec<Limited> = (0..50)
        .map(|n| limited(&format!("k{}", n % 10), n, 100))
        .collect();
    enqueue_limited(&db.pool, &jobs, Enqueue::new()).await?;
    db.wait_until_idle(Duration::from_secs(60)).await?;
    let per_key = peak_overlap_per_key(&db.pool, "k%").await?;
    let keys_at_once = peak_overlap(&db.pool, "k%").await?;
    println!("key concurrency 1, 10 keys: per key {per_key}, keys at once {keys_at_once}");
    assert_eq!(runs_done(&db.pool, "k%").await?, 50);
    assert_eq!(per_key, 1, "never two running jobs of one key");
    assert!(keys_at_once >= 3, "several keys at once: {keys_at_once}");
    for worker in workers {
        assert!(worker.terminate(Duration::from_secs(30)).await?.success());
    }
    Ok(())
}

#[tokio::test]
async fn a_worker_killed_holding_every_slot_keeps_them_until_its_lease_ends() -> anyhow::Result<()>
{
    let db = TestDb::reserving(POOL_SIZE + 2 * process_connections(), POOL_SIZE).await?;
    create_runs_table(&db.pool).await?;
    let env = fast_env(); // a lease of 3 s, a heartbeat a second
    let doomed = Process::started_worker(&db, &env).await?;
    let jobs: Vec<Limited> = (0..8).map(|n| limited("s", n, 1500)).collect();
    enqueue_limited(&db.pool, &jobs, Enqueue::new()).await?;
    wait_until(Duration::from_secs(20), "4 of 4 slots taken", || async {
        Ok(runs_done(&db.pool, "%").await? == 0 && starts(&db.pool, "%").await?.len() == 4)
    })
    .await?;
    // The survivor is up while the doomed one holds every slot: it claims nothing.
    let survivor = Process::started_worker(&db, &env).await?;
    let running: i64 =
        sqlx::query_scalar("select count(*) from engine_test_runs where finished_at is null")
            .fetch_one(&db.pool)
            .await?;
    anyhow::ensure!(
        running == 4,
        "{running} running at the kill, not 4: too slow a start-up"
    );
    doomed.signal(nix::sys::signal::Signal::SIGKILL)?;
    let killed = db_now(&db.pool).await?;
    db.wait_until_idle(Duration::from_secs(60)).await?;
    let next = sqlx::query_scalar::<_, DateTime<Utc>>(
        "select min(started_at) from engine_test_runs where started_at > $1",
    )
    .bind(killed)
    .fetch_one(&db.pool)
    .await?;
    let after = (next - killed).as_seconds_f64();
    println!("killed holding 4 of 4: the next job started {after:.2} s later");
    // Its last heartbeat came at most a second before the kill: its jobs
    // are its own until 2 s after it at the earliest.
    assert!(
        after >= 1.9,
        "a fifth job started {after:.2} s after the kill, before the lease ended"
    );
    let done: i64 = sqlx::query_scalar(
        "select count(*) from apalis.jobs where job_type = $1 and status = 'Done'",
    )
    .bind(LIMITED)
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(done, 8, "then they ran");
    assert!(survivor.terminate(Duration::from_secs(30)).await?.success());
    Ok(())
}

#[tokio::test]
async fn a_paused_queue_starts_nothing_until_resumed_then_at_once() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    create_runs_table(&db.pool).await?;
    admin::pause(&db.pool, LIMITED).await?;
    assert!(admin::queue_controls_of(&db.pool, LIMITED).await?.paused);
    // A poll interval of a minute: only the resume's wake-up can start them soon.
    let running = start_with(
        &db,
        WorkerConfig {
            poll_interval: Duration::from_secs(60),
            ..fast_config()
        },
    );
    let jobs: Vec<Limited> = (0..5).map(|n| limited("p", n, 10)).collect();
    enqueue_limited(&db.pool, &jobs, Enqueue::new()).await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        starts(&db.pool, "%").await?.len(),
        0,
        "paused for 5 s: nothing started"
    );
    let resumed = db_now(&db.pool).await?;
    admin::resume(&db.pool, LIMITED).await?;
    db.wait_until_idle(Duration::from_secs(30)).await?;
    assert_eq!(runs_done(&db.pool, "%").await?, 5, "resumed: all ran");
    let first = starts(&db.pool, "%").await?[0];
    let latency = (first - resumed).as_seconds_f64();
    println!("resumed: the first job started {latency:.3} s later");
    assert!(latency < 1.0, "the resume woke the workers: {latency:.3} s");
    stop(running).await
}

#[tokio::test]
async fn with_key_concurrency_a_key_with_two_thousand_jobs_does_not_starve_nine_small_ones()
-> anyhow::Result<()> {
    let db = TestDb::new().await?;
    create_runs_table(&db.pool).await?;
    admin::set_limits(
        &db.pool,
        LIMITED,
        Limits::none().concurrency(2).key_concurrency(2),
    )
    .await?;
    let big: Vec<Limited> = (0..2000).map(|n| limited("big", n, 20)).collect();
    enqueue_limited(&db.pool, &big, Enqueue::new()).await?;
    let small: Vec<Limited> = (0..18)
        .map(|n| limited(&format!("small{}", n / 2), n, 20))
        .collect();
    enqueue_limited(&db.pool, &small, Enqueue::new()).await?;
    let running = start(&db);
    wait_until(
        Duration::from_secs(60),
        "the small keys' 18 jobs started",
        || async { Ok(starts(&db.pool, "small%").await?.len() == 18) },
    )
    .await?;
    let order = start_order(&db.pool, "%").await?;
    let last_small = order
        .iter()
        .rposition(|key| key.starts_with("small"))
        .unwrap_or_default();
    let big_before_last_small = order[..last_small]
        .iter()
        .filter(|key| key.starts_with("big/"))
        .count();
    println!("big's jobs started before the small keys' last: {big_before_last_small}");
    assert!(
        big_before_last_small < 50,
        "all 18 small jobs started before big's 50th: {big_before_last_small} of big's first"
    );
    assert!(peak_overlap(&db.pool, "%").await? <= 2);
    admin::purge(&db.pool, LIMITED).await?;
    db.wait_until_idle(Duration::from_secs(30)).await?;
    stop(running).await
}

#[tokio::test]
async fn a_resumed_queue_starts_its_higher_priority_jobs_first() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    create_runs_table(&db.pool).await?;
    // One at a time: the order of the claims is the order of the starts.
    admin::set_limits(&db.pool, LIMITED, Limits::none().concurrency(1)).await?;
    admin::pause(&db.pool, LIMITED).await?;
    let low: Vec<Limited> = (0..1000).map(|n| limited("low", n, 1)).collect();
    enqueue_limited(&db.pool, &low, Enqueue::new()).await?;
    let high: Vec<Limited> = (0..10).map(|n| limited("high", n, 1)).collect();
    enqueue_limited(&db.pool, &high, Enqueue::new().priority(5)).await?;
    let running = start(&db);
    admin::resume(&db.pool, LIMITED).await?;
    wait_until(Duration::from_secs(30), "ten jobs started", || async {
        Ok(starts(&db.pool, "%").await?.len() >= 10)
    })
    .await?;
    admin::purge(&db.pool, LIMITED).await?;
    db.wait_until_idle(Duration::from_secs(30)).await?;
    let order = start_order(&db.pool, "%").await?;
    println!("the first starts: {:?}", &order[..12.min(order.len())]);
    assert!(
        order[..10].iter().all(|key| key.starts_with("high/")),
        "the 10 of priority 5 started first: {:?}",
        &order[..10]
    );
    stop(running).await
}

#[tokio::test]
async fn a_higher_priority_job_enqueued_during_a_backlog_starts_within_a_few_jobs()
-> anyhow::Result<()> {
    let db = TestDb::new().await?;
    create_runs_table(&db.pool).await?;
    // A backlog a worker of one slot takes seconds over, so that its
    // claims start past the last job they claimed (`storage::ClaimKey`): a
    // job that sorts before that key is found by a claim from the whole
    // queue, which a notification brings within 100 ms: 0 backlog jobs
    // started before each in three rounds, measured; with the timer of one
    // second alone, [34, 54, 8] and [29, 47, 2].
    let low: Vec<Record> = (0..600)
        .map(|n| Record {
            key: format!("low/{n:04}"),
            sleep_millis: 10,
        })
        .collect();
    let mut tx = db.pool.begin().await?;
    durable_jobs::enqueue_many(&mut tx, &low).await?;
    tx.commit().await?;
    let running = start_with(
        &db,
        WorkerConfig {
            concurrency: 1,
            ..fast_config()
        },
    );
    let mut enqueued = Vec::new();
    for round in 0..3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let mut tx = db.pool.begin().await?;
        durable_jobs::enqueue_with(
            &mut tx,
            &Record {
                key: format!("high/{round}"),
                sleep_millis: 0,
            },
            Enqueue::new().priority(5),
        )
        .await?;
        tx.commit().await?;
        enqueued.push(db_now(&db.pool).await?);
    }
    wait_until(
        Duration::from_secs(30),
        "the three jobs of priority 5 ran",
        || async { Ok(starts(&db.pool, "high/%").await?.len() >= 3) },
    )
    .await?;
    let high = starts(&db.pool, "high/%").await?;
    admin::purge(&db.pool, Record::NAME).await?;
    db.wait_until_idle(Duration::from_secs(30)).await?;
    let low = starts(&db.pool, "low/%").await?;
    let before: Vec<usize> = enqueued
        .iter()
        .zip(&high)
        .map(|(enqueued, started)| {
            low.iter()
                .filter(|low| *low > enqueued && *low < started)
                .count()
        })
        .collect();
    println!(
        "jobs of the backlog started between each enqueue of priority 5 and its start: {before:?} ({} of the backlog ran)",
        low.len()
    );
    assert!(
        low.len() < 600,
        "the backlog was still there when the last job of priority 5 ran"
    );
    assert!(
        before.iter().all(|&count| count < 25),
        "each job of priority 5 started within a few jobs of the backlog: {before:?}"
    );
    stop(running).await
}

#[tokio::test]
async fn a_rate_limited_queue_reaches_its_rate_with_a_ten_second_poll() -> anyhow::Result<()> {
    // Ours, and an in-process worker whose claims (one at each token) open
    // its whole bookkeeping pool (a connection per queue and three).
    let db = TestDb::reserving(POOL_SIZE + process_connections(), POOL_SIZE).await?;
    create_runs_table(&db.pool).await?;
    // 100 jobs at 50/s (burst 5) take 2 s; without wake-ups at each token,
    // a worker polling every 10 s would start 5 per poll.
    admin::set_limits(
        &db.pool,
        LIMITED,
        Limits::none().rate(Rate::per_second(50.0).burst(5)),
    )
    .await?;
    let jobs: Vec<Limited> = (0..100).map(|n| limited("rated", n, 1)).collect();
    let running = start_with(
        &db,
        WorkerConfig {
            concurrency: 8,
            poll_interval: Duration::from_secs(10),
            ..fast_config()
        },
    );
    // The worker's first claim (at start) finds nothing: the jobs come after.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let enqueued = db_now(&db.pool).await?;
    enqueue_limited(&db.pool, &jobs, Enqueue::new()).await?;
    wait_until(Duration::from_secs(9), "the 100 jobs done", || async {
        Ok(runs_done(&db.pool, "rated/%").await? >= 100)
    })
    .await?;
    let started = starts(&db.pool, "rated/%").await?;
    let took = (started[started.len() - 1] - enqueued).as_seconds_f64();
    let span = (started[started.len() - 1] - started[0]).as_seconds_f64();
    println!("100 starts at 50/s in {took:.2} s (first to last {span:.2} s)");
    // Not faster than the bucket either (exactness per window is the
    // three-process test's: here 8 slots bunch the starts of spaced claims).
    assert!(100.0 <= 50.0 * (span + 0.05) + 5.0, "{span:.2} s");
    stop(running).await
}

#[tokio::test]
async fn a_delayed_job_is_scheduled_then_woken_on_time_with_an_hour_poll() -> anyhow::Result<()> {
    let db = TestDb::reserving(default_reserve(), POOL_SIZE).await?;
    create_runs_table(&db.pool).await?;
    let running = start_with(
        &db,
        WorkerConfig {
            poll_interval: Duration::from_secs(3600),
            ..fast_config()
        },
    );
    // Let the worker park on an empty claim: only a wake-up starts it now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Its due time is counted from the enqueue; the commit follows at once.
    let enqueued = db_now(&db.pool).await?;
    let mut tx = db.pool.begin().await?;
    durable_jobs::enqueue_with(
        &mut tx,
        &limited("later", 0, 1),
        Enqueue::new().delay(Duration::from_secs(3)),
    )
    .await?;
    tx.commit().await?;
    let state: String =
        sqlx::query_scalar("select state from apalis.job_states where job_type = $1")
            .bind(LIMITED)
            .fetch_one(&db.pool)
            .await?;
    assert_eq!(state, "scheduled");
    db.wait_until_idle(Duration::from_secs(30)).await?;
    let started = starts(&db.pool, "later/%").await?[0];
    let after = (started - enqueued).as_seconds_f64();
    println!("delayed 3 s, polling hourly: started {after:.3} s after its enqueue");
    assert!(after >= 3.0, "not before it was due: {after:.3} s");
    assert!(after < 3.5, "woken when due, not at a poll: {after:.3} s");
    stop(running).await
}

#[tokio::test]
async fn a_delayed_workflow_step_waits_after_its_release() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    create_runs_table(&db.pool).await?;
    let running = start(&db);
    let mut tx = db.pool.begin().await?;
    let first = Record {
        key: "first".to_owned(),
        sleep_millis: 1,
    };
    let second = Record {
        key: "second".to_owned(),
        sleep_millis: 1,
    };
    let workflow = durable_jobs::Workflow::new("delayed")
        .add("first", first)
        .step(
            durable_jobs::Step::new("second", &second)
                .after(["first"])
                .delay(Duration::from_millis(1500)),
        )
        .enqueue(&mut tx)
        .await?;
    tx.commit().await?;
    db.wait_until_idle(Duration::from_secs(30)).await?;
    let times: Vec<(String, DateTime<Utc>, Option<DateTime<Utc>>)> = sqlx::query_as(
        "select key, started_at, finished_at from engine_test_runs order by started_at",
    )
    .fetch_all(&db.pool)
    .await?;
    assert_eq!(times.len(), 2, "{times:?}");
    let gap = (times[1].1 - times[0].2.unwrap_or(times[0].1)).as_seconds_f64();
    println!("workflow {workflow}: the delayed step started {gap:.2} s after the first ended");
    assert_eq!(times[1].0, "second");
    assert!(
        (1.45..5.0).contains(&gap),
        "delayed 1.5 s after its release: {gap:.2} s"
    );
    stop(running).await
}

#[tokio::test]
async fn a_job_failing_past_its_max_age_dies_with_that_reason() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    create_runs_table(&db.pool).await?;
    let running = start(&db);
    let id = enqueue(
        &db.pool,
        &Aging {
            key: "aging".to_owned(),
        },
    )
    .await?;
    db.wait_for_status(&id, "Killed", Duration::from_secs(30))
        .await?;
    let (attempts, lived): (i32, f64) = sqlx::query_as(
        "select attempts, extract(epoch from done_at - $2::timestamptz)::float8
         from apalis.jobs where id = $1",
    )
    .bind(&id)
    .bind(DateTime::<Utc>::from(
        ulid::Ulid::from_string(&id)?.datetime(),
    ))
    .fetch_one(&db.pool)
    .await?;
    let reason = db.job_outcome(&id).await?.1.unwrap_or_default();
    println!("dead after {attempts} attempts, {lived:.2} s after its enqueue: {reason}");
    assert!(reason.contains("age limit of 2s (MAX_AGE)"), "{reason}");
    assert!(
        reason.contains("the partner is still down"),
        "keeps the error: {reason}"
    );
    assert!((2..1000).contains(&attempts), "{attempts} attempts");
    assert!(
        (2.0..4.0).contains(&lived),
        "died past 2 s, at a failure: {lived:.2} s"
    );
    stop(running).await
}

#[tokio::test]
async fn retry_after_runs_the_job_again_at_its_time() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    create_runs_table(&db.pool).await?;
    let running = start(&db);
    let id = enqueue(
        &db.pool,
        &Snoozing {
            key: "snooze".to_owned(),
            after_millis: 2000,
        },
    )
    .await?;
    db.wait_for_status(&id, "Done", Duration::from_secs(30))
        .await?;
    let runs: Vec<(i32, DateTime<Utc>, Option<DateTime<Utc>>)> = sqlx::query_as(
        "select attempt, started_at, finished_at from engine_test_runs order by started_at",
    )
    .fetch_all(&db.pool)
    .await?;
    assert_eq!(runs.iter().map(|run| run.0).collect::<Vec<_>>(), [1, 2]);
    let again = (runs[1].1 - runs[0].2.unwrap_or(runs[0].1)).as_seconds_f64();
    println!("asked for 2 s: ran again {again:.3} s after the first attempt ended");
    assert!(
        (2.0..2.5).contains(&again),
        "again 2.0 to 2.5 s later: {again:.3} s"
    );
    stop(running).await
}

#[tokio::test]
async fn the_unknown_type_reaper_leaves_paused_delayed_and_held_back_jobs_alone()
-> anyhow::Result<()> {
    let db = TestDb::new().await?;
    create_runs_table(&db.pool).await?;
    // Long due: a paused queue's jobs, and jobs held back by a limit of one
    // behind a running one; a stranger's delayed job; a stranger due long ago.
    admin::pause(&db.pool, LIMITED).await?;
    let paused: Vec<Limited> = (0..3).map(|n| limited("paused", n, 1)).collect();
    enqueue_limited(&db.pool, &paused, Enqueue::new()).await?;
    admin::set_limits(&db.pool, Record::NAME, Limits::none().concurrency(1)).await?;
    let mut tx = db.pool.begin().await?;
    for n in 0..3 {
        let record = Record {
            key: format!("held/{n}"),
            sleep_millis: 1800,
        };
        durable_jobs::enqueue(&mut tx, &record).await?;
    }
    tx.commit().await?;
    sqlx::query("update apalis.jobs set run_at = now() - interval '2 hours'")
        .execute(&db.pool)
        .await?;
    let strangers: Vec<(String, String)> = sqlx::query_as(
        "insert into apalis.jobs (id, job_type, job, status, max_attempts, run_at)
         values (apalis.generate_ulid(), 'engine_test_stranger', '\x6e756c6c', 'Pending', 3,
                 now() + interval '1 hour'),
                (apalis.generate_ulid(), 'engine_test_stranger', '\x6e756c6c', 'Pending', 3,
                 now() - interval '2 hours')
         returning id, case when run_at > now() then 'delayed' else 'due' end",
    )
    .fetch_all(&db.pool)
    .await?;
    let running = start_with(
        &db,
        WorkerConfig {
            unknown_grace: Duration::from_secs(1),
            ..fast_config()
        },
    );
    for (id, kind) in &strangers {
        if kind == "due" {
            db.wait_for_status(id, "Killed", Duration::from_secs(20))
                .await?;
        }
    }
    // The reaper ran (it killed the stranger due long ago): nothing else died.
    let dead: Vec<(String, String)> = sqlx::query_as(
        "select job_type, coalesce(last_result ->> 'Err', '') from apalis.jobs
         where status = 'Killed' order by job_type",
    )
    .fetch_all(&db.pool)
    .await?;
    assert_eq!(dead.len(), 1, "only the stranger due long ago: {dead:?}");
    assert_eq!(dead[0].0, "engine_test_stranger");
    // The delayed stranger is left to its time (and then its grace).
    for (id, kind) in &strangers {
        if kind == "delayed" {
            assert_eq!(db.job_outcome(id).await?.0, "Pending");
            sqlx::query("delete from apalis.jobs where id = $1")
                .bind(id)
                .execute(&db.pool)
                .await?;
        }
    }
    admin::resume(&db.pool, LIMITED).await?;
    db.wait_until_idle(Duration::from_secs(30)).await?;
    assert_eq!(
        runs_done(&db.pool, "%").await?,
        6,
        "the paused and held-back jobs ran"
    );
    stop(running).await
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
