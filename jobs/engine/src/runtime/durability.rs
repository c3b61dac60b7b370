//! Making every failed attempt end the same durable way.
//!
//! apalis-postgres on its own re-claims a failed row at once (no backoff),
//! leaves a row `Running` forever when an attempt panics or times out, and
//! re-queues a lost worker's jobs without looking at `max_attempts`. This
//! layer, outermost around every handler, closes those gaps:
//!
//! - a failed, panicked or timed-out attempt ends `Failed`; its
//!   acknowledgement also pushes `run_at` out by the job type's backoff
//!   (`queries::RECORD_EVENTS`: one write), so the row is re-claimed only when
//!   due, and the delay survives restarts;
//! - the attempt that reaches `max_attempts` ends `Killed` (dead), with its
//!   error kept in `last_result`; so does a failed attempt of a job older
//!   than its type's `MAX_AGE`, with the age as the reason;
//! - a job's `JobError::retry_after` is a retry like any other, at its time;
//! - a job whose earlier attempts were lost with their worker (crash, lease
//!   expiry) and that has no attempts left is killed without running.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use apalis::prelude::{AbortError, BoxDynError, ExecutionContext, Status, Task};
use tower::{Layer, Service};

use crate::{
    durable::Suspension,
    job::{Backoff, RetryAfter},
    runtime::health::{Activity, mark_activity},
};

/// Wraps a worker's service with [`Durability`].
#[derive(Debug, Clone)]
pub(crate) struct DurabilityLayer {
    queue: &'static str,
    backoff: Backoff,
    max_age: Option<Duration>,
    activity: Activity,
}

impl DurabilityLayer {
    /// For the jobs of `queue`, retried after `backoff` until `max_age` after
    /// their enqueue (if any); each attempt's start is noted in `activity`
    /// (the worker's watchdog reads it).
    pub(crate) fn new(
        queue: &'static str,
        backoff: Backoff,
        max_age: Option<Duration>,
        activity: Activity,
    ) -> Self {
        Self {
            queue,
            backoff,
            max_age,
            activity,
        }
    }
}

impl<S> Layer<S> for DurabilityLayer {
    type Service = Durability<S>;
    fn layer(&self, inner: S) -> Durability<S> {
        Durability {
            inner,
            queue: self.queue,
            backoff: self.backoff,
            max_age: self.max_age,
            activity: self.activity.clone(),
        }
    }
}

/// The service installed by [`DurabilityLayer`]. It also counts outcomes:
/// `durable_jobs_{succeeded,failed,retried,dead}_total` and
/// `durable_jobs_duration_seconds`, labelled by queue.
#[derive(Debug, Clone)]
pub(crate) struct Durability<S> {
    inner: S,
    queue: &'static str,
    backoff: Backoff,
    max_age: Option<Duration>,
    activity: Activity,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, Args> Service<Task<Args>> for Durability<S>
where
    S: Service<Task<Args>>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: Into<BoxDynError>,
{
    type Response = S::Response;
    type Error = BoxDynError;
    type Future = BoxFuture<Result<S::Response, BoxDynError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxDynError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, task: Task<Args>) -> Self::Future {
        mark_activity(&self.activity);
        let ctx = task.ctx().clone();
        let max_attempts = ctx.max_attempts().unwrap_or(1);
        let job_id = ctx.task_id().map(ToString::to_string).unwrap_or_default();
        // Attempts already used: apalis counts an attempt lost with its worker
        // when it re-queues the job, but then ignores max_attempts.
        let used = ctx.attempt();
        let queue = self.queue;
        if used >= max_attempts {
            ctx.raw_status().store(Status::Killed);
            metrics::counter!("durable_jobs_dead_total", "queue" => queue).increment(1);
            let reason = format!(
                "gave up without running: {used} of its {max_attempts} attempts were already used \
                 (lost with their workers, or the row was edited)"
            );
            tracing::error!(job.id = %job_id, job.attempt = used, "job is dead: {reason}");
            return Box::pin(std::future::ready(Err(AbortError::new(reason).into())));
        }
        let run = self.inner.call(task);
        let (backoff, max_age) = (self.backoff, self.max_age);
        Box::pin(async move {
            let started = std::time::Instant::now();
            let mut result = run.await.map_err(Into::into);
            let outcome = match result {
                Ok(_) => {
                    metrics::counter!("durable_jobs_succeeded_total", "queue" => queue)
                        .increment(1);
                    "success"
                }
                Err(error) if error.downcast_ref::<Suspension>().is_some() => {
                    // Not a failure: the settle makes it wait again, using no attempt.
                    ctx.raw_status().store(Status::Pending);
                    metrics::counter!("durable_jobs_suspended_total", "queue" => queue)
                        .increment(1);
                    tracing::info!(job.id = %job_id, job.attempt = ctx.attempt(), "job {error}");
                    result = Err(error);
                    "suspended"
                }
                Err(error) => {
                    metrics::counter!("durable_jobs_failed_total", "queue" => queue).increment(1);
                    let failure = Failure {
                        ctx: &ctx,
                        max_attempts,
                        job_id: &job_id,
                        backoff,
                        max_age,
                    };
                    let (dead, error) = failure.settle(error);
                    let counter = if dead {
                        "durable_jobs_dead_total"
                    } else {
                        "durable_jobs_retried_total"
                    };
                    metrics::counter!(counter, "queue" => queue).increment(1);
                    result = Err(error);
                    "failure"
                }
            };
            metrics::histogram!("durable_jobs_duration_seconds", "queue" => queue, "outcome" => outcome)
                .record(started.elapsed().as_secs_f64());
            result
        })
    }
}

