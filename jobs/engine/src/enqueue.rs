//! Putting jobs on the queue inside the caller's transaction.

use std::collections::HashMap;

use apalis::prelude::{AbortError, BoxDynError, TaskId};
use sqlx::PgConnection;
use tracing::Instrument as _;
use ulid::Ulid;

use crate::{
    error::Error,
    job::{Job, Merge, Unique},
    queries,
};

/// Puts `job` on its queue using `conn`, typically `&mut *tx` of the
/// transaction whose write caused it: the job then exists if and only if that
/// transaction commits, and workers are woken (NOTIFY) at commit.
///
/// A job whose [`Job::unique`] names a key merges into the pending job of
/// that key instead, if there is one; the returned id is then that job's.
///
/// Returns the id of the job that will run this (a ULID).
pub async fn enqueue<J: Job>(conn: &mut PgConnection, job: &J) -> Result<Ulid, Error> {
    let span = producer_span(J::NAME);
    async {
        let metadata = observability::inject_current();
        let id = match job.unique() {
            None => {
                let id = Ulid::generate();
                insert::<J>(conn, &[id], &[serde_json::to_vec(job)?], metadata).await?;
                id
            }
            Some(unique) => upsert::<J>(conn, job, unique, metadata).await?,
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
    if jobs.iter().any(|job| job.unique().is_some()) {
        let mut ids = Vec::with_capacity(jobs.len());
        for job in jobs {
            ids.push(enqueue(conn, job).await?);
        }
        return Ok(ids);
    }
    let span = producer_span(J::NAME);
    async {
        let ids: Vec<Ulid> = jobs.iter().map(|_| Ulid::generate()).collect();
        let payloads = jobs
            .iter()
            .map(serde_json::to_vec)
            .collect::<Result<Vec<_>, _>>()?;
        insert::<J>(conn, &ids, &payloads, observability::inject_current()).await?;
        metrics::counter!("durable_jobs_enqueued_total", "queue" => J::NAME)
            .increment(jobs.len() as u64);
        Ok(ids)
    }
    .instrument(span)
    .await
}

async fn insert<J: Job>(
    conn: &mut PgConnection,
    ids: &[Ulid],
    payloads: &[Vec<u8>],
    metadata: HashMap<String, String>,
) -> Result<(), Error> {
    let (keys, values): (Vec<String>, Vec<String>) = metadata.into_iter().unzip();
    sqlx::query(queries::INSERT_JOBS)
        .bind(ids.iter().map(Ulid::to_string).collect::<Vec<_>>())
        .bind(J::NAME)
        .bind(payloads)
        .bind(i32::try_from(J::MAX_ATTEMPTS).unwrap_or(i32::MAX))
        .bind(&keys)
        .bind(&values)
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
