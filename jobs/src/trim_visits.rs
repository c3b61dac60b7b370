//! `TrimVisits`: delete every visit older than a threshold.
//!
//! **Running it twice is harmless, and reports the same**: delivery is
//! at-least-once (a job whose acknowledgement was lost, to a killed worker or
//! a Postgres crash, runs again under the same job id), so every step that
//! deletes commits its DELETE with the record of the ids it deleted, in one
//! transaction: a row of `trim_deletions` for a small trim, the `step_tx`
//! checkpoint of a large trim's chunk. A re-run finds that row, deletes nothing
//! and reports the recorded count, and logs the recorded ids unless the row
//! says their log lines were written: the total is exact and every deleted id
//! is logged at least once.
//!
//! A trim of more than `TRIM_CHUNK` visits (a backlog after days without a
//! worker) runs as a workflow instead of one huge DELETE: `TrimVisits` plans
//! it ([`TrimChunk`] steps, each deleting at most `TRIM_CHUNK` visits of one
//! id range in its own transaction) and a [`TrimSummary`] fan-in logs the
//! Module 7 summary once, with the total. The plan is keyed by the planning
//! job's id, so a re-run of `TrimVisits` plans it once.
//!
//! With `TRIM_APPROVAL_ABOVE` set, a trim that would delete more visits
//! than that first waits (durably: holding no worker slot) for an
//! operator's [`Decision`], signalled from the dashboard's job page, for at
//! most `TRIM_APPROVAL_TIMEOUT`.

use std::{io::Write as _, time::Duration};

use chrono::{DateTime, SecondsFormat, Utc};
use durable_jobs::{Job, JobError, Limits, Merge, Unique, Workflow};
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgExecutor, PgPool, types::Json};
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

    /// Two trims never delete at once, across every worker process: a trim
    /// that finds another running waits for its slot (in the claim), so
    /// their deletes never contend for the same rows.
    fn limits() -> Limits {
        Limits::none().concurrency(1)
    }

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
        prune_records(&context.pool).await?;
        let settings = context.settings;
        let chunk = i64::from(settings.trim_chunk.get());
        let old = match settings.trim_approval_above {
            None => self.count_older(&context.pool, chunk + 1).await?,
            Some(above) => {
                let above = i64::try_from(above).unwrap_or(i64::MAX - 1);
                // A checkpoint: the job runs again from the top after the
                // approval, and must decide as it did before.
                let old = job
                    .step(
                        "count",
                        self.count_older(&context.pool, above.max(chunk) + 1),
                    )
                    .await?;
                if old > above
                    && let Some(declined) = self.approved(&job, above).await?
                {
                    return Ok(declined);
                }
                old
            }
        };
        if old <= chunk {
            return Ok(self.perform(&context.pool, job.id()).await?);
        }
        Ok(self.plan(&context.pool, job.id(), chunk).await?)
    }
}

/// An operator's answer to a large trim (`TRIM_APPROVAL_ABOVE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Decision {
    /// Delete them.
    Approve,
    /// Delete nothing.
    Reject,
}

/// Why a large trim deleted nothing, waiting for an approval that did not come.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NotApproved {
    /// An operator rejected it.
    Rejected,
    /// No answer within `TRIM_APPROVAL_TIMEOUT`.
    TimedOut,
    /// Another trim already waited for an approval (this job's id): that
    /// one deletes, once approved, what this one would have.
    LeftTo(String),
}

/// What a `TrimVisits` run did; stored as the job's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrimOutcome {
    /// How many visits were deleted (0 when the trim was planned as a
    /// workflow, or not approved).
    pub deleted: usize,
    /// The ids deleted, oldest first: the first [`SUMMARY_IDS`] of them
    /// (the page shows them; every id is also logged).
    #[serde(default)]
    pub ids: Vec<i64>,
    /// The workflow that runs a large trim, if this one was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub planned: Option<TrimPlan>,
    /// Why it deleted nothing, when it needed an approval and had none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_approved: Option<NotApproved>,
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

/// The signal a large trim waits for (see [`Decision`]).
pub const APPROVAL: &str = "approval";

