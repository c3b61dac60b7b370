//! The `worker` binary's schedules: a bad prune schedule stops it with a
//! clear error, and `worker status` lists each schedule. (The engine's own
//! schedule tests are in jobs/engine/tests/engine/schedules.rs.)

use std::time::Duration;

use anyhow::{Context as _, bail};
use chrono::{DateTime, TimeDelta, Utc};
use sqlx::PgPool;
use tests::{Process, TestDb, fast_worker_env};

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
async fn a_bad_prune_schedule_stops_the_worker_with_a_clear_error() -> anyhow::Result<()> {
    tests::budget::runs_processes(1);
    let db = TestDb::migrated().await?;
    for (expression, says) in [
        ("0 3 * * *", "it has 5 fields, not 6"),
        ("0 0 0 30 2 *", "never matches"),
        ("* * * * * mon-fry", "illegal character"),
    ] {
        let mut worker = Process::spawn(
            "worker",
            &[
                ("DATABASE_URL", db.url.as_str()),
                ("JOB_PRUNE_SCHEDULE", expression),
            ],
        )?;
        worker
            .wait_for_line("invalid schedule", Duration::from_secs(30))
            .await?;
        let status = worker.wait(Duration::from_secs(30)).await?;
        let output = worker.output().join("\n");
        assert!(!status.success(), "{expression:?}: {output}");
        assert!(
            // The worker's one-line refusal (jobs/src/cli.rs) names the
            // variable, the flag and the value.
            output.contains(&format!(
                "invalid JOB_PRUNE_SCHEDULE={expression:?} (--prune-schedule)"
            )) && output.contains(&format!("invalid schedule {expression:?}"))
                && output.contains(says)
                && output.contains("seconds first"),
            "{expression:?}: {output}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn worker_status_lists_each_schedule_with_its_last_and_next_run() -> anyhow::Result<()> {
    tests::budget::runs_processes(1);
    let db = TestDb::migrated().await?;
    let mut env = fast_worker_env();
    env.extend([
        ("DATABASE_URL", db.url.as_str()),
        ("JOB_PRUNE_SCHEDULE", "*/2 * * * * *"),
    ]);
    let worker = Process::started_worker(&env).await?;
    let now = Utc::now();
    wait_for_tick(&db.pool, "prune_jobs", now, Duration::from_secs(30)).await?;
    db.wait_until_idle(Duration::from_secs(10)).await?;
    assert!(worker.terminate(Duration::from_secs(30)).await?.success());
    let (last, next, state): (DateTime<Utc>, DateTime<Utc>, String) = sqlx::query_as(
        "select last_tick, next_tick, jobs.state from apalis.schedules
         join apalis.job_states as jobs on jobs.id = last_job_id
         where name = 'prune_jobs'",
    )
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(next - last, TimeDelta::seconds(2), "every other second");

    let output = tokio::process::Command::new(tests::binary("worker")?)
        .arg("status")
        .env("DATABASE_URL", &db.url)
        .env("RUST_LOG", "warn")
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    let header = lines
        .iter()
        .position(|line| line.starts_with("SCHEDULE "))
        .with_context(|| format!("a schedules table: {stdout}"))?;
    let row: Vec<&str> = lines[header + 1].split_whitespace().collect();
    let time = |at: DateTime<Utc>| at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    assert_eq!(
        row,
        [
            "prune_jobs",
            "*/2",
            "*",
            "*",
            "*",
            "*",
            "*",
            "skip",
            &time(last),
            &state,
            &time(next)
        ],
        "{stdout}"
    );
    Ok(())
}
