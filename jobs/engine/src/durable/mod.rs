//! Durable execution inside one job: checkpointed steps ([`JobContext::step`],
//! [`JobContext::step_tx`]), durable sleep ([`JobContext::sleep`]), signals
//! ([`JobContext::wait_for`], [`signals::signal`]) and awaited children
//! ([`JobContext::spawn`], [`JobContext::await_result`]).
//!
//! The replay model: a job that was suspended (a sleep, a wait) or retried
//! runs `run` again from the top; each checkpoint call is matched by its name
//! to what the job recorded in `apalis.job_checkpoints`, and returns the
//! recorded result instead of running again. Code between checkpoints must
//! therefore be deterministic given the checkpoints' results.
//!
//! Suspending ends the attempt with a [`Suspension`] (through `?`): the
//! runtime settles the job back to waiting, due when the sleep or wait ends
//! (or at once when its signal or child arrives), using no attempt, and its
//! slot, lease and connection are free meanwhile.

pub mod signals;

use std::{collections::HashMap, future::Future, pin::Pin, time::Duration};

use chrono::{DateTime, Utc};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use ulid::Ulid;

use crate::{
    enqueue::enqueue,
    error::Error,
    job::{Checkpoint, ChildFailed, Job, JobContext, JobError},
    queries,
    workflow::ChildWorkflow,
};

/// The future a [`JobContext::step_tx`] step returns: it borrows the
/// transaction it is handed.
pub type StepFuture<'t, T> = Pin<Box<dyn Future<Output = T> + Send + 't>>;

/// How an attempt ends when the job suspends: the runtime reads it where it
/// settles the attempt. Returned (inside a [`JobError`]) by `sleep`,
/// `wait_for` and `await_result`; pass it on with `?`.
#[derive(Debug)]
pub(crate) struct Suspension {
    /// How long until the job is due again (at the latest).
    pub(crate) wake_in: Duration,
    /// What it waits for: `sleep:<name>`, `signal:<name>`, `child:<id>`.
    pub(crate) waiting_for: String,
}

impl std::fmt::Display for Suspension {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "suspended ({}) for at most {:.1?}",
            self.waiting_for, self.wake_in
        )
    }
}

impl std::error::Error for Suspension {}

/// A child this job spawned (see [`JobContext::spawn`]): a job of type `J`,
/// or a workflow ([`ChildWorkflow`]).
#[derive(Debug)]
pub struct Child<J> {
    id: Ulid,
    job: std::marker::PhantomData<fn() -> J>,
}

impl<J> Clone for Child<J> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<J> Copy for Child<J> {}

impl<J> Child<J> {
    /// The child's id: its job's, or its workflow's.
    pub fn id(&self) -> Ulid {
        self.id
    }
}

/// A wait for a signal or a child gives up after this without one, and a
/// wait for a child looks again (a lost wake-up costs at most this).
const CHILD_RECHECK: Duration = Duration::from_secs(3600);

/// `type_name` without module paths: `Vec<Quote>`, not
/// `alloc::vec::Vec<my_app::billing::Quote>` (moving a type to another module
/// must not strand its jobs' checkpoints).
pub(crate) fn short_type_name<T: ?Sized>() -> String {
    let full = std::any::type_name::<T>();
    let mut short = String::with_capacity(full.len());
    let mut segment = String::new();
    let mut chars = full.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_alphanumeric() || c == '_' {
            segment.push(c);
        } else if c == ':' && chars.peek() == Some(&':') {
            chars.next();
            segment.clear();
        } else {
            short.push_str(&segment);
            segment.clear();
            short.push(c);
        }
    }
    short.push_str(&segment);
    short
}

