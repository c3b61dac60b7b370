//! Faults with real processes: a database outage, workers killed mid-drain, a soak.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use jobs::probe::{Behaviour, Probe};
use nix::sys::signal::Signal;
use tests::{Process, TestDb, cluster::PrivateCluster, enqueue_probes, fast_worker_env};

/// `(seconds since start, status or 0 for a transport error, latency)` per request.
type Samples = Arc<Mutex<Vec<(f64, u16, Duration)>>>;

/// Visits `address` from `clients` loops until `stop`, `pause` apart.
fn load(
    address: &str,
    clients: usize,
    pause: Duration,
    stop: Arc<AtomicBool>,
    started: Instant,
) -> (Samples, Vec<tokio::task::JoinHandle<()>>) {
    let samples: Samples = Arc::default();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client");
    let tasks = (0..clients)
        .map(|n| {
            let (http, stop, samples, url) = (
                http.clone(),
                stop.clone(),
                samples.clone(),
                format!("http://{address}/"),
            );
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let sent = Instant::now();
                    let status = match http
                        .get(&url)
                        .header("user-agent", format!("load-{n}"))
                        .send()
                        .await
                    {
                        Ok(response) => response.status().as_u16(),
                        Err(_) => 0,
                    };
                    samples.lock().expect("samples").push((
                        started.elapsed().as_secs_f64(),
                        status,
                        sent.elapsed(),
                    ));
                    tokio::time::sleep(pause).await;
                }
            })
        })
        .collect();
    (samples, tasks)
}

