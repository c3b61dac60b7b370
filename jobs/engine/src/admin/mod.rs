//! Operator views and actions on the queue: counts, dead jobs, retry, cancel,
//! prune. Used by the `worker` subcommands (and anything else that operates
//! the queue).

use std::time::Duration;

use chrono::{DateTime, Utc};

use sqlx::PgPool;

mod durable;
mod state;

pub use durable::{
    CheckpointView, answer, checkpoints, child_workflows, children, oldest_waiting_for,
};
pub use state::{JobState, UnknownState};

use crate::{
    error::Error,
    limits::{self, Limits},
    queries,
};

/// How many jobs of one queue are in one state.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct StateCount {
    /// Queue name (`apalis.jobs.job_type`).
    pub queue: String,
    /// The state.
    pub state: JobState,
    /// Number of jobs.
    pub count: i64,
    /// When the first of them is due, for jobs that wait for a time
    /// (`scheduled`, `sleeping`, `waiting`: a wait's timeout).
    pub next_due: Option<DateTime<Utc>>,
}

/// Job counts per queue and state, in a fixed order.
pub async fn queue_status(pool: &PgPool) -> Result<Vec<StateCount>, Error> {
    Ok(sqlx::query_as(queries::QUEUE_STATUS)
        .fetch_all(pool)
        .await?)
}

/// One job, as the dashboard lists it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct JobSummary {
    /// Job id (ULID).
    pub id: String,
    /// Queue name.
    pub queue: String,
    /// Its state.
    pub state: JobState,
    /// Attempts used.
    pub attempts: i32,
    /// Attempts allowed.
    pub max_attempts: i32,
    /// When it is (or was) due.
    pub run_at: Option<DateTime<Utc>>,
    /// The last attempt's error, if it failed.
    pub last_error: Option<String>,
}

/// What one queue finished in the last hour.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct HourStats {
    /// Queue name.
    pub queue: String,
    /// Jobs done.
    pub done: i64,
    /// Jobs that died.
    pub dead: i64,
    /// Jobs whose last attempt failed and that wait for a retry.
    pub retrying: i64,
}

/// Per queue: jobs done, died, and failed-and-retrying in the last hour
/// (by the time of their latest attempt).
pub async fn last_hour(pool: &PgPool) -> Result<Vec<HourStats>, Error> {
    Ok(sqlx::query_as(queries::LAST_HOUR).fetch_all(pool).await?)
}

/// A job that will not run again by itself.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct DeadJob {
    /// Job id (ULID).
    pub id: String,
    /// Queue name.
    pub queue: String,
    /// Attempts used.
    pub attempts: i32,
    /// The last attempt's error.
    pub last_error: Option<String>,
    /// When it died.
    pub died_at: Option<DateTime<Utc>>,
}

/// The newest dead jobs (`Killed`, or `Failed` with no attempts left).
pub async fn dead_jobs(pool: &PgPool, limit: i64) -> Result<Vec<DeadJob>, Error> {
    Ok(sqlx::query_as(queries::DEAD_JOBS)
        .bind(limit)
        .fetch_all(pool)
        .await?)
}

/// Puts a dead job back in the queue with a fresh set of attempts.
pub async fn retry(pool: &PgPool, id: &str) -> Result<(), Error> {
    let retried: i64 = sqlx::query_scalar(queries::RETRY)
        .bind(id)
        .fetch_one(pool)
        .await?;
    require_changed(u64::try_from(retried).unwrap_or_default(), id, "dead")
}

/// Cancels a job that has not started (pending, or waiting for a retry): it
/// ends dead with "cancelled by an operator".
pub async fn cancel(pool: &PgPool, id: &str) -> Result<(), Error> {
    let updated = sqlx::query(queries::CANCEL).bind(id).execute(pool).await?;
    require_changed(updated.rows_affected(), id, "pending")
}

/// An operator action changed job `id`, or it was not in the `expected` state.
fn require_changed(rows: u64, id: &str, expected: &'static str) -> Result<(), Error> {
    if rows == 0 {
        return Err(Error::NoSuchJob {
            id: id.to_owned(),
            expected,
        });
    }
    Ok(())
}

