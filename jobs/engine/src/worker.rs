//! The worker runtime: pulls jobs from Postgres and runs them until shutdown.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use apalis::prelude::{
    AbortError, Attempt, BoxDynError, Data, MetadataStore, Monitor, ParallelizeExt as _, TaskId,
    WorkerBuilder, WorkerBuilderExt as _, WorkerContext,
};
use apalis_postgres::{Config, PgPool};
use tokio_util::sync::CancellationToken;

use crate::{
    Error, Job, JobContext, Registry, Schedule,
    admin::{self, Retention},
    cron,
    durability::DurabilityLayer,
    enqueue::decode,
    job::Backoff,
    job_span::JobSpanLayer,
    queries,
    storage::QueueStorage,
    wakeups::Wakeups,
    workflow::{StepOf, WORKFLOW_ID_KEY, WORKFLOW_STEP_KEY},
};

/// Worker settings (flags and environment variables of `worker` and `web`).
#[derive(Debug, Clone, clap::Args)]
#[group(id = "worker")]
#[command(next_help_heading = "Worker")]
pub struct WorkerConfig {
    /// Jobs this process runs at once, per job type. The default suits short
    /// jobs (throughput needs many slots, since each claim and settle is a
    /// round trip); running jobs of every type share at most 8 database
    /// connections, and one that needs a connection waits for it.
    #[arg(long, env = "WORKER_CONCURRENCY", default_value_t = defaults::CONCURRENCY, value_parser = clap::value_parser!(u16).range(1..))]
    pub concurrency: u16,
    /// Most jobs a worker claims at a time (default: the concurrency), in
    /// two claims in flight of half as many each. A claim never takes more
    /// than the free slots, so a worker holds no job it cannot start at
    /// once; a smaller cap spreads a burst over more workers.
    #[arg(long, env = "WORKER_CLAIM_BATCH", value_parser = clap::value_parser!(u16).range(1..))]
    pub claim_batch: Option<u16>,
    /// Seconds between queue polls, on top of LISTEN/NOTIFY wake-ups; picks up
    /// delayed and retried jobs, which send no notification.
    #[arg(long, env = "WORKER_POLL_INTERVAL", default_value = defaults::POLL_INTERVAL, value_parser = ranges::POLL_INTERVAL.parser())]
    pub poll_interval: Duration,
    /// Seconds after which a silent worker's jobs are handed to another worker
    /// (heartbeats run at a third of this).
    #[arg(long, env = "JOB_LEASE", default_value = defaults::LEASE, value_parser = ranges::LEASE.parser())]
    pub lease: Duration,
    /// Seconds a shutdown waits for running jobs before abandoning them (they
    /// are then recovered by another worker once the lease expires).
    #[arg(long, env = "WORKER_SHUTDOWN_GRACE", default_value = defaults::SHUTDOWN_GRACE, value_parser = ranges::SHUTDOWN_GRACE.parser())]
    pub shutdown_grace: Duration,
    /// Seconds one attempt may run before it is cancelled and counted as
    /// failed, for every job type (default: each type's own, 60 s unless it
    /// says otherwise).
    #[arg(long, env = "JOB_TIMEOUT", value_parser = ranges::JOB_TIMEOUT.parser())]
    pub job_timeout: Option<Duration>,
    /// Seconds before the first retry, for every job type; each further retry
    /// waits twice as long (±10 % jitter). Default: each type's own (1 s
    /// unless it says otherwise).
    #[arg(long, env = "JOB_BACKOFF_BASE", value_parser = ranges::BACKOFF.parser())]
    pub backoff_base: Option<Duration>,
    /// Longest wait between retries, in seconds, for every job type (default:
    /// each type's own, an hour unless it says otherwise).
    #[arg(long, env = "JOB_BACKOFF_MAX", value_parser = ranges::BACKOFF.parser())]
    pub backoff_max: Option<Duration>,
    /// Seconds a done job is kept before it is pruned.
    #[arg(long, env = "JOB_RETENTION_DONE", default_value = defaults::RETENTION_DONE, value_parser = ranges::RETENTION.parser())]
    pub retention_done: Duration,
    /// Seconds a dead job is kept (visible to operators) before it is pruned.
    #[arg(long, env = "JOB_RETENTION_DEAD", default_value = defaults::RETENTION_DEAD, value_parser = ranges::RETENTION.parser())]
    pub retention_dead: Duration,
    /// When finished jobs are pruned: the engine's periodic `prune_jobs` job,
    /// once per tick across all workers. A cron expression of six fields,
    /// seconds first, in UTC (default: every minute).
    #[arg(long, env = "JOB_PRUNE_SCHEDULE", default_value = defaults::PRUNE_SCHEDULE, value_parser = Schedule::cron)]
    pub prune_schedule: Schedule,
    /// Seconds a due job of a type that no worker of any process has
    /// registered for that long may wait before it is killed, with a reason
    /// naming the types the fleet does handle (room for rolling deploys that
    /// add job types). Other services' job types on the same database are
    /// safe while their workers heartbeat.
    #[arg(long, env = "JOB_UNKNOWN_GRACE", default_value = defaults::UNKNOWN_GRACE, value_parser = ranges::UNKNOWN_GRACE.parser())]
    pub unknown_grace: Duration,
    /// Kill jobs of types nobody handles after `JOB_UNKNOWN_GRACE`
    /// (true/false). Off: such jobs wait until some worker handles them.
    #[arg(long, env = "JOB_KILL_UNHANDLED", default_value_t = true, action = clap::ArgAction::Set)]
    pub kill_unhandled: bool,
    /// Wait for the disk flush on the queue's own bookkeeping too (claims,
    /// start and finish marks, heartbeats; true/false). By default these commit
    /// asynchronously (`synchronous_commit=off` on those connections only),
    /// which helps where a flush is slow and bookkeeping commits are many
    /// (measured: 1.4-1.7x with small claims; about even with the default
    /// concurrency's large batches, see BENCHMARKS.md): a Postgres crash
    /// may then forget the last fraction of a second of them, and the jobs
    /// concerned run again, as after a worker crash. Enqueues and the jobs'
    /// own writes always wait for the flush.
    #[arg(long, env = "WORKER_SYNC_BOOKKEEPING", default_value_t = false, action = clap::ArgAction::Set)]
    pub sync_bookkeeping: bool,
}

