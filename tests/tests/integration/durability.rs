//! The queue keeps its promises: retries with backoff, dead jobs, crash
//! recovery, scaling, coalescing, graceful shutdown, retention, operations.

use std::{collections::HashMap, time::Duration};

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use jobs::probe::{Behaviour, Probe};
use sqlx::Connection as _;
use tests::{Process, TestApp, TestDb, enqueue_probes, fast_worker_config, fast_worker_env};

fn probe(key: &str, behaviour: Behaviour) -> Probe {
    Probe {
        key: key.to_owned(),
        behaviour,
    }
}

/// `(attempt, worker, started_at, finished?)` of every run of probe `key`.
async fn runs(db: &TestDb, key: &str) -> anyhow::Result<Vec<(i32, String, DateTime<Utc>, bool)>> {
    Ok(sqlx::query_as(
        "select attempt, worker, started_at, finished_at is not null
         from job_probe_runs where probe = $1 order by started_at",
    )
    .bind(key)
    .fetch_all(&db.pool)
    .await?)
}

/// Probe runs per worker process id (worker names end
/// `-<pid>-<start ms>-<generation>`, see `jobs::worker`).
async fn runs_per_pid(db: &TestDb) -> anyhow::Result<HashMap<u32, i64>> {
    let rows: Vec<(Option<String>, i64)> = sqlx::query_as(
        "select substring(worker from '-([0-9]+)-[0-9]+-[0-9]+$'), count(*)
         from job_probe_runs group by 1",
    )
    .fetch_all(&db.pool)
    .await?;
    rows.into_iter()
        .map(|(pid, runs)| {
            let pid = pid.context("a worker name without a pid")?;
            Ok((pid.parse()?, runs))
        })
        .collect()
}

/// `(status, attempts, last_result)` of job `id`.
async fn job_row(db: &TestDb, id: &str) -> anyhow::Result<(String, i32, String)> {
    Ok(sqlx::query_as(
        "select status, attempts, coalesce(last_result::text, '') from apalis.jobs where id = $1",
    )
    .bind(id)
    .fetch_one(&db.pool)
    .await?)
}

#[tokio::test]
async fn a_job_that_fails_twice_then_succeeds_takes_three_attempts_with_growing_gaps()
-> anyhow::Result<()> {
    tests::init_logs();
    let mut app = TestApp::spawn().await?;
    // The delay each failure stores: run_at minus the time of that write.
    sqlx::raw_sql(
        "create table stored_delays (n bigint generated always as identity, delay float8);
         create function log_stored_delay() returns trigger language plpgsql as $$
         begin
             insert into stored_delays (delay)
             values (extract(epoch from new.run_at - clock_timestamp()));
             return new;
         end $$;
         create trigger log_stored_delay after update on apalis.jobs for each row
             when (new.status = 'Failed') execute function log_stored_delay();",
    )
    .execute(&app.db.pool)
    .await?;
    app.start_worker_with(jobs::WorkerConfig {
        backoff_base: Some(Duration::from_millis(500)),
        ..fast_worker_config()
    });
    let ids = enqueue_probes(
        &app.db.pool,
        [probe("flaky", Behaviour::FailFirst { failures: 2 })],
    )
    .await?;
    app.db.drain_queue(Duration::from_secs(30)).await?;
    let delays: Vec<f64> = sqlx::query_scalar("select delay from stored_delays order by n")
        .fetch_all(&app.db.pool)
        .await?;
    println!("stored retry delays: {delays:?}");
    assert!(
        // Less the time from computing the delay to this write (a few ms,
        // more on a loaded machine).
        delays.len() == 2 && (0.40..0.55).contains(&delays[0]) && (0.85..1.1).contains(&delays[1]),
        "each failure stores base · 2^(attempt-1) ±10 %, less the write's latency: {delays:?}"
    );

    let runs = runs(&app.db, "flaky").await?;
    let attempts: Vec<i32> = runs.iter().map(|r| r.0).collect();
    assert_eq!(attempts, [1, 2, 3]);
    let gaps: Vec<Duration> = runs
        .windows(2)
        .map(|w| (w[1].2 - w[0].2).to_std())
        .collect::<Result<_, _>>()?;
    println!("gaps between attempts: {gaps:?}");
    // Delays of 500 ms and 1 s (±10 %); load can only add to them.
    assert!(
        gaps[0] >= Duration::from_millis(450),
        "first retry waits ~500 ms: {gaps:?}"
    );
    assert!(
        gaps[1] >= Duration::from_millis(900),
        "second retry waits ~1 s: {gaps:?}"
    );
    // How soon a due retry is claimed depends on the machine's load, so the
    // growth is checked on the delays the row stored, above.
    assert!(delays[1] > delays[0], "delays grow: {delays:?}");
    assert_eq!(job_row(&app.db, &ids[0]).await?.1, 3);
    app.stop().await
}

