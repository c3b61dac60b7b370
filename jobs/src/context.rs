//! What VisitMe's jobs need at run time.

use std::num::NonZeroU32;

use sqlx::PgPool;

/// Shared, cheap-to-clone resources handed to every job run (the registry's
/// context).
#[derive(Debug, Clone)]
pub struct JobContext {
    /// The application database (the same one that holds the queue).
    pub pool: PgPool,
    /// How VisitMe's jobs are tuned.
    pub settings: JobSettings,
}

/// Settings of VisitMe's jobs (flags and environment variables of `worker`
/// and `web`, which runs an embedded worker).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Args)]
#[command(next_help_heading = "Jobs")]
pub struct JobSettings {
    /// Most visits one trim step deletes in one transaction. A trim of more
    /// runs as a workflow of chunk steps of this size (by id range, each
    /// its own short transaction) and a summary step, so a backlog of a
    /// million visits never becomes one huge DELETE.
    #[arg(long, env = "TRIM_CHUNK", default_value_t = JobSettings::DEFAULT_TRIM_CHUNK)]
    pub trim_chunk: NonZeroU32,
}

impl JobSettings {
    /// The default [`JobSettings::trim_chunk`].
    pub const DEFAULT_TRIM_CHUNK: NonZeroU32 = NonZeroU32::new(1000).expect("not zero");
}

impl Default for JobSettings {
    fn default() -> Self {
        Self {
            trim_chunk: Self::DEFAULT_TRIM_CHUNK,
        }
    }
}