impl WorkerConfig {
    /// Refuses settings outside their ranges (the command line refuses them
    /// while parsing; this catches a config built in code). `run` calls it
    /// first. The message names the variable, the value and the range.
    pub fn check(&self) -> Result<(), Error> {
        let durations = [
            (
                "WORKER_POLL_INTERVAL",
                ranges::POLL_INTERVAL,
                Some(self.poll_interval),
            ),
            ("JOB_LEASE", ranges::LEASE, Some(self.lease)),
            (
                "WORKER_SHUTDOWN_GRACE",
                ranges::SHUTDOWN_GRACE,
                Some(self.shutdown_grace),
            ),
            ("JOB_TIMEOUT", ranges::JOB_TIMEOUT, self.job_timeout),
            ("JOB_BACKOFF_BASE", ranges::BACKOFF, self.backoff_base),
            ("JOB_BACKOFF_MAX", ranges::BACKOFF, self.backoff_max),
            (
                "JOB_RETENTION_DONE",
                ranges::RETENTION,
                Some(self.retention_done),
            ),
            (
                "JOB_RETENTION_DEAD",
                ranges::RETENTION,
                Some(self.retention_dead),
            ),
            (
                "JOB_UNKNOWN_GRACE",
                ranges::UNKNOWN_GRACE,
                Some(self.unknown_grace),
            ),
        ];
        for (setting, range, value) in durations {
            if let Some(value) = value {
                range.check(setting, value).map_err(Error::Config)?;
            }
        }
        if self.concurrency == 0 {
            return Err(Error::Config(
                "WORKER_CONCURRENCY=0 is out of range: it must be from 1 to 65535".to_owned(),
            ));
        }
        if self.claim_batch == Some(0) {
            return Err(Error::Config(
                "WORKER_CLAIM_BATCH=0 is out of range: it must be from 1 to 65535".to_owned(),
            ));
        }
        Ok(())
    }

