//! `TrimVisits`: delete every visit older than a threshold.
//!
//! **Running it twice is harmless**: the second run finds nothing older than the
//! threshold and deletes nothing. Delivery is at-least-once (a crashed worker's
//! job runs again), so this idempotence is what makes retries safe.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use durable_jobs::{Job, JobError, Merge, Unique};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tracing::Instrument as _;

use crate::JobContext;

/// Delete every visit with `created_at < older_than`.
///
/// The web tier enqueues one per page view with the oldest *shown* visit as the
/// threshold, so the visits a page shows are never deleted by its own job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrimVisits {
    /// Visits created strictly before this instant are deleted (full precision).
    pub older_than: DateTime<Utc>,
}

impl Job for TrimVisits {
    const NAME: &'static str = "trim_visits";
    const MAX_ATTEMPTS: u32 = 5;
    type Context = JobContext;
    type Output = TrimOutcome;

    /// Page views coalesce: one pending trim per [`COALESCE_WINDOW`], keeping
    /// the latest threshold (so it deletes everything each view's would
    /// have). A due trim takes no more merges, so a stream of views never
    /// keeps it locked from the claim.
    fn unique(&self) -> Option<Unique> {
        Some(
            Unique::key("all")
                .window(COALESCE_WINDOW)
                .merge(Merge::KeepGreatest {
                    // Fixed width, so that text order is time order.
                    order: self.older_than.to_rfc3339_opts(SecondsFormat::Nanos, true),
                }),
        )
    }

    async fn run(
        self,
        job: durable_jobs::JobContext<'_, JobContext>,
    ) -> Result<TrimOutcome, JobError> {
        tracing::debug!(job.id = job.id(), job.attempt = job.attempt(), older_than = %self.older_than, "trimming visits");
        Ok(self.perform(&job.context().pool, job.id()).await?)
    }
}

/// What a `TrimVisits` run did; stored as the job's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrimOutcome {
    /// How many visits were deleted.
    pub deleted: usize,
    /// The ids deleted, oldest first: the first [`SUMMARY_IDS`] of them
    /// (the page shows them; every id is also logged).
    #[serde(default)]
    pub ids: Vec<i64>,
}

/// Longest list of ids written into the summary line; every id also has its own
/// log record, so nothing is lost by shortening a huge summary.
pub const SUMMARY_IDS: usize = 100;

impl TrimVisits {
    /// Deletes the visits older than the threshold and returns their ids, oldest first.
    pub async fn delete_older(&self, pool: &PgPool) -> Result<Vec<i64>, sqlx::Error> {
        let mut ids: Vec<i64> =
            sqlx::query_scalar("delete from visits where created_at < $1 returning id")
                .bind(self.older_than)
                .fetch_all(pool)
                .instrument(observability::db_span("DELETE", "visits"))
                .await?;
        ids.sort_unstable();
        Ok(ids)
    }

    /// Runs the job: deletes, then logs one record per deleted visit and a summary.
    pub async fn perform(&self, pool: &PgPool, job_id: &str) -> Result<TrimOutcome, sqlx::Error> {
        let ids = self.delete_older(pool).await?;
        for id in &ids {
            tracing::info!(visit.id = id, job.id = %job_id, "deleted visit {id}");
        }
        let threshold = self.older_than.to_rfc3339();
        if ids.is_empty() {
            tracing::info!(
                job.id = %job_id,
                visits.deleted = 0,
                "No entities older than: {threshold}"
            );
        } else {
            let shown: Vec<String> = ids.iter().take(SUMMARY_IDS).map(i64::to_string).collect();
            let more = match ids.len().saturating_sub(SUMMARY_IDS) {
                0 => String::new(),
                n => format!(" (and {n} more)"),
            };
            tracing::info!(
                job.id = %job_id,
                visits.deleted = ids.len(),
                "Deleting {} entities: {}{more}",
                ids.len(),
                shown.join(", ")
            );
        }
        Ok(TrimOutcome {
            deleted: ids.len(),
            ids: ids.into_iter().take(SUMMARY_IDS).collect(),
        })
    }
}

/// How long a new `TrimVisits` waits before it may run. Page views within one
/// window merge into the same pending job, so a burst of visits costs one
/// trim per window instead of one per visit.
pub const COALESCE_WINDOW: Duration = Duration::from_millis(500);
