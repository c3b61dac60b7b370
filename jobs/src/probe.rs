//! `Probe`: a diagnostic job that exercises the queue end to end.
//!
//! Each execution records a row in `job_probe_runs` (which attempt, which
//! worker, when it started and finished), then behaves as asked: succeed,
//! fail, panic, crash the process, sleep or wait for a lock. Operators use
//! it to check a deployment; our tests and benchmarks use it to prove
//! retries, crash recovery and scaling against the real `worker` binary. It
//! is built only with the `probes` cargo feature, which the tests and the
//! bench turn on.
//!
//! **Running it twice** records two runs: that is the point, so duplicates
//! are visible.

use durable_jobs::{Job, JobError};
use serde::{Deserialize, Serialize};

use crate::JobContext;

/// A diagnostic job: `key` names it in `job_probe_runs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    /// Free-form name, recorded with every run.
    pub key: String,
    /// What each attempt does.
    pub behaviour: Behaviour,
}

/// What a probe attempt does after recording its start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Behaviour {
    /// Finish at once.
    Succeed,
    /// Finish at once without recording the run (for queue benchmarks, where
    /// the side effect would be what is measured).
    Noop,
    /// Sleep, then succeed, without recording the run (for scaling benchmarks:
    /// two recorded writes per run would put the disk, not the queue, under test).
    Nap {
        /// How long, in milliseconds.
        millis: u64,
    },
    /// Fail the first `failures` attempts, then succeed.
    FailFirst {
        /// How many attempts fail.
        failures: usize,
    },
    /// Fail every attempt.
    FailAlways,
    /// Panic in every attempt.
    Panic,
    /// Sleep, then succeed.
    Sleep {
        /// How long, in milliseconds.
        millis: u64,
    },
    /// Abort the whole worker process (`std::process::abort`) in every
    /// attempt, after recording the run: a real crash, for crash-recovery tests.
    Abort,
    /// Run `count` trivial checkpointed steps (`job.step`), without
    /// recording the run (for the durable-execution benchmark).
    Steps {
        /// How many steps.
        count: u32,
    },
    /// Record the run, then wait durably (up to a minute) for the signal
    /// `go`: the resumed run records a second run (for the resume latency).
    AwaitSignal,
    /// Block until the Postgres advisory lock `lock` is free (someone else
    /// holds it to keep the job running), then succeed.
    WaitForLock {
        /// The advisory lock key.
        lock: i64,
    },
}

impl Job for Probe {
    const NAME: &'static str = "probe";
    const MAX_ATTEMPTS: u32 = 3;
    type Context = JobContext;
    type Output = ();

    async fn run(self, job: durable_jobs::JobContext<'_, JobContext>) -> Result<(), JobError> {
        run(self, &job).await
    }
}

async fn run(probe: Probe, job: &durable_jobs::JobContext<'_, JobContext>) -> Result<(), JobError> {
    let context = job.context();
    match probe.behaviour {
        Behaviour::Noop => return Ok(()),
        Behaviour::Nap { millis } => {
            tokio::time::sleep(std::time::Duration::from_millis(millis)).await;
            return Ok(());
        }
        Behaviour::Steps { count } => {
            for n in 0..count {
                job.step(&format!("step-{n}"), async { Ok::<_, JobError>(n) })
                    .await?;
            }
            return Ok(());
        }
        _ => {}
    }
    let attempt = job.attempt();
    let run_id: i64 = sqlx::query_scalar(
        "insert into job_probe_runs (probe, attempt, worker) values ($1, $2, $3) returning id",
    )
    .bind(&probe.key)
    .bind(i32::try_from(attempt)?)
    .bind(job.worker())
    .fetch_one(&context.pool)
    .await?;
    tracing::info!(job.id = job.id(), job.attempt = attempt, probe = %probe.key, "probe running");
    match probe.behaviour {
        Behaviour::Succeed | Behaviour::Noop | Behaviour::Nap { .. } | Behaviour::Steps { .. } => {}
        Behaviour::AwaitSignal => {
            job.wait_for::<bool>("go", std::time::Duration::from_secs(60))
                .await?;
        }
        Behaviour::FailFirst { failures } if attempt as usize <= failures => {
            return Err(JobError::retry(format!(
                "probe {} failing attempt {attempt} as asked",
                probe.key
            )));
        }
        Behaviour::FailFirst { .. } => {}
        Behaviour::FailAlways => {
            return Err(JobError::retry(format!(
                "probe {} fails every attempt (attempt {attempt})",
                probe.key
            )));
        }
        Behaviour::Panic => panic!("probe {} panics as asked (attempt {attempt})", probe.key),
        Behaviour::Abort => {
            tracing::error!(job.id = job.id(), job.attempt = attempt, probe = %probe.key, "probe aborting the process as asked");
            std::process::abort();
        }
        Behaviour::Sleep { millis } => {
            tokio::time::sleep(std::time::Duration::from_millis(millis)).await
        }
        Behaviour::WaitForLock { lock } => {
            // Transaction-scoped: the lock is released at commit, whatever happens.
            let mut tx = context.pool.begin().await?;
            sqlx::query("select pg_advisory_xact_lock($1)")
                .bind(lock)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        }
    }
    sqlx::query("update job_probe_runs set finished_at = clock_timestamp() where id = $1")
        .bind(run_id)
        .execute(&context.pool)
        .await?;
    Ok(())
}