    /// The retry backoff of a job type that declares `declared`.
    pub fn backoff(&self, declared: Backoff) -> Backoff {
        Backoff {
            base: self.backoff_base.unwrap_or(declared.base),
            max: self.backoff_max.unwrap_or(declared.max),
        }
    }

    /// The retention these settings describe.
    pub fn retention(&self) -> Retention {
        Retention {
            done: self.retention_done,
            dead: self.retention_dead,
        }
    }

    /// Database connections a worker process running `registry` needs in the
    /// pool it is given: one per running job (its own writes), shared by
    /// every queue and at most 8, plus three for the runtime's upkeep (lost
    /// attempts, schedules, wake-ups). Beyond that cap, a job that needs a
    /// connection waits for one (up to the pool's acquire timeout): a large
    /// concurrency, which short jobs need for throughput, and a registry of
    /// many mostly idle queues stay within a small Postgres's connection
    /// limit (measured: per-queue pools of 6 put three test workers of five
    /// queues over Postgres's default 100, and their heartbeats failed). The
    /// queues' bookkeeping and the process's listener use a small pool of
    /// their own, built from this one.
    pub fn connections_needed<C>(&self, _registry: &Registry<C>) -> u32 {
        u32::from(self.concurrency).min(JOB_CONNECTIONS) + 3
    }

    /// The pool for the queues' own bookkeeping (claims, start and finish
    /// marks, heartbeats) and the process's listener: a small lazy twin of
    /// `pool` with session settings for that work alone. One connection per
    /// queue and three more: the listener, and for a busy queue its two
    /// claims and its settle beside the other queues' polls. Every queue
    /// registers and claims at once at start, which opens most of the pool,
    /// and the pool keeps what it opened (measured: an idle worker of five
    /// queues held 14 connections in all with two per queue and one here, 12 now):
    ///
    /// - `plan_cache_mode=force_generic_plan`: bookkeeping is a few statements
    ///   repeated with other ids, and a custom plan re-plans on every call
    ///   (measured: 0.3 ms of each 0.8 ms event round). The generic plans
    ///   are the ones we want: rows found by primary key or by the claim
    ///   index, whoever the worker is.
    /// - `synchronous_commit=off` unless `sync_bookkeeping`. Losing the newest
    ///   of these writes in a crash is safe: Postgres loses only a suffix of
    ///   its log, so a finish mark that survived means the job's own
    ///   (synchronous, earlier) writes survived too, and a lost mark or claim
    ///   puts the job back in the queue, to run again.
    pub(crate) fn bookkeeping_pool(&self, pool: &PgPool, queues: u32) -> PgPool {
        let mut settings = vec![("plan_cache_mode", "force_generic_plan")];
        if !self.sync_bookkeeping {
            settings.push(("synchronous_commit", "off"));
        }
        let connect = pool.connect_options().as_ref().clone().options(settings);
        pool.options()
            .clone()
            .min_connections(0)
            .max_connections(queues + 3)
            .connect_lazy_with(connect)
    }
}

/// The most connections running jobs get from the worker's pool, all queues
/// together (see [`WorkerConfig::connections_needed`]).
const JOB_CONNECTIONS: u32 = 8;

fn queue_count<C>(registry: &Registry<C>) -> u32 {
    u32::try_from(registry.jobs.len()).unwrap_or(u32::MAX)
}

/// The worker's defaults, written once: the command line's and [`Default`]'s.
mod defaults {
    pub(super) const CONCURRENCY: u16 = 128;
    pub(super) const POLL_INTERVAL: &str = "1";
    pub(super) const LEASE: &str = "30";
    pub(super) const SHUTDOWN_GRACE: &str = "25";
    pub(super) const RETENTION_DONE: &str = "86400";
    pub(super) const RETENTION_DEAD: &str = "604800";
    pub(super) const PRUNE_SCHEDULE: &str = "0 * * * * *";
    pub(super) const UNKNOWN_GRACE: &str = "3600";
}