/// Longest list of ids written into the summary line; every id also has its own
/// log record, so nothing is lost by shortening a huge summary.
pub const SUMMARY_IDS: usize = 100;

impl TrimVisits {
    /// How many visits are older than the threshold, counting at most `limit`.
    async fn count_older(&self, pool: &PgPool, limit: i64) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar(
            "select count(*) from (select 1 from visits where created_at < $1 limit $2) as old",
        )
        .bind(self.older_than)
        .bind(limit)
        .fetch_one(pool)
        .instrument(observability::db_span("SELECT", "visits"))
        .await
    }

    /// Waits for an operator to approve deleting more than `above` visits:
    /// `None` once approved (go on), else the outcome of a trim that deletes
    /// nothing. Only one trim waits at a time: a later one, which would
    /// delete the same old visits and more, leaves them to it.
    async fn approved(
        &self,
        job: &durable_jobs::JobContext<'_, JobContext>,
        above: i64,
    ) -> Result<Option<TrimOutcome>, JobError> {
        let context = job.context();
        let waiting = job
            .step("already-waiting", async {
                let waiting =
                    durable_jobs::admin::oldest_waiting_for(&context.pool, Self::NAME, APPROVAL)
                        .await?;
                Ok::<_, durable_jobs::Error>(waiting.map(|other| other.id))
            })
            .await?;
        let threshold = self.older_than.to_rfc3339();
        let timeout = context.settings.trim_approval_timeout;
        let not_approved = |why| {
            Some(TrimOutcome {
                deleted: 0,
                ids: Vec::new(),
                planned: None,
                not_approved: Some(why),
            })
        };
        if let Some(other) = waiting {
            tracing::info!(
                job.id = job.id(),
                waiting = %other,
                "more than {above} visits are older than {threshold}: trim {other} already waits \
                 for an operator's approval to delete them, and this one leaves them to it"
            );
            return Ok(not_approved(NotApproved::LeftTo(other)));
        }
        job.step("ask", async {
            tracing::warn!(
                job.id = job.id(),
                "more than {above} visits are older than {threshold} (TRIM_APPROVAL_ABOVE={above}): \
                 waiting up to {timeout:?} for an operator's approval (Approve or Reject on this \
                 job's dashboard page) before deleting any"
            );
            Ok::<_, JobError>(())
        })
        .await?;
        let choices = [("Approve", Decision::Approve), ("Reject", Decision::Reject)];
        match job.wait_for_choice(APPROVAL, timeout, &choices).await? {
            Some(Decision::Approve) => {
                tracing::info!(
                    job.id = job.id(),
                    "an operator approved deleting the visits older than {threshold}"
                );
                Ok(None)
            }
            Some(Decision::Reject) => {
                tracing::info!(
                    job.id = job.id(),
                    "an operator rejected deleting the visits older than {threshold}: nothing deleted"
                );
                Ok(not_approved(NotApproved::Rejected))
            }
            None => {
                tracing::warn!(
                    job.id = job.id(),
                    "gave up: no operator approved deleting more than {above} visits older than \
                     {threshold} within {timeout:?} (TRIM_APPROVAL_TIMEOUT); nothing deleted"
                );
                Ok(not_approved(NotApproved::TimedOut))
            }
        }
    }

    /// Deletes the visits older than the threshold and returns their ids,
    /// oldest first (no record: see [`TrimVisits::perform`]).
    pub async fn delete_older(
        &self,
        executor: impl PgExecutor<'_>,
    ) -> Result<Vec<i64>, sqlx::Error> {
        let mut ids: Vec<i64> =
            sqlx::query_scalar("delete from visits where created_at < $1 returning id")
                .bind(self.older_than)
                .fetch_all(executor)
                .instrument(observability::db_span("DELETE", "visits"))
                .await?;
        ids.sort_unstable();
        Ok(ids)
    }

    /// Runs the job as job `job_id`: deletes (recording the ids in
    /// `trim_deletions`, in the DELETE's transaction), then logs one record
    /// per deleted visit and a summary. A re-run under the same id deletes
    /// nothing and returns, and logs, what the first run recorded.
    pub async fn perform(&self, pool: &PgPool, job_id: &str) -> Result<TrimOutcome, sqlx::Error> {
        let record = delete_once(pool, job_id, Target::Older(*self)).await?;
        self.finish(pool, job_id, record).await
    }

    /// The outcome of a recorded run: the plan, or the deletion (its ids
    /// logged unless they were, and the summary).
    async fn finish(
        &self,
        pool: &PgPool,
        job_id: &str,
        record: Record,
    ) -> Result<TrimOutcome, sqlx::Error> {
        if let Some(plan) = record.plan {
            return Ok(TrimOutcome {
                deleted: 0,
                ids: Vec::new(),
                planned: Some(plan),
                not_approved: None,
            });
        }
        log_once(pool, job_id, &record).await?;
        let ids = record.ids;
        log_summary(job_id, self.older_than, ids.len(), &ids);
        Ok(TrimOutcome {
            deleted: ids.len(),
            ids: ids.into_iter().take(SUMMARY_IDS).collect(),
            planned: None,
            not_approved: None,
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
        if !claim(&mut tx, job_id).await? {
            // Another attempt of this job recorded its run first.
            tx.rollback().await?;
            return Ok(self
                .finish(pool, job_id, recorded(pool, job_id).await?)
                .await?);
        }
        let id = workflow.enqueue(&mut tx).await?;
        let plan = TrimPlan {
            workflow: id.to_string(),
            chunks: ranges.len(),
            visits,
        };
        sqlx::query("update trim_deletions set plan = $2 where job_id = $1")
            .bind(job_id)
            .bind(Json(&plan))
            .execute(&mut *tx)
            .instrument(observability::db_span("UPDATE", "trim_deletions"))
            .await?;
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
            planned: Some(plan),
            not_approved: None,
        })
    }
}

