//! The worker runtime: runs a [`Registry`]'s job types from Postgres until
//! shutdown. [`run`] is the supervisor: it starts the process's upkeep
//! (`maintenance`), its schedulers (`schedule`) and one monitor of workers
//! (`stack`: one per job type, each on its `backend`), and restarts the
//! monitor when it dies or its watchdog finds it stalled.

pub(crate) mod config;
pub(crate) mod durability;
pub(crate) mod health;
pub(crate) mod job_span;
pub(crate) mod registry;
pub mod shutdown;
pub(crate) mod stack;
pub(crate) mod watchdog;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use apalis::prelude::Monitor;
use apalis_postgres::PgPool;
use tokio_util::sync::CancellationToken;

use crate::{
    backend::wakeups::Wakeups,
    durable,
    error::Error,
    limits,
    maintenance::{self, Upkeep, prune::PruneJobs},
    runtime::{
        config::WorkerConfig,
        health::{Activity, Health, WorkerState, mark_activity, now_millis},
        registry::Registry,
        stack::WorkerParts,
        watchdog::watch,
    },
    schedule::{self, Periodic},
};

/// The schedules a worker process keeps: the registry's and the engine's
/// prune on `config.prune_schedule`.
fn kept_by_workers<C>(registry: &Registry<C>, config: &WorkerConfig) -> Vec<Periodic> {
    let mut schedules = vec![Periodic::new::<PruneJobs>(config.prune_schedule.clone())];
    schedules.extend(registry.schedules.iter().cloned());
    schedules
}

/// How often the worker is restarted after dying on its own (lost database,
/// say) before `run` gives up; a run that lasted a minute resets the count.
const MAX_RESTARTS: u32 = 5;
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// Why a monitor run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// The process is shutting down.
    Shutdown,
    /// The watchdog asked for a fresh monitor (see [`watch`]).
    Restart,
    /// A worker died on its own.
    Died,
}

/// Runs one monitor (every job type of `registry`) until `shutdown` or
/// `restart` fires or a worker dies; both signals stop it gracefully.
async fn run_monitor<C>(
    registry: &Registry<C>,
    parts: &WorkerParts<C>,
    shutdown: &CancellationToken,
    restart: &CancellationToken,
) -> Ended {
    let monitor = registry.jobs.iter().fold(Monitor::new(), |monitor, job| {
        (job.add_worker)(monitor, parts)
    });
    let config = &parts.config;
    let monitor = monitor.shutdown_timeout(config.shutdown_grace);

    let signalled = Arc::new(AtomicBool::new(false));
    let signal = {
        let signalled = signalled.clone();
        let (shutdown, restart) = (shutdown.clone(), restart.clone());
        async move {
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = restart.cancelled() => {}
            }
            signalled.store(true, Ordering::SeqCst);
            tracing::info!("worker stopping: no new jobs, finishing running ones");
            Ok(())
        }
    };
    // With a shutdown timeout, apalis returns Ok even when every worker died,
    // so the signal flag, not the result, tells a shutdown from a death.
    if let Err(err) = monitor.run_with_signal(signal).await {
        tracing::error!(error = %err, "worker monitor failed");
    }
    match (signalled.load(Ordering::SeqCst), shutdown.is_cancelled()) {
        (true, true) => Ended::Shutdown,
        (true, false) => Ended::Restart,
        (false, _) => Ended::Died,
    }
}

/// A worker process's jobs: every job type of a [`Registry`], with the
/// context their runs share, on `pool`, until shutdown.
///
/// ```no_run
/// # async fn example(pool: sqlx::PgPool, registry: durable_jobs::Registry<()>) -> Result<(), durable_jobs::Error> {
/// use durable_jobs::{Worker, WorkerConfig};
/// let shutdown = durable_jobs::shutdown::on_signal();
/// Worker::new(pool, registry, ())
///     .config(WorkerConfig::default())
///     .run(shutdown)
///     .await
/// # }
/// ```
#[must_use = "a worker does nothing until `run`"]
pub struct Worker<C> {
    pool: PgPool,
    registry: Registry<C>,
    context: C,
    config: WorkerConfig,
    health: Health,
}

impl<C: Clone + Send + Sync + 'static> Worker<C> {
    /// A worker for `registry`'s job types, their runs sharing `context`,
    /// with the default [`WorkerConfig`]. `pool` must have
    /// [`WorkerConfig::connections_needed`] connections.
    pub fn new(pool: PgPool, registry: Registry<C>, context: C) -> Self {
        Self {
            pool,
            registry,
            context,
            config: WorkerConfig::default(),
            health: Health::default(),
        }
    }

    /// With these settings.
    pub fn config(mut self, config: WorkerConfig) -> Self {
        self.config = config;
        self
    }

    /// Reporting what it is doing in `health` (a clone shares the state:
    /// keep one for a readiness check).
    pub fn health(mut self, health: Health) -> Self {
        self.health = health;
        self
    }

    /// Runs the job worker for every job type until `shutdown` is cancelled.
    ///
    /// On shutdown it stops claiming, lets running jobs finish (up to
    /// `shutdown_grace`), returns claimed-but-unstarted jobs to the queue and
    /// returns `Ok`. If the worker dies while the database is unreachable, it
    /// waits for the database (with backoff, logging each wait) and restarts; that
    /// never counts against it. If it dies while the database answers, it is
    /// restarted with a backoff; after 5 such deaths in a row (a
    /// minute of healthy running resets the count) this returns [`Error::WorkerDied`].
    ///
    /// A config outside its ranges is refused at once ([`WorkerConfig::check`]).
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        supervise(
            self.pool,
            self.registry,
            self.context,
            self.config,
            shutdown,
            &self.health,
        )
        .await
    }
}

