//! `TrimVisits`: delete every visit older than a threshold.
//!
//! **Running it twice is harmless**: the second run finds nothing older than the
//! threshold and deletes nothing. Delivery is at-least-once (a crashed worker's
//! job runs again), so this idempotence is what makes retries safe.
//!
//! A trim of more than `TRIM_CHUNK` visits (a backlog after days without a
//! worker) runs as a workflow instead of one huge DELETE: `TrimVisits` plans
//! it ([`TrimChunk`] steps, each deleting at most `TRIM_CHUNK` visits of one
//! id range in its own transaction) and a [`TrimSummary`] fan-in logs the
//! Module 7 summary once, with the total. The plan is keyed by the planning
//! job's id, so a re-run of `TrimVisits` plans it once.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use durable_jobs::{Job, JobError, Merge, Unique, Workflow};
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
        let context = job.context();
        let chunk = i64::from(context.settings.trim_chunk.get());
        let old: i64 = sqlx::query_scalar(
            "select count(*) from (select 1 from visits where created_at < $1 limit $2) as old",
        )
        .bind(self.older_than)
        .bind(chunk + 1)
        .fetch_one(&context.pool)
        .instrument(observability::db_span("SELECT", "visits"))
        .await?;
        if old <= chunk {
            return Ok(self.perform(&context.pool, job.id()).await?);
        }
        Ok(self.plan(&context.pool, job.id(), chunk).await?)
    }
}

/// What a `TrimVisits` run did; stored as the job's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrimOutcome {
    /// How many visits were deleted (0 when the trim was planned as a workflow).
    pub deleted: usize,
    /// The ids deleted, oldest first: the first [`SUMMARY_IDS`] of them
    /// (the page shows them; every id is also logged).
    #[serde(default)]
    pub ids: Vec<i64>,
    /// The workflow that runs a large trim, if this one was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub planned: Option<TrimPlan>,
}

/// A large trim, planned as a workflow of chunks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrimPlan {
    /// The workflow's id.
    pub workflow: String,
    /// Chunk steps.
    pub chunks: usize,
    /// Visits older than the threshold when it was planned.
    pub visits: i64,
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
        log_deleted(job_id, &ids);
        log_summary(job_id, self.older_than, ids.len(), &ids);
        Ok(TrimOutcome {
            deleted: ids.len(),
            ids: ids.into_iter().take(SUMMARY_IDS).collect(),
            planned: None,
        })
    }

    /// Plans a large trim: one [`TrimChunk`] per `chunk` old visits (by id)
    /// and a [`TrimSummary`] after them all, enqueued in one transaction.
    async fn plan(
        &self,
        pool: &PgPool,
        job_id: &str,
        chunk: i64,
    ) -> Result<TrimOutcome, durable_jobs::Error> {
        let ranges: Vec<(i64, i64, i64)> = sqlx::query_as(
            "select min(id), max(id), count(*) from (
                 select id, (row_number() over (order by id) - 1) / $2 as chunk
                 from visits where created_at < $1) as numbered
             group by chunk order by chunk",
        )
        .bind(self.older_than)
        .bind(chunk)
        .fetch_all(pool)
        .instrument(observability::db_span("SELECT", "visits"))
        .await?;
        let visits: i64 = ranges.iter().map(|(_, _, count)| count).sum();
        let names: Vec<String> = (1..=ranges.len())
            .map(|n| format!("chunk-{n:05}"))
            .collect();
        let mut workflow = Workflow::new(TrimVisits::NAME).key(format!("trim_visits:{job_id}"));
        for (name, (first_id, last_id, _)) in names.iter().zip(&ranges) {
            workflow = workflow.add(
                name.clone(),
                TrimChunk {
                    older_than: self.older_than,
                    first_id: *first_id,
                    last_id: *last_id,
                },
            );
        }
        let workflow = workflow.add_after(
            "summary",
            TrimSummary {
                older_than: self.older_than,
            },
            names,
        );
        let mut tx = pool.begin().await?;
        let id = workflow.enqueue(&mut tx).await?;
        tx.commit().await?;
        tracing::info!(
            job.id = %job_id,
            workflow.id = %id,
            visits,
            chunks = ranges.len(),
            "trimming {visits} visits older than {} in {} chunks of at most {chunk}",
            self.older_than.to_rfc3339(),
            ranges.len()
        );
        Ok(TrimOutcome {
            deleted: 0,
            ids: Vec::new(),
            planned: Some(TrimPlan {
                workflow: id.to_string(),
                chunks: ranges.len(),
                visits,
            }),
        })
    }
}