impl Default for WorkerConfig {
    fn default() -> Self {
        // The defaults are constants of ours, so they parse.
        let seconds = |value| parse_seconds(value).expect("a default number of seconds");
        Self {
            concurrency: defaults::CONCURRENCY,
            claim_batch: None,
            poll_interval: seconds(defaults::POLL_INTERVAL),
            lease: seconds(defaults::LEASE),
            shutdown_grace: seconds(defaults::SHUTDOWN_GRACE),
            job_timeout: None,
            backoff_base: None,
            backoff_max: None,
            retention_done: seconds(defaults::RETENTION_DONE),
            retention_dead: seconds(defaults::RETENTION_DEAD),
            prune_schedule: Schedule::cron(defaults::PRUNE_SCHEDULE)
                .expect("the default prune schedule parses"),
            unknown_grace: seconds(defaults::UNKNOWN_GRACE),
            kill_unhandled: true,
            sync_bookkeeping: false,
        }
    }
}

fn parse_seconds(value: &str) -> Result<Duration, String> {
    let seconds: f64 = value
        .parse()
        .map_err(|_| format!("{value:?} is not a number of seconds"))?;
    Duration::try_from_secs_f64(seconds).map_err(|err| format!("{value:?}: {err}"))
}

/// The range of each duration setting: wide enough for any real use, narrow
/// enough that the runtime's timers and Postgres's intervals and timestamps
/// hold (a year is about 3.2e7 s; a timestamp overflows near 9e12 s from now).
mod ranges {
    use crate::SecondsRange;

    /// Polls need a pause: 0 panicked the timer.
    pub(super) const POLL_INTERVAL: SecondsRange = SecondsRange::new(0.01, 3600.0);
    /// Heartbeats run at a third of the lease: under a second, a busy
    /// worker's heartbeat misses it, and others take its jobs.
    pub(super) const LEASE: SecondsRange = SecondsRange::new(1.0, 86_400.0);
    pub(super) const SHUTDOWN_GRACE: SecondsRange = SecondsRange::new(0.0, 86_400.0);
    /// An attempt needs some time: 0 failed every attempt.
    pub(super) const JOB_TIMEOUT: SecondsRange = SecondsRange::new(0.001, 7.0 * 86_400.0);
    pub(super) const BACKOFF: SecondsRange = SecondsRange::new(0.0, 30.0 * 86_400.0);
    pub(super) const RETENTION: SecondsRange = SecondsRange::new(0.0, 10.0 * 365.0 * 86_400.0);
    pub(super) const UNKNOWN_GRACE: SecondsRange = SecondsRange::new(0.0, 365.0 * 86_400.0);
}

/// How often the worker is restarted after dying on its own (lost database,
/// say) before `run` gives up; a run that lasted a minute resets the count.
const MAX_RESTARTS: u32 = 5;
const HEALTHY_RUN: Duration = Duration::from_secs(60);
/// Heartbeats per lease: a worker is declared dead after this many missed beats.
const HEARTBEATS_PER_LEASE: u32 = 3;

/// A unique worker name per process and start: `<queue>@<host>-<pid>-<start ms>-<generation>`.
///
/// apalis refuses or confuses two live workers with one name (and a dead
/// worker's twin would keep its jobs from ever being recovered), so every
/// process and every restart gets its own.
fn worker_name(queue: &str, generation: usize) -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .map(|h| h.to_string_lossy().into_owned())
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
        .queue(J::NAME)
        .batch_size(usize::from(
            config.claim_batch.unwrap_or(config.concurrency),
        ))
        .heartbeat_interval(heartbeat)
        .missed_heartbeats(HEARTBEATS_PER_LEASE as usize)
}

/// What every job type's worker is built from (see [`add_worker`]).
pub(crate) struct WorkerParts<C> {
    pool: PgPool,
    bookkeeping: PgPool,
    wakeups: Wakeups,
    config: WorkerConfig,
    generation: usize,
    activity: Activity,
    context: C,
}

