//! The worker's queue backend: apalis-postgres's tables, claims and recovery,
//! with bookkeeping that costs one round trip per step.
//!
//! apalis-postgres 1.0 runs every bookkeeping step (claim a batch; record
//! starts and results) as `BEGIN`, statements, `COMMIT`, and records results
//! with a statement that finds a worker's jobs through `lock_by`, i.e. through
//! every job that worker ever finished: it slowed from 0.5 to 4.4 ms per call
//! over one 10,000-job drain. apalis drives these steps one at a time, so
//! their latency is the queue's throughput.
//!
//! [`QueueStorage`] keeps apalis's state machine ([`Persisted`]), its schema,
//! its claim function (as the engine's migration redefines it), its
//! heartbeat and its hand-back of abandoned jobs, and replaces:
//!
//! - the claim: the single statement `apalis.get_jobs(..)`, sent without a
//!   transaction around it (it is atomic on its own), each claimed row turned
//!   into a task on its own ([`claim`]: a row that cannot be one is killed
//!   alone, where apalis's decoder failed the whole batch);
//! - the round of starts (`Running`) and results: one statement that finds
//!   its rows by id and settles a failure with its backoff
//!   (`queries::RECORD_EVENTS`);
//! - worker registration and orphan recovery ([`recover_orphans`]: jobs out
//!   of attempts end dead, and a failure never kills the worker).
//!
//! It writes rows as apalis-postgres 1.0 does: status names as `Status`
//! displays them, `last_result` as `{"Ok": ..}` or `{"Err": ..}`. An upgrade
//! of apalis-postgres must check both, and `get_jobs`'s signature.

use std::{
    convert::Infallible,
    task::{Context, Poll},
};

use std::{collections::HashMap, str::FromStr as _};

use apalis::prelude::{
    Backend, Codec, MetadataStore, Status, TaskBuilder, TaskId, TaskResult, WorkerContext,
};
use apalis_codec::json::JsonCodec;
use apalis_core::backend::{
    BackendConfig, WireFormatBackend,
    finalize::Durable,
    persistence::{Persisted, Persistence, TaskEvent, TaskPersistLayer},
};
use apalis_postgres::{Config, Error, PgPool, PgTask, queries as apalis_queries};

use crate::{job::Backoff, queries};
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{
    Row as _,
    postgres::{PgRow, types::PgHstore},
};
use ulid::Ulid;

/// Decodes nothing: the handler receives the stored JSON bytes and decodes them
/// itself, so an undecodable payload fails only its own job (see `worker::handle`).
#[derive(Debug, Clone, Copy, Default)]
pub struct RawPayload;

impl Codec<Vec<u8>> for RawPayload {
    type Error = Infallible;
    type Compact = Vec<u8>;
    fn encode(&self, value: &Vec<u8>) -> Result<Vec<u8>, Infallible> {
        Ok(value.clone())
    }
    fn decode(&self, value: &Vec<u8>) -> Result<Vec<u8>, Infallible> {
        Ok(value.clone())
    }
}

/// A queue's backend for apalis workers. Build it with [`QueueStorage::new`];
/// it claims in batches of `config.batch_size`.
#[derive(Debug, Clone)]
pub struct QueueStorage {
    persisted: Persisted<Bookkeeping>,
}

impl QueueStorage {
    /// A backend for the queue `config.queue`, doing its bookkeeping on
    /// `pool`; failed attempts wait `backoff` before their retry.
    pub fn new(pool: &PgPool, config: Config, backoff: Backoff) -> Self {
        Self {
            persisted: Persisted::new(Bookkeeping {
                pool: pool.clone(),
                config,
                backoff,
            }),
        }
    }
}

/// The database side of [`QueueStorage`], driven one step at a time by
/// apalis's [`Persisted`].
#[derive(Debug, Clone)]
struct Bookkeeping {
    pool: PgPool,
    config: Config,
    backoff: Backoff,
}

/// What one round of task events changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recorded {
    /// Results recorded (jobs this worker still held).
    pub finished: i64,
    /// Jobs marked `Running` (claimed by this worker, not yet started).
    pub started: i64,
}

