//! Periodic jobs: each tick enqueued exactly once across worker processes,
//! the catch-up policy after downtime, the schedules in the dashboard, and
//! the engine's own `prune_jobs` schedule.

use std::time::Duration;

use crate::support::{POOL_SIZE, Process, TestDb, fast_config, fast_env};
use anyhow::{Context as _, bail};
use chrono::{DateTime, TimeDelta, Utc};
use durable_jobs::{CatchUp, Job, JobContext, JobError, Registry, Schedule, Tick};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Each tick's job, with its tick; the test reads the ticks from the queue.
#[derive(Debug, Serialize, Deserialize)]
struct Beat {
    tick: Tick,
}

impl From<Tick> for Beat {
    fn from(tick: Tick) -> Self {
        Self { tick }
    }
}

impl Job for Beat {
    const NAME: &'static str = "schedule_test_beat";
    type Context = ();
    type Output = ();

    async fn run(self, _: JobContext<'_, ()>) -> Result<(), JobError> {
        Ok(())
    }
}

/// The ticks of `queue`'s jobs (from their payloads), with `Tick::previous`,
/// oldest first, duplicates included.
async fn ticks(
    pool: &PgPool,
    queue: &str,
) -> anyhow::Result<Vec<(DateTime<Utc>, Option<DateTime<Utc>>)>> {
    Ok(sqlx::query_as(
        "select (payload -> 'tick' ->> 'at')::timestamptz,
                (payload -> 'tick' ->> 'previous')::timestamptz
         from (select convert_from(job, 'UTF8')::jsonb as payload from apalis.jobs
               where job_type = $1) as jobs
         order by 1",
    )
    .bind(queue)
    .fetch_all(pool)
    .await?)
}

