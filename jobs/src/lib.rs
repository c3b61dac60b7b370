#![doc = include_str!("../README.md")]

mod context;
#[cfg(feature = "probes")]
pub mod probe;
pub mod trim_visits;

pub use context::{JobContext, JobSettings};
pub use durable_jobs::{
    Error, Health, Job, Registry, Worker, WorkerConfig, WorkerState, admin, enqueue, enqueue_many,
    shutdown,
};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
pub use trim_visits::{
    APPROVAL, ChunkOutcome, Decision, NotApproved, TrimChunk, TrimOutcome, TrimPlan, TrimSummary,
    TrimVisits,
};

/// Every job type VisitMe runs, registered once: the worker runtime, the
/// unknown-type reaper, the watchdog, pool sizing and the dashboard read this.
/// Adding a job type is its file plus one `register` line here.
pub fn registry() -> Registry<JobContext> {
    let registry = Registry::new()
        .register::<TrimVisits>()
        .register::<TrimChunk>()
        .register::<TrimSummary>();
    // The diagnostic job of the tests and the bench, never in production builds.
    #[cfg(feature = "probes")]
    let registry = registry.register::<probe::Probe>();
    registry
}

/// Runs VisitMe's jobs ([`registry`]) until `shutdown`; see [`durable_jobs::Worker::run`].
pub async fn run(
    pool: PgPool,
    config: WorkerConfig,
    settings: JobSettings,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    run_reporting(pool, config, settings, shutdown, &Health::default()).await
}

/// [`run`], reporting what the worker is doing in `health`.
pub async fn run_reporting(
    pool: PgPool,
    config: WorkerConfig,
    settings: JobSettings,
    shutdown: CancellationToken,
    health: &Health,
) -> Result<(), Error> {
    let context = JobContext {
        pool: pool.clone(),
        settings,
    };
    durable_jobs::Worker::new(pool, registry(), context)
        .config(config)
        .health(health.clone())
        .run(shutdown)
        .await
}
