//! `TrimVisits`: delete every visit older than a threshold.
//!
//! **Running it twice is harmless**: the second run finds nothing older than the
//! threshold and deletes nothing. Delivery is at-least-once (a crashed worker's
//! job runs again), so this idempotence is what makes retries safe.

use std::time::Duration;

use apalis::prelude::{Attempt, BoxDynError, Data, TaskId};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool};
use ulid::Ulid;

use tracing::Instrument as _;

use crate::{Error, Job, JobContext, decode, enqueue::producer_span};

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
                .instrument(observability::db_span("DELETE", "visits"))
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
pub async fn handle(
    payload: Vec<u8>,
    context: Data<JobContext>,
    task_id: TaskId,
    attempt: Attempt,
) -> Result<TrimOutcome, BoxDynError> {
    let job: TrimVisits = decode(&payload, &task_id)?;
    let job_id = task_id.to_string();
    tracing::debug!(job.id = %job_id, job.attempt = attempt.current(), older_than = %job.older_than, "trimming visits");
    Ok(job.perform(&context.pool, &job_id).await?)
}

/// How long a new `TrimVisits` waits before it may run. Page views within this
/// window merge into the same pending job, so a burst of visits costs one
/// trim per window instead of one per visit.
pub const COALESCE_WINDOW: Duration = Duration::from_millis(500);

/// Enqueues `job` on `conn` (the visit's transaction), merged with the
/// pending one of the current coalescing window if there is one.
///
/// Time is cut into windows of [`COALESCE_WINDOW`] (on the database's clock);
/// all page views of one window share one job (apalis's unique
/// `(job_type, idempotency_key)` index, the key naming the window), which
/// keeps the later of the thresholds, so it deletes everything each would
/// have. The job is due when its window closes, and from then on no view
/// merges into it: a view of the next window starts the next job. So a due
/// trim is never locked by the stream of page views (the claim skips locked
/// rows: when every view updated the one pending row, a trim waited 17.8 s at
/// 1,520 views/s), and recovering or retrying a trim can never conflict with a
/// newer one.
///
/// Returns the id of the job that will carry this threshold.
pub async fn enqueue(conn: &mut PgConnection, job: &TrimVisits) -> Result<Ulid, Error> {
    let span = producer_span(TrimVisits::QUEUE);
    async {
        // Metadata: our threshold (compared through this key rather than by
        // parsing the payload, so a pending row with a corrupt payload cannot
        // make page views fail: it is simply replaced) and the trace context
        // of this enqueue, so the job's run joins this request's trace.
        let mut metadata = observability::inject_current();
        metadata.insert(THRESHOLD_KEY.to_owned(), job.older_than.to_rfc3339());
        let (keys, values): (Vec<String>, Vec<String>) = metadata.into_iter().unzip();
        let payload = serde_json::to_vec(job)?;
        // A window's job can be claimed between our reading the clock and our
        // merge; the merge then changes nothing, and the next try falls in
        // the next window (the claim happened after the window closed).
        for _ in 0..3 {
            let merged: Option<String> = sqlx::query_scalar(MERGE_INTO_WINDOW)
                .bind(Ulid::generate().to_string())
                .bind(TrimVisits::QUEUE)
                .bind(&payload)
                .bind(i32::try_from(TrimVisits::MAX_ATTEMPTS).unwrap_or(i32::MAX))
                .bind(COALESCE_WINDOW.as_secs_f64())
                .bind(job.older_than.to_rfc3339())
                .bind(&keys)
                .bind(&values)
                .fetch_optional(&mut *conn)
                .instrument(observability::db_span("INSERT", "apalis.jobs"))
                .await?;
            let Some(id) = merged else { continue };
            tracing::Span::current().record("messaging.message.id", id.as_str());
            // Counted per enqueue request, merged into a pending job or not.
            metrics::counter!("visitme_jobs_enqueued_total", "queue" => TrimVisits::QUEUE)
                .increment(1);
            // The id column is checked to hold canonical ULIDs.
            return id.parse().map_err(|_| Error::CorruptId(id));
        }
        Err(Error::EnqueueRaced(TrimVisits::QUEUE))
    }
    .instrument(span)
    .await
}

/// Inserts a trim for the current window (`$5` seconds long) or merges into
/// the window's pending one, keeping the later threshold (`$6`, also in the
/// metadata under `visitme.older_than`). Returns no row when the window's job
/// was claimed meanwhile.
const MERGE_INTO_WINDOW: &str = "
with slot as (
    select n, to_timestamp((n + 1) * $5) as closes
    from (select floor(extract(epoch from clock_timestamp()) / $5)::bigint as n) as clock
)
insert into apalis.jobs as jobs
    (id, job_type, job, status, attempts, max_attempts, run_at, priority, metadata, idempotency_key)
select $1, $2, $3, 'Pending', 0, $4, slot.closes, 0, hstore($7::text[], $8::text[]),
       'coalesce:' || slot.n
from slot
on conflict (job_type, idempotency_key) do update set
    job = case when jobs.metadata -> 'visitme.older_than' is null
                 or ($6)::timestamptz > (jobs.metadata -> 'visitme.older_than')::timestamptz
               then excluded.job else jobs.job end,
    metadata = case when jobs.metadata -> 'visitme.older_than' is null
                      or ($6)::timestamptz > (jobs.metadata -> 'visitme.older_than')::timestamptz
                    then coalesce(jobs.metadata, ''::hstore) || excluded.metadata
                    else jobs.metadata end
where jobs.status = 'Pending'
returning id";

/// The metadata key holding a pending trim's threshold (RFC 3339).
const THRESHOLD_KEY: &str = "visitme.older_than";
