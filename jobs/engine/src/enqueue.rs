//! Putting jobs on the queue inside the caller's transaction.

use std::{collections::HashMap, time::Duration};

use apalis::prelude::{AbortError, BoxDynError, TaskId};
use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use tracing::Instrument as _;
use ulid::Ulid;

use crate::{
    error::Error,
    job::{Job, Merge, Unique},
    queries,
};

/// When and in which order an enqueued job runs: App Engine's `countdown`
/// ([`Enqueue::delay`]) and `eta` ([`Enqueue::run_at`]), and a priority.
///
/// ```
/// # use std::time::Duration;
/// let later = durable_jobs::Enqueue::new().delay(Duration::from_secs(10)).priority(5);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Enqueue {
    delay: Option<Duration>,
    run_at: Option<DateTime<Utc>>,
    priority: Option<i16>,
}

impl Enqueue {
    /// Due at once, with the type's [`Job::PRIORITY`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Due `delay` after the enqueuing transaction's start (its `now()`).
    #[must_use]
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }

    /// Due at `at` (at once if that has passed). With [`Enqueue::delay`]
    /// too, the later of the two.
    #[must_use]
    pub fn run_at(mut self, at: DateTime<Utc>) -> Self {
        self.run_at = Some(at);
        self
    }

    /// Runs before due jobs of lower priority (higher first; any `i16`)
    /// instead of the type's [`Job::PRIORITY`].
    #[must_use]
    pub fn priority(mut self, priority: i16) -> Self {
        self.priority = Some(priority);
        self
    }

    /// When the job is due, if not at once: `None` means the transaction's `now()`.
    fn due(&self) -> Option<DateTime<Utc>> {
        let delayed = self.delay.map(|delay| {
            Utc::now() + chrono::TimeDelta::from_std(delay).unwrap_or(chrono::TimeDelta::MAX)
        });
        match (delayed, self.run_at) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    fn priority_of<J: Job>(&self) -> i32 {
        i32::from(self.priority.unwrap_or(J::PRIORITY))
    }
}

/// Puts `job` on its queue using `conn`, typically `&mut *tx` of the
/// transaction whose write caused it: the job then exists if and only if that
/// transaction commits, and workers are woken (NOTIFY) at commit.
///
/// A job whose [`Job::unique`] names a key merges into the pending job of
/// that key instead, if there is one; the returned id is then that job's.
///
/// Returns the id of the job that will run this (a ULID).
pub async fn enqueue<J: Job>(conn: &mut PgConnection, job: &J) -> Result<Ulid, Error> {
    enqueue_with(conn, job, Enqueue::new()).await
}

/// [`enqueue`] with a delay, a time to run at or a priority ([`Enqueue`]).
/// A unique job ([`Job::unique`]) runs no earlier than its window's end and
/// than `options` say; merged into a pending job, it keeps that job's time
/// and priority.
pub async fn enqueue_with<J: Job>(
    conn: &mut PgConnection,
    job: &J,
    options: Enqueue,
) -> Result<Ulid, Error> {
    let span = producer_span(J::NAME);
    async {
        let metadata = observability::inject_current();
        let id = match job.unique() {
            None => {
                let id = Ulid::generate();
                let payload = Payload::of(job)?;
                insert::<J>(conn, &[id], &[payload], metadata, options).await?;
                id
            }
            Some(unique) => upsert::<J>(conn, job, unique, metadata, options).await?,
        };
        tracing::Span::current().record("messaging.message.id", id.to_string());
        // Counted per enqueue request, merged into a pending job or not.
        metrics::counter!("durable_jobs_enqueued_total", "queue" => J::NAME).increment(1);
        Ok(id)
    }
    .instrument(span)
    .await
}

/// [`enqueue`] for many jobs of one type, in one statement when none of them
/// is unique. Returns their ids in order.
pub async fn enqueue_many<J: Job>(conn: &mut PgConnection, jobs: &[J]) -> Result<Vec<Ulid>, Error> {
    enqueue_many_with(conn, jobs, Enqueue::new()).await
}

/// [`enqueue_many`] with the same [`Enqueue`] options for every job.
pub async fn enqueue_many_with<J: Job>(
    conn: &mut PgConnection,
    jobs: &[J],
    options: Enqueue,
) -> Result<Vec<Ulid>, Error> {
    if jobs.iter().any(|job| job.unique().is_some()) {
        let mut ids = Vec::with_capacity(jobs.len());
        for job in jobs {
            ids.push(enqueue_with(conn, job, options).await?);
        }
        return Ok(ids);
    }
    let span = producer_span(J::NAME);
    async {
        let ids: Vec<Ulid> = jobs.iter().map(|_| Ulid::generate()).collect();
        let payloads = jobs
            .iter()
            .map(Payload::of)
            .collect::<Result<Vec<_>, _>>()?;
        insert::<J>(
            conn,
            &ids,
            &payloads,
            observability::inject_current(),
            options,
        )
        .await?;
        metrics::counter!("durable_jobs_enqueued_total", "queue" => J::NAME)
            .increment(jobs.len() as u64);
        Ok(ids)
    }
    .instrument(span)
    .await
}