impl<C> JobContext<'_, C> {
    async fn checkpoint(&self, name: &str) -> Result<Option<Checkpoint>, JobError> {
        {
            let loaded = self.checkpoints.0.lock().expect("no panic holding it");
            if let Some(all) = loaded.as_ref() {
                return Ok(all.get(name).cloned());
            }
        }
        let rows: Vec<(String, String, String, Value)> = sqlx::query_as(queries::JOB_CHECKPOINTS)
            .bind(self.id)
            .fetch_all(self.pool)
            .await?;
        let all: HashMap<String, Checkpoint> = rows
            .into_iter()
            .map(|(name, kind, value_type, value)| {
                (
                    name,
                    Checkpoint {
                        kind,
                        value_type,
                        value,
                    },
                )
            })
            .collect();
        let found = all.get(name).cloned();
        *self.checkpoints.0.lock().expect("no panic holding it") = Some(all);
        Ok(found)
    }

    fn remember(&self, name: &str, kind: &str, value_type: &str, value: &Value) {
        if let Some(all) = self
            .checkpoints
            .0
            .lock()
            .expect("no panic holding it")
            .as_mut()
        {
            all.insert(
                name.to_owned(),
                Checkpoint {
                    kind: kind.to_owned(),
                    value_type: value_type.to_owned(),
                    value: value.clone(),
                },
            );
        }
    }

    /// Records checkpoint `name` on its own (see
    /// `queries::RECORD_CHECKPOINT_NO_FLUSH`) unless it exists; returns the
    /// value when it recorded it (none: another attempt recorded it first).
    async fn record(
        &self,
        name: &str,
        kind: &str,
        value_type: &str,
        value: &Value,
    ) -> Result<Option<Value>, JobError> {
        self.record_with(
            queries::RECORD_CHECKPOINT_NO_FLUSH,
            self.pool,
            name,
            kind,
            value_type,
            value,
        )
        .await
    }

    /// [`Self::record`] in the transaction `tx` (a `step_tx`, a spawn).
    async fn record_in(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        name: &str,
        kind: &str,
        value_type: &str,
        value: &Value,
    ) -> Result<Option<Value>, JobError> {
        self.record_with(
            queries::RECORD_CHECKPOINT,
            &mut **tx,
            name,
            kind,
            value_type,
            value,
        )
        .await
    }

    async fn record_with<'e>(
        &self,
        statement: &'static str,
        executor: impl sqlx::PgExecutor<'e>,
        name: &str,
        kind: &str,
        value_type: &str,
        value: &Value,
    ) -> Result<Option<Value>, JobError> {
        let inserted: Option<Value> = sqlx::query_scalar(statement)
            .bind(self.id)
            .bind(name)
            .bind(kind)
            .bind(value_type)
            .bind(value)
            .fetch_optional(executor)
            .await?;
        if inserted.is_some() {
            self.remember(name, kind, value_type, value);
        }
        Ok(inserted)
    }

    /// The recorded checkpoint `name`, refused unless it is a `kind` of
    /// `value_type`.
    fn checked(
        name: &str,
        checkpoint: Checkpoint,
        kind: &str,
        value_type: &str,
    ) -> Result<Value, JobError> {
        if checkpoint.kind != kind || checkpoint.value_type != value_type {
            return Err(JobError::fatal(format!(
                "checkpoint {name:?} was recorded as a {} of {}, and is now read as a {kind} of \
                 {value_type}: two checkpoints of this job share a name, or its code changed \
                 under a suspended job",
                checkpoint.kind, checkpoint.value_type
            )));
        }
        Ok(checkpoint.value)
    }

    fn decode<T: DeserializeOwned>(name: &str, value: Value) -> Result<T, JobError> {
        serde_json::from_value(value).map_err(|err| {
            JobError::fatal(format!(
                "checkpoint {name:?} does not decode as {}: {err}",
                short_type_name::<T>()
            ))
        })
    }

    /// Runs `step` once per job: its result is recorded under `name`, and a
    /// later attempt of this job (after a failure, a crash or a suspension)
    /// gets the recorded result without running it again.
    ///
    /// At-least-once for the step's own side effects: a crash after them
    /// and before the record runs the step again. For writes to the job's
    /// database, [`JobContext::step_tx`] is exactly once. A name reused with
    /// another type is refused (the job dies with the reason).
    pub async fn step<T, E, F>(&self, name: &str, step: F) -> Result<T, JobError>
    where
        T: Serialize + DeserializeOwned + Send,
        E: Into<JobError>,
        F: Future<Output = Result<T, E>>,
    {
        let value_type = short_type_name::<T>();
        if let Some(recorded) = self.checkpoint(name).await? {
            return Self::decode(name, Self::checked(name, recorded, "step", &value_type)?);
        }
        let output = step.await.map_err(Into::into)?;
        let value = serde_json::to_value(&output)?;
        match self.record(name, "step", &value_type, &value).await? {
            Some(_) => Ok(output),
            // Another attempt (a lease that expired under this one) recorded
            // it first: its result is the job's.
            None => self.recorded(name, "step", &value_type).await,
        }
    }

    async fn recorded<T: DeserializeOwned>(
        &self,
        name: &str,
        kind: &str,
        value_type: &str,
    ) -> Result<T, JobError> {
        let (found_kind, found_type, value): (String, String, Value) =
            sqlx::query_as(queries::JOB_CHECKPOINT)
                .bind(self.id)
                .bind(name)
                .fetch_one(self.pool)
                .await?;
        let checkpoint = Checkpoint {
            kind: found_kind,
            value_type: found_type,
            value,
        };
        Self::decode(name, Self::checked(name, checkpoint, kind, value_type)?)
    }

    /// Runs `step` in a transaction on the job's database (the engine's
    /// pool), and records its result in the same transaction: the step's
    /// writes and its checkpoint commit together, so a crash keeps both or
    /// neither, and a committed step never runs again.
    ///
    /// ```ignore
    /// let id: i64 = job.step_tx("record", |tx| Box::pin(async move {
    ///     sqlx::query_scalar("insert into orders (total) values ($1) returning id")
    ///         .bind(total).fetch_one(&mut **tx).await
    /// })).await?;
    /// ```
    pub async fn step_tx<T, E, F>(&self, name: &str, step: F) -> Result<T, JobError>
    where
        T: Serialize + DeserializeOwned + Send,
        E: Into<JobError>,
        F: for<'t> FnOnce(&'t mut Transaction<'static, Postgres>) -> StepFuture<'t, Result<T, E>>,
    {
        self.step_in_tx(name, step, false).await
    }

    /// A [`JobContext::step_tx`] that is the job's last act: the job
    /// completes in the step's transaction, its result this step's value
    /// (return it: `return job.finish_tx(..).await;`). So there is no moment
    /// when the step's writes are committed and the job still looks
    /// unfinished: a crash keeps both or neither. The runtime's own settle
    /// of this attempt then finds the job done and changes nothing. An
    /// attempt that lost its lease meanwhile (another worker took the job)
    /// rolls the step back and fails.
    pub async fn finish_tx<T, E, F>(&self, name: &str, step: F) -> Result<T, JobError>
    where
        T: Serialize + DeserializeOwned + Send,
        E: Into<JobError>,
        F: for<'t> FnOnce(&'t mut Transaction<'static, Postgres>) -> StepFuture<'t, Result<T, E>>,
    {
        self.step_in_tx(name, step, true).await
    }

    async fn step_in_tx<T, E, F>(&self, name: &str, step: F, finish: bool) -> Result<T, JobError>
    where
        T: Serialize + DeserializeOwned + Send,
        E: Into<JobError>,
        F: for<'t> FnOnce(&'t mut Transaction<'static, Postgres>) -> StepFuture<'t, Result<T, E>>,
    {
        let value_type = short_type_name::<T>();
        if let Some(recorded) = self.checkpoint(name).await? {
            return Self::decode(name, Self::checked(name, recorded, "step", &value_type)?);
        }
        let mut tx = self.pool.begin().await?;
        let output = step(&mut tx).await.map_err(Into::into)?;
        let value = serde_json::to_value(&output)?;
        match self
            .record_in(&mut tx, name, "step", &value_type, &value)
            .await?
        {
            Some(_) => {
                if finish {
                    let completed = sqlx::query(queries::COMPLETE_IN_STEP)
                        .bind(self.id)
                        .bind(json!({ "Ok": value }))
                        .bind(self.worker)
                        .bind(i32::try_from(self.attempt).unwrap_or(i32::MAX))
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                    if completed == 0 {
                        tx.rollback().await?;
                        return Err(JobError::retry(format!(
                            "step {name:?} not committed: this attempt no longer holds the job \
                             (its lease ended and another worker took it)"
                        )));
                    }
                }
                tx.commit().await?;
                Ok(output)
            }
            None => {
                // Committed by another attempt meanwhile: ours is undone.
                tx.rollback().await?;
                self.recorded(name, "step", &value_type).await
            }
        }
    }

    /// Sleeps durably for `duration` from its first call: that attempt ends
    /// here (not a failure, no attempt used, its slot and lease freed) and
    /// the job is due again when the time is up; then it runs from the top,
    /// its earlier steps return their recorded results, and this returns.
    pub async fn sleep(&self, name: &str, duration: Duration) -> Result<(), JobError> {
        let until = Utc::now()
            + chrono::TimeDelta::from_std(duration).unwrap_or(chrono::TimeDelta::MAX / 2);
        self.sleep_until(name, until).await
    }

    /// [`JobContext::sleep`] until `until`.
    pub async fn sleep_until(&self, name: &str, until: DateTime<Utc>) -> Result<(), JobError> {
        let until = match self.checkpoint(name).await? {
            Some(recorded) => deadline(name, Self::checked(name, recorded, "sleep", "sleep")?)?,
            None => {
                let value = json!({ "until": until });
                match self.record(name, "sleep", "sleep", &value).await? {
                    Some(_) => until,
                    None => deadline(name, self.recorded::<Value>(name, "sleep", "sleep").await?)?,
                }
            }
        };
        let left = (until - Utc::now()).to_std().unwrap_or_default();
        if left.is_zero() {
            return Ok(());
        }
        Err(self.suspend(left, format!("sleep:{name}")).await)
    }

    /// Suspends the job until signal `name` arrives ([`signals::signal`],
    /// [`JobContext::signal_url`]) or `timeout` from the first call passes:
    /// `Ok(Some(value))`, or `Ok(None)` after the timeout. A signal sent
    /// before the wait is kept and received; the first signal wins.
    pub async fn wait_for<T>(&self, name: &str, timeout: Duration) -> Result<Option<T>, JobError>
    where
        T: Serialize + DeserializeOwned + Send,
    {
        self.wait(name, timeout, None).await
    }

    /// [`JobContext::wait_for`] a signal that a person answers: the
    /// dashboard's job page shows one button per choice (its label), and a
    /// press sends that choice's value as the signal (CSRF-checked, like
    /// its other actions). Any sender may still signal it with another value.
    ///
    /// ```ignore
    /// let decision = job.wait_for_choice("approval", Duration::from_secs(86_400),
    ///     &[("Approve", Decision::Approve), ("Reject", Decision::Reject)]).await?;
    /// ```
    pub async fn wait_for_choice<T>(
        &self,
        name: &str,
        timeout: Duration,
        choices: &[(&str, T)],
    ) -> Result<Option<T>, JobError>
    where
        T: Serialize + DeserializeOwned + Send,
    {
        let choices = choices
            .iter()
            .map(|(label, value)| {
                Ok(json!({ "label": label, "value": serde_json::to_value(value)? }))
            })
            .collect::<Result<Vec<Value>, serde_json::Error>>()?;
        self.wait(name, timeout, Some(Value::Array(choices))).await
    }

    async fn wait<T>(
        &self,
        name: &str,
        timeout: Duration,
        choices: Option<Value>,
    ) -> Result<Option<T>, JobError>
    where
        T: Serialize + DeserializeOwned + Send,
    {
        let value_type = format!("Option<{}>", short_type_name::<T>());
        let until = match self.checkpoint(name).await? {
            Some(recorded) => {
                let value = Self::checked(name, recorded, "wait", &value_type)?;
                if let Some(outcome) = value.get("outcome") {
                    return Self::decode(name, outcome.clone());
                }
                deadline(name, value)?
            }
            None => {
                let until = Utc::now()
                    + chrono::TimeDelta::from_std(timeout).unwrap_or(chrono::TimeDelta::MAX / 2);
                let mut value = json!({ "until": until });
                if let Some(choices) = choices {
                    value["choices"] = choices;
                }
                match self.record(name, "wait", &value_type, &value).await? {
                    Some(_) => until,
                    None => deadline(
                        name,
                        self.recorded::<Value>(name, "wait", &value_type).await?,
                    )?,
                }
            }
        };
        let signal: Option<(Value, Option<String>)> = sqlx::query_as(queries::SIGNAL_OF)
            .bind(self.id)
            .bind(name)
            .fetch_optional(self.pool)
            .await?;
        let left = (until - Utc::now()).to_std().unwrap_or_default();
        let outcome = match signal {
            Some((value, sender)) => {
                // The run that receives it links to the span that sent it.
                observability::link_traceparents(&tracing::Span::current(), sender.as_deref());
                Some(value)
            }
            None if left.is_zero() => None,
            None => return Err(self.suspend(left, format!("signal:{name}")).await),
        };
        // The outcome becomes the checkpoint's: a replay returns it even once
        // the signal row is gone.
        let received: Option<T> = match &outcome {
            Some(value) => Some(Self::decode(name, value.clone())?),
            None => None,
        };
        let recorded = json!({ "until": until, "outcome": outcome });
        // Without the choices: the wait is answered, the buttons go.
        sqlx::query(queries::SETTLE_CHECKPOINT)
            .bind(self.id)
            .bind(name)
            .bind(&recorded)
            .execute(self.pool)
            .await?;
        self.remember(name, "wait", &value_type, &recorded);
        Ok(received)
    }

    /// Starts `child` as this job's child, once: the first call enqueues it
    /// (a job, or a workflow: [`Workflow::returning`](crate::workflow::Workflow::returning)) and records its id in
    /// the same transaction; a later attempt gets the same child. Await it
    /// with [`JobContext::await_result`]. A child that has not started dies
    /// with its parent (cancelled, dead); a workflow is cancelled.
    pub async fn spawn<S: Spawn>(&self, name: &str, child: &S) -> Result<Child<S>, JobError> {
        let value_type = child.checkpoint_type();
        let id = match self.checkpoint(name).await? {
            Some(recorded) => {
                Self::decode::<String>(name, Self::checked(name, recorded, "spawn", &value_type)?)?
            }
            None => {
                let mut tx = self.pool.begin().await?;
                let id = child.start(&mut tx, self.id).await?.to_string();
                let value = Value::String(id.clone());
                match self
                    .record_in(&mut tx, name, "spawn", &value_type, &value)
                    .await?
                {
                    Some(_) => {
                        tx.commit().await?;
                        id
                    }
                    None => {
                        tx.rollback().await?;
                        self.recorded(name, "spawn", &value_type).await?
                    }
                }
            }
        };
        let id = id
            .parse()
            .map_err(|_| JobError::fatal(format!("child id {id:?} is not a ULID")))?;
        Ok(Child {
            id,
            job: std::marker::PhantomData,
        })
    }

    /// Suspends until `child` ends, then returns its result (a workflow's:
    /// its output step's, once every step has ended); a child that died
    /// fails this with [`ChildFailed`] (the job then dies too, unless it
    /// handles the error).
    pub async fn await_result<S: Spawn>(&self, child: Child<S>) -> Result<S::Output, JobError> {
        let name = format!("await:{}", child.id);
        let value_type = short_type_name::<S::Output>();
        if let Some(recorded) = self.checkpoint(&name).await? {
            return Self::decode(&name, Self::checked(&name, recorded, "await", &value_type)?);
        }
        let id = child.id.to_string();
        let ended = match self.child_outcome(&id).await? {
            ChildOutcome::Open => {
                return Err(self.suspend(CHILD_RECHECK, format!("child:{id}")).await);
            }
            ChildOutcome::Gone => {
                return Err(JobError::fatal(format!(
                    "child {id} is gone (pruned before it was awaited?)"
                )));
            }
            ChildOutcome::Died(error) => {
                // apalis's prefix of a fatal error says nothing the state does not.
                let error = error.strip_prefix("AbortError: ").unwrap_or(&error);
                return Err(JobError::fatal(ChildFailed {
                    child: id,
                    error: error.to_owned(),
                }));
            }
            ChildOutcome::Done(value) => value,
        };
        let output: S::Output = Self::decode(&name, ended.clone())?;
        self.record(&name, "await", &value_type, &ended).await?;
        Ok(output)
    }

    /// Where child `id` (a job, else a workflow) stands.
    async fn child_outcome(&self, id: &str) -> Result<ChildOutcome, JobError> {
        let ok_of = |result: Option<Value>| {
            result
                .and_then(|mut result| result.get_mut("Ok").map(Value::take))
                .unwrap_or(Value::Null)
        };
        let job: Option<(String, Option<Value>)> = sqlx::query_as(queries::CHILD_OUTCOME)
            .bind(id)
            .fetch_optional(self.pool)
            .await?;
        if let Some((state, result)) = job {
            return Ok(match state.as_str() {
                "done" => ChildOutcome::Done(ok_of(result)),
                "dead" => ChildOutcome::Died(
                    result
                        .as_ref()
                        .and_then(|result| result.get("Err"))
                        .and_then(Value::as_str)
                        .unwrap_or("no error recorded")
                        .to_owned(),
                ),
                _ => ChildOutcome::Open,
            });
        }
        type WorkflowOutcome = (
            bool,
            Option<String>,
            Option<String>,
            Option<Value>,
            Option<String>,
        );
        let workflow: Option<WorkflowOutcome> = sqlx::query_as(queries::WORKFLOW_CHILD_OUTCOME)
            .bind(id)
            .fetch_optional(self.pool)
            .await?;
        Ok(match workflow {
            None => ChildOutcome::Gone,
            Some((true, ..)) => ChildOutcome::Open,
            Some((false, _, Some(state), result, _)) if state == "done" => {
                ChildOutcome::Done(ok_of(result))
            }
            Some((false, output, state, _, died)) => {
                ChildOutcome::Died(died.unwrap_or_else(|| {
                    format!(
                        "its step {:?} ended {}",
                        output.unwrap_or_default(),
                        state.as_deref().unwrap_or("without running")
                    )
                }))
            }
        })
    }
}

