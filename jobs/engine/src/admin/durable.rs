//! What a durable job recorded and waits for, as operators see it: its
//! checkpoints, its children, and the answers a person may give to a wait
//! ([`crate::job::JobContext`]'s `wait_for_choice`).

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;

use super::{JobSummary, WorkflowSummary};
use crate::{
    durable::signals::{self, Signalled},
    error::Error,
    queries,
};

/// One checkpoint of a job: a step's result, a sleep's or wait's deadline
/// (and outcome), a spawned child's id.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct CheckpointView {
    /// Its name in the job's code.
    pub name: String,
    /// `step`, `sleep`, `wait`, `spawn` or `await`.
    pub kind: String,
    /// The Rust type of its value.
    pub value_type: String,
    /// What it recorded (JSON).
    pub value: Value,
    /// When it was recorded.
    pub created_at: DateTime<Utc>,
}

impl CheckpointView {
    /// A wait's answers for a person (`wait_for_choice`), while it waits:
    /// each choice's label.
    pub fn choices(&self) -> Vec<String> {
        if self.kind != "wait" || self.value.get("outcome").is_some() {
            return Vec::new();
        }
        self.value
            .get("choices")
            .and_then(Value::as_array)
            .map(|choices| {
                choices
                    .iter()
                    .filter_map(|choice| choice.get("label")?.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Job `id`'s checkpoints, in the order it recorded them.
pub async fn checkpoints(pool: &PgPool, id: &str) -> Result<Vec<CheckpointView>, Error> {
    Ok(sqlx::query_as(queries::CHECKPOINT_VIEWS)
        .bind(id)
        .fetch_all(pool)
        .await?)
}

/// The jobs job `id` spawned, oldest first.
pub async fn children(pool: &PgPool, id: &str) -> Result<Vec<JobSummary>, Error> {
    Ok(sqlx::query_as(queries::CHILDREN_OF)
        .bind(id)
        .fetch_all(pool)
        .await?)
}

/// The workflows job `id` spawned, oldest first.
pub async fn child_workflows(pool: &PgPool, id: &str) -> Result<Vec<WorkflowSummary>, Error> {
    Ok(sqlx::query_as(queries::CHILD_WORKFLOWS)
        .bind(id)
        .fetch_all(pool)
        .await?)
}

/// The oldest job of `queue` waiting for signal `signal`, if one is.
pub async fn oldest_waiting_for(
    pool: &PgPool,
    queue: &str,
    signal: &str,
) -> Result<Option<JobSummary>, Error> {
    Ok(sqlx::query_as(queries::OLDEST_WAITING_FOR)
        .bind(queue)
        .bind(format!("signal:{signal}"))
        .fetch_optional(pool)
        .await?)
}

/// Answers job `id`'s wait `wait` with its choice labelled `label` (see
/// [`CheckpointView::choices`]): sends that choice's value as the signal.
/// A wait that is not waiting, or has no such choice, is
/// [`Signalled::WaitEnded`] when answered or timed out, else `NoSuchJob`.
pub async fn answer(pool: &PgPool, id: &str, wait: &str, label: &str) -> Result<Signalled, Error> {
    let mut tx = pool.begin().await?;
    let recorded: Option<Value> = sqlx::query_scalar(queries::WAIT_CHECKPOINT)
        .bind(id)
        .bind(wait)
        .fetch_optional(&mut *tx)
        .await?;
    let Some(recorded) = recorded else {
        return Ok(Signalled::NoSuchJob);
    };
    if recorded.get("outcome").is_some() {
        return Ok(Signalled::WaitEnded);
    }
    let chosen = recorded
        .get("choices")
        .and_then(Value::as_array)
        .and_then(|choices| {
            choices
                .iter()
                .find(|choice| choice.get("label").and_then(Value::as_str) == Some(label))
        })
        .and_then(|choice| choice.get("value"));
    let Some(value) = chosen else {
        return Ok(Signalled::NoSuchJob);
    };
    let signalled = signals::signal(&mut tx, id, wait, value).await?;
    tx.commit().await?;
    Ok(signalled)
}