/// Records one round of `worker`'s task events (see [`queries::RECORD_EVENTS`]):
/// results of jobs it still holds, and starts of jobs it claimed. Events about
/// jobs it no longer holds (recovered by another worker meanwhile) change
/// nothing.
pub async fn record_events(
    pool: &PgPool,
    events: Vec<TaskEvent<Value>>,
    worker: &str,
    backoff: Backoff,
) -> Result<Recorded, Error> {
    let round = EventRound::from(events);
    if round.is_empty() {
        return Ok(Recorded::default());
    }
    let (finished, started) = sqlx::query_as(queries::RECORD_EVENTS)
        .bind(&round.finished_ids)
        .bind(&round.attempts)
        .bind(&round.statuses)
        .bind(&round.outcomes)
        .bind(&round.started_ids)
        .bind(worker)
        .bind(backoff.base.as_secs_f64())
        .bind(backoff.max.as_secs_f64())
        .fetch_one(pool)
        .await?;
    Ok(Recorded { finished, started })
}

/// Claims up to `batch_size` due jobs of the queue (our plan-caching
/// `apalis.get_jobs`) and turns each row into a task on its own.
///
/// apalis-postgres decodes a claimed batch as a whole: one row whose id is not
/// a ULID, whose metadata holds a NULL value or whose `run_at` is before 1970
/// failed every job of the batch, and the worker with it, every lease, until
/// it gave up. Here a row that cannot become a task is killed alone, with the
/// reason in `last_result`, and the rest of the batch runs.
pub async fn claim(pool: &PgPool, config: &Config, worker: &str) -> Result<Vec<PgTask>, Error> {
    let rows = sqlx::query(queries::CLAIM)
        .bind(worker)
        .bind(config.queue.as_ref())
        .bind(i32::try_from(config.batch_size).unwrap_or(i32::MAX))
        .fetch_all(pool)
        .await?;
    let mut tasks = Vec::with_capacity(rows.len());
    let (mut rejected_ids, mut reasons) = (Vec::new(), Vec::new());
    for row in &rows {
        match task_from_row(row) {
            Ok(task) => tasks.push(task),
            Err(reason) => {
                let id: String = row.try_get("id").unwrap_or_default();
                tracing::error!(job.id = %id, queue = %config.queue, reason = %reason, "job row cannot be run; it is dead");
                metrics::counter!("visitme_jobs_dead_total", "queue" => config.queue.to_string())
                    .increment(1);
                rejected_ids.push(id);
                reasons.push(format!("corrupt job row: {reason}"));
            }
        }
    }
    if !rejected_ids.is_empty() {
        sqlx::query(queries::KILL_REJECTED)
            .bind(&rejected_ids)
            .bind(&reasons)
            .bind(worker)
            .execute(pool)
            .await?;
    }
    Ok(tasks)
}

/// One claimed row as a task, or why it cannot be one. Every column is read on
/// its own, so that no value of one row can fail another.
fn task_from_row(row: &PgRow) -> Result<PgTask, String> {
    fn column<'r, T: sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>>(
        row: &'r PgRow,
        name: &str,
    ) -> Result<T, String> {
        row.try_get(name)
            .map_err(|err| format!("column {name}: {err}"))
    }
    let id: String = column(row, "id")?;
    let ulid = Ulid::from_string(&id).map_err(|err| format!("id {id:?} is not a ULID: {err}"))?;
    if ulid.to_string() != id {
        return Err(format!("id {id:?} is not a canonical (upper-case) ULID"));
    }
    let payload: Vec<u8> = column(row, "job")?;
    let queue: String = column(row, "job_type")?;
    let attempts: i32 = column(row, "attempts")?;
    let max_attempts: i32 = column(row, "max_attempts")?;
    let attempts =
        usize::try_from(attempts).map_err(|_| format!("attempts is {attempts}, below zero"))?;
    let max_attempts = usize::try_from(max_attempts)
        .ok()
        .filter(|max| *max >= 1)
        .ok_or_else(|| format!("max_attempts is {max_attempts}, below one"))?;
    let run_at: DateTime<Utc> = column(row, "run_at")?;
    let run_at =
        u64::try_from(run_at.timestamp()).map_err(|_| format!("run_at {run_at} is before 1970"))?;
    let seconds = |at: Option<DateTime<Utc>>| at.and_then(|at| u64::try_from(at.timestamp()).ok());
    let lock_at: Option<DateTime<Utc>> = column(row, "lock_at")?;
    let done_at: Option<DateTime<Utc>> = column(row, "done_at")?;
    let lock_by: Option<String> = column(row, "lock_by")?;
    let priority: i32 = column(row, "priority")?;
    let idempotency_key: Option<String> = column(row, "idempotency_key")?;
    let metadata: Option<PgHstore> = column(row, "metadata")?;
    let mut entries = HashMap::new();
    for (key, value) in metadata.into_iter().flatten() {
        let value = value.ok_or_else(|| format!("metadata key {key:?} holds NULL"))?;
        entries.insert(key, value);
    }
    let status = Status::from_str(&column::<String>(row, "status")?)
        .map_err(|err| format!("status: {err}"))?;
    let mut task = TaskBuilder::new(payload)
        .task_id(TaskId::from_ulid(ulid))
        .queue(queue.into())
        .status(status)
        .attempt(attempts)
        .max_attempts(max_attempts)
        .run_at_timestamp(run_at)
        .lock_at(seconds(lock_at))
        .done_at(seconds(done_at))
        .lock_by(lock_by)
        .priority(usize::try_from(priority).unwrap_or_default())
        .with_metadata(MetadataStore::from_map(entries));
    if let Some(key) = idempotency_key {
        task = task.idempotency_key(key);
    }
    Ok(task.build())
}

