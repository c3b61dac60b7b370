//! The one declaration of a job type: [`Job`].

use std::{collections::HashMap, future::Future, sync::Mutex, time::Duration};

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
    /// Give up on a job still failing this long after it was enqueued,
    /// whatever attempts it has left (App Engine's `task_age_limit`, Cloud
    /// Tasks' `max_retry_duration`). Checked when an attempt fails: that
    /// attempt ends the job, dead, with the age as its reason. A delay
    /// counts: the age is measured from the enqueue (the job id's time).
    /// `None` (the default): attempts alone decide.
    const MAX_AGE: Option<Duration> = None;
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
    /// The engine's pool (workflow reads and additions, checkpoints).
    pub(crate) pool: &'a PgPool,
    pub(crate) step: Option<&'a StepOf>,
    /// The job's checkpoints, read at its first checkpoint call.
    pub(crate) checkpoints: &'a Checkpoints,
    /// The key that signs its signal URLs.
    pub(crate) signal_key: &'a [u8],
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
/// retry at a time the job names ([`JobError::retry_after`]), or give up now.
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

    /// Run again `delay` from now instead of after the backoff (a partner's
    /// `Retry-After`; Oban's snooze). It counts as an attempt (out of
    /// attempts, or past [`Job::MAX_AGE`], the job is dead) and is logged as
    /// a retry, with `reason`.
    pub fn retry_after(
        delay: Duration,
        reason: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self {
            error: Box::new(RetryAfter {
                delay,
                reason: reason.into(),
            }),
            fatal: false,
        }
    }
}

impl JobError {
    /// The child failure inside, if this is an awaited child's death
    /// ([`JobContext::await_result`]).
    pub fn child_failure(&self) -> Option<&ChildFailed> {
        self.error.downcast_ref()
    }
}

/// The error of [`JobError::retry_after`]: the runtime reads its delay
/// where it settles the attempt.
#[derive(Debug)]
pub(crate) struct RetryAfter {
    pub(crate) delay: Duration,
    reason: Box<dyn std::error::Error + Send + Sync>,
}

impl std::fmt::Display for RetryAfter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (asked to run again in {:?})",
            self.reason, self.delay
        )
    }
}

impl std::error::Error for RetryAfter {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.reason)
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
/// With [`Backoff::max_doublings`] (App Engine's `max_doublings`) the delay
/// doubles that many times, then grows by the last doubled step each time
/// (linearly), up to `max`. The delay is stored in the row (`run_at`), so it
/// survives restarts.
///
/// ```
/// # use std::time::Duration;
/// # use durable_jobs::Backoff;
/// // App Engine's min 10 s, max 300 s, 3 doublings: 10, 20, 40, 80, 160, 240, 300, 300 s.
/// const BACKOFF: Backoff =
///     Backoff::new(Duration::from_secs(10), Duration::from_secs(300)).max_doublings(3);
/// assert_eq!(BACKOFF.nominal(6), Duration::from_secs(240));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Delay after the first failed attempt.
    pub base: Duration,
    /// Longest delay.
    pub max: Duration,
    /// Doublings before the delay grows linearly (`None`: it doubles up to `max`).
    pub max_doublings: Option<u32>,
}

impl Backoff {
    /// 1 s, 2 s, 4 s, … up to an hour.
    pub const DEFAULT: Self = Self::new(Duration::from_secs(1), Duration::from_secs(3600));

    /// `base`, doubling per attempt up to `max`.
    pub const fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            max_doublings: None,
        }
    }

    /// Doubles `doublings` times, then grows linearly.
    pub const fn max_doublings(mut self, doublings: u32) -> Self {
        self.max_doublings = Some(doublings);
        self
    }

    /// The delay after failed attempt number `attempt` (1-based), before jitter.
    pub fn nominal(&self, attempt: u32) -> Duration {
        let steps = attempt.saturating_sub(1);
        let doublings = self.doublings();
        let delay = if steps <= doublings {
            self.base.saturating_mul(1 << steps)
        } else {
            // Linear past the doublings: base·2^d more per attempt.
            self.base
                .saturating_mul(1 << doublings)
                .saturating_mul(steps - doublings + 1)
        };
        delay.min(self.max)
    }

    /// The doublings in force (30 at most: 2^30 base periods is past any cap).
    pub(crate) fn doublings(&self) -> u32 {
        self.max_doublings.unwrap_or(30).min(30)
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
        let backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let nominal: Vec<u64> = (1..=8).map(|a| backoff.nominal(a).as_secs()).collect();
        assert_eq!(nominal, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(
            backoff.nominal(10_000),
            Duration::from_secs(60),
            "huge attempts do not overflow"
        );
    }

    #[test]
    fn max_doublings_turns_the_growth_linear_as_app_engine_does() {
        let backoff =
            Backoff::new(Duration::from_secs(10), Duration::from_secs(300)).max_doublings(3);
        let nominal: Vec<u64> = (1..=9).map(|a| backoff.nominal(a).as_secs()).collect();
        assert_eq!(nominal, [10, 20, 40, 80, 160, 240, 300, 300, 300]);
        let never = Backoff::new(Duration::from_secs(2), Duration::from_secs(60)).max_doublings(0);
        let nominal: Vec<u64> = (1..=4).map(|a| never.nominal(a).as_secs()).collect();
        assert_eq!(nominal, [2, 4, 6, 8], "0 doublings: linear from the start");
        assert_eq!(never.nominal(u32::MAX), Duration::from_secs(60));
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

/// The error of an awaited child that died (out of attempts, fatal,
/// cancelled): `JobContext::await_result` fails with it, and the parent is
/// then dead too unless it handles it ([`JobError::child_failure`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("child {child} died: {error}")]
pub struct ChildFailed {
    /// The child's id (a job's or a workflow's).
    pub child: String,
    /// Its last error.
    pub error: String,
}

/// The job's checkpoints, read once per attempt at its first checkpoint call.
#[derive(Debug, Default)]
pub(crate) struct Checkpoints(pub(crate) Mutex<Option<HashMap<String, Checkpoint>>>);

/// One recorded checkpoint (see `durable`).
#[derive(Debug, Clone)]
pub(crate) struct Checkpoint {
    pub(crate) kind: String,
    pub(crate) value_type: String,
    pub(crate) value: serde_json::Value,
}