/// How long finished jobs are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Done jobs older than this are deleted.
    pub done: Duration,
    /// Dead jobs older than this are deleted (kept longer, to be looked at).
    pub dead: Duration,
}

/// What a prune deleted (the result of a `prune_jobs` job).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Pruned {
    /// Done jobs deleted.
    pub done: u64,
    /// Dead jobs deleted.
    pub dead: u64,
    /// Rows of long-gone workers deleted.
    pub workers: u64,
    /// Finished workflows deleted, each whole (its steps' jobs with it).
    pub workflows: u64,
}

/// Deletes finished jobs past their retention, finished workflows past it
/// (whole: a workflow whose steps have all ended, kept as long as its last
/// step), then workers that have been silent for a day and hold no open
/// job.
/// Safe to run from many processes.
pub async fn prune(pool: &PgPool, retention: Retention) -> Result<Pruned, Error> {
    let (done, dead): (i64, i64) = sqlx::query_as(queries::PRUNE_JOBS)
        .bind(retention.done.as_secs_f64())
        .bind(retention.dead.as_secs_f64())
        .fetch_one(pool)
        .await?;
    let workflows = sqlx::query(queries::PRUNE_WORKFLOWS)
        .bind(retention.done.as_secs_f64())
        .bind(retention.dead.as_secs_f64())
        .execute(pool)
        .await?
        .rows_affected();
    let mut tx = pool.begin().await?;
    sqlx::query(queries::LOCK_SILENT_WORKERS)
        .execute(&mut *tx)
        .await?;
    let workers = sqlx::query(queries::PRUNE_WORKERS)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    tx.commit().await?;
    let as_count = |n: i64| u64::try_from(n).unwrap_or_default();
    Ok(Pruned {
        done: as_count(done),
        dead: as_count(dead),
        workers,
        workflows,
    })
}

/// Job counts per queue of the states that are not final (`pending`,
/// `scheduled`, `claimed`, `running`), the queue depth of `/metrics`.
///
/// Cheaper than [`queue_status`], which groups every row by its computed
/// state: pending and retrying rows are found through apalis's claim index
/// (`jobs_claim_order`, whose predicate this repeats), and only
/// claimed and running rows are counted, so nothing is grouped or sorted but
/// them. Finding those is still a sequential scan (no index covers `status`):
/// 36 ms against 87 ms for [`queue_status`] over 300,000 finished jobs. Call
/// it rarely, as `/metrics` does (cached, one at a time, its own connection).
/// States with no job are absent.
pub async fn open_job_counts(pool: &PgPool) -> Result<Vec<StateCount>, Error> {
    Ok(sqlx::query_as(queries::OPEN_JOB_COUNTS)
        .fetch_all(pool)
        .await?)
}

/// A workflow as operators see it: `worker workflow <id>` and the dashboard.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkflowView {
    /// Workflow id (ULID).
    pub id: String,
    /// Its label.
    pub name: String,
    /// Its idempotency key, if it was given one.
    pub key: Option<String>,
    /// When it was enqueued.
    pub created_at: DateTime<Utc>,
    /// When it was asked to cancel.
    pub cancel_requested_at: Option<DateTime<Utc>>,
    /// The job that spawned it, if a job did (`JobContext::spawn`).
    pub parent_id: Option<String>,
    /// Its steps, in the order they were added.
    pub steps: Vec<StepView>,
}

impl WorkflowView {
    /// `running` while a step has not ended, then `cancelled` (if it was
    /// asked to), `failed` (a step died or was cancelled) or `done`.
    pub fn state(&self) -> &'static str {
        let open = self
            .steps
            .iter()
            .any(|step| !matches!(step.state.as_str(), "done" | "dead" | "cancelled"));
        if open {
            if self.cancel_requested_at.is_some() {
                "cancelling"
            } else {
                "running"
            }
        } else if self.cancel_requested_at.is_some() {
            "cancelled"
        } else if self.steps.iter().any(|step| step.state != "done") {
            "failed"
        } else {
            "done"
        }
    }
}

