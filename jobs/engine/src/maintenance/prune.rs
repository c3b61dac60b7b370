//! The engine's own periodic job: `prune_jobs`, retention on
//! `JOB_PRUNE_SCHEDULE`, once per tick across all workers.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use crate::{
    admin::{self, Pruned, Retention},
    job::{Job, JobContext, JobError},
    schedule::Tick,
};

/// The engine's periodic prune: deletes finished jobs and workflows past their
/// retention ([`admin::prune`]), on `JOB_PRUNE_SCHEDULE`, once per tick across all
/// workers. Running it twice prunes nothing more.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct PruneJobs {
    tick: Tick,
}

impl From<Tick> for PruneJobs {
    fn from(tick: Tick) -> Self {
        Self { tick }
    }
}

/// What the prune needs: a connection and `JOB_RETENTION_DONE`/`_DEAD`.
#[derive(Debug, Clone)]
pub(crate) struct PruneContext {
    pub(crate) pool: PgPool,
    pub(crate) retention: Retention,
}

impl Job for PruneJobs {
    const NAME: &'static str = "prune_jobs";
    const MAX_ATTEMPTS: u32 = 3;
    // A first prune of a long-neglected queue deletes many rows.
    const TIMEOUT: Duration = Duration::from_secs(300);
    type Context = PruneContext;
    type Output = Pruned;

    async fn run(self, job: JobContext<'_, PruneContext>) -> Result<Pruned, JobError> {
        let context = job.context();
        let pruned = admin::prune(&context.pool, context.retention).await?;
        if pruned != Pruned::default() {
            tracing::info!(
                job.id = job.id(),
                jobs.done = pruned.done,
                jobs.dead = pruned.dead,
                workflows = pruned.workflows,
                workers = pruned.workers,
                tick = %self.tick.at,
                "pruned finished jobs"
            );
        }
        Ok(pruned)
    }
}