/// Recovers the jobs of `queue`'s lost workers (see [`queries::RECOVER_ORPHANS`]).
pub async fn recover_orphans(pool: &PgPool, queue: &str, lease_seconds: u64) -> Result<u64, Error> {
    let recovered = sqlx::query(queries::RECOVER_ORPHANS)
        .bind(lease_seconds as f64)
        .bind(queue)
        .execute(pool)
        .await?
        .rows_affected();
    Ok(recovered)
}

async fn recover_orphans_logged(pool: &PgPool, queue: &str, lease_seconds: u64) {
    match recover_orphans(pool, queue, lease_seconds).await {
        Ok(0) => {}
        Ok(recovered) => tracing::warn!(
            queue,
            jobs.recovered = recovered,
            "took over jobs of workers that stopped heartbeating"
        ),
        Err(err) => {
            tracing::warn!(queue, error = %err, "recovering lost workers' jobs failed; will retry")
        }
    }
}

impl Bookkeeping {
    fn lease_seconds(&self) -> u64 {
        self.config.orphaned_duration().as_secs()
    }
}

impl Persistence for Bookkeeping {
    type Compact = Vec<u8>;
    type Response = Value;
    type Error = Error;

    async fn register(&mut self, worker: &WorkerContext) -> Result<(), Error> {
        let queue = self.config.queue.to_string();
        recover_orphans_logged(&self.pool, &queue, self.lease_seconds()).await;
        let inserted = sqlx::query(queries::REGISTER_WORKER)
            .bind(worker.name())
            .bind(&queue)
            .bind(worker.get_service())
            .execute(&self.pool)
            .await?
            .rows_affected();
        if inserted == 0 {
            return Err(Error::WorkerAlreadyExists(worker.name().to_owned()));
        }
        Ok(())
    }

    async fn heartbeat(&mut self, worker: &WorkerContext) -> Result<(), Error> {
        let queue = self.config.queue.to_string();
        apalis_queries::keep_alive(&mut *self.pool.acquire().await?, &queue, worker).await?;
        recover_orphans_logged(&self.pool, &queue, self.lease_seconds()).await;
        Ok(())
    }

    async fn fetch_next(&mut self, worker: &WorkerContext) -> Result<Vec<PgTask>, Error> {
        claim(&self.pool, &self.config, worker.name()).await
    }

    async fn reenqueue_abandoned(
        &mut self,
        tasks: Vec<PgTask>,
        worker: &WorkerContext,
    ) -> Result<u64, Error> {
        let ids: Vec<String> = tasks
            .iter()
            .filter_map(|task| task.task_id().map(ToString::to_string))
            .collect();
        let queue = self.config.queue.to_string();
        let returned = apalis_queries::reenqueue_abandoned(
            &mut *self.pool.acquire().await?,
            &queue,
            worker.name(),
            &ids,
        )
        .await?;
        if returned != tasks.len() as u64 {
            return Err(Error::ReenqueueMismatch {
                queued: tasks.len(),
                abandoned: usize::try_from(returned).unwrap_or(usize::MAX),
            });
        }
        Ok(returned)
    }

    async fn handle_events(
        &mut self,
        events: Vec<TaskEvent<Value>>,
        worker: &WorkerContext,
    ) -> Result<(), Error> {
        record_events(&self.pool, events, worker.name(), self.backoff).await?;
        Ok(())
    }

    async fn push_tasks(&mut self, tasks: Vec<PgTask>) -> Result<(), Error> {
        let queue = self.config.queue.to_string();
        apalis_queries::push_tasks(&mut *self.pool.acquire().await?, &queue, tasks).await
    }
}