impl<C> WorkerParts<C> {
    /// These parts with another context, made from the process's pool and
    /// the settings: for the engine's own job types (`cron::PruneJobs`).
    pub(crate) fn with_context<D>(
        &self,
        context: impl FnOnce(&PgPool, &WorkerConfig) -> D,
    ) -> WorkerParts<D> {
        WorkerParts {
            pool: self.pool.clone(),
            bookkeeping: self.bookkeeping.clone(),
            wakeups: self.wakeups.clone(),
            config: self.config.clone(),
            generation: self.generation,
            activity: self.activity.clone(),
            context: context(&self.pool, &self.config),
        }
    }
}

/// Adds the worker of job type `J` to `monitor`: the closure apalis calls to
/// build (and, after a crash, rebuild) it. Every job type gets the same
/// stack, outermost first:
///
/// - `DurabilityLayer`: every failed attempt ends `Failed` (its backoff is
///   written with the acknowledgement) or `Killed` when out of attempts,
///   never stuck `Running`;
/// - `concurrency`: at most `WORKER_CONCURRENCY` attempts at once;
/// - `parallelize`: each attempt on its own tokio task (all cores; a slow job
///   cannot stall the heartbeat; a panic stays inside its task);
/// - `JobSpanLayer`: the attempt's CONSUMER span, in the enqueuer's trace;
/// - `timeout`: inside that task, so a timed-out attempt is really cancelled.
pub(crate) fn add_worker<J: Job>(monitor: Monitor, parts: &WorkerParts<J::Context>) -> Monitor {
    let WorkerParts {
        pool,
        bookkeeping,
        wakeups,
        config,
        generation,
        activity,
        context,
    } = parts;
    let (pool, bookkeeping, wakeups, config, generation, activity, context) = (
        EnginePool(pool.clone()),
        bookkeeping.clone(),
        wakeups.clone(),
        config.clone(),
        *generation,
        activity.clone(),
        context.clone(),
    );
    monitor.register(move |restarts: usize| {
        // LISTEN/NOTIFY wakes us within milliseconds of a commit (the
        // process's one listener, `wakeups`); the interval catches what sends
        // no notification.
        let backend = QueueStorage::new(
            &bookkeeping,
            queue_config::<J>(&config),
            config.backoff(J::BACKOFF),
            usize::from(config.concurrency),
            wakeups.subscribe(J::NAME),
            config.poll_interval,
        );
        WorkerBuilder::new(worker_name(J::NAME, generation + restarts))
            .backend(backend)
            .layer(DurabilityLayer::new(
                J::NAME,
                config.backoff(J::BACKOFF),
                activity.clone(),
            ))
            .concurrency(usize::from(config.concurrency))
            .parallelize(tokio::spawn)
            .layer(JobSpanLayer::new(J::NAME))
            .timeout(config.job_timeout.unwrap_or(J::TIMEOUT))
            .data(context.clone())
            .data(pool.clone())
            .build(handle::<J>)
    })
}

/// The pool a job's workflow reads and additions use (the process's main
/// pool: additions must survive a crash as the job's own writes do).
#[derive(Debug, Clone)]
struct EnginePool(PgPool);

/// The handler of every job type: decodes the stored JSON (a row nobody can
/// decode fails only its own job, dead with the reason) and runs it. A
/// workflow step first records its attempt's trace, for its dependents' links.
async fn handle<J: Job>(
    payload: Vec<u8>,
    context: Data<J::Context>,
    pool: Data<EnginePool>,
    metadata: MetadataStore,
    task_id: TaskId,
    attempt: Attempt,
    worker: WorkerContext,
) -> Result<J::Output, BoxDynError> {
    let job: J = decode(&payload, &task_id)?;
    let id = task_id.to_string();
    let step = match (
        metadata.get(WORKFLOW_ID_KEY),
        metadata.get(WORKFLOW_STEP_KEY),
    ) {
        (Some(workflow), Some(step)) => Some(StepOf {
            workflow: workflow.to_owned(),
            step: step.to_owned(),
        }),
        _ => None,
    };
    if let Some(step) = &step {
        let traceparent = observability::inject_current().remove("traceparent");
        // Only the links of a later fan-in depend on it: never fail the step.
        if let Err(err) = sqlx::query(queries::STEP_STARTED)
            .bind(&step.workflow)
            .bind(&step.step)
            .bind(traceparent)
            .execute(&(*pool).0)
            .await
        {
            tracing::warn!(job.id = %id, error = %err, "could not record the workflow step's start");
        }
    }
    let run = JobContext {
        id: &id,
        worker: worker.name(),
        attempt: u32::try_from(attempt.current()).unwrap_or(u32::MAX),
        max_attempts: J::MAX_ATTEMPTS,
        context: &*context,
        pool: &(*pool).0,
        step: step.as_ref(),
    };
    job.run(run).await.map_err(|failure| {
        if failure.fatal {
            AbortError::new(failure.error).into()
        } else {
            failure.error
        }
    })
}

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