#[tokio::test]
async fn a_job_that_always_fails_is_dead_after_max_attempts_with_its_error() -> anyhow::Result<()> {
    let mut app = TestApp::spawn().await?;
    app.start_worker();
    let ids = enqueue_probes(&app.db.pool, [probe("hopeless", Behaviour::FailAlways)]).await?;
    app.db.wait_until_idle(Duration::from_secs(30)).await?;

    assert_eq!(
        runs(&app.db, "hopeless").await?.len(),
        <Probe as jobs::Job>::MAX_ATTEMPTS as usize
    );
    let (status, attempts, last_result) = job_row(&app.db, &ids[0]).await?;
    assert_eq!((status.as_str(), attempts), ("Killed", 3));
    assert!(
        last_result.contains("fails every attempt (attempt 3)"),
        "{last_result}"
    );
    let dead = jobs::admin::dead_jobs(&app.db.pool, 10).await?;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, ids[0]);
    app.stop().await
}

#[tokio::test]
async fn panicking_and_timed_out_attempts_are_retried_and_never_left_running() -> anyhow::Result<()>
{
    let mut app = TestApp::spawn().await?;
    app.start_worker_with(jobs::WorkerConfig {
        job_timeout: Some(Duration::from_millis(300)),
        ..fast_worker_config()
    });
    let ids = enqueue_probes(
        &app.db.pool,
        [
            probe("panics", Behaviour::Panic),
            probe("too-slow", Behaviour::Sleep { millis: 5_000 }),
        ],
    )
    .await?;
    app.db.wait_until_idle(Duration::from_secs(30)).await?;

    for (id, key) in ids.iter().zip(["panics", "too-slow"]) {
        let runs = runs(&app.db, key).await?;
        assert_eq!(runs.len(), 3, "{key}: every attempt ran: {runs:?}");
        assert!(
            runs.iter().all(|r| !r.3),
            "{key}: no attempt got past the failure"
        );
        let (status, attempts, last_result) = job_row(&app.db, id).await?;
        assert_eq!(
            (status.as_str(), attempts),
            ("Killed", 3),
            "{key}: {last_result}"
        );
    }
    let running: i64 =
        sqlx::query_scalar("select count(*) from apalis.jobs where status = 'Running'")
            .fetch_one(&app.db.pool)
            .await?;
    assert_eq!(running, 0);
    app.stop().await
}

#[tokio::test]
async fn a_job_whose_attempts_were_all_lost_with_workers_is_killed_without_running()
-> anyhow::Result<()> {
    let mut app = TestApp::spawn().await?;
    let ids = enqueue_probes(&app.db.pool, [probe("poison", Behaviour::Succeed)]).await?;
    // What apalis leaves after the job crashed its worker three times: Pending
    // again, with every attempt used.
    sqlx::query("update apalis.jobs set attempts = max_attempts where id = $1")
        .bind(&ids[0])
        .execute(&app.db.pool)
        .await?;
    app.start_worker();
    app.db.wait_until_idle(Duration::from_secs(30)).await?;
    let (status, _, last_result) = job_row(&app.db, &ids[0]).await?;
    assert_eq!(status, "Killed");
    assert!(
        last_result.contains("3 of its 3 attempts were already used"),
        "{last_result}"
    );
    assert!(
        runs(&app.db, "poison").await?.is_empty(),
        "it did not run again"
    );
    app.stop().await
}

