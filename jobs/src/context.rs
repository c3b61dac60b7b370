//! What VisitMe's jobs need at run time.

use std::{num::NonZeroU32, time::Duration};

use durable_jobs::SecondsRange;
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
    #[arg(long, env = "TRIM_CHUNK", default_value_t = JobSettings::DEFAULT_TRIM_CHUNK, value_parser = parse_trim_chunk)]
    pub trim_chunk: NonZeroU32,
    /// A trim that would delete more visits than this waits for an
    /// operator's approval (Approve or Reject on the dashboard's job page)
    /// before it deletes anything. Unset: trims never wait.
    #[arg(long, env = "TRIM_APPROVAL_ABOVE")]
    pub trim_approval_above: Option<u64>,
    /// How long a trim waits for that approval, in seconds; then it gives
    /// up without deleting, and logs why.
    #[arg(long, env = "TRIM_APPROVAL_TIMEOUT", default_value = "86400", value_parser = APPROVAL_TIMEOUT.parser())]
    pub trim_approval_timeout: Duration,
}

/// From a second to 30 days.
const APPROVAL_TIMEOUT: SecondsRange = SecondsRange::new(1.0, 30.0 * 86_400.0);

/// The most visits one chunk may delete: a chunk is one transaction, and its
/// record of the deleted ids is one row.
const MAX_TRIM_CHUNK: u32 = 100_000;

fn parse_trim_chunk(value: &str) -> Result<NonZeroU32, String> {
    value
        .trim()
        .parse::<u32>()
        .ok()
        .filter(|chunk| *chunk <= MAX_TRIM_CHUNK)
        .and_then(NonZeroU32::new)
        .ok_or_else(|| format!("must be a whole number from 1 to {MAX_TRIM_CHUNK}"))
}

impl JobSettings {
    /// The default [`JobSettings::trim_chunk`].
    pub const DEFAULT_TRIM_CHUNK: NonZeroU32 = NonZeroU32::new(1000).expect("not zero");
    /// The default [`JobSettings::trim_approval_timeout`]: a day.
    pub const DEFAULT_APPROVAL_TIMEOUT: Duration = Duration::from_secs(86_400);
}

impl Default for JobSettings {
    fn default() -> Self {
        Self {
            trim_chunk: Self::DEFAULT_TRIM_CHUNK,
            trim_approval_above: None,
            trim_approval_timeout: Self::DEFAULT_APPROVAL_TIMEOUT,
        }
    }
}