/// When this process last started a job attempt (Unix milliseconds).
pub type Activity = Arc<AtomicU64>;

fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Records that a job attempt starts now.
pub fn mark_activity(activity: &Activity) {
    activity.store(now_millis(), Ordering::Relaxed);
}

/// Watchdog for one monitor run. A worker can come back from a database
/// outage alive but no longer claiming (seen in our outage test: due jobs
/// waited a minute while the process heartbeated). When jobs of our queues
/// have been due for a whole lease and this process started none in that
/// time (so it is not merely busy), it asks for a fresh monitor via `restart`.
async fn watch(
    pool: PgPool,
    queues: Vec<&'static str>,
    config: WorkerConfig,
    activity: Activity,
    restart: CancellationToken,
) {
    let lease_ms = u64::try_from(config.lease.as_millis()).unwrap_or(u64::MAX);
    let mut every = tokio::time::interval(config.lease.max(Duration::from_secs(1)));
    every.tick().await; // the first tick is immediate; give the monitor a lease first
    loop {
        every.tick().await;
        if now_millis().saturating_sub(activity.load(Ordering::Relaxed)) < lease_ms {
            continue;
        }
        let stalled: Result<bool, sqlx::Error> = sqlx::query_scalar(queries::DUE_FOR)
            .bind(&queues)
            .bind(config.lease.as_secs_f64())
            .fetch_one(&pool)
            .await;
        if let Ok(true) = stalled {
            tracing::warn!(
                "jobs have been due for a lease and none started here; restarting the worker"
            );
            restart.cancel();
            return;
        }
    }
}

/// What a worker's supervisor is doing, for readiness checks (`web`'s
/// `/readyz` with the embedded worker). Cheap to clone; clones share the state.
#[derive(Debug, Clone, Default)]
pub struct Health(Arc<std::sync::atomic::AtomicU8>);

/// The states [`Health`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// Not started yet, or stopped.
    Stopped,
    /// Running jobs.
    Running,
    /// Waiting for the database to answer before restarting.
    WaitingForDatabase,
    /// Died on its own; restarting after a pause.
    Restarting,
}

impl Health {
    /// The current state.
    pub fn state(&self) -> WorkerState {
        match self.0.load(Ordering::Relaxed) {
            1 => WorkerState::Running,
            2 => WorkerState::WaitingForDatabase,
            3 => WorkerState::Restarting,
            _ => WorkerState::Stopped,
        }
    }

    /// Records `state`.
    pub fn set(&self, state: WorkerState) {
        let code = match state {
            WorkerState::Stopped => 0,
            WorkerState::Running => 1,
            WorkerState::WaitingForDatabase => 2,
            WorkerState::Restarting => 3,
        };
        self.0.store(code, Ordering::Relaxed);
    }
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
pub async fn run<C: Clone + Send + Sync + 'static>(
    pool: PgPool,
    registry: Registry<C>,
    context: C,
    config: WorkerConfig,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    run_reporting(
        pool,
        registry,
        context,
        config,
        shutdown,
        &Health::default(),
    )
    .await
}