#[tokio::test]
async fn a_sigkilled_workers_job_is_completed_by_another_worker_within_the_lease()
-> anyhow::Result<()> {
    tests::budget::runs_processes(2);
    let db = TestDb::migrated().await?;
    let mut env = fast_worker_env();
    env.push(("DATABASE_URL", db.url.as_str()));
    // Hold the lock the job waits for, so it stays running until we let go.
    let mut holder = sqlx::PgConnection::connect_with(&migrations::parse_url(&db.url)?).await?;
    sqlx::query("select pg_advisory_lock(4242)")
        .execute(&mut holder)
        .await?;

    let first = Process::started_worker(&env).await?;
    let ids = enqueue_probes(
        &db.pool,
        [probe("blocked", Behaviour::WaitForLock { lock: 4242 })],
    )
    .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while runs(&db, "blocked").await?.is_empty() {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the first worker never started the job"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let second = Process::started_worker(&env).await?;

    first.signal(nix::sys::signal::Signal::SIGKILL)?;
    let killed_at = tokio::time::Instant::now();
    sqlx::query("select pg_advisory_unlock(4242)")
        .execute(&mut holder)
        .await?;
    db.drain_queue(Duration::from_secs(30)).await?;
    let recovered_in = killed_at.elapsed();
    println!("job recovered and completed {recovered_in:?} after SIGKILL (lease 3 s)");
    assert!(
        recovered_in < Duration::from_secs(3 + 1 + 5),
        "within lease + heartbeat + slack"
    );

    let runs = runs(&db, "blocked").await?;
    assert_eq!(runs.len(), 2, "{runs:?}");
    assert!(
        !runs[0].3 && runs[1].3,
        "first run cut off, second finished: {runs:?}"
    );
    assert_ne!(runs[0].1, runs[1].1, "another worker ran it");
    assert_eq!(runs[1].0, 2, "the re-run counts as attempt 2");
    assert_eq!(job_row(&db, &ids[0]).await?.0, "Done");
    let status = second.terminate(Duration::from_secs(30)).await?;
    assert!(status.success());
    Ok(())
}

#[tokio::test]
async fn three_worker_processes_drain_3000_jobs_running_each_exactly_once() -> anyhow::Result<()> {
    tests::budget::runs_processes(3);
    let db = TestDb::migrated().await?;
    let mut env = fast_worker_env();
    // A lease no heartbeat misses: with the tests' 3 s, a worker starved of
    // CPU by the tests beside it lost its lease (its jobs ran again, at least
    // once as promised); this test is about claims, not leases.
    // Likewise the job timeout: a no-op starved past the tests' 2 s timed
    // out and ran again.
    env.retain(|(name, _)| *name != "JOB_TIMEOUT");
    env.extend([
        ("DATABASE_URL", db.url.as_str()),
        ("JOB_LEASE", "30"),
        ("JOB_TIMEOUT", "30"),
    ]);
    let mut workers = Vec::new();
    for _ in 0..3 {
        let worker = Process::started_worker(&env).await?;
        workers.push(worker);
    }
    let started = std::time::Instant::now();
    enqueue_probes(
        &db.pool,
        (0..3000).map(|n| probe(&format!("bulk-{n}"), Behaviour::Succeed)),
    )
    .await?;
    db.drain_queue(Duration::from_secs(180)).await?;
    let elapsed = started.elapsed();

    let per_probe: Vec<(String, i64)> = sqlx::query_as(
        "select probe, count(*) from job_probe_runs group by probe having count(*) <> 1",
    )
    .fetch_all(&db.pool)
    .await?;
    if !per_probe.is_empty() {
        let detail: Vec<(String, i32, String, bool)> = sqlx::query_as(
            "select probe, attempt, worker, finished_at is not null from job_probe_runs
             where probe = any($1) order by probe, started_at",
        )
        .bind(
            per_probe
                .iter()
                .map(|(probe, _)| probe.clone())
                .collect::<Vec<_>>(),
        )
        .fetch_all(&db.pool)
        .await?;
        let mut workers_said = Vec::new();
        for worker in &mut workers {
            let exited = worker.exited()?;
            let notable: Vec<String> = worker
                .output()
                .into_iter()
                .filter(|line| line.contains("WARN") || line.contains("ERROR"))
                .collect();
            workers_said.push((worker.pid(), exited, notable));
        }
        panic!(
            "jobs run other than once: {per_probe:?}; their runs: {detail:?}; workers: {workers_said:#?}"
        );
    }
    let total: i64 = sqlx::query_scalar("select count(*) from job_probe_runs")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(total, 3000);
    let split = runs_per_pid(&db).await?;
    println!("3000 jobs in {elapsed:?} by 3 workers (pid: jobs): {split:?}");
    assert_eq!(split.len(), 3, "three workers ran jobs: {split:?}");
    for worker in &workers {
        let pid = worker.pid().context("worker still running")?;
        assert!(
            split.get(&pid).is_some_and(|jobs| *jobs > 0),
            "worker {pid} ran jobs: {split:?}"
        );
    }
    for worker in workers {
        assert!(worker.terminate(Duration::from_secs(30)).await?.success());
    }
    Ok(())
}

#[tokio::test]
async fn a_burst_of_1000_concurrent_visits_runs_far_fewer_trims_and_keeps_the_10_newest()
-> anyhow::Result<()> {
    // The router's pool of 20 (as before the tests ran in parallel): with 10,
    // 32 requests at once waited past its 3 s and were answered 503.
    tests::budget::uses_pool(20);
    let mut app = TestApp::spawn().await?;
    // A generous job timeout: this test is about coalescing trims, and a
    // trim of a thousand visits took over the tests' 2 s on a loaded machine.
    app.start_worker_with(jobs::WorkerConfig {
        job_timeout: Some(Duration::from_secs(30)),
        ..fast_worker_config()
    });
    let app = std::sync::Arc::new(app);
    let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(32));
    let mut visits = tokio::task::JoinSet::new();
    let burst = std::time::Instant::now();
    for n in 0..1000 {
        let (app, limit) = (app.clone(), limit.clone());
        visits.spawn(async move {
            let _slot = limit.acquire().await?;
            app.visit(&format!("burst-{n}")).await
        });
    }
    while let Some(visit) = visits.join_next().await {
        visit??;
    }
    // Concurrent views cannot see each other's uncommitted visits, so the table
    // may hold a few more than 10 until the next view; one more settles it.
    let last = app.visit("after the burst").await?;
    let burst = burst.elapsed();
    app.db.drain_queue(Duration::from_secs(60)).await?;

    let trims: i64 =
        sqlx::query_scalar("select count(*) from apalis.jobs where job_type = 'trim_visits'")
            .fetch_one(&app.db.pool)
            .await?;
    // One pending trim per coalescing window the burst spanned (a loaded
    // machine makes the burst longer, so more windows), and far fewer than
    // the visits.
    let windows = burst.as_secs_f64() / jobs::trim_visits::COALESCE_WINDOW.as_secs_f64();
    println!("1001 visits in {burst:.1?} ({windows:.0} windows) ran {trims} trim jobs");
    // A span of n windows' length touches at most n + 2 of them; one more
    // for the enqueue's clock, read a moment after the burst's.
    assert!(
        (trims as f64) <= windows.floor() + 3.0,
        "at most one trim per window: {trims} in {windows:.0} windows"
    );
    assert!(trims < 200, "far fewer trims than visits: {trims}");
    let mut remaining = app.db.visit_ids().await?;
    let mut shown = last.ids();
    remaining.sort_unstable();
    shown.sort_unstable();
    assert_eq!(
        remaining, shown,
        "exactly the 10 newest (the last page's) remain"
    );
    let app = std::sync::Arc::into_inner(app).expect("all visits finished");
    app.stop().await
}