/// [`Worker::run`].
async fn supervise<C: Clone + Send + Sync + 'static>(
    pool: PgPool,
    registry: Registry<C>,
    context: C,
    config: WorkerConfig,
    shutdown: CancellationToken,
    health: &Health,
) -> Result<(), Error> {
    config.check()?;
    let queues = registry.queues();
    tracing::info!(
        queues = queues.join(", "),
        concurrency = config.concurrency,
        lease = ?config.lease,
        sync_bookkeeping = config.sync_bookkeeping,
        "worker started"
    );
    let bookkeeping = config.bookkeeping_pool(&pool, registry.queue_count());
    let stop_listening = CancellationToken::new();
    let wakeups = Wakeups::listen(bookkeeping.clone(), stop_listening.clone());
    let max_timeout = registry
        .jobs
        .iter()
        .map(|job| job.timeout)
        .max()
        .unwrap_or_default();
    let upkeep = Upkeep {
        lease: config.lease,
        // The longest timeout a job type of this process may have.
        job_timeout: config.job_timeout.unwrap_or(max_timeout),
        unknown_grace: config.unknown_grace,
        kill_unhandled: config.kill_unhandled,
    };
    let maintenance = tokio::spawn(maintenance::maintain(
        pool.clone(),
        queues.clone(),
        upkeep,
        shutdown.clone(),
    ));
    let scheduler = tokio::spawn(schedule::run(
        pool.clone(),
        kept_by_workers(&registry, &config),
        shutdown.clone(),
    ));
    let waker = tokio::spawn(maintenance::wake_for_due(
        pool.clone(),
        queues.clone(),
        config.poll_interval,
        shutdown.clone(),
    ));
    let activity: Activity = Arc::new(AtomicU64::new(now_millis()));
    let mut failures = 0u32;
    let result = async {
        for generation in 0.. {
            let started = Instant::now();
            let restart = CancellationToken::new();
            let watchdog = tokio::spawn(watch(
                pool.clone(),
                queues.clone(),
                config.clone(),
                activity.clone(),
                restart.clone(),
            ));
            health.set(WorkerState::Running);
            // Each type's declared limits, for every process's claims; a
            // failure (the database is down) is the claims' to report.
            for job in &registry.jobs {
                if let Err(err) = limits::declare(&pool, job.name, &job.limits).await {
                    tracing::warn!(queue = job.name, error = %err, "could not record the queue's declared limits");
                }
            }
            // The key of signal URLs; unreadable, the database is down.
            let ended = match durable::signal_key(&pool).await {
                Ok(key) => {
                    let parts = WorkerParts {
                        pool: pool.clone(),
                        bookkeeping: bookkeeping.clone(),
                        wakeups: wakeups.clone(),
                        config: config.clone(),
                        generation: generation * 1000,
                        activity: activity.clone(),
                        signal_key: key.into(),
                        context: context.clone(),
                    };
                    run_monitor(&registry, &parts, &shutdown, &restart).await
                }
                Err(err) => {
                    tracing::warn!(error = %err, "could not read the signal URLs' key");
                    Ended::Died
                }
            };
            watchdog.abort();
            match ended {
                Ended::Shutdown => return Ok(()),
                Ended::Restart => {
                    mark_activity(&activity);
                    continue;
                }
                Ended::Died => {}
            }
            if !database_answers(&pool).await {
                health.set(WorkerState::WaitingForDatabase);
                if wait_for_database(&pool, &shutdown).await.is_err() {
                    return Ok(());
                }
                tracing::info!("database is back; restarting the worker");
                continue;
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
            health.set(WorkerState::Restarting);
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
        Ok(())
    }
    .await;
    maintenance.abort();
    scheduler.abort();
    waker.abort();
    stop_listening.cancel();
    health.set(WorkerState::Stopped);
    if result.is_ok() {
        tracing::info!("worker stopped");
    }
    result
}

/// Whether the database answers a trivial query within a few seconds.
async fn database_answers(pool: &PgPool) -> bool {
    let ping = sqlx::query("select 1").execute(pool);
    matches!(
        tokio::time::timeout(Duration::from_secs(5), ping).await,
        Ok(Ok(_))
    )
}

/// Waits, with a growing pause (1 s doubling to 30 s) and a log line per
/// wait, until the database answers; `Err` if `shutdown` came first.
async fn wait_for_database(pool: &PgPool, shutdown: &CancellationToken) -> Result<(), ()> {
    let mut pause = Duration::from_secs(1);
    let down_since = Instant::now();
    loop {
        tracing::warn!(
            down_for = ?Duration::from_secs(down_since.elapsed().as_secs()),
            "database unavailable; the worker waits for it (next check in {pause:?})"
        );
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = shutdown.cancelled() => return Err(()),
        }
        if database_answers(pool).await {
            return Ok(());
        }
        pause = (pause * 2).min(Duration::from_secs(30));
    }
}