/// A failed attempt, and what decides how it ends.
struct Failure<'a> {
    ctx: &'a Arc<ExecutionContext>,
    max_attempts: usize,
    job_id: &'a str,
    backoff: Backoff,
    max_age: Option<Duration>,
}

impl Failure<'_> {
    /// Decides how the attempt ends (the acknowledgement writes it, with the
    /// retry's delay). Returns whether the job is dead, and the error to
    /// store (past its age, the age is the reason).
    fn settle(&self, error: BoxDynError) -> (bool, BoxDynError) {
        let Self {
            ctx,
            max_attempts,
            job_id,
            ..
        } = *self;
        let attempt = ctx.attempt();
        // A handler's AbortError has already marked the job Killed: permanent, no retry.
        if ctx.status() == Status::Killed || error.downcast_ref::<AbortError>().is_some() {
            ctx.raw_status().store(Status::Killed);
            tracing::error!(job.id = job_id, job.attempt = attempt, error = %error, "job is dead: permanent failure");
            return (true, error);
        }
        // Panics and timeouts never reach apalis's own status bookkeeping, which
        // would leave the row `Running`; every failure ends Failed or Killed here.
        if attempt >= max_attempts {
            ctx.raw_status().store(Status::Killed);
            tracing::error!(job.id = job_id, job.attempt = attempt, error = %error, "job is dead after {attempt} attempts");
            return (true, error);
        }
        if let Some(age) = self.past_its_age() {
            ctx.raw_status().store(Status::Killed);
            let reason = format!(
                "gave up: still failing {age:.1?} after it was enqueued, past its age limit of \
                 {:?} (MAX_AGE); the last error: {error}",
                self.max_age.unwrap_or_default()
            );
            tracing::error!(
                job.id = job_id,
                job.attempt = attempt,
                "job is dead: {reason}"
            );
            return (true, reason.into());
        }
        ctx.raw_status().store(Status::Failed);
        if let Some(asked) = error.downcast_ref::<RetryAfter>() {
            tracing::warn!(
                job.id = job_id,
                job.attempt = attempt,
                error = %error,
                "attempt {attempt} of {max_attempts} failed; running again in {:.1?}, as it asked",
                asked.delay
            );
        } else {
            let delay = self
                .backoff
                .nominal(u32::try_from(attempt).unwrap_or(u32::MAX));
            tracing::warn!(
                job.id = job_id,
                job.attempt = attempt,
                error = %error,
                "attempt {attempt} of {max_attempts} failed; retrying in about {delay:.1?}"
            );
        }
        (false, error)
    }

    /// The job's age, if its type has an age limit and the job is past it.
    /// The age runs from the enqueue: the time in the job's ULID.
    fn past_its_age(&self) -> Option<Duration> {
        let max_age = self.max_age?;
        let enqueued = ulid::Ulid::from_string(self.job_id).ok()?.datetime();
        let age = SystemTime::now()
            .duration_since(enqueued)
            .unwrap_or_default();
        (age >= max_age).then_some(age)
    }
}
