#![doc = include_str!("../README.md")]

pub mod admin;
mod cron;
#[cfg(feature = "dashboard")]
pub mod dashboard;
mod durability;
mod enqueue;
mod error;
mod job;
mod job_span;
mod migrate;
mod queries;
mod registry;
mod seconds;
pub mod shutdown;
mod storage;
pub mod testing;
mod wakeups;
mod worker;
mod workflow;

pub use cron::{CatchUp, Schedule, Tick};
pub use enqueue::{enqueue, enqueue_many};
pub use error::Error;
pub use job::{Backoff, Job, JobContext, JobError, Merge, Unique};
pub use migrate::{is_migrated, migrate};
pub use registry::Registry;
pub use seconds::SecondsRange;
pub use worker::{Health, WorkerConfig, WorkerState, run, run_reporting};
pub use workflow::{OnDependencyFailure, Step, StepOf, Workflow};

/// Internals that the integration tests check against the real schema; not
/// part of the API, and may change without notice.
#[doc(hidden)]
pub mod internals {
    pub use crate::{
        queries::RECORD_EVENTS,
        storage::{Recorded, record_events, recover_orphans},
    };

    /// The bookkeeping pool a worker of one queue would use.
    pub fn bookkeeping_pool(config: &crate::WorkerConfig, pool: &sqlx::PgPool) -> sqlx::PgPool {
        config.bookkeeping_pool(pool, 1)
    }
}
