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
//!   error kept in `last_result`;
//! - a job whose earlier attempts were lost with their worker (crash, lease
//!   expiry) and that has no attempts left is killed without running.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use apalis::prelude::{AbortError, BoxDynError, ExecutionContext, Status, Task};
use tower::{Layer, Service};

use crate::{
    job::Backoff,
    runtime::health::{Activity, mark_activity},
};

/// Wraps a worker's service with [`Durability`].
#[derive(Debug, Clone)]
pub(crate) struct DurabilityLayer {
    queue: &'static str,
    backoff: Backoff,
    activity: Activity,
}

impl DurabilityLayer {
    /// For the jobs of `queue`, retried after `backoff`; each attempt's start
    /// is noted in `activity` (the worker's watchdog reads it).
    pub(crate) fn new(queue: &'static str, backoff: Backoff, activity: Activity) -> Self {
        Self {
            queue,
            backoff,
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
        let backoff = self.backoff;
        Box::pin(async move {
            let started = std::time::Instant::now();
            let result = run.await.map_err(Into::into);
            let outcome = match &result {
                Ok(_) => {
                    metrics::counter!("durable_jobs_succeeded_total", "queue" => queue)
                        .increment(1);
                    "success"
                }
                Err(error) => {
                    metrics::counter!("durable_jobs_failed_total", "queue" => queue).increment(1);
                    let dead = settle_failure(&ctx, error, max_attempts, &job_id, backoff);
                    let counter = if dead {
                        "durable_jobs_dead_total"
                    } else {
                        "durable_jobs_retried_total"
                    };
                    metrics::counter!(counter, "queue" => queue).increment(1);
                    "failure"
                }
            };
            metrics::histogram!("durable_jobs_duration_seconds", "queue" => queue, "outcome" => outcome)
                .record(started.elapsed().as_secs_f64());
            result
        })
    }
}

/// Decides how a failed attempt ends (the acknowledgement writes it, with
/// the retry's delay). Returns whether the job is dead.
fn settle_failure(
    ctx: &Arc<ExecutionContext>,
    error: &BoxDynError,
    max_attempts: usize,
    job_id: &str,
    backoff: Backoff,
) -> bool {
    let attempt = ctx.attempt();
    // A handler's AbortError has already marked the job Killed: permanent, no retry.
    if ctx.status() == Status::Killed || error.downcast_ref::<AbortError>().is_some() {
        ctx.raw_status().store(Status::Killed);
        tracing::error!(job.id = job_id, job.attempt = attempt, error = %error, "job is dead: permanent failure");
        return true;
    }
    // Panics and timeouts never reach apalis's own status bookkeeping, which
    // would leave the row `Running`; every failure ends Failed or Killed here.
    if attempt >= max_attempts {
        ctx.raw_status().store(Status::Killed);
        tracing::error!(job.id = job_id, job.attempt = attempt, error = %error, "job is dead after {attempt} attempts");
        return true;
    }
    ctx.raw_status().store(Status::Failed);
    let delay = backoff.nominal(u32::try_from(attempt).unwrap_or(u32::MAX));
    tracing::warn!(
        job.id = job_id,
        job.attempt = attempt,
        error = %error,
        "attempt {attempt} of {max_attempts} failed; retrying in about {delay:.1?}"
    );
    false
}