/// [`run`], reporting what it is doing in `health`.
pub async fn run_reporting<C: Clone + Send + Sync + 'static>(
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
    let bookkeeping = config.bookkeeping_pool(&pool, queue_count(&registry));
    let stop_listening = CancellationToken::new();
    let wakeups = Wakeups::listen(bookkeeping.clone(), stop_listening.clone());
    let max_timeout = registry
        .jobs
        .iter()
        .map(|job| job.timeout)
        .max()
        .unwrap_or_default();
    let maintenance = tokio::spawn(maintain(
        pool.clone(),
        queues.clone(),
        max_timeout,
        config.clone(),
        shutdown.clone(),
    ));
    let scheduler = tokio::spawn(cron::run(
        pool.clone(),
        cron::kept_by_workers(&registry, &config),
        shutdown.clone(),
    ));
    let waker = tokio::spawn(wake_for_due(
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
            let parts = WorkerParts {
                pool: pool.clone(),
                bookkeeping: bookkeeping.clone(),
                wakeups: wakeups.clone(),
                config: config.clone(),
                generation: generation * 1000,
                activity: activity.clone(),
                context: context.clone(),
            };
            let ended = run_monitor(&registry, &parts, &shutdown, &restart).await;
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

/// Every `poll_interval`, wakes this process's workers (and every other's)
/// for queues with due jobs (see `queries::WAKE_FOR_DUE`): retries and
/// delayed jobs start when due, not at the next heartbeat.
async fn wake_for_due(
    pool: PgPool,
    queues: Vec<&'static str>,
    poll_interval: Duration,
    shutdown: CancellationToken,
) {
    let mut every = tokio::time::interval(poll_interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            () = shutdown.cancelled() => return,
        }
        // A failure (the database is down, say) is the heartbeat's to report.
        // Twice the interval: a tick that came late still sees what fell due.
        let _ = sqlx::query(queries::WAKE_FOR_DUE)
            .bind(&queues)
            .bind(2.0 * poll_interval.as_secs_f64())
            .execute(&pool)
            .await;
    }
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

/// How often each worker process kills jobs of unknown types.
const KILL_UNHANDLED_EVERY: Duration = Duration::from_secs(60);

/// Queue upkeep, in every worker process (concurrent runs are harmless):
/// every lease, attempts lost with their acknowledgement go back to the queue;
/// every [`KILL_UNHANDLED_EVERY`], jobs of unknown types past their grace are
/// killed. (Finished jobs are pruned by the periodic `prune_jobs` job, once
/// per tick across all workers: see `cron`.)
async fn maintain(
    pool: PgPool,
    queues: Vec<&'static str>,
    max_timeout: Duration,
    config: WorkerConfig,
    shutdown: CancellationToken,
) {
    let mut every = tokio::time::interval(config.lease.max(Duration::from_secs(1)));
    let mut last_kill: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = every.tick() => {}
            () = shutdown.cancelled() => return,
        }
        // The longest timeout a job type of this process may have.
        let timeout = config.job_timeout.unwrap_or(max_timeout);
        match admin::reap_lost_attempts(&pool, timeout, config.lease).await {
            Ok(0) => {}
            Ok(reaped) => tracing::warn!(
                jobs.reaped = reaped,
                "returned attempts whose results were lost to the queue"
            ),
            Err(err) => {
                tracing::warn!(error = %err, "checking for lost attempts failed; will retry")
            }
        }
        if !config.kill_unhandled || last_kill.is_some_and(|at| at.elapsed() < KILL_UNHANDLED_EVERY)
        {
            continue;
        }
        last_kill = Some(Instant::now());
        match admin::kill_unhandled(&pool, &queues, config.unknown_grace).await {
            Ok(0) => {}
            Ok(killed) => tracing::warn!(
                jobs.killed = killed,
                "killed jobs of types no worker handles"
            ),
            Err(err) => {
                tracing::warn!(error = %err, "checking for unknown job types failed; will retry")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        worker: WorkerConfig,
    }

    #[test]
    fn the_command_lines_defaults_are_the_default_config() {
        // Only where no WORKER_*/JOB_* variable is set, as in CI.
        if std::env::vars().any(|(key, _)| key.starts_with("WORKER_") || key.starts_with("JOB_")) {
            return;
        }
        let parsed = Cli::try_parse_from(["worker"]).expect("no arguments parse");
        assert_eq!(
            format!("{:?}", parsed.worker),
            format!("{:?}", WorkerConfig::default())
        );
    }
}
