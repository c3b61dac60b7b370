//! The one declaration of a job type: [`Job`].

use std::{future::Future, time::Duration};

use serde::{Serialize, de::DeserializeOwned};
use sqlx::PgPool;

use crate::limits::Limits;

/// A job type: a small serde value (ids, timestamps; not whole records) and
/// everything about how it runs. Declared once, registered once
/// ([`crate::Registry::register`]); the runtime, the reaper of unknown types,
/// the watchdog, pool sizing and the operator views all read it from there.
///
/// ```
/// use durable_jobs::{Job, JobContext, JobError};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// struct SendWelcome { user_id: i64 }
///
/// impl Job for SendWelcome {
///     const NAME: &'static str = "send_welcome";
///     type Context = sqlx::PgPool;
///     type Output = ();
///
///     async fn run(self, job: JobContext<'_, sqlx::PgPool>) -> Result<(), JobError> {
///         sqlx::query("update users set welcomed = true where id = $1")
///             .bind(self.user_id)
///             .execute(job.context())
///             .await?;
///         Ok(())
///     }
/// }
/// ```
///
/// Delivery is at-least-once (a worker that dies mid-job has it run again),
/// so `run` must be idempotent: say in the type's doc what running it twice
/// does.
pub trait Job: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The queue, stored as the row's `job_type`. Explicit and stable: renaming
    /// or moving the Rust type must never strand queued jobs.
    const NAME: &'static str;
    /// Attempts before the job is dead (`Killed`), counting lost ones.
    const MAX_ATTEMPTS: u32 = 20;
    /// How long one attempt may run before it is cancelled and counts as
    /// failed. The worker's `JOB_TIMEOUT` overrides it for every type.
    const TIMEOUT: Duration = Duration::from_secs(60);
    /// Delays between attempts. The worker's `JOB_BACKOFF_BASE` and
    /// `JOB_BACKOFF_MAX` override it for every type.
    const BACKOFF: Backoff = Backoff::DEFAULT;
    /// The priority of its jobs unless the enqueue says otherwise
    /// (`Enqueue::priority`): a claim takes the highest priority
    /// first, then the oldest due. Any `i16`; 0 by default.
    const PRIORITY: i16 = 0;

    /// What [`Job::run`] needs (a pool, clients, settings): given once to the
    /// [`crate::Registry`], shared by every run.
    type Context: Clone + Send + Sync + 'static;
    /// The job's result, stored in the row (`last_result`) when it succeeds.
    type Output: Serialize + DeserializeOwned + Send + Sync + 'static;

    /// At most one pending job per key; see [`Unique`]. `None` (the default):
    /// every enqueue is a job of its own.
    fn unique(&self) -> Option<Unique> {
        None
    }

    /// The queue's limits, across every worker process (see [`Limits`]);
    /// none by default. Operators override them without a deploy
    /// (`admin::set_limits`).
    fn limits() -> Limits {
        Limits::none()
    }

    /// The key of [`Limits::key_concurrency`] (a tenant, a partner account):
    /// at most that many of one key's jobs run at once, and claims go
    /// round-robin across keys. `None` (the default): a key of its own.
    fn concurrency_key(&self) -> Option<String> {
        None
    }

    /// Runs one attempt.
    fn run(
        self,
        job: JobContext<'_, Self::Context>,
    ) -> impl Future<Output = Result<Self::Output, JobError>> + Send;
}

/// What an attempt knows about itself, and the registry's context.
#[derive(Debug)]
pub struct JobContext<'a, C> {
    pub(crate) id: &'a str,
    pub(crate) worker: &'a str,
    pub(crate) attempt: u32,
    pub(crate) max_attempts: u32,
    pub(crate) context: &'a C,
    /// The engine's pool (workflow reads and additions).
    pub(crate) pool: &'a PgPool,
    pub(crate) step: Option<&'a StepOf>,
}

impl<'a, C> JobContext<'a, C> {
    /// The job's id (a ULID), as logs, the dashboard and `worker` show it.
    pub fn id(&self) -> &'a str {
        self.id
    }

    /// The name of the worker running this attempt (unique per process and start).
    pub fn worker(&self) -> &'a str {
        self.worker
    }

    /// This attempt's number, from 1.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Attempts allowed in all.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The context given to the registry.
    pub fn context(&self) -> &'a C {
        self.context
    }

    /// The workflow and step this job is, if it is a workflow step.
    pub fn workflow(&self) -> Option<&'a StepOf> {
        self.step
    }
}