/// One chunk of a large trim: deletes the visits older than the threshold
/// whose ids are in `first_id..=last_id` (at most `TRIM_CHUNK`: the plan cut
/// the ranges so) in a `step_tx` (one short transaction with the step's
/// checkpoint, which records the ids), then logs each id in a `step`.
///
/// **Running it twice is harmless**: the second run deletes nothing and
/// returns the recorded ids (logging them again if the log step's
/// checkpoint was not written).
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
        // The delete and its record (the step's checkpoint) commit together.
        let ids: Vec<i64> = job
            .step_tx("delete", |tx| {
                Box::pin(async move { Target::Range(self).delete(tx).await })
            })
            .await?;
        // At least once: a kill before this step's checkpoint logs them again.
        job.step("log", async {
            log_deleted(job.id(), &ids);
            std::io::stdout().flush()
        })
        .await?;
        Ok(ChunkOutcome {
            deleted: ids.len(),
            first_ids: ids.into_iter().take(SUMMARY_IDS).collect(),
        })
    }
}

/// The fan-in of a large trim: logs the Module 7 summary once, with the total
/// of every chunk (their recorded counts, so exact after any re-run). Running it twice logs the summary twice (nothing else).
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
            not_approved: None,
        })
    }
}

/// How long a `trim_deletions` row is kept. Only a re-run of its own job reads
/// it, and a job's re-runs (lease recovery, retries with backoff: seconds to
/// minutes, five attempts at most) are long over after a week; the summary
/// reads the chunks' stored results, not these rows.
pub const RECORD_RETENTION: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// Keeps `trim_deletions` bounded: deletes rows older than [`RECORD_RETENTION`].
async fn prune_records(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("delete from trim_deletions where recorded_at < now() - $1::interval")
        .bind(RECORD_RETENTION)
        .execute(pool)
        .instrument(observability::db_span("DELETE", "trim_deletions"))
        .await?;
    Ok(())
}

/// What a trim job deleted or planned, as `trim_deletions` recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    /// The ids deleted, ascending.
    ids: Vec<i64>,
    /// Whether every id's log line was written.
    logged: bool,
    /// The workflow a planning run enqueued.
    plan: Option<TrimPlan>,
}

/// What a recorded delete deletes.
#[derive(Debug, Clone, Copy)]
enum Target {
    /// Every visit older than the threshold (the small trim).
    Older(TrimVisits),
    /// A chunk's id range.
    Range(TrimChunk),
}

