//! The worker runtime: pulls jobs from Postgres and runs them until shutdown.

use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use apalis::prelude::{
    BackendExt as _, Codec, Monitor, ParallelizeExt as _, Strategy, WorkerBuilder,
    WorkerBuilderExt as _,
};
use apalis_postgres::{Config, PgPool, PostgresStorage, Pubsub};
use tokio_util::sync::CancellationToken;

use crate::{
    Error, Job, JobContext,
    trim_visits::{self, TrimVisits},
};

/// Worker settings (flags and environment variables of `worker` and `web`).
#[derive(Debug, Clone, clap::Args)]
#[group(id = "worker")]
#[command(next_help_heading = "Worker")]
pub struct WorkerConfig {
    /// Jobs this process runs at once.
    #[arg(long, env = "WORKER_CONCURRENCY", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
    pub concurrency: u16,
    /// Seconds between queue polls, on top of LISTEN/NOTIFY wake-ups; picks up
    /// delayed and retried jobs, which send no notification.
    #[arg(long, env = "WORKER_POLL_INTERVAL", default_value = "1", value_parser = parse_seconds)]
    pub poll_interval: Duration,
    /// Seconds after which a silent worker's jobs are handed to another worker
    /// (heartbeats run at a third of this).
    #[arg(long, env = "JOB_LEASE", default_value = "30", value_parser = parse_seconds)]
    pub lease: Duration,
    /// Seconds a shutdown waits for running jobs before abandoning them (they
    /// are then recovered by another worker once the lease expires).
    #[arg(long, env = "WORKER_SHUTDOWN_GRACE", default_value = "25", value_parser = parse_seconds)]
    pub shutdown_grace: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            concurrency: 4,
            poll_interval: Duration::from_secs(1),
            lease: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(25),
        }
    }
}

fn parse_seconds(value: &str) -> Result<Duration, String> {
    let seconds: f64 = value
        .parse()
        .map_err(|_| format!("{value:?} is not a number of seconds"))?;
    Duration::try_from_secs_f64(seconds).map_err(|err| format!("{value:?}: {err}"))
}

/// How often the worker is restarted after dying on its own (lost database,
/// say) before `run` gives up; a run that lasted a minute resets the count.
const MAX_RESTARTS: u32 = 5;
const HEALTHY_RUN: Duration = Duration::from_secs(60);
/// Heartbeats per lease: a worker is declared dead after this many missed beats.
const HEARTBEATS_PER_LEASE: u32 = 3;

/// Decodes nothing: the handler receives the stored JSON bytes and decodes them
/// itself, so an undecodable row fails only its own job (see `trim_visits::handle`).
#[derive(Debug, Clone, Copy, Default)]
pub struct RawPayload;

impl Codec<Vec<u8>> for RawPayload {
    type Error = Infallible;
    type Compact = Vec<u8>;
    fn encode(&self, value: &Vec<u8>) -> Result<Vec<u8>, Infallible> {
        Ok(value.clone())
    }
    fn decode(&self, value: &Vec<u8>) -> Result<Vec<u8>, Infallible> {
        Ok(value.clone())
    }
}

/// A unique worker name per process and start: `<queue>@<host>-<pid>-<start ms>-<generation>`.
///
/// apalis refuses or confuses two live workers with one name (and a dead
/// worker's twin would keep its jobs from ever being recovered), so every
/// process and every restart gets its own.
fn worker_name(queue: &str, generation: u32) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    let started_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    format!(
        "{queue}@{host}-{}-{started_ms}-{generation}",
        std::process::id()
    )
}

/// Queue settings for one job type.
fn queue_config<J: Job>(config: &WorkerConfig) -> Config {
    let heartbeat = config.lease / HEARTBEATS_PER_LEASE;
    Config::default()
        .queue(J::QUEUE)
        // Claim no more than we can run, so other processes share the work.
        .batch_size(usize::from(config.concurrency))
        .heartbeat_interval(heartbeat)
        .missed_heartbeats(HEARTBEATS_PER_LEASE as usize)
}

/// Runs one monitor (all job types) until `shutdown` fires or a worker dies.
/// Returns whether it ended because of `shutdown`.
async fn run_monitor(
    pool: &PgPool,
    config: &WorkerConfig,
    generation: u32,
    shutdown: &CancellationToken,
) -> bool {
    let context = JobContext { pool: pool.clone() };
    let pool = pool.clone();
    let cfg = config.clone();
    let monitor = Monitor::new()
        .register(move |restarts| {
            let queue = queue_config::<TrimVisits>(&cfg);
            // LISTEN/NOTIFY wakes us within milliseconds of a commit; the interval
            // catches what sends no notification (retries, delayed jobs).
            let wake_up = Strategy::new()
                .stream(Pubsub::new(pool.clone(), TrimVisits::QUEUE.to_owned()))
                .interval(cfg.poll_interval);
            let backend = PostgresStorage::<Vec<u8>>::new(&pool)
                .with_config(queue)
                .poll_with_strategy(wake_up)
                .with_codec(RawPayload);
            WorkerBuilder::new(worker_name(TrimVisits::QUEUE, generation + restarts as u32))
                .backend(backend)
                .concurrency(usize::from(cfg.concurrency))
                // Each job on its own tokio task: jobs use all cores and a slow
                // job cannot stall the heartbeat.
                .parallelize(tokio::spawn)
                .data(context.clone())
                .build(trim_visits::handle)
        })
        .shutdown_timeout(config.shutdown_grace);

    let signalled = Arc::new(AtomicBool::new(false));
    let signal = {
        let signalled = signalled.clone();
        let shutdown = shutdown.clone();
        async move {
            shutdown.cancelled().await;
            signalled.store(true, Ordering::SeqCst);
            tracing::info!("worker shutting down: no new jobs, finishing running ones");
            Ok(())
        }
    };
    // With a shutdown timeout, apalis returns Ok even when every worker died,
    // so the signal flag, not the result, tells a shutdown from a death.
    if let Err(err) = monitor.run_with_signal(signal).await {
        tracing::error!(error = %err, "worker monitor failed");
    }
    signalled.load(Ordering::SeqCst)
}

/// Runs the job worker for every job type until `shutdown` is cancelled.
///
/// On shutdown it stops claiming, lets running jobs finish (up to
/// `shutdown_grace`), returns claimed-but-unstarted jobs to the queue and
/// returns `Ok`. If the worker dies on its own it is restarted with a backoff;
/// after [`MAX_RESTARTS`] quick deaths in a row this returns
/// [`Error::WorkerDied`].
pub async fn run(
    pool: PgPool,
    config: WorkerConfig,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    tracing::info!(
        queues = TrimVisits::QUEUE,
        concurrency = config.concurrency,
        lease = ?config.lease,
        "worker started"
    );
    let mut failures = 0u32;
    for generation in 0.. {
        let started = Instant::now();
        if run_monitor(&pool, &config, generation * 1000, &shutdown).await {
            tracing::info!("worker stopped");
            return Ok(());
        }
        if started.elapsed() >= HEALTHY_RUN {
            failures = 0;
        }
        failures += 1;
        if failures > MAX_RESTARTS {
            return Err(Error::WorkerDied {
                restarts: MAX_RESTARTS,
            });
        }
        let delay = Duration::from_secs(1 << (failures - 1).min(4));
        tracing::warn!(
            attempt = failures,
            "worker stopped unexpectedly; restarting in {delay:?}"
        );
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => return Ok(()),
        }
    }
    unreachable!("the generation counter does not run out")
}