/// Where an awaited child stands.
enum ChildOutcome {
    /// Running, waiting, or a workflow with a step still open.
    Open,
    /// Done: the result (a workflow's output step's).
    Done(Value),
    /// Died: its (or its first dead step's) error.
    Died(String),
    /// No such job or workflow (pruned).
    Gone,
}

/// What [`JobContext::spawn`] starts as a child: a job (awaiting it returns
/// its output), or a workflow with the step whose output awaiting it returns
/// ([`Workflow::returning`](crate::workflow::Workflow::returning)). Sealed:
/// the engine implements it.
pub trait Spawn: Send + Sync + sealed::Sealed {
    /// What [`JobContext::await_result`] returns for this child.
    type Output: DeserializeOwned;

    /// The type its spawn checkpoint records (a child of another kind under
    /// the same name is refused).
    #[doc(hidden)]
    fn checkpoint_type(&self) -> String;

    /// Enqueues the child on `conn`, as job `parent`'s; returns its id.
    #[doc(hidden)]
    fn start<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        parent: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Ulid, Error>> + Send + 'a>>;
}

mod sealed {
    pub trait Sealed {}
    impl<J: crate::job::Job> Sealed for J {}
    impl<J> Sealed for crate::workflow::ChildWorkflow<J> {}
}