#[tokio::test]
async fn sigterm_during_a_long_job_lets_it_finish_and_exits_0() -> anyhow::Result<()> {
    tests::budget::runs_processes(1);
    let db = TestDb::migrated().await?;
    let mut env = fast_worker_env();
    env.push(("DATABASE_URL", db.url.as_str()));
    let mut worker = Process::started_worker(&env).await?;
    let ids = enqueue_probes(
        &db.pool,
        [probe("long", Behaviour::Sleep { millis: 1_500 })],
    )
    .await?;
    worker
        .wait_for_line("probe running", Duration::from_secs(30))
        .await?;

    let status = worker.terminate(Duration::from_secs(30)).await?;
    assert!(status.success(), "exit {status}");
    let runs = runs(&db, "long").await?;
    assert_eq!(runs.len(), 1);
    assert!(runs[0].3, "the running job finished before exit");
    assert_eq!(job_row(&db, &ids[0]).await?.0, "Done");
    Ok(())
}

#[tokio::test]
async fn prune_removes_old_done_and_dead_jobs_and_nothing_else() -> anyhow::Result<()> {
    let db = TestDb::migrated().await?;
    let ids = enqueue_probes(
        &db.pool,
        (0..6).map(|n| probe(&format!("p{n}"), Behaviour::Succeed)),
    )
    .await?;
    // (status, finished how long ago) for each job; the last stays pending.
    let ages = [
        ("Done", "2 days"),
        ("Done", "1 hour"),
        ("Killed", "8 days"),
        ("Killed", "2 days"),
        ("Failed", "8 days"), // out of attempts: dead
    ];
    for (id, (status, age)) in ids.iter().zip(ages) {
        sqlx::query(
            "update apalis.jobs set status = $2, attempts = max_attempts, done_at = now() - $3::interval where id = $1",
        )
        .bind(id)
        .bind(status)
        .bind(age)
        .execute(&db.pool)
        .await?;
    }
    let retention = jobs::admin::Retention {
        done: Duration::from_secs(86_400),
        dead: Duration::from_secs(7 * 86_400),
    };
    let pruned = jobs::admin::prune(&db.pool, retention).await?;
    assert_eq!((pruned.done, pruned.dead), (1, 2));
    let mut left: Vec<String> = sqlx::query_scalar("select id from apalis.jobs")
        .fetch_all(&db.pool)
        .await?;
    let mut kept = vec![ids[1].clone(), ids[3].clone(), ids[5].clone()];
    left.sort();
    kept.sort();
    assert_eq!(left, kept, "recent done, recent dead and pending jobs stay");
    Ok(())
}