/// One round of task events as the columns `RECORD_EVENTS` binds.
#[derive(Debug, Default, PartialEq)]
struct EventRound {
    finished_ids: Vec<String>,
    attempts: Vec<i32>,
    statuses: Vec<String>,
    outcomes: Vec<Value>,
    started_ids: Vec<String>,
}

impl EventRound {
    fn is_empty(&self) -> bool {
        self.finished_ids.is_empty() && self.started_ids.is_empty()
    }
}

impl From<Vec<TaskEvent<Value>>> for EventRound {
    /// Results are sorted by id, so that concurrent writers lock rows in one
    /// order; a job that started and finished in the same round needs no
    /// start mark.
    fn from(events: Vec<TaskEvent<Value>>) -> Self {
        let mut results: Vec<TaskResult<Value>> = Vec::new();
        let mut started_ids = Vec::new();
        for event in events {
            match event {
                TaskEvent::Complete(result) => results.push(result),
                TaskEvent::Lock { task_id } => started_ids.push(task_id.to_string()),
                _ => {}
            }
        }
        results.sort_by_key(|result| result.task_id.to_string());
        let mut round = Self::default();
        for result in results {
            round.finished_ids.push(result.task_id.to_string());
            round
                .attempts
                .push(i32::try_from(result.attempt).unwrap_or(i32::MAX));
            round.statuses.push(result.status.to_string());
            // The shape apalis stores: {"Ok": value} or {"Err": message}.
            round.outcomes.push(match result.result {
                Ok(value) => serde_json::json!({ "Ok": value }),
                Err(message) => serde_json::json!({ "Err": message }),
            });
        }
        started_ids.retain(|started| !round.finished_ids.contains(started));
        round.started_ids = started_ids;
        round
    }
}

impl Backend for QueueStorage {
    type Task = PgTask;
    type Error = Error;

    fn poll_ready(
        &mut self,
        cx: &mut Context<'_>,
        worker: &WorkerContext,
    ) -> Poll<Result<(), Error>> {
        let heartbeat = self.persisted.config.heartbeat_interval;
        self.persisted.poll_ready(cx, worker, heartbeat)
    }

    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        worker: &WorkerContext,
    ) -> Poll<Option<Result<PgTask, Error>>> {
        self.persisted.poll_next(cx, worker)
    }

    fn poll_close(
        &mut self,
        cx: &mut Context<'_>,
        worker: &WorkerContext,
    ) -> Poll<Result<(), Error>> {
        self.persisted.poll_close(cx, worker)
    }
}

impl BackendConfig for QueueStorage {
    type Args = Vec<u8>;
    type Id = Ulid;
    type Kind = Durable;
    type Config = Config;
    type Layer = TaskPersistLayer<JsonCodec<Value>, Value>;

    fn config(&self) -> &Config {
        &self.persisted.config
    }

    fn middleware(&mut self, _: &mut WorkerContext) -> Self::Layer {
        let config = self.persisted.config.clone();
        self.persisted
            .layer(JsonCodec::<Value>::default(), config.batch_size)
            .persist_results(config.persist_results)
            .lock_tasks(config.lock_tasks)
    }
}

impl WireFormatBackend for QueueStorage {
    type Codec = RawPayload;
    type Compact = Vec<u8>;

    fn codec(&self) -> &RawPayload {
        &RawPayload
    }
}

#[cfg(test)]
mod tests {
    use apalis::prelude::{Status, TaskId};

    use super::*;

    fn id(n: u128) -> TaskId {
        TaskId::from_ulid(Ulid::from(n))
    }

    #[test]
    fn a_round_sorts_results_and_drops_start_marks_of_finished_jobs() {
        let events = vec![
            TaskEvent::Lock { task_id: id(2) },
            TaskEvent::Lock { task_id: id(1) },
            TaskEvent::Lock { task_id: id(3) },
            TaskEvent::Complete(TaskResult {
                task_id: id(2),
                attempt: 1,
                status: Status::Done,
                result: Ok(Value::Null),
            }),
            TaskEvent::Complete(TaskResult {
                task_id: id(1),
                attempt: 3,
                status: Status::Failed,
                result: Err("boom".to_owned()),
            }),
        ];
        let round = EventRound::from(events);
        assert_eq!(round.finished_ids, [id(1).to_string(), id(2).to_string()]);
        assert_eq!(round.attempts, [3, 1]);
        assert_eq!(round.statuses, ["Failed", "Done"]);
        assert_eq!(
            round.outcomes,
            [
                serde_json::json!({"Err": "boom"}),
                serde_json::json!({"Ok": null})
            ]
        );
        assert_eq!(round.started_ids, [id(3).to_string()]);
    }
}