impl<J: Job> Spawn for J {
    type Output = J::Output;

    fn checkpoint_type(&self) -> String {
        format!("Child<{}>", J::NAME)
    }

    fn start<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        parent: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Ulid, Error>> + Send + 'a>> {
        Box::pin(async move {
            let id = enqueue(&mut *conn, self).await?;
            sqlx::query(queries::ADOPT)
                .bind(id.to_string())
                .bind(parent)
                .execute(&mut *conn)
                .await?;
            Ok(id)
        })
    }
}

impl<J: Job> Spawn for ChildWorkflow<J> {
    type Output = J::Output;

    fn checkpoint_type(&self) -> String {
        format!("Workflow<{}>", J::NAME)
    }

    fn start<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        parent: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Ulid, Error>> + Send + 'a>> {
        Box::pin(async move {
            self.check_output()?;
            let id = self.workflow.clone().enqueue(&mut *conn).await?;
            sqlx::query(queries::ADOPT_WORKFLOW)
                .bind(id.to_string())
                .bind(parent)
                .bind(&self.output_step)
                .execute(&mut *conn)
                .await?;
            Ok(id)
        })
    }
}

/// The deadline recorded in a sleep's or wait's checkpoint.
fn deadline(name: &str, value: Value) -> Result<DateTime<Utc>, JobError> {
    value
        .get("until")
        .cloned()
        .and_then(|until| serde_json::from_value(until).ok())
        .ok_or_else(|| JobError::fatal(format!("checkpoint {name:?} holds no deadline")))
}

