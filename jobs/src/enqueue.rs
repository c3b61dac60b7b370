//! Typed jobs and putting them on the queue inside the caller's transaction.

use apalis::prelude::{AbortError, BoxDynError, MetadataStore, TaskBuilder, TaskId};
use apalis_postgres::PgTask;
use serde::{Serialize, de::DeserializeOwned};
use sqlx::PgConnection;
use tracing::Instrument as _;
use ulid::Ulid;

use crate::Error;

/// A job type: a small serde value (IDs, timestamps) plus where it queues.
pub trait Job: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The queue name stored in `apalis.jobs.job_type`. Explicit, so renaming or
    /// moving the Rust type never strands queued jobs.
    const QUEUE: &'static str;
    /// How many times a job of this type runs before it is given up.
    const MAX_ATTEMPTS: usize;
}

/// Puts `job` on its queue using `conn`, typically `&mut *tx` of the
/// transaction whose write caused the job: the job then exists if and only if
/// that transaction commits, and workers are woken (NOTIFY) at commit.
///
/// Returns the job's id (a ULID, as apalis-postgres requires).
pub async fn enqueue<J: Job>(conn: &mut PgConnection, job: &J) -> Result<Ulid, Error> {
    let id = Ulid::generate();
    let span = producer_span(J::QUEUE);
    span.record("messaging.message.id", id.to_string());
    async {
        // Inside the producer span: the job's run becomes its child.
        let trace_context = MetadataStore::from_map(observability::inject_current());
        let task: PgTask = TaskBuilder::new(serde_json::to_vec(job)?)
            .task_id(TaskId::from_ulid(id))
            .max_attempts(J::MAX_ATTEMPTS)
            .with_metadata(trace_context)
            .build();
        apalis_postgres::queries::push_tasks(conn, J::QUEUE, vec![task]).await?;
        metrics::counter!("visitme_jobs_enqueued_total", "queue" => J::QUEUE).increment(1);
        Ok(id)
    }
    .instrument(span)
    .await
}

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
pub fn decode<J: Job>(payload: &[u8], task_id: &TaskId) -> Result<J, BoxDynError> {
    serde_json::from_slice(payload).map_err(|err| {
        tracing::error!(job.id = %task_id, error = %err, "cannot decode {} payload; the job is dead", J::QUEUE);
        AbortError::new(format!("cannot decode {} payload: {err}", J::QUEUE)).into()
    })
}