/// A job as its row stores it: the JSON and its concurrency key.
pub(crate) struct Payload {
    pub(crate) json: Vec<u8>,
    pub(crate) concurrency_key: Option<String>,
}

impl Payload {
    pub(crate) fn of<J: Job>(job: &J) -> Result<Self, serde_json::Error> {
        Ok(Self {
            json: serde_json::to_vec(job)?,
            concurrency_key: job.concurrency_key(),
        })
    }
}

async fn insert<J: Job>(
    conn: &mut PgConnection,
    ids: &[Ulid],
    payloads: &[Payload],
    metadata: HashMap<String, String>,
    options: Enqueue,
) -> Result<(), Error> {
    let (keys, values): (Vec<String>, Vec<String>) = metadata.into_iter().unzip();
    sqlx::query(queries::INSERT_JOBS)
        .bind(ids.iter().map(Ulid::to_string).collect::<Vec<_>>())
        .bind(J::NAME)
        .bind(
            payloads
                .iter()
                .map(|p| p.json.as_slice())
                .collect::<Vec<_>>(),
        )
        .bind(i32::try_from(J::MAX_ATTEMPTS).unwrap_or(i32::MAX))
        .bind(&keys)
        .bind(&values)
        .bind(options.due())
        .bind(options.priority_of::<J>())
        .bind(
            payloads
                .iter()
                .map(|p| p.concurrency_key.as_deref())
                .collect::<Vec<_>>(),
        )
        .execute(&mut *conn)
        .instrument(observability::db_span("INSERT", "apalis.jobs"))
        .await?;
    Ok(())
}

/// Inserts a unique job or merges it into the pending one of its key (see
/// [`queries::UPSERT_UNIQUE`]).
async fn upsert<J: Job>(
    conn: &mut PgConnection,
    job: &J,
    unique: Unique,
    mut metadata: HashMap<String, String>,
    options: Enqueue,
) -> Result<Ulid, Error> {
    let (rule, order) = match unique.merge {
        Merge::KeepExisting => ("keep", None),
        Merge::Replace => ("replace", None),
        Merge::KeepGreatest { order } => ("greatest", Some(order)),
    };
    if let Some(order) = &order {
        metadata.insert(ORDER_KEY.to_owned(), order.clone());
    }
    let payload = serde_json::to_vec(job)?;
    let (keys, values): (Vec<String>, Vec<String>) = metadata.into_iter().unzip();
    // The pending job can be claimed between our reading and our merge; the
    // merge then changes nothing and the key is free (or, with a window, the
    // next window has begun): the next try inserts.
    for _ in 0..3 {
        let merged: Option<String> = sqlx::query_scalar(queries::UPSERT_UNIQUE)
            .bind(Ulid::generate().to_string())
            .bind(J::NAME)
            .bind(&payload)
            .bind(i32::try_from(J::MAX_ATTEMPTS).unwrap_or(i32::MAX))
            .bind(&keys)
            .bind(&values)
            .bind(&unique.key)
            .bind(unique.window.map(|window| window.as_secs_f64()))
            .bind(rule)
            .bind(&order)
            .bind(options.due())
            .bind(options.priority_of::<J>())
            .bind(job.concurrency_key())
            .fetch_optional(&mut *conn)
            .instrument(observability::db_span("INSERT", "apalis.jobs"))
            .await?;
        if let Some(id) = merged {
            // The id column is checked to hold canonical ULIDs.
            return id.parse().map_err(|_| Error::CorruptId(id));
        }
    }
    Err(Error::EnqueueRaced(J::NAME))
}

/// The metadata key holding a unique job's order for [`Merge::KeepGreatest`].
const ORDER_KEY: &str = "unique.order";

/// The PRODUCER span of an enqueue (OpenTelemetry messaging conventions).
/// `messaging.message.id` is recorded once the job id is known.
pub(crate) fn producer_span(queue: &'static str) -> tracing::Span {
    tracing::info_span!(
        "send",
        otel.name = format!("send {queue}"),
        otel.kind = "producer",
        messaging.system = "apalis",
        messaging.operation.type = "send",
        messaging.operation.name = "send",
        messaging.destination.name = queue,
        messaging.message.id = tracing::field::Empty,
    )
}

/// Decodes a job's stored JSON payload inside its handler.
///
/// Workers hand handlers the raw bytes so that a row nobody can decode fails
/// only its own job: the error is an `AbortError`, so the job ends dead
/// (`Killed`) with the reason in `last_result`, and the worker goes on.
pub(crate) fn decode<J: Job>(payload: &[u8], task_id: &TaskId) -> Result<J, BoxDynError> {
    serde_json::from_slice(payload).map_err(|err| {
        tracing::error!(job.id = %task_id, error = %err, "cannot decode {} payload; the job is dead", J::NAME);
        AbortError::new(format!("cannot decode {} payload: {err}", J::NAME)).into()
    })
}