#[tokio::test]
async fn operator_commands_show_retry_and_cancel_jobs() -> anyhow::Result<()> {
    let db = TestDb::migrated().await?;
    let ids = enqueue_probes(
        &db.pool,
        [
            probe("dead-one", Behaviour::Succeed),
            probe("pending-one", Behaviour::Succeed),
        ],
    )
    .await?;
    sqlx::query(
        r#"update apalis.jobs set status = 'Killed', attempts = 3, done_at = now(),
           last_result = '{"Err": "boom on attempt 3"}' where id = $1"#,
    )
    .bind(&ids[0])
    .execute(&db.pool)
    .await?;
    let run = |args: &[&str]| {
        let url = db.url.clone();
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        async move {
            let mut command = tokio::process::Command::new(tests::binary("worker")?);
            command
                .args(&args)
                .env("DATABASE_URL", url)
                .env("RUST_LOG", "warn");
            let output = command.output().await?;
            anyhow::Ok((
                output.status.success(),
                String::from_utf8_lossy(&output.stdout).into_owned(),
            ))
        }
    };
    let (ok, status) = run(&["status"]).await?;
    assert!(
        ok && status.contains("probe") && status.contains("dead") && status.contains("pending"),
        "{status}"
    );
    let (ok, dead) = run(&["dead"]).await?;
    assert!(
        ok && dead.contains(&ids[0]) && dead.contains("boom on attempt 3"),
        "{dead}"
    );

    let (ok, out) = run(&["retry", &ids[0]]).await?;
    assert!(ok, "{out}");
    assert_eq!(job_row(&db, &ids[0]).await?.0, "Pending");

    let (ok, out) = run(&["cancel", &ids[1]]).await?;
    assert!(ok, "{out}");
    let (status, _, result) = job_row(&db, &ids[1]).await?;
    assert_eq!(status, "Killed");
    assert!(result.contains("cancelled by an operator"));

    let (ok, _) = run(&["cancel", &ids[1]]).await?;
    assert!(!ok, "cancelling a job that is no longer pending fails");
    let (ok, _) = run(&["retry", "01JNOSUCHJOB0000000000000"]).await?;
    assert!(!ok, "retrying an unknown job fails");
    Ok(())
}

