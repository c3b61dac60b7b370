//! Making every failed attempt end the same durable way.
//!
//! apalis-postgres on its own re-claims a failed row at once (no backoff),
//! leaves a row `Running` forever when an attempt panics or times out, and
//! re-queues a lost worker's jobs without looking at `max_attempts`. This
//! layer, outermost around every handler, closes those gaps:
//!
//! - a failed, panicked or timed-out attempt ends `Failed` with `run_at`
//!   pushed out by an exponential backoff with jitter, stored in the row (so it
//!   survives restarts), and the row is re-claimed only when due;
//! - the attempt that reaches `max_attempts` ends `Killed` (dead), with its
//!   error kept in `last_result`;
//! - a job whose earlier attempts were lost with their worker (crash, lease
//!   expiry) and that has no attempts left is killed without running.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use apalis::prelude::{AbortError, BoxDynError, ExecutionContext, Status, Task};
use sqlx::PgPool;
use tower::{Layer, Service};

use crate::worker::{Activity, mark_activity};

/// Exponential backoff between attempts: `base · 2^(attempt-1)`, capped at
/// `max`, with ±10 % jitter (as Oban does) so that jobs failing together do
/// not retry together, while each delay stays clearly longer than the last.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Delay after the first failed attempt.
    pub base: Duration,
    /// Longest delay.
    pub max: Duration,
}

impl Backoff {
    /// The delay after failed attempt number `attempt` (1-based), before jitter.
    pub fn nominal(&self, attempt: usize) -> Duration {
        let exponent = u32::try_from(attempt.saturating_sub(1))
            .unwrap_or(u32::MAX)
            .min(30);
        self.base.saturating_mul(1 << exponent).min(self.max)
    }

    /// The delay with jitter in `[0.9, 1.1)` of the nominal one: consecutive
    /// delays still grow (each nominal one doubles until the cap).
    pub fn delay(&self, attempt: usize) -> Duration {
        self.nominal(attempt).mul_f64(0.9 + 0.2 * jitter())
    }
}

/// A number in `[0, 1)` that differs between calls and processes; jitter
/// needs spread, not cryptographic randomness.
fn jitter() -> f64 {
    use std::hash::{BuildHasher as _, RandomState};
    let bits = RandomState::new().hash_one(std::time::Instant::now());
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// Wraps a worker's service with [`Durability`].
#[derive(Debug, Clone)]
pub struct DurabilityLayer {
    queue: &'static str,
    pool: PgPool,
    backoff: Backoff,
    activity: Activity,
}

impl DurabilityLayer {
    /// For the jobs of `queue`; backoff delays are written to
    /// `apalis.jobs.run_at` through `pool`; each attempt's start is noted in
    /// `activity` (the worker's watchdog reads it).
    pub fn new(queue: &'static str, pool: PgPool, backoff: Backoff, activity: Activity) -> Self {
        Self {
            queue,
            pool,
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
            pool: self.pool.clone(),
            backoff: self.backoff,
            activity: self.activity.clone(),
        }
    }
}

/// The service installed by [`DurabilityLayer`]. It also counts outcomes:
/// `visitme_jobs_{succeeded,failed,retried,dead}_total` and
/// `visitme_job_duration_seconds`, labelled by queue.
#[derive(Debug, Clone)]
pub struct Durability<S> {
    inner: S,
    queue: &'static str,
    pool: PgPool,
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
            metrics::counter!("visitme_jobs_dead_total", "queue" => queue).increment(1);
            let reason = format!(
                "gave up without running: {used} of its {max_attempts} attempts were already used \
                 (lost with their workers, or the row was edited)"
            );
            tracing::error!(job.id = %job_id, job.attempt = used, "job is dead: {reason}");
            return Box::pin(std::future::ready(Err(AbortError::new(reason).into())));
        }
        let run = self.inner.call(task);
        let pool = self.pool.clone();
        let backoff = self.backoff;
        Box::pin(async move {
            let started = std::time::Instant::now();
            let result = run.await.map_err(Into::into);
            let outcome = match &result {
                Ok(_) => {
                    metrics::counter!("visitme_jobs_succeeded_total", "queue" => queue)
                        .increment(1);
                    "success"
                }
                Err(error) => {
                    metrics::counter!("visitme_jobs_failed_total", "queue" => queue).increment(1);
                    let dead =
                        settle_failure(&ctx, error, max_attempts, &job_id, &pool, backoff).await;
                    let counter = if dead {
                        "visitme_jobs_dead_total"
                    } else {
                        "visitme_jobs_retried_total"
                    };
                    metrics::counter!(counter, "queue" => queue).increment(1);
                    "failure"
                }
            };
            metrics::histogram!("visitme_job_duration_seconds", "queue" => queue, "outcome" => outcome)
                .record(started.elapsed().as_secs_f64());
            result
        })
    }
}

/// Decides how a failed attempt ends and records the backoff for a retry.
/// Returns whether the job is dead.
async fn settle_failure(
    ctx: &Arc<ExecutionContext>,
    error: &BoxDynError,
    max_attempts: usize,
    job_id: &str,
    pool: &PgPool,
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
    let delay = backoff.delay(attempt);
    tracing::warn!(
        job.id = job_id,
        job.attempt = attempt,
        error = %error,
        "attempt {attempt} of {max_attempts} failed; retrying in {delay:.1?}"
    );
    // Before the acknowledgement that marks the row Failed: once it is, the
    // row is claimable as soon as run_at has passed.
    let pushed = sqlx::query(
        "update apalis.jobs set run_at = clock_timestamp() + make_interval(secs => $2) where id = $1",
    )
    .bind(job_id)
    .bind(delay.as_secs_f64())
    .execute(pool)
    .await;
    if let Err(err) = pushed {
        tracing::warn!(job.id = job_id, error = %err, "could not store the retry delay; the retry may come early");
    }
    false
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

    #[test]
    fn jittered_delays_stay_within_ten_percent_and_keep_growing() {
        let backoff = Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(3600),
        };
        for attempt in 1..=10 {
            let (low, high) = (
                backoff.nominal(attempt).mul_f64(0.9),
                backoff.nominal(attempt).mul_f64(1.1),
            );
            for _ in 0..50 {
                let delay = backoff.delay(attempt);
                assert!(delay >= low && delay < high, "attempt {attempt}: {delay:?}");
                assert!(
                    delay
                        > backoff
                            .nominal(attempt.saturating_sub(1).max(1))
                            .mul_f64(1.1)
                        || attempt == 1
                );
            }
        }
    }
}