/// Polls (every 50 ms, for at most `deadline`) until `queue` has a job for a
/// tick at or after `at`.
async fn wait_for_tick(
    pool: &PgPool,
    queue: &str,
    at: DateTime<Utc>,
    deadline: Duration,
) -> anyhow::Result<()> {
    let give_up = tokio::time::Instant::now() + deadline;
    loop {
        let ticks = ticks(pool, queue).await?;
        if ticks.last().is_some_and(|(tick, _)| *tick >= at) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= give_up {
            bail!("no {queue} job for a tick from {at} within {deadline:?}: {ticks:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn three_workers_enqueue_every_tick_of_a_per_second_schedule_exactly_once()
-> anyhow::Result<()> {
    // Ours, and three worker processes (each a pool of 7, bookkeeping 5).
    let db = TestDb::reserving(POOL_SIZE + 36, POOL_SIZE).await?;
    let mut env = fast_env();
    env.push(("JOB_PRUNE_SCHEDULE", "* * * * * *"));
    let mut workers = Vec::new();
    for _ in 0..3 {
        workers.push(Process::started_worker(&db, &env).await?);
    }
    // Ten seconds with all three running, from the next whole second.
    let now: DateTime<Utc> = sqlx::query_scalar("select now()")
        .fetch_one(&db.pool)
        .await?;
    let first = now.duration_trunc_second() + TimeDelta::seconds(1);
    let last = first + TimeDelta::seconds(9);
    wait_for_tick(&db.pool, "prune_jobs", last, Duration::from_secs(30)).await?;
    db.wait_until_idle(Duration::from_secs(10)).await?;
    for worker in workers {
        assert!(worker.terminate(Duration::from_secs(30)).await?.success());
    }

    let ticks: Vec<DateTime<Utc>> = ticks(&db.pool, "prune_jobs")
        .await?
        .into_iter()
        .map(|(at, _)| at)
        .filter(|at| (first..=last).contains(at))
        .collect();
    let expected: Vec<DateTime<Utc>> = (0..10).map(|s| first + TimeDelta::seconds(s)).collect();
    assert_eq!(
        ticks, expected,
        "one job per tick, none missed, none twice, while three workers ran"
    );
    let not_done: i64 = sqlx::query_scalar(
        "select count(*) from apalis.jobs
         where job_type = 'prune_jobs' and status <> 'Done'
           and (convert_from(job, 'UTF8')::jsonb -> 'tick' ->> 'at')::timestamptz <= $1",
    )
    .bind(last)
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(not_done, 0, "every tick's prune ran");
    Ok(())
}

/// Runs the engine in this process with `Beat` on a per-second schedule
/// (grace 450 ms, `catch_up`) until it enqueued two ticks, stops it for three
/// ticks, restarts it 900 ms after a tick (so the latest missed tick is past
/// the grace by as much as a running worker's tick may come late) until two more ticks. Returns the last tick before the
/// downtime, the restart time, and every tick with its `previous`.
async fn run_with_downtime(
    catch_up: CatchUp,
) -> anyhow::Result<(
    DateTime<Utc>,
    DateTime<Utc>,
    Vec<(DateTime<Utc>, Option<DateTime<Utc>>)>,
)> {
    let db = TestDb::new().await?;
    let schedule = Schedule::cron("* * * * * *")?
        .grace(Duration::from_millis(450))
        .catch_up(catch_up);
    let start = || {
        let shutdown = CancellationToken::new();
        let registry = Registry::<()>::new().schedule::<Beat>(schedule.clone());
        let worker = tokio::spawn(
            durable_jobs::Worker::new(db.pool.clone(), registry, ())
                .config(fast_config())
                .run(shutdown.clone()),
        );
        (shutdown, worker)
    };

    let (shutdown, worker) = start();
    let started = Utc::now();
    wait_for_tick(
        &db.pool,
        Beat::NAME,
        started.duration_trunc_second() + TimeDelta::seconds(2),
        Duration::from_secs(30),
    )
    .await?;
    shutdown.cancel();
    worker.await??;
    let before = ticks(&db.pool, Beat::NAME).await?;
    let last_before = before.last().context("ticks before the downtime")?.0;

    // The clock is the database's, on this machine.
    let restart_at = last_before + TimeDelta::milliseconds(3900);
    tokio::time::sleep((restart_at - Utc::now()).to_std().unwrap_or_default()).await;
    let (shutdown, worker) = start();
    let restarted = Utc::now();
    wait_for_tick(
        &db.pool,
        Beat::NAME,
        restarted.duration_trunc_second() + TimeDelta::seconds(2),
        Duration::from_secs(30),
    )
    .await?;
    shutdown.cancel();
    worker.await??;
    Ok((last_before, restarted, ticks(&db.pool, Beat::NAME).await?))
}

/// Checks the ticks after `restarted`: one job per tick, each naming the one
/// before as `previous`, from the first tick after `restarted`.
fn assert_on_time_after(
    restarted: DateTime<Utc>,
    after: &[(DateTime<Utc>, Option<DateTime<Utc>>)],
) {
    let first = restarted.duration_trunc_second() + TimeDelta::seconds(1);
    assert!(after.len() >= 2, "{after:?}");
    for (n, (at, _)) in after.iter().enumerate() {
        let n = i64::try_from(n).expect("a few ticks");
        assert_eq!(*at, first + TimeDelta::seconds(n), "{after:?}");
    }
    for pair in after.windows(2) {
        assert_eq!(pair[1].1, Some(pair[0].0), "{after:?}");
    }
}

#[tokio::test]
async fn ticks_missed_while_no_worker_ran_are_skipped_by_default() -> anyhow::Result<()> {
    let (last_before, restarted, ticks) = run_with_downtime(CatchUp::Skip).await?;
    let after: Vec<_> = ticks.into_iter().filter(|t| t.0 > last_before).collect();
    assert!(
        after.iter().all(|(at, _)| *at > restarted),
        "no job for a tick of the downtime ({last_before} to {restarted}): {after:?}"
    );
    assert_eq!(
        after.first().and_then(|t| t.1),
        Some(last_before),
        "the first job after the downtime names the last before it: {after:?}"
    );
    assert_on_time_after(restarted, &after);
    Ok(())
}

#[tokio::test]
async fn ticks_missed_while_no_worker_ran_get_one_job_with_run_once() -> anyhow::Result<()> {
    let (last_before, restarted, ticks) = run_with_downtime(CatchUp::RunOnce).await?;
    let after: Vec<_> = ticks.into_iter().filter(|t| t.0 > last_before).collect();
    let caught_up: Vec<_> = after.iter().filter(|t| t.0 < restarted).collect();
    assert_eq!(
        caught_up,
        [&(restarted.duration_trunc_second(), Some(last_before))],
        "one job for the ticks of the downtime ({last_before} to {restarted}): the latest, \
         standing in since the last before it: {after:?}"
    );
    assert_on_time_after(restarted, &after[1..]);
    assert_eq!(
        after[1].1,
        Some(after[0].0),
        "the schedule goes on after the catch-up: {after:?}"
    );
    Ok(())
}

#[tokio::test]
async fn the_dashboard_lists_each_schedule_with_its_last_and_next_run() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let shutdown = CancellationToken::new();
    let registry = Registry::<()>::new()
        .schedule::<Beat>(Schedule::cron("* * * * * *")?.catch_up(CatchUp::RunOnce));
    let worker = tokio::spawn(
        durable_jobs::Worker::new(db.pool.clone(), registry, ())
            .config(fast_config())
            .run(shutdown.clone()),
    );
    wait_for_tick(&db.pool, Beat::NAME, Utc::now(), Duration::from_secs(30)).await?;
    shutdown.cancel();
    worker.await??;
    let (last, next): (DateTime<Utc>, DateTime<Utc>) =
        sqlx::query_as("select last_tick, next_tick from apalis.schedules where name = $1")
            .bind(Beat::NAME)
            .fetch_one(&db.pool)
            .await?;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let app = axum::Router::new().nest(
        "/jobs",
        durable_jobs::dashboard::router(durable_jobs::dashboard::Dashboard::new(db.pool.clone())),
    );
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let page = reqwest::get(format!("http://{address}/jobs"))
        .await?
        .text()
        .await?;
    server.abort();
    let html = scraper::Html::parse_document(&page);
    let selector = |css: &str| scraper::Selector::parse(css).map_err(|e| anyhow::anyhow!("{e}"));
    let time_of = |row: &str, cell: &str| -> anyhow::Result<String> {
        let css = format!("#schedules tr[data-schedule=\"{row}\"] td.{cell} time");
        let element = html
            .select(&selector(&css)?)
            .next()
            .with_context(|| format!("{css} in {page}"))?;
        Ok(element
            .value()
            .attr("datetime")
            .unwrap_or_default()
            .to_owned())
    };
    let rfc3339 = |at: DateTime<Utc>| at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    assert_eq!(time_of(Beat::NAME, "last-run")?, rfc3339(last));
    assert_eq!(time_of(Beat::NAME, "next-run")?, rfc3339(next));
    let row = html
        .select(&selector(&format!(
            "#schedules tr[data-schedule=\"{}\"]",
            Beat::NAME
        ))?)
        .next()
        .context("the beat's row")?
        .text()
        .collect::<String>();
    assert!(
        row.contains("* * * * * *") && row.contains("run_once"),
        "{row}"
    );
    assert!(
        html.select(&selector("#schedules tr[data-schedule=\"prune_jobs\"]")?)
            .next()
            .is_some(),
        "the engine's prune is a schedule too: {page}"
    );
    Ok(())
}

/// Whole seconds, as ticks are.
trait WholeSeconds {
    fn duration_trunc_second(self) -> Self;
}

impl WholeSeconds for DateTime<Utc> {
    fn duration_trunc_second(self) -> Self {
        chrono::DurationRound::duration_trunc(self, TimeDelta::seconds(1))
            .expect("a time of this century")
    }
}

/// A job of the prune test: it is never run there.
#[derive(Debug, Serialize, Deserialize)]
struct Chore;

impl Job for Chore {
    const NAME: &'static str = "schedule_test_chore";
    type Context = ();
    type Output = ();

    async fn run(self, _: JobContext<'_, ()>) -> Result<(), JobError> {
        Ok(())
    }
}

#[tokio::test]
async fn the_prune_jobs_queue_deletes_finished_jobs_past_their_retention() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let mut tx = db.pool.begin().await?;
    let ids: Vec<String> = durable_jobs::enqueue_many(&mut tx, &[Chore, Chore, Chore])
        .await?
        .iter()
        .map(ToString::to_string)
        .collect();
    tx.commit().await?;
    // Old done, recent done, dead (within its retention).
    sqlx::query(
        "update apalis.jobs set status = case when id = $3 then 'Killed' else 'Done' end,
                attempts = 1, done_at = now() - case when id = $2 then interval '1 minute'
                                                     else interval '2 days' end
         where id = any($1)",
    )
    .bind(&ids)
    .bind(&ids[1])
    .bind(&ids[2])
    .execute(&db.pool)
    .await?;

    let shutdown = CancellationToken::new();
    let config = durable_jobs::WorkerConfig {
        prune_schedule: "* * * * * *".parse()?,
        retention_done: Duration::from_secs(86_400),
        retention_dead: Duration::from_secs(3 * 86_400),
        ..fast_config()
    };
    let worker = tokio::spawn(
        durable_jobs::Worker::new(
            db.pool.clone(),
            Registry::<()>::new().register::<Chore>(),
            (),
        )
        .config(config)
        .run(shutdown.clone()),
    );
    let give_up = tokio::time::Instant::now() + Duration::from_secs(30);
    let pruned = loop {
        let pruned: Option<i64> = sqlx::query_scalar(
            "select sum((last_result -> 'Ok' ->> 'done')::int8)::int8 from apalis.jobs
             where job_type = 'prune_jobs' and status = 'Done'",
        )
        .fetch_one(&db.pool)
        .await?;
        if pruned.is_some_and(|n| n > 0) || tokio::time::Instant::now() >= give_up {
            break pruned;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    shutdown.cancel();
    worker.await??;
    assert_eq!(pruned, Some(1), "the old done job, once");
    let left: Vec<String> =
        sqlx::query_scalar("select id from apalis.jobs where job_type = $1 order by id")
            .bind(Chore::NAME)
            .fetch_all(&db.pool)
            .await?;
    let mut kept = vec![ids[1].clone(), ids[2].clone()];
    kept.sort();
    assert_eq!(
        left, kept,
        "the recent done job and the dead one within its retention stay"
    );
    Ok(())
}

#[tokio::test]
async fn a_tick_never_gets_a_second_job_even_if_its_schedules_row_is_reset() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let run_until = |tick: DateTime<Utc>| {
        let pool = db.pool.clone();
        async move {
            let shutdown = CancellationToken::new();
            let registry = Registry::<()>::new().schedule::<Beat>(Schedule::cron("* * * * * *")?);
            let worker = tokio::spawn(
                durable_jobs::Worker::new(pool.clone(), registry, ())
                    .config(fast_config())
                    .run(shutdown.clone()),
            );
            wait_for_tick(&pool, Beat::NAME, tick, Duration::from_secs(30)).await?;
            shutdown.cancel();
            worker.await??;
            anyhow::Ok(())
        }
    };
    run_until(Utc::now().duration_trunc_second() + TimeDelta::seconds(2)).await?;
    let before = ticks(&db.pool, Beat::NAME).await?;
    // As if the row were lost: every tick since a minute ago is due again,
    // within the grace.
    sqlx::query("delete from apalis.schedules where name = $1")
        .bind(Beat::NAME)
        .execute(&db.pool)
        .await?;
    sqlx::query(
        "insert into apalis.schedules (name, expression, catch_up, handled_until)
         values ($1, '* * * * * *', 'skip', now() - interval '50 seconds')",
    )
    .bind(Beat::NAME)
    .execute(&db.pool)
    .await?;
    run_until(Utc::now().duration_trunc_second() + TimeDelta::seconds(1)).await?;
    let after: Vec<DateTime<Utc>> = ticks(&db.pool, Beat::NAME)
        .await?
        .into_iter()
        .map(|(at, _)| at)
        .collect();
    let mut distinct = after.clone();
    distinct.dedup();
    assert_eq!(after, distinct, "no tick twice");
    assert!(
        before.iter().all(|(at, _)| after.contains(at)),
        "{before:?} {after:?}"
    );
    assert!(
        after.len() > before.len() + 40,
        "the ticks of the reset minute that had no job got one: {after:?}"
    );
    Ok(())
}
