//! What every worker process runs on its own, beside its workers, so that
//! no job is stuck however the fleet fails: attempts whose results were lost
//! go back to the queue, jobs of types no worker of the fleet handles end
//! dead, due jobs that no insert notified wake the workers, the queue's
//! statistics keep up with its size (plans stay fit for it), and the
//! periodic prune ([`prune::PruneJobs`]) keeps finished jobs within their
//! retention. Each is safe to run in many processes at once. Knows nothing of
//! the runtime: it is handed plain settings.

pub(crate) mod prune;

use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::{error::Error, queries};

/// The settings of a process's upkeep (from its `WorkerConfig`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Upkeep {
    /// How long a silent worker keeps its jobs; also the upkeep's period.
    pub(crate) lease: Duration,
    /// The longest an attempt of the process's job types may run.
    pub(crate) job_timeout: Duration,
    /// How long a type may go unhandled by the whole fleet before its jobs die.
    pub(crate) unknown_grace: Duration,
    /// Whether such jobs die at all.
    pub(crate) kill_unhandled: bool,
}

/// Every `poll_interval`, wakes this process's workers (and every other's)
/// for queues with due jobs (see `queries::WAKE_FOR_DUE`): retries and
/// delayed jobs start when due, not at the next heartbeat. And analyzes the
/// queue's table when it has outgrown its statistics
/// (`queries::ANALYZE_JOBS_IF_OUTGROWN`): every session's plans made on the
/// old ones are then made again, within a poll of a burst of jobs.
pub(crate) async fn wake_for_due(
    pool: PgPool,
    queues: Vec<&'static str>,
    poll_interval: Duration,
    shutdown: CancellationToken,
) {
    let mut every = tokio::time::interval(poll_interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            () = shutdown.cancelled() => return,
        }
        // A failure (the database is down, say) is the heartbeat's to report.
        // Twice the interval: a tick that came late still sees what fell due.
        let _ = sqlx::query(queries::WAKE_FOR_DUE)
            .bind(&queues)
            .bind(2.0 * poll_interval.as_secs_f64())
            .execute(&pool)
            .await;
        match sqlx::query_scalar::<_, bool>(queries::ANALYZE_JOBS_IF_OUTGROWN)
            .fetch_one(&pool)
            .await
        {
            Ok(true) => {
                tracing::info!("analyzed the queue's table: it had outgrown its statistics")
            }
            Ok(false) => {}
            // As above: the heartbeat reports an unreachable database.
            Err(err) => tracing::debug!(error = %err, "could not check the queue's statistics"),
        }
    }
}

/// How often each worker process kills jobs of unknown types.
const KILL_UNHANDLED_EVERY: Duration = Duration::from_secs(60);

/// Queue upkeep, in every worker process (concurrent runs are harmless):
/// every lease, attempts lost with their acknowledgement go back to the queue;
/// every [`KILL_UNHANDLED_EVERY`], jobs of unknown types past their grace are
/// killed. (Finished jobs are pruned by the periodic `prune_jobs` job, once
/// per tick across all workers: see `cron`.)
pub(crate) async fn maintain(
    pool: PgPool,
    queues: Vec<&'static str>,
    upkeep: Upkeep,
    shutdown: CancellationToken,
) {
    let mut every = tokio::time::interval(upkeep.lease.max(Duration::from_secs(1)));
    let mut last_kill: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = every.tick() => {}
            () = shutdown.cancelled() => return,
        }
        match reap_lost_attempts(&pool, upkeep.job_timeout, upkeep.lease).await {
            Ok(0) => {}
            Ok(reaped) => tracing::warn!(
                jobs.reaped = reaped,
                "returned attempts whose results were lost to the queue"
            ),
            Err(err) => {
                tracing::warn!(error = %err, "checking for lost attempts failed; will retry")
            }
        }
        if !upkeep.kill_unhandled || last_kill.is_some_and(|at| at.elapsed() < KILL_UNHANDLED_EVERY)
        {
            continue;
        }
        last_kill = Some(Instant::now());
        match kill_unhandled(&pool, &queues, upkeep.unknown_grace).await {
            Ok(0) => {}
            Ok(killed) => tracing::warn!(
                jobs.killed = killed,
                "killed jobs of types no worker handles"
            ),
            Err(err) => {
                tracing::warn!(error = %err, "checking for unknown job types failed; will retry")
            }
        }
    }
}

/// Kills pending jobs of types that no worker of the whole fleet handles (a
/// typo, or a job type that was removed) once they have been due for
/// `grace` and no worker of any process has registered that type within it
/// (see [`queries::KILL_UNHANDLED`]), so they end dead with the reason
/// recorded instead of waiting forever. `local_queues` (the caller's own)
/// always count as handled. Services that share a database keep each other's
/// backlogs: a type counts as handled while any worker of it is seen. The
/// grace leaves room for rolling deploys, where a new job type may be queued
/// before the workers that know it are up. Returns how many were killed.
pub(crate) async fn kill_unhandled(
    pool: &PgPool,
    local_queues: &[&str],
    grace: Duration,
) -> Result<u64, Error> {
    let local: Vec<String> = local_queues.iter().map(|q| (*q).to_owned()).collect();
    let killed: i64 = sqlx::query_scalar(queries::KILL_UNHANDLED)
        .bind(&local)
        .bind(grace.as_secs_f64())
        .fetch_one(pool)
        .await?;
    Ok(u64::try_from(killed).unwrap_or_default())
}

/// Returns attempts whose result can no longer arrive to the queue: rows
/// `Running` for longer than `job_timeout + lease` (the timeout cancels every
/// attempt, so such an attempt's acknowledgement was lost, e.g. in a database
/// outage), and rows claimed (`Queued`) but not started for longer than
/// `2 · job_timeout + lease`. apalis re-queues only the jobs of workers that
/// stopped heartbeating; these belong to live workers and would otherwise stay
/// stuck. They become `Failed` (retried at once, counted as an attempt) or, out
/// of attempts, `Killed`. Returns how many were returned.
pub(crate) async fn reap_lost_attempts(
    pool: &PgPool,
    job_timeout: Duration,
    lease: Duration,
) -> Result<u64, Error> {
    let reaped = sqlx::query(queries::REAP_LOST_ATTEMPTS)
        .bind(job_timeout.as_secs_f64())
        .bind(lease.as_secs_f64())
        .execute(pool)
        .await?
        .rows_affected();
    Ok(reaped)
}