#[tokio::test]
async fn an_attempt_whose_result_was_lost_goes_back_to_the_queue() -> anyhow::Result<()> {
    let mut app = TestApp::spawn().await?;
    let ids = enqueue_probes(&app.db.pool, [probe("lost-ack", Behaviour::Succeed)]).await?;
    // What a database outage can leave behind: a row Running long past the
    // job timeout, whose acknowledgement never arrived.
    sqlx::query("update apalis.jobs set status = 'Running', lock_at = now() - interval '1 hour' where id = $1")
        .bind(&ids[0])
        .execute(&app.db.pool)
        .await?;
    app.start_worker();
    app.db.drain_queue(Duration::from_secs(30)).await?;
    let (status, attempts, _) = job_row(&app.db, &ids[0]).await?;
    assert_eq!(
        (status.as_str(), attempts),
        ("Done", 2),
        "the lost attempt counted, the next one ran"
    );
    assert_eq!(runs(&app.db, "lost-ack").await?.len(), 1);
    app.stop().await
}

#[tokio::test]
async fn claimed_jobs_returned_unstarted_at_shutdown_keep_their_attempts() -> anyhow::Result<()> {
    tests::budget::runs_processes(1);
    let db = TestDb::migrated().await?;
    let mut env = fast_worker_env();
    env.extend([
        ("DATABASE_URL", db.url.as_str()),
        ("WORKER_CONCURRENCY", "5"),
        ("WORKER_SHUTDOWN_GRACE", "20"),
        ("JOB_TIMEOUT", "60"),
    ]);
    let mut worker = Process::started_worker(&env).await?;
    // A worker claims only for free slots and starts what it claimed at once,
    // so jobs are claimed but unstarted only while a claim is on its way back
    // when the worker stops. Hold that moment open: a claim share-locks the
    // claiming worker's row first (`apalis.get_jobs`), so it waits while we
    // lock that row.
    let mut holder = sqlx::PgConnection::connect_with(&migrations::parse_url(&db.url)?).await?;
    sqlx::query("begin").execute(&mut holder).await?;
    sqlx::query("select 1 from apalis.workers where worker_type = 'probe' for update")
        .execute(&mut holder)
        .await?;
    let ids = enqueue_probes(
        &db.pool,
        (0..5).map(|n| probe(&format!("held-{n}"), Behaviour::Succeed)),
    )
    .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "select count(*) from pg_stat_activity
             where datname = current_database() and wait_event_type = 'Lock'
               and query like '%get_jobs%'",
        )
        .fetch_one(&db.pool)
        .await?;
        // One or both of the worker's claims in flight (two run at once).
        if waiting >= 1 {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "no claim waited for the worker's row"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Shut down while the claim is on its way, then let it arrive.
    worker.signal(nix::sys::signal::Signal::SIGTERM)?;
    worker
        .wait_for_line("worker stopping", Duration::from_secs(10))
        .await?;
    sqlx::query("commit").execute(&mut holder).await?;
    let status = worker.terminate(Duration::from_secs(30)).await?;
    assert!(status.success(), "exit {status}");
    let mut returned = 0;
    for id in &ids {
        let (status, attempts, _) = job_row(&db, id).await?;
        if status == "Pending" {
            returned += 1;
            assert_eq!(attempts, 0, "job {id} never started, so it used no attempt");
        }
    }
    let states = db.job_counts().await?;
    assert_eq!(
        returned, 5,
        "the five claimed, unstarted jobs went back to the queue: {states:?}"
    );
    let ran: i64 = sqlx::query_scalar("select count(*) from job_probe_runs")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(ran, 0, "none of them ran: {states:?}");
    Ok(())
}

