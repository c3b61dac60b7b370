#![doc = include_str!("../README.md")]

pub mod admin;
mod backend;
#[cfg(feature = "cli")]
pub mod cli;
#[cfg(feature = "dashboard")]
pub mod dashboard;
mod durable;
mod enqueue;
mod error;
mod job;
#[cfg(test)]
mod layout_test;
mod limits;
mod maintenance;
mod migrate;
mod queries;
mod runtime;
mod schedule;
mod seconds;
pub mod testing;
mod workflow;

/// The axum the dashboard's router is built on.
#[cfg(feature = "dashboard")]
pub use axum;
pub use durable::{
    Child, Spawn, StepFuture,
    signals::{self, Signalled, signal},
};
pub use enqueue::{Enqueue, enqueue, enqueue_many, enqueue_many_with, enqueue_with};
pub use error::Error;
pub use job::{Backoff, ChildFailed, Job, JobContext, JobError, Merge, StepOf, Unique};
pub use limits::{Limits, Rate};
pub use migrate::{is_migrated, migrate};
pub use runtime::registry::Registry;
/// The sqlx this engine is built on (0.9): name its `PgPool` and
/// transactions through this, so an app on another sqlx cannot mix them up.
pub use sqlx;
/// The type of job ids.
pub use ulid::Ulid;

pub use runtime::shutdown;
pub use runtime::{
    Worker,
    config::WorkerConfig,
    health::{Health, WorkerState},
};
pub use schedule::{CatchUp, Schedule, Tick};
pub use seconds::SecondsRange;
pub use workflow::{ChildWorkflow, OnDependencyFailure, Step, Workflow};

/// Internals that the integration tests check against the real schema; not
/// part of the API, and may change without notice.
#[doc(hidden)]
pub mod internals {
    pub use crate::{
        backend::storage::{Recorded, record_events, recover_orphans},
        queries::RECORD_EVENTS,
    };

    /// The bookkeeping pool a worker of one queue would use.
    pub fn bookkeeping_pool(config: &crate::WorkerConfig, pool: &sqlx::PgPool) -> sqlx::PgPool {
        config.bookkeeping_pool(pool, 1)
    }
}