#[tokio::test]
async fn a_5_second_postgres_outage_gives_fast_503s_recovers_and_loses_no_job() -> anyhow::Result<()>
{
    let cluster = PrivateCluster::start()?;
    let url = cluster.url("visitme");
    let mut env = fast_worker_env();
    env.push(("DATABASE_URL", url.as_str()));
    // Production's retry spacing (1 s, 2 s, 4 s, …): five attempts outlast a
    // 5 s outage, as they must (the test default of 0.2 s would not).
    env.push(("JOB_BACKOFF_BASE", "1"));
    let mut web = Process::spawn(
        "web",
        &[
            ("DATABASE_URL", url.as_str()),
            ("BIND", "127.0.0.1:0"),
            ("EMBEDDED_WORKER", "false"),
        ],
    )?;
    let mut worker = Process::spawn("worker", &env)?;
    let address = web.web_address().await?;
    worker
        .wait_for_line("worker started", Duration::from_secs(60))
        .await?;

    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let (samples, clients) = load(
        &address,
        4,
        Duration::from_millis(20),
        stop.clone(),
        started,
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.stop()?;
    let outage = (started.elapsed().as_secs_f64(), Instant::now());
    tokio::time::sleep(Duration::from_secs(5)).await;
    cluster.resume()?;
    let resumed = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(6)).await;
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await?;
    }
    let samples = samples.lock().expect("samples").clone();

    let count = |status: u16| samples.iter().filter(|s| s.1 == status).count();
    let unexpected: Vec<_> = samples
        .iter()
        .filter(|s| s.1 != 200 && s.1 != 503)
        .collect();
    let slowest = samples.iter().map(|s| s.2).max().unwrap_or_default();
    let recovered_at = samples
        .iter()
        .filter(|s| s.0 > resumed && s.1 == 200)
        .map(|s| s.0)
        .fold(f64::MAX, f64::min);
    println!(
        "outage {:.1}s..{resumed:.1}s: {} requests, {} ok, {} x 503, slowest {slowest:?}, first 200 after restart at +{:.2}s",
        outage.0,
        samples.len(),
        count(200),
        count(503),
        recovered_at - resumed,
    );
    assert!(unexpected.is_empty(), "only 200s and 503s: {unexpected:?}");
    assert!(count(503) > 0, "the outage was seen");
    assert!(
        slowest < Duration::from_secs(6),
        "no request hangs: {slowest:?}"
    );
    assert!(recovered_at < resumed + 5.0, "the web recovered by itself");
    let _ = outage.1;

    // Every job committed before (and after) the outage completes; the worker reconnected.
    let db = sqlx::PgPool::connect_with(migrations::parse_url(&url)?).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let open: i64 =
            sqlx::query_scalar("select count(*) from apalis.jobs where status not in ('Done')")
                .fetch_one(&db)
                .await?;
        if open == 0 {
            break;
        }
        if Instant::now() >= deadline {
            let rows: Vec<(String, String, i32, Option<String>)> = sqlx::query_as(
                "select job_type, status, attempts, last_result::text from apalis.jobs where status <> 'Done'",
            )
            .fetch_all(&db)
            .await?;
            anyhow::bail!("{open} jobs not done after the outage: {rows:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The invariant: after one more view and its trim, only the 10 newest remain.
    reqwest::get(format!("http://{address}/"))
        .await?
        .error_for_status()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while sqlx::query_scalar::<_, i64>("select count(*) from visits")
        .fetch_one(&db)
        .await?
        != 10
    {
        anyhow::ensure!(Instant::now() < deadline, "the table was not trimmed to 10");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    db.close().await;
    for process in [web, worker] {
        assert!(process.terminate(Duration::from_secs(30)).await?.success());
    }
    Ok(())
}

#[tokio::test]
async fn workers_sigkilled_again_and_again_during_a_1000_job_drain_lose_nothing()
-> anyhow::Result<()> {
    let db = TestDb::migrated().await?;
    let mut env = fast_worker_env();
    env.push(("DATABASE_URL", db.url.as_str()));
    let mut workers = Vec::new();
    for _ in 0..3 {
        let worker = Process::started_worker(&env).await?;
        workers.push(worker);
    }
    let started = Instant::now();
    enqueue_probes(
        &db.pool,
        (0..1000).map(|n| Probe {
            key: format!("k{n}"),
            behaviour: Behaviour::Sleep { millis: 20 },
        }),
    )
    .await?;
    let mut kills = 0;
    loop {
        let open: i64 = sqlx::query_scalar(
            "select count(*) from apalis.jobs where status in ('Pending', 'Queued', 'Running')
                or (status = 'Failed' and attempts < max_attempts)",
        )
        .fetch_one(&db.pool)
        .await?;
        if open == 0 {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(180),
            "{open} jobs still open"
        );
        if kills < 12 {
            tokio::time::sleep(Duration::from_millis(600)).await;
            let victim = kills % workers.len();
            workers[victim].signal(Signal::SIGKILL)?;
            workers[victim] = Process::spawn("worker", &env)?;
            kills += 1;
        } else {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let elapsed = started.elapsed();
    db.drain_queue(Duration::from_secs(5)).await?;
    let finished: i64 = sqlx::query_scalar(
        "select count(distinct probe) from job_probe_runs where finished_at is not null",
    )
    .fetch_one(&db.pool)
    .await?;
    let rerun: i64 = sqlx::query_scalar("select count(*) from (select probe from job_probe_runs group by probe having count(*) > 1) as r")
        .fetch_one(&db.pool)
        .await?;
    let finished_twice: i64 = sqlx::query_scalar(
        "select count(*) from (select probe from job_probe_runs where finished_at is not null group by probe having count(*) > 1) as r",
    )
    .fetch_one(&db.pool)
    .await?;
    println!(
        "1000 jobs, {kills} SIGKILLs, drained in {elapsed:?}: {rerun} jobs re-run after a kill, {finished_twice} completed twice (at-least-once)"
    );
    assert_eq!(finished, 1000, "every job completed");
    for worker in workers {
        assert!(worker.terminate(Duration::from_secs(30)).await?.success());
    }
    Ok(())
}

/// `just soak` runs this for 60 s (`SOAK_SECONDS`); the test suite for 8 s.
#[tokio::test]
async fn soak_steady_visits_with_worker_restarts_keeps_every_promise() -> anyhow::Result<()> {
    let seconds: u64 = std::env::var("SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let db = TestDb::migrated().await?;
    let mut env = fast_worker_env();
    env.push(("DATABASE_URL", db.url.as_str()));
    let mut web = Process::spawn(
        "web",
        &[
            ("DATABASE_URL", db.url.as_str()),
            ("BIND", "127.0.0.1:0"),
            ("EMBEDDED_WORKER", "false"),
        ],
    )?;
    let address = web.web_address().await?;
    let mut workers = vec![
        Process::spawn("worker", &env)?,
        Process::spawn("worker", &env)?,
    ];
    for worker in &mut workers {
        worker
            .wait_for_line("worker started", Duration::from_secs(60))
            .await?;
    }
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let (samples, clients) = load(
        &address,
        2,
        Duration::from_millis(40),
        stop.clone(),
        started,
    );
    let mut restarts = 0;
    while started.elapsed() < Duration::from_secs(seconds) {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let victim = restarts % workers.len();
        let signal = if restarts % 2 == 0 {
            Signal::SIGTERM
        } else {
            Signal::SIGKILL
        };
        workers[victim].signal(signal)?;
        workers[victim] = Process::spawn("worker", &env)?;
        restarts += 1;
    }
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await?;
    }
    let samples = samples.lock().expect("samples").clone();
    let errors = samples.iter().filter(|s| s.1 != 200).count();
    // Jobs of killed workers come back after the lease (3 s here).
    db.drain_queue(Duration::from_secs(60)).await?;
    let visits = db.visit_ids().await?.len();
    println!(
        "soak {seconds}s: {} requests, {errors} errors, {restarts} worker restarts, {visits} visits left",
        samples.len()
    );
    assert_eq!(errors, 0, "zero unexpected 5xx or failed requests");
    let orphaned: i64 = sqlx::query_scalar(
        "select count(*) from apalis.jobs j join apalis.workers w on w.id = j.lock_by
         where j.status in ('Running', 'Queued') and w.last_seen < now() - interval '3 seconds'",
    )
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(orphaned, 0, "no job is held by a dead worker");
    let stale: i64 = sqlx::query_scalar("select count(*) from apalis.jobs where status = 'Pending' and run_at < now() - interval '3 seconds'")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(stale, 0, "no pending job older than the lease");
    assert!(visits <= 10 + 2, "the table stays bounded: {visits}");
    for process in workers.into_iter().chain([web]) {
        assert!(process.terminate(Duration::from_secs(30)).await?.success());
    }
    Ok(())
}