/// One step of a [`WorkflowView`].
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct StepView {
    /// Its name in the workflow.
    pub name: String,
    /// Its job's id (the job exists once the step is released).
    pub job_id: String,
    /// Its job's queue.
    pub job_type: String,
    /// The steps it waits for.
    pub depends_on: Vec<String>,
    /// `cancel` or `run` (when a dependency dies).
    pub on_dependency_failure: String,
    /// `waiting` (for dependencies), a [`JobState`] name once released, or
    /// `cancelled`.
    pub state: String,
    /// Attempts used.
    pub attempts: i32,
    /// Attempts allowed.
    pub max_attempts: i32,
    /// When it was added to the workflow.
    pub added_at: DateTime<Utc>,
    /// When its dependencies were all done and its job was queued.
    pub released_at: Option<DateTime<Utc>>,
    /// When its first attempt started.
    pub started_at: Option<DateTime<Utc>>,
    /// When it ended.
    pub finished_at: Option<DateTime<Utc>>,
    /// Its output, once done.
    pub result: Option<serde_json::Value>,
    /// Its last error.
    pub error: Option<String>,
    /// What its job is suspended for (durable execution), as
    /// [`JobDetail::suspended_for`]: a step `waiting` with this set waits
    /// for a signal or a child, not for its dependencies.
    pub suspended_for: Option<String>,
}

#[derive(sqlx::FromRow)]
struct WorkflowRow {
    id: String,
    name: String,
    key: Option<String>,
    created_at: DateTime<Utc>,
    cancel_requested_at: Option<DateTime<Utc>>,
    parent_id: Option<String>,
}

/// Workflow `id` with its steps, or `None` if there is none (or it was pruned).
pub async fn workflow(pool: &PgPool, id: &str) -> Result<Option<WorkflowView>, Error> {
    let Some(row): Option<WorkflowRow> = sqlx::query_as(queries::WORKFLOW)
        .bind(id)
        .fetch_optional(pool)
        .await?
    else {
        return Ok(None);
    };
    let steps = sqlx::query_as(queries::WORKFLOW_STEPS)
        .bind(id)
        .fetch_all(pool)
        .await?;
    Ok(Some(WorkflowView {
        id: row.id,
        name: row.name,
        key: row.key,
        created_at: row.created_at,
        cancel_requested_at: row.cancel_requested_at,
        parent_id: row.parent_id,
        steps,
    }))
}

/// A workflow in a list: its steps counted.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct WorkflowSummary {
    /// Workflow id.
    pub id: String,
    /// Its label.
    pub name: String,
    /// When it was enqueued.
    pub created_at: DateTime<Utc>,
    /// When it was asked to cancel.
    pub cancel_requested_at: Option<DateTime<Utc>>,
    /// Steps in all.
    pub steps: i64,
    /// Steps done.
    pub done: i64,
    /// Steps dead or cancelled.
    pub failed: i64,
    /// Steps waiting, queued or running.
    pub open: i64,
}

/// The newest workflows.
pub async fn latest_workflows(pool: &PgPool, limit: i64) -> Result<Vec<WorkflowSummary>, Error> {
    Ok(sqlx::query_as(queries::LATEST_WORKFLOWS)
        .bind(limit)
        .fetch_all(pool)
        .await?)
}

/// What [`cancel_workflow`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CancelledWorkflow {
    /// Steps that had not started and never will.
    pub cancelled: u64,
    /// Steps running now: asked to stop (`JobContext::cancelled`), and not
    /// retried if they fail.
    pub running: u64,
}

/// Cancels workflow `id`: its steps that have not started are cancelled at
/// once; running ones are asked to stop and are not retried. Cancelling a
/// cancelled or finished workflow changes nothing.
pub async fn cancel_workflow(pool: &PgPool, id: &str) -> Result<CancelledWorkflow, Error> {
    let (found, cancelled, running): (bool, i64, i64) = sqlx::query_as(queries::CANCEL_WORKFLOW)
        .bind(id)
        .fetch_one(pool)
        .await?;
    if !found {
        return Err(Error::NoSuchJob {
            id: id.to_owned(),
            expected: "workflow",
        });
    }
    let as_count = |n: i64| u64::try_from(n).unwrap_or_default();
    Ok(CancelledWorkflow {
        cancelled: as_count(cancelled),
        running: as_count(running),
    })
}