impl Target {
    async fn delete(self, conn: &mut PgConnection) -> Result<Vec<i64>, sqlx::Error> {
        match self {
            Self::Older(trim) => trim.delete_older(conn).await,
            Self::Range(chunk) => {
                let mut ids: Vec<i64> = sqlx::query_scalar(
                    "delete from visits where id between $1 and $2 and created_at < $3 returning id",
                )
                .bind(chunk.first_id)
                .bind(chunk.last_id)
                .bind(chunk.older_than)
                .fetch_all(conn)
                .instrument(observability::db_span("DELETE", "visits"))
                .await?;
                ids.sort_unstable();
                Ok(ids)
            }
        }
    }
}

/// Claims job `job_id`'s `trim_deletions` row in `tx`; false if it exists.
///
/// Two attempts of one job can run at once (a lease expired under a slow
/// one): the second's insert waits on the first's uncommitted row until that
/// transaction ends, then finds it committed (false), or takes over if the
/// first rolled back.
async fn claim(tx: &mut PgConnection, job_id: &str) -> Result<bool, sqlx::Error> {
    let inserted = sqlx::query(
        "insert into trim_deletions (job_id) values ($1) on conflict (job_id) do nothing",
    )
    .bind(job_id)
    .execute(tx)
    .instrument(observability::db_span("INSERT", "trim_deletions"))
    .await?
    .rows_affected();
    Ok(inserted == 1)
}

/// Job `job_id`'s committed row.
async fn recorded(pool: &PgPool, job_id: &str) -> Result<Record, sqlx::Error> {
    let (ids, logged, plan): (Vec<i64>, bool, Option<Json<TrimPlan>>) = sqlx::query_as(
        "select ids, logged_at is not null, plan from trim_deletions where job_id = $1",
    )
    .bind(job_id)
    .fetch_one(pool)
    .instrument(observability::db_span("SELECT", "trim_deletions"))
    .await?;
    Ok(Record {
        ids,
        logged,
        plan: plan.map(|Json(plan)| plan),
    })
}

/// Deletes `target` once for job `job_id`: the DELETE and the row recording
/// its ids commit together, and a job that has a row deletes nothing and
/// gets the row.
async fn delete_once(pool: &PgPool, job_id: &str, target: Target) -> Result<Record, sqlx::Error> {
    let mut tx = pool.begin().await?;
    if !claim(&mut tx, job_id).await? {
        tx.rollback().await?;
        return recorded(pool, job_id).await;
    }
    let ids = target.delete(&mut tx).await?;
    if ids.is_empty() {
        // Nothing older than the threshold: nothing to remember, as a
        // re-run deletes nothing either; the table keeps only trims that deleted.
        tx.rollback().await?;
        return Ok(Record {
            ids,
            logged: true,
            plan: None,
        });
    }
    sqlx::query(
        "update trim_deletions set ids = $2, deleted = cardinality($2::bigint[]) where job_id = $1",
    )
    .bind(job_id)
    .bind(&ids)
    .execute(&mut *tx)
    .instrument(observability::db_span("UPDATE", "trim_deletions"))
    .await?;
    tx.commit().await?;
    Ok(Record {
        ids,
        logged: false,
        plan: None,
    })
}

/// Logs the record's ids unless its row says they were, then marks them
/// logged: only once the lines are written, so a kill in between logs them
/// again (at least once) rather than never.
async fn log_once(pool: &PgPool, job_id: &str, record: &Record) -> Result<(), sqlx::Error> {
    if record.logged {
        return Ok(());
    }
    log_deleted(job_id, &record.ids);
    // The stdout layer (observability::init) writes each line with one
    // blocking write to std's line-buffered stdout, so a logged line is
    // already in the pipe; the flush makes that explicit. If stdout is
    // broken, the row stays unmarked.
    if std::io::stdout().flush().is_err() {
        return Ok(());
    }
    sqlx::query(
        "update trim_deletions set logged_at = now() where job_id = $1 and logged_at is null",
    )
    .bind(job_id)
    .execute(pool)
    .instrument(observability::db_span("UPDATE", "trim_deletions"))
    .await?;
    Ok(())
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