/// One chunk of a large trim: deletes the visits older than the threshold
/// whose ids are in `first_id..=last_id` (at most `TRIM_CHUNK`: the plan cut
/// the ranges so), in one short transaction, and logs each id.
///
/// **Running it twice is harmless**: the second run deletes nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrimChunk {
    /// The trim's threshold.
    pub older_than: DateTime<Utc>,
    /// First id of the range.
    pub first_id: i64,
    /// Last id of the range.
    pub last_id: i64,
}

/// What a chunk deleted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkOutcome {
    /// Visits deleted.
    pub deleted: usize,
    /// The first of their ids (at most the summary's 100), ascending.
    pub first_ids: Vec<i64>,
}

impl Job for TrimChunk {
    const NAME: &'static str = "trim_visits_chunk";
    const MAX_ATTEMPTS: u32 = 5;
    type Context = JobContext;
    type Output = ChunkOutcome;

    async fn run(
        self,
        job: durable_jobs::JobContext<'_, JobContext>,
    ) -> Result<ChunkOutcome, JobError> {
        let mut ids: Vec<i64> = sqlx::query_scalar(
            "delete from visits where id between $1 and $2 and created_at < $3 returning id",
        )
        .bind(self.first_id)
        .bind(self.last_id)
        .bind(self.older_than)
        .fetch_all(&job.context().pool)
        .instrument(observability::db_span("DELETE", "visits"))
        .await?;
        ids.sort_unstable();
        log_deleted(job.id(), &ids);
        Ok(ChunkOutcome {
            deleted: ids.len(),
            first_ids: ids.into_iter().take(SUMMARY_IDS).collect(),
        })
    }
}

/// The fan-in of a large trim: logs the Module 7 summary once, with the total
/// of every chunk. Running it twice logs the summary twice (nothing else).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrimSummary {
    /// The trim's threshold.
    pub older_than: DateTime<Utc>,
}

impl Job for TrimSummary {
    const NAME: &'static str = "trim_visits_summary";
    const MAX_ATTEMPTS: u32 = 5;
    type Context = JobContext;
    type Output = TrimOutcome;

    async fn run(
        self,
        job: durable_jobs::JobContext<'_, JobContext>,
    ) -> Result<TrimOutcome, JobError> {
        let chunks = job.dependency_results::<TrimChunk>().await?;
        let deleted: usize = chunks.iter().map(|(_, chunk)| chunk.deleted).sum();
        let first: Vec<i64> = chunks
            .iter()
            .flat_map(|(_, chunk)| chunk.first_ids.iter().copied())
            .take(SUMMARY_IDS)
            .collect();
        log_summary(job.id(), self.older_than, deleted, &first);
        Ok(TrimOutcome {
            deleted,
            ids: first,
            planned: None,
        })
    }
}

/// One log record per deleted visit (the trace's event per id).
fn log_deleted(job_id: &str, ids: &[i64]) {
    for id in ids {
        tracing::info!(visit.id = id, job.id = %job_id, "deleted visit {id}");
    }
}

/// The Module 7 summary line: `Deleting N entities: <ids>` (the first 100,
/// then "and N more"), or `No entities older than: <threshold>`.
fn log_summary(job_id: &str, older_than: DateTime<Utc>, deleted: usize, first_ids: &[i64]) {
    if deleted == 0 {
        let threshold = older_than.to_rfc3339();
        tracing::info!(
            job.id = %job_id,
            visits.deleted = 0,
            "No entities older than: {threshold}"
        );
        return;
    }
    let shown: Vec<String> = first_ids
        .iter()
        .take(SUMMARY_IDS)
        .map(i64::to_string)
        .collect();
    let more = match deleted.saturating_sub(shown.len()) {
        0 => String::new(),
        n => format!(" (and {n} more)"),
    };
    tracing::info!(
        job.id = %job_id,
        visits.deleted = deleted,
        "Deleting {deleted} entities: {}{more}",
        shown.join(", ")
    );
}

/// How long a new `TrimVisits` waits before it may run. Page views within one
/// window merge into the same pending job, so a burst of visits costs one
/// trim per window instead of one per visit.
pub const COALESCE_WINDOW: Duration = Duration::from_millis(500);