/// Which jobs a listing shows: all by default, newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobFilter {
    /// Only this queue.
    pub queue: Option<String>,
    /// Only this state.
    pub state: Option<JobState>,
    /// Only jobs older than this job id (the next page after it).
    pub before: Option<String>,
}

/// Up to `limit` jobs matching `filter`, newest first. The next page is
/// `filter.before = <the last id shown>`.
pub async fn jobs_page(
    pool: &PgPool,
    filter: &JobFilter,
    limit: i64,
) -> Result<Vec<JobSummary>, Error> {
    Ok(sqlx::query_as(queries::JOBS_PAGE)
        .bind(filter.queue.as_deref())
        .bind(filter.state.map(JobState::as_str))
        .bind(filter.before.as_deref())
        .bind(limit)
        .fetch_all(pool)
        .await?)
}

/// How much of a job's payload and of its result [`job`] and
/// [`latest_job_of`] read: a prefix, whatever the row holds (a payload of
/// 50 MB was read whole on every view).
pub const PREVIEW_BYTES: usize = 64 * 1024;

/// Everything the queue holds about one job, its payload and result cut to
/// [`PREVIEW_BYTES`] (their full sizes alongside).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct JobDetail {
    /// Job id (ULID; its first 48 bits are the creation time).
    pub id: String,
    /// Queue name.
    pub queue: String,
    /// Its state.
    pub state: JobState,
    /// apalis's own status (`Pending`, `Queued`, `Running`, `Done`, `Failed`, `Killed`).
    pub status: String,
    /// Attempts used.
    pub attempts: i32,
    /// Attempts allowed.
    pub max_attempts: i32,
    /// When it is (or was) due.
    pub run_at: DateTime<Utc>,
    /// When its current or last attempt was claimed or started.
    pub lock_at: Option<DateTime<Utc>>,
    /// The worker that holds (or last held) it.
    pub lock_by: Option<String>,
    /// When its last attempt ended.
    pub done_at: Option<DateTime<Utc>>,
    /// The serialized job (JSON, as enqueued): its first [`PREVIEW_BYTES`].
    pub payload: Vec<u8>,
    /// The whole payload's size in bytes.
    pub payload_bytes: i64,
    /// Its metadata as a JSON object (the enqueuer's `traceparent`, ...).
    pub metadata: Option<String>,
    /// The last attempt's result: `{"Ok": <output>}` or `{"Err": "<error>"}`
    /// (its first [`PREVIEW_BYTES`] characters).
    pub last_result: Option<String>,
    /// The whole result's size in bytes (as JSON text).
    pub last_result_bytes: Option<i64>,
    /// Its uniqueness key while it waits.
    pub unique_key: Option<String>,
    /// What it is suspended for (durable execution): `sleep:<name>`,
    /// `signal:<name>` or `child:<job id>`; see [`JobDetail::suspension`].
    pub suspended_for: Option<String>,
    /// The job that spawned it, if one did.
    pub parent_id: Option<String>,
}

