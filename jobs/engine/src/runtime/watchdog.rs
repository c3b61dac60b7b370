//! The watchdog of one monitor run: restarts a worker that stopped claiming.

use std::{sync::atomic::Ordering, time::Duration};

use apalis_postgres::PgPool;
use tokio_util::sync::CancellationToken;

use crate::{
    queries,
    runtime::{
        config::WorkerConfig,
        health::{Activity, now_millis},
    },
};

/// Watchdog for one monitor run. A worker can come back from a database
/// outage alive but no longer claiming (seen in our outage test: due jobs
/// waited a minute while the process heartbeated). When jobs of our queues
/// have been due for a whole lease and this process started none in that
/// time (so it is not merely busy), it asks for a fresh monitor via `restart`.
pub(crate) async fn watch(
    pool: PgPool,
    queues: Vec<&'static str>,
    config: WorkerConfig,
    activity: Activity,
    restart: CancellationToken,
) {
    let lease_ms = u64::try_from(config.lease.as_millis()).unwrap_or(u64::MAX);
    let mut every = tokio::time::interval(config.lease.max(Duration::from_secs(1)));
    every.tick().await; // the first tick is immediate; give the monitor a lease first
    loop {
        every.tick().await;
        if now_millis().saturating_sub(activity.load(Ordering::Relaxed)) < lease_ms {
            continue;
        }
        let stalled: Result<bool, sqlx::Error> = sqlx::query_scalar(queries::DUE_FOR)
            .bind(&queues)
            .bind(config.lease.as_secs_f64())
            .fetch_one(&pool)
            .await;
        if let Ok(true) = stalled {
            tracing::warn!(
                "jobs have been due for a lease and none started here; restarting the worker"
            );
            restart.cancel();
            return;
        }
    }
}