/// The metadata key of a suspended job's last run's `traceparent`: the run
/// that resumes it links to that span (`runtime::job_span`).
pub(crate) const PREVIOUS_RUN_KEY: &str = "durable.previous_run";

impl<C> JobContext<'_, C> {
    /// Ends the attempt suspended (see [`Suspension`]), keeping this run's
    /// span for the next run to link to.
    async fn suspend(&self, wake_in: Duration, waiting_for: String) -> JobError {
        if let Some(run) = observability::inject_current().remove("traceparent")
            && let Err(err) = sqlx::query(queries::REMEMBER_RUN)
                .bind(self.id)
                .bind(run)
                .execute(self.pool)
                .await
        {
            return err.into();
        }
        suspension(wake_in, waiting_for)
    }
}

fn suspension(wake_in: Duration, waiting_for: String) -> JobError {
    JobError::retry(Suspension {
        wake_in,
        waiting_for,
    })
}

/// The engine pool's signing key for signal URLs (made by the migrations).
pub(crate) async fn signal_key(pool: &PgPool) -> Result<Vec<u8>, sqlx::Error> {
    sqlx::query_scalar(queries::SIGNAL_KEY)
        .fetch_one(pool)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_names_leave_out_module_paths() {
        assert_eq!(short_type_name::<u64>(), "u64");
        assert_eq!(short_type_name::<Vec<String>>(), "Vec<String>");
        assert_eq!(
            short_type_name::<Option<(i64, std::time::Duration)>>(),
            "Option<(i64, Duration)>"
        );
    }
}