/// What a suspended job waits for (its state is `sleeping` or `waiting`,
/// until its due time [`JobDetail::run_at`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suspension<'a> {
    /// Its sleep of this name.
    Sleep(&'a str),
    /// The signal of this name.
    Signal(&'a str),
    /// The end of its child job with this id.
    Child(&'a str),
}

impl JobDetail {
    /// What it waits for while suspended.
    pub fn suspension(&self) -> Option<Suspension<'_>> {
        let (kind, what) = self.suspended_for.as_deref()?.split_once(':')?;
        match kind {
            "sleep" => Some(Suspension::Sleep(what)),
            "signal" => Some(Suspension::Signal(what)),
            "child" => Some(Suspension::Child(what)),
            _ => None,
        }
    }
}

impl JobDetail {
    /// When it was enqueued (from its ULID).
    pub fn created_at(&self) -> Option<DateTime<Utc>> {
        let ulid = ulid::Ulid::from_string(&self.id).ok()?;
        DateTime::from_timestamp_millis(i64::try_from(ulid.timestamp_ms()).ok()?)
    }

    /// Whether [`Self::payload`] is only the payload's beginning.
    pub fn payload_is_cut(&self) -> bool {
        usize::try_from(self.payload_bytes).is_ok_and(|full| full > self.payload.len())
    }

    /// Whether [`Self::last_result`] is only the result's beginning (then
    /// it does not parse: no [`Self::output`] or [`Self::last_error`]).
    pub fn result_is_cut(&self) -> bool {
        let shown = self.last_result.as_deref().map_or(0, str::len);
        self.last_result_bytes
            .and_then(|full| usize::try_from(full).ok())
            .is_some_and(|full| full > shown)
    }

    /// The payload pretty-printed when it is JSON, else (a cut one too) as
    /// lossy text.
    pub fn payload_pretty(&self) -> String {
        serde_json::from_slice::<serde_json::Value>(&self.payload)
            .ok()
            .and_then(|value| serde_json::to_string_pretty(&value).ok())
            .unwrap_or_else(|| String::from_utf8_lossy(&self.payload).into_owned())
    }

    /// The metadata's entries, sorted by key.
    pub fn metadata_entries(&self) -> Vec<(String, String)> {
        let parsed: Option<std::collections::BTreeMap<String, String>> = self
            .metadata
            .as_deref()
            .and_then(|text| serde_json::from_str(text).ok());
        parsed.unwrap_or_default().into_iter().collect()
    }

    /// The trace the job belongs to (from the enqueuer's `traceparent`).
    pub fn trace_id(&self) -> Option<String> {
        self.metadata_entries()
            .into_iter()
            .find(|(key, _)| key == "traceparent")
            .and_then(|(_, value)| {
                observability::trace_id_of_traceparent(&value).map(str::to_owned)
            })
    }

    /// The workflow and step this job is, if it is a workflow step.
    pub fn workflow_step(&self) -> Option<crate::job::StepOf> {
        let entries = self.metadata_entries();
        let get = |wanted: &str| {
            entries
                .iter()
                .find(|(key, _)| key == wanted)
                .map(|(_, value)| value.clone())
        };
        Some(crate::job::StepOf {
            workflow: get(crate::workflow::WORKFLOW_ID_KEY)?,
            step: get(crate::workflow::WORKFLOW_STEP_KEY)?,
        })
    }

    fn result(&self) -> Option<serde_json::Value> {
        serde_json::from_str(self.last_result.as_deref()?).ok()
    }

    /// The last attempt's error, if it failed.
    pub fn last_error(&self) -> Option<String> {
        let result = self.result()?;
        let error = result.get("Err")?;
        Some(
            error
                .as_str()
                .map_or_else(|| error.to_string(), str::to_owned),
        )
    }

    /// The job's output (what its run returned), once it succeeded.
    pub fn output(&self) -> Option<serde_json::Value> {
        self.result()?.get("Ok").cloned()
    }
}

/// One job, if there is such a job.
pub async fn job(pool: &PgPool, id: &str) -> Result<Option<JobDetail>, Error> {
    Ok(sqlx::query_as(queries::JOB_DETAIL)
        .bind(id)
        .bind(preview_limit())
        .fetch_optional(pool)
        .await?)
}

/// One failed attempt of a job.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct AttemptError {
    /// The attempt's number (as counted when it failed).
    pub attempt: i32,
    /// Its error.
    pub error: String,
    /// When it was recorded.
    pub failed_at: DateTime<Utc>,
}

/// Every failed attempt of job `id`, oldest first (kept until the job is pruned).
pub async fn job_errors(pool: &PgPool, id: &str) -> Result<Vec<AttemptError>, Error> {
    Ok(sqlx::query_as(queries::JOB_ERRORS)
        .bind(id)
        .fetch_all(pool)
        .await?)
}

/// The newest job of `queue`, if it has any.
pub async fn latest_job_of(pool: &PgPool, queue: &str) -> Result<Option<JobDetail>, Error> {
    Ok(sqlx::query_as(queries::LATEST_JOB_OF_QUEUE)
        .bind(queue)
        .bind(preview_limit())
        .fetch_optional(pool)
        .await?)
}

/// [`PREVIEW_BYTES`] as Postgres's `substring` and `left` take it.
fn preview_limit() -> i32 {
    i32::try_from(PREVIEW_BYTES).unwrap_or(i32::MAX)
}