/// How an attempt failed: retry later (the default for any error, via `?`),
/// or give up now.
#[derive(Debug)]
pub struct JobError {
    pub(crate) error: Box<dyn std::error::Error + Send + Sync>,
    pub(crate) fatal: bool,
}

impl JobError {
    /// Retry after the backoff, while attempts are left.
    pub fn retry(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self {
            error: error.into(),
            fatal: false,
        }
    }

    /// No retry: the job is dead at once, with this error (bad input, say).
    pub fn fatal(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self {
            error: error.into(),
            fatal: true,
        }
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for JobError {
    fn from(error: E) -> Self {
        Self::retry(error)
    }
}

impl std::fmt::Display for JobError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

/// Exponential backoff between attempts: `base · 2^(attempt-1)`, capped at
/// `max`, with ±10 % jitter (as Oban does) so that jobs failing together do
/// not retry together, while each delay stays clearly longer than the last.
/// The delay is stored in the row (`run_at`), so it survives restarts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Delay after the first failed attempt.
    pub base: Duration,
    /// Longest delay.
    pub max: Duration,
}

impl Backoff {
    /// 1 s, 2 s, 4 s, … up to an hour.
    pub const DEFAULT: Self = Self {
        base: Duration::from_secs(1),
        max: Duration::from_secs(3600),
    };

    /// The delay after failed attempt number `attempt` (1-based), before jitter.
    pub fn nominal(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(1).min(30);
        self.base.saturating_mul(1 << exponent).min(self.max)
    }
}

/// "At most one pending job per key": what [`Job::unique`] returns.
///
/// A job is pending from its enqueue until a worker claims it; at most one
/// job of a type is pending per key, and an enqueue that finds one merges
/// into it by [`Merge`]. Once claimed, the key is free: the next enqueue
/// starts a new job (a job that runs never takes merges, and a recovered or
/// retried job never conflicts with a newer one).
///
/// With [`Unique::window`], time is cut into windows of that length and the
/// key is per window: enqueues of one window share a job, which is due when
/// its window closes and takes no merges after that. Use it for keys enqueued
/// at a high rate: a due job that keeps taking merges stays locked by them
/// and the claim (`SKIP LOCKED`) passes it by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unique {
    pub(crate) key: String,
    pub(crate) window: Option<Duration>,
    pub(crate) merge: Merge,
}

impl Unique {
    /// At most one pending job of the type with this `key`; a newcomer
    /// leaves the pending one as it is ([`Merge::KeepExisting`]).
    pub fn key(key: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            window: None,
            merge: Merge::KeepExisting,
        }
    }

    /// One pending job per key and window of `window`, due when its window closes.
    pub fn window(mut self, window: Duration) -> Self {
        self.window = Some(window);
        self
    }

    /// How a newcomer merges into the pending job.
    pub fn merge(mut self, merge: Merge) -> Self {
        self.merge = merge;
        self
    }
}

/// How an enqueue merges into the pending job with its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Merge {
    /// The pending job stays as it is.
    KeepExisting,
    /// The newcomer's arguments (and trace) replace the pending job's.
    Replace,
    /// Whichever has the greater `order` (compared as text, so use a
    /// fixed-width rendering, e.g. of a timestamp) is kept: "the later
    /// threshold wins". The job's arguments and trace go with it.
    KeepGreatest {
        /// The newcomer's sort key.
        order: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_per_attempt_up_to_the_cap() {
        let backoff = Backoff {
            base: Duration::from_secs(1),
            max: Duration::from_secs(60),
        };
        let nominal: Vec<u64> = (1..=8).map(|a| backoff.nominal(a).as_secs()).collect();
        assert_eq!(nominal, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(
            backoff.nominal(10_000),
            Duration::from_secs(60),
            "huge attempts do not overflow"
        );
    }
}

/// Where a running job sits in its workflow (see [`crate::JobContext::workflow`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepOf {
    /// The workflow's id.
    pub workflow: String,
    /// The step's name.
    pub step: String,
}