#[tokio::test]
async fn a_live_worker_keeps_the_lease_of_a_job_three_leases_long_while_another_polls()
-> anyhow::Result<()> {
    tests::budget::runs_processes(2);
    let db = TestDb::migrated().await?;
    let mut env = fast_worker_env();
    env.extend([
        ("DATABASE_URL", db.url.as_str()),
        // Not 2: the lease in seconds is truncated from 3 heartbeats of
        // 0.666 s, so "2" means a 1 s lease, which a busy machine can miss.
        ("JOB_LEASE", "3"),
        ("JOB_TIMEOUT", "30"),
    ]);
    let first = Process::started_worker(&env).await?;
    let ids = enqueue_probes(
        &db.pool,
        [probe("long", Behaviour::Sleep { millis: 9_000 })],
    )
    .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while runs(&db, "long").await?.is_empty() {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the first worker never started the job"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Polls every 50 ms and, with every heartbeat, takes over the jobs of
    // workers silent for a lease: the first one's heartbeats must keep it off.
    let second = Process::started_worker(&env).await?;
    db.drain_queue(Duration::from_secs(30)).await?;

    let runs = runs(&db, "long").await?;
    assert_eq!(runs.len(), 1, "it ran exactly once: {runs:?}");
    assert!(runs[0].3, "and finished: {runs:?}");
    let first_pid = first.pid().context("first worker running")?;
    assert!(
        runs[0].1.contains(&format!("-{first_pid}-")),
        "the first worker ran it: {runs:?}"
    );
    let (status, attempts, _) = job_row(&db, &ids[0]).await?;
    assert_eq!((status.as_str(), attempts), ("Done", 1));
    for worker in [first, second] {
        assert!(worker.terminate(Duration::from_secs(30)).await?.success());
    }
    Ok(())
}

#[tokio::test]
async fn a_retry_keeps_its_stored_time_and_attempt_count_across_a_worker_restart()
-> anyhow::Result<()> {
    tests::budget::runs_processes(2);
    let db = TestDb::migrated().await?;
    let mut env = fast_worker_env();
    env.push(("DATABASE_URL", db.url.as_str()));
    let mut slow_retries = env.clone();
    slow_retries.push(("JOB_BACKOFF_BASE", "4"));
    let first = Process::started_worker(&slow_retries).await?;
    let ids = enqueue_probes(
        &db.pool,
        [probe("flaky", Behaviour::FailFirst { failures: 1 })],
    )
    .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (status, attempts, _) = job_row(&db, &ids[0]).await?;
        if (status.as_str(), attempts) == ("Failed", 1) {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the first attempt never failed: {status} {attempts}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let retry_at: DateTime<Utc> =
        sqlx::query_scalar("select run_at from apalis.jobs where id = $1")
            .bind(&ids[0])
            .fetch_one(&db.pool)
            .await?;
    assert!(first.terminate(Duration::from_secs(30)).await?.success());

    // The new worker's own backoff is 0.2 s: only the stored time can hold it back.
    let second = Process::started_worker(&env).await?;
    let early: bool = sqlx::query_scalar("select now() < $1")
        .bind(retry_at)
        .fetch_one(&db.pool)
        .await?;
    anyhow::ensure!(
        early,
        "the new worker was not up before the retry was due; the test proves nothing"
    );
    db.drain_queue(Duration::from_secs(30)).await?;

    let runs = runs(&db, "flaky").await?;
    let attempts: Vec<i32> = runs.iter().map(|r| r.0).collect();
    assert_eq!(attempts, [1, 2], "the retry is attempt 2: {runs:?}");
    let (first_pid, second_pid) = (
        pid_of(&runs[0].1)?,
        second.pid().context("second worker running")?,
    );
    assert_ne!(first_pid, second_pid, "{runs:?}");
    assert_eq!(
        pid_of(&runs[1].1)?,
        second_pid,
        "the new worker ran the retry"
    );
    let backoff = (retry_at - runs[0].2).to_std()?;
    assert!(
        backoff >= Duration::from_millis(3_600),
        "the first worker stored its 4 s backoff (±10 %): {backoff:?}"
    );
    assert!(
        runs[1].2 >= retry_at,
        "the retry started at {} before its stored time {retry_at}",
        runs[1].2
    );
    assert_eq!(job_row(&db, &ids[0]).await?.0, "Done");
    assert!(second.terminate(Duration::from_secs(30)).await?.success());
    Ok(())
}

/// The process id in a worker name (`<queue>@<host>-<pid>-<start ms>-<generation>`).
fn pid_of(worker: &str) -> anyhow::Result<u32> {
    let mut parts = worker.rsplit('-');
    let pid = parts
        .nth(2)
        .context("worker name ends -<pid>-<ms>-<generation>")?;
    Ok(pid.parse()?)
}

#[tokio::test]
async fn a_job_that_crashes_its_worker_on_every_attempt_ends_killed_after_max_attempts()
-> anyhow::Result<()> {
    tests::budget::runs_processes(2);
    use std::os::unix::process::ExitStatusExt as _;
    let db = TestDb::migrated().await?;
    let mut env = fast_worker_env();
    env.extend([("DATABASE_URL", db.url.as_str()), ("JOB_LEASE", "2")]);
    let mut worker = Process::started_worker(&env).await?;
    let ids = enqueue_probes(&db.pool, [probe("crasher", Behaviour::Abort)]).await?;
    // A supervisor's part: start a new worker whenever one dies.
    let mut crashes = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(status) = worker.exited()? {
            assert_eq!(status.signal(), Some(6), "the worker aborted: {status}");
            crashes += 1;
            // Not `started_worker`: the new worker may take the crasher over
            // and abort before it has registered all its queues.
            worker = Process::spawn("worker", &env)?;
        }
        let (status, attempts, _) = job_row(&db, &ids[0]).await?;
        if status == "Killed" {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "after {crashes} crashes the job is still {status} with {attempts} attempts"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let max = usize::try_from(<Probe as jobs::Job>::MAX_ATTEMPTS)?;
    let (status, attempts, last_result) = job_row(&db, &ids[0]).await?;
    println!("killed after {crashes} crashes: {last_result}");
    assert_eq!(
        (status.as_str(), usize::try_from(attempts)?),
        ("Killed", max),
        "{last_result}"
    );
    assert!(
        last_result.contains(&format!("gave up after {max} of {max} attempts"))
            && last_result.contains("lost with its worker"),
        "an honest reason: {last_result}"
    );
    let runs = runs(&db, "crasher").await?;
    let numbers: Vec<i32> = runs.iter().map(|r| r.0).collect();
    assert_eq!(
        numbers,
        [1, 2, 3],
        "each attempt ran once, in its own worker: {runs:?}"
    );
    assert!(runs.iter().all(|r| !r.3), "no attempt finished: {runs:?}");
    let pids: std::collections::HashSet<u32> = runs
        .iter()
        .map(|r| pid_of(&r.1))
        .collect::<anyhow::Result<_>>()?;
    assert_eq!(
        pids.len(),
        max,
        "each attempt in a worker of its own: {runs:?}"
    );
    assert_eq!(crashes, max, "each attempt crashed its worker");
    // The survivor is not crash-looping: it stays up and stops cleanly.
    assert!(
        worker.exited()?.is_none(),
        "the last worker is still running"
    );
    assert!(worker.terminate(Duration::from_secs(30)).await?.success());
    Ok(())
}