/// The unfinished jobs of one queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct OpenCounts {
    /// Waiting to be claimed (due or not yet due).
    pub waiting: i64,
    /// Claimed or running.
    pub running: i64,
    /// Failed, waiting for a retry.
    pub retrying: i64,
}

/// How many jobs of `queue` wait, run, and wait for a retry. Counting the
/// claimed and running ones scans the table (no index covers `status`):
/// ~40 ms over 200,000 finished jobs; cache it where many pages show it.
pub async fn open_counts_of(pool: &PgPool, queue: &str) -> Result<OpenCounts, Error> {
    Ok(sqlx::query_as(queries::OPEN_COUNTS_OF_QUEUE)
        .bind(queue)
        .fetch_one(pool)
        .await?)
}

/// What the dashboard's queue page shows of one queue ([`queue_view`]).
#[derive(Debug, Clone, PartialEq)]
pub struct QueueView {
    /// Paused or not, and its limits (declared, in force).
    pub controls: QueueControls,
    /// Due jobs waiting for a claim.
    pub waiting: i64,
    /// Jobs not yet due: delayed, retrying after a backoff, in a unique window.
    pub scheduled: i64,
    /// Claimed or running.
    pub running: i64,
    /// The last hour, minute by minute, oldest first (60 entries).
    pub minutes: Vec<QueueMinute>,
}

/// One minute of a queue's last hour (see [`QueueView::minutes`]).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct QueueMinute {
    /// The minute's start.
    pub minute: DateTime<Utc>,
    /// Jobs whose latest attempt started in it.
    pub started: i64,
    /// Jobs that ended (done or dead) in it.
    pub finished: i64,
    /// Median wait from due to start of the jobs started in it, in seconds.
    pub wait_p50: Option<f64>,
    /// 95th percentile of that wait, in seconds.
    pub wait_p95: Option<f64>,
}

/// `queue`'s state, limits, counts and last hour (the dashboard's queue
/// page). Jobs are counted from the rows: a scan of the queue's unfinished
/// jobs and of those that started or ended within the hour.
pub async fn queue_view(pool: &PgPool, queue: &str) -> Result<QueueView, Error> {
    let (waiting, scheduled, running): (i64, i64, i64) = sqlx::query_as(queries::QUEUE_PAGE_COUNTS)
        .bind(queue)
        .fetch_one(pool)
        .await?;
    let minutes = sqlx::query_as(queries::QUEUE_MINUTES)
        .bind(queue)
        .fetch_all(pool)
        .await?;
    Ok(QueueView {
        controls: queue_controls_of(pool, queue).await?,
        waiting,
        scheduled,
        running,
        minutes,
    })
}

/// One schedule as operators see it (`worker status`, the dashboard).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ScheduleStatus {
    /// The queue (job type) the schedule enqueues.
    pub queue: String,
    /// Its cron expression, as the latest worker declared it.
    pub expression: String,
    /// Its catch-up policy: `skip` or `run_once`.
    pub catch_up: String,
    /// The newest tick that got a job.
    pub last_tick: Option<DateTime<Utc>>,
    /// That job's id.
    pub last_job_id: Option<String>,
    /// That job's state; `None` once pruned.
    pub last_job_state: Option<JobState>,
    /// The next tick. In the past, it says that no worker keeps the
    /// schedule (none runs, or the schedule was removed from the code).
    pub next_tick: Option<DateTime<Utc>>,
}

/// Every schedule workers have kept, by queue name.
pub async fn schedules(pool: &PgPool) -> Result<Vec<ScheduleStatus>, Error> {
    Ok(sqlx::query_as(queries::SCHEDULES).fetch_all(pool).await?)
}

// ---- flow control ----

/// What controls a queue: paused or not, the limits in force and the ones
/// its job type declares ([`crate::Job::limits`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct QueueControls {
    /// The queue (`job_type`).
    pub queue: String,
    /// Whether it starts nothing ([`pause`]).
    pub paused: bool,
    /// Whether an operator's limits ([`set_limits`]) replace the declared ones.
    pub overridden: bool,
    /// The limits claims obey now.
    pub in_force: Limits,
    /// The limits the job type declares (as its last worker to start said).
    pub declared: Limits,
}

