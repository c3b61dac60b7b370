//! `TrimVisits`: delete every visit older than a threshold.
//!
//! **Running it twice is harmless**: the second run finds nothing older than the
//! threshold and deletes nothing. Delivery is at-least-once (a crashed worker's
//! job runs again), so this idempotence is what makes retries safe.

use apalis::prelude::{AbortError, Attempt, BoxDynError, Data, TaskId};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use crate::{Job, JobContext};

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
    const QUEUE: &'static str = "trim_visits";
    const MAX_ATTEMPTS: usize = 5;
}

/// What a `TrimVisits` run did; stored as the job's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrimOutcome {
    /// How many visits were deleted.
    pub deleted: usize,
}

/// Longest list of ids written into the summary line; every id also has its own
/// log record, so nothing is lost by shortening a huge summary.
const SUMMARY_IDS: usize = 100;

impl TrimVisits {
    /// Deletes the visits older than the threshold and returns their ids, oldest first.
    pub async fn delete_older(&self, pool: &PgPool) -> Result<Vec<i64>, sqlx::Error> {
        let mut ids: Vec<i64> =
            sqlx::query_scalar("delete from visits where created_at < $1 returning id")
                .bind(self.older_than)
                .fetch_all(pool)
                .await?;
        ids.sort_unstable();
        Ok(ids)
    }

    /// Runs the job: deletes, then logs one record per deleted visit and a summary.
    pub async fn perform(&self, pool: &PgPool, job_id: &str) -> Result<TrimOutcome, sqlx::Error> {
        let ids = self.delete_older(pool).await?;
        for id in &ids {
            tracing::info!(visit.id = id, job.id = job_id, "deleted visit {id}");
        }
        let threshold = self.older_than.to_rfc3339();
        if ids.is_empty() {
            tracing::info!(
                job.id = job_id,
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
                job.id = job_id,
                visits.deleted = ids.len(),
                "Deleting {} entities: {}{more}",
                ids.len(),
                shown.join(", ")
            );
        }
        Ok(TrimOutcome { deleted: ids.len() })
    }
}

/// The worker's handler for the `trim_visits` queue.
///
/// It takes the raw payload and decodes it here, so a row no handler can decode
/// ends as a dead job with the decode error recorded, instead of stopping the
/// worker (apalis's own decoding fails the whole poll).
pub async fn handle(
    payload: Vec<u8>,
    context: Data<JobContext>,
    task_id: TaskId,
    attempt: Attempt,
) -> Result<TrimOutcome, BoxDynError> {
    let job_id = task_id.to_string();
    let job: TrimVisits = match serde_json::from_slice(&payload) {
        Ok(job) => job,
        Err(err) => {
            tracing::error!(job.id = %job_id, error = %err, "cannot decode TrimVisits payload; giving up on this job");
            return Err(AbortError::new(format!("cannot decode TrimVisits payload: {err}")).into());
        }
    };
    tracing::debug!(job.id = %job_id, job.attempt = attempt.current(), older_than = %job.older_than, "trimming visits");
    Ok(job.perform(&context.pool, &job_id).await?)
}
