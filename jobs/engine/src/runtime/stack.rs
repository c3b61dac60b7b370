//! One job type's worker: the stack every attempt runs through (durability,
//! concurrency, its own task, its span, its timeout), the backend it claims
//! from, and the handler that decodes and runs the job.

use std::{
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use apalis::prelude::{
    AbortError, Attempt, BoxDynError, Data, MetadataStore, Monitor, ParallelizeExt as _, TaskId,
    WorkerBuilder, WorkerBuilderExt as _, WorkerContext,
};
use apalis_postgres::{Config, PgPool};

use crate::{
    backend::{storage::QueueStorage, wakeups::Wakeups},
    enqueue::decode,
    job::{Checkpoints, Job, JobContext, StepOf},
    maintenance::prune::{PruneContext, PruneJobs},
    runtime::{
        config::WorkerConfig, durability::DurabilityLayer, health::Activity, job_span::JobSpanLayer,
    },
    workflow::{WORKFLOW_ID_KEY, WORKFLOW_STEP_KEY},
};

/// Heartbeats per lease: a worker is declared dead after this many missed beats.
pub(crate) const HEARTBEATS_PER_LEASE: u32 = 3;

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
    pub(crate) pool: PgPool,
    pub(crate) bookkeeping: PgPool,
    pub(crate) wakeups: Wakeups,
    pub(crate) config: WorkerConfig,
    pub(crate) generation: usize,
    pub(crate) activity: Activity,
    pub(crate) signal_key: Arc<[u8]>,
    pub(crate) context: C,
}

impl<C> WorkerParts<C> {
    /// These parts with another context, made from the process's pool and
    /// the settings: for the engine's own job types (`PruneJobs`).
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
            signal_key: self.signal_key.clone(),
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
        signal_key,
        context,
    } = parts;
    let (pool, bookkeeping, wakeups, config, generation, activity, context) = (
        EnginePool {
            pool: pool.clone(),
            signal_key: signal_key.clone(),
        },
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
                J::MAX_AGE,
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

/// The pool a job's workflow reads and additions and its checkpoints use
/// (the process's main pool: they must survive a crash as the job's own
/// writes do), and the key of its signal URLs.
#[derive(Debug, Clone)]
struct EnginePool {
    pool: PgPool,
    signal_key: Arc<[u8]>,
}

/// The handler of every job type: decodes the stored JSON (a row nobody can
/// decode fails only its own job, dead with the reason) and runs it. (A
/// workflow step's attempt's trace, for its dependents' links, goes with its
/// result: see `AttemptTrace`.)
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
    let run = JobContext {
        id: &id,
        worker: worker.name(),
        attempt: u32::try_from(attempt.current()).unwrap_or(u32::MAX),
        max_attempts: J::MAX_ATTEMPTS,
        context: &*context,
        pool: &pool.pool,
        step: step.as_ref(),
        checkpoints: &Checkpoints::default(),
        signal_key: &pool.signal_key,
    };
    job.run(run).await.map_err(|failure| {
        if failure.fatal {
            AbortError::new(failure.error).into()
        } else {
            failure.error
        }
    })
}

/// Adds the `prune_jobs` worker beside an app's job types (see
/// [`Registry::new`](crate::Registry::new)), on the process's pool (a
/// queue's share of it, as any job type has).
pub(crate) fn add_prune_worker<C>(monitor: Monitor, parts: &WorkerParts<C>) -> Monitor {
    let parts = parts.with_context(|pool, config| PruneContext {
        pool: pool.clone(),
        retention: config.retention(),
    });
    add_worker::<PruneJobs>(monitor, &parts)
}