/// Every queue with a control (paused, or with limits); the others have none.
pub async fn queue_controls(pool: &PgPool) -> Result<Vec<QueueControls>, Error> {
    type Row = (
        String,
        bool,
        bool,
        Option<i32>,
        Option<f64>,
        Option<i32>,
        Option<i32>,
        Option<i32>,
        Option<f64>,
        Option<i32>,
        Option<i32>,
    );
    let rows: Vec<Row> = sqlx::query_as(queries::QUEUE_CONTROLS)
        .fetch_all(pool)
        .await?;
    Ok(rows
        .into_iter()
        .map(|row| QueueControls {
            queue: row.0,
            paused: row.1,
            overridden: row.2,
            in_force: limits::from_columns(row.3, row.4, row.5, row.6),
            declared: limits::from_columns(row.7, row.8, row.9, row.10),
        })
        .collect())
}

/// The controls of `queue` (none: not paused, no limits).
pub async fn queue_controls_of(pool: &PgPool, queue: &str) -> Result<QueueControls, Error> {
    Ok(queue_controls(pool)
        .await?
        .into_iter()
        .find(|controls| controls.queue == queue)
        .unwrap_or_else(|| QueueControls {
            queue: queue.to_owned(),
            paused: false,
            overridden: false,
            in_force: Limits::none(),
            declared: Limits::none(),
        }))
}

/// Pauses `queue` on every worker: its claims start nothing until
/// [`resume`]; jobs already claimed or running finish.
pub async fn pause(pool: &PgPool, queue: &str) -> Result<(), Error> {
    sqlx::query(queries::SET_PAUSED)
        .bind(queue)
        .bind(true)
        .execute(pool)
        .await?;
    tracing::info!(queue, "queue paused");
    Ok(())
}

/// Undoes [`pause`].
pub async fn resume(pool: &PgPool, queue: &str) -> Result<(), Error> {
    sqlx::query(queries::SET_PAUSED)
        .bind(queue)
        .bind(false)
        .execute(pool)
        .await?;
    wake(pool, queue).await?;
    tracing::info!(queue, "queue resumed");
    Ok(())
}

/// Wakes `queue`'s workers everywhere (see `queries::WAKE_QUEUE`).
async fn wake(pool: &PgPool, queue: &str) -> Result<(), Error> {
    sqlx::query(queries::WAKE_QUEUE)
        .bind(queue)
        .execute(pool)
        .await?;
    Ok(())
}

/// Replaces `queue`'s declared limits with `limits` until [`reset_limits`]
/// (an operator's override, kept across deploys; `Limits::none()` lifts
/// every limit).
pub async fn set_limits(pool: &PgPool, queue: &str, limits: Limits) -> Result<(), Error> {
    let (concurrency, rate, burst, key_concurrency) = limits::columns(&limits);
    sqlx::query(queries::OVERRIDE_LIMITS)
        .bind(queue)
        .bind(concurrency)
        .bind(rate)
        .bind(burst)
        .bind(key_concurrency)
        .execute(pool)
        .await?;
    wake(pool, queue).await?;
    tracing::info!(queue, ?limits, "queue limits overridden");
    Ok(())
}

/// Puts `queue` back on the limits its job type declares.
pub async fn reset_limits(pool: &PgPool, queue: &str) -> Result<(), Error> {
    sqlx::query(queries::RESET_LIMITS)
        .bind(queue)
        .execute(pool)
        .await?;
    wake(pool, queue).await?;
    tracing::info!(queue, "queue limits back to the declared ones");
    Ok(())
}

/// Ends every waiting job of `queue` (due or scheduled, retries included;
/// not those claimed or running) as dead, with the reason "purged by an
/// operator". Returns how many. Cloud Tasks' `PurgeQueue`; the rows stay
/// (dead, retryable one by one) until the retention prune.
pub async fn purge(pool: &PgPool, queue: &str) -> Result<u64, Error> {
    let purged: i64 = sqlx::query_scalar(queries::PURGE_WAITING)
        .bind(queue)
        .bind("purged by an operator")
        .fetch_one(pool)
        .await?;
    tracing::info!(queue, jobs.purged = purged, "queue purged");
    Ok(u64::try_from(purged).unwrap_or_default())
}
