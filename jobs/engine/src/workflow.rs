//! Workflows: DAGs of the engine's jobs, enqueued in the caller's
//! transaction, each step released exactly once when its dependencies end.
//!
//! Why not apalis-workflow 1.0: its fan-in is at least once (a step enqueues
//! its successor in one transaction and records its own completion in
//! another, so a crash in between runs the successor twice), a fan-in after a
//! chain never runs, a failing dependency is re-fetched 25 times without
//! backoff, and there is no cancel (verified: `notes/apalis-workflow-cron.md`).
//! Here the release is a trigger on `apalis.jobs` (the workflows migration):
//! it runs in the very transaction that records a dependency's end, and
//! counts dependencies off under the dependent's row lock.

use std::{collections::HashSet, time::Duration};

use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use sqlx::{PgConnection, PgExecutor};
use tracing::Instrument as _;
use ulid::Ulid;

use crate::{
    error::Error,
    job::{Job, JobContext, StepOf},
    queries,
};

/// What a step does when one of its dependencies dies or is cancelled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OnDependencyFailure {
    /// The step is cancelled, and so are the steps that need it (the default).
    #[default]
    Cancel,
    /// The step runs anyway once every dependency has ended, however.
    Run,
}

impl OnDependencyFailure {
    fn as_str(self) -> &'static str {
        match self {
            Self::Cancel => "cancel",
            Self::Run => "run",
        }
    }
}

/// One step of a [`Workflow`]: a job of a registered type, under a name unique
/// in its workflow, with the steps it waits for.
#[derive(Debug, Clone)]
pub struct Step {
    name: String,
    job_type: &'static str,
    payload: Result<Vec<u8>, String>,
    max_attempts: u32,
    depends_on: Vec<String>,
    on_dependency_failure: OnDependencyFailure,
    delay: Option<Duration>,
    priority: i16,
    concurrency_key: Option<String>,
}

impl Step {
    /// Step `name` runs `job`. It is an ordinary job of `J`'s queue: `J`'s
    /// attempts, backoff, timeout and lease apply to it.
    pub fn new<J: Job>(name: impl Into<String>, job: &J) -> Self {
        Self {
            name: name.into(),
            job_type: J::NAME,
            payload: serde_json::to_vec(job).map_err(|err| err.to_string()),
            max_attempts: J::MAX_ATTEMPTS,
            depends_on: Vec::new(),
            on_dependency_failure: OnDependencyFailure::Cancel,
            delay: None,
            priority: J::PRIORITY,
            concurrency_key: job.concurrency_key(),
        }
    }

    /// The step's job is due `delay` after the step is released (its
    /// dependencies ended; a step without any: the workflow's enqueue), and
    /// `scheduled` until then.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }

    /// The step's job's priority (its type's `Job::PRIORITY` unless set).
    pub fn priority(mut self, priority: i16) -> Self {
        self.priority = priority;
        self
    }

    /// The step runs only after each of these steps has ended (done, unless
    /// [`Step::run_anyway`]).
    pub fn after<I, S>(mut self, dependencies: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.depends_on
            .extend(dependencies.into_iter().map(Into::into));
        self
    }

    /// The step runs once its dependencies have ended, even if some died or
    /// were cancelled (a clean-up or report step).
    pub fn run_anyway(mut self) -> Self {
        self.on_dependency_failure = OnDependencyFailure::Run;
        self
    }

    /// The step's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// A DAG of jobs, enqueued atomically: every step exists if and only if the
/// transaction that enqueued the workflow commits.
///
/// ```no_run
/// # use durable_jobs::{Job, JobContext, JobError, Step, Workflow};
/// # #[derive(serde::Serialize, serde::Deserialize)] struct Fetch { part: u32 }
/// # #[derive(serde::Serialize, serde::Deserialize)] struct Merge;
/// # impl Job for Fetch { const NAME: &'static str = "fetch"; type Context = (); type Output = u64;
/// #     async fn run(self, _: JobContext<'_, ()>) -> Result<u64, JobError> { Ok(1) } }
/// # impl Job for Merge { const NAME: &'static str = "merge"; type Context = (); type Output = ();
/// #     async fn run(self, _: JobContext<'_, ()>) -> Result<(), JobError> { Ok(()) } }
/// # async fn example(pool: sqlx::PgPool) -> Result<(), durable_jobs::Error> {
/// let mut tx = pool.begin().await?;
/// let id = Workflow::new("import")
///     .add("fetch-1", Fetch { part: 1 })
///     .add("fetch-2", Fetch { part: 2 })
///     .add_after("merge", Merge, ["fetch-1", "fetch-2"]) // fan-in: runs once, after both
///     .enqueue(&mut *tx)
///     .await?;
/// tx.commit().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Workflow {
    name: String,
    key: Option<String>,
    steps: Vec<Step>,
}

impl Workflow {
    /// An empty workflow; `name` labels it for operators.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            key: None,
            steps: Vec::new(),
        }
    }

    /// An idempotency key: enqueueing a workflow whose key exists adds
    /// nothing and returns the existing workflow's id (a step that plans a
    /// workflow can run twice, say after a crash, and plan it once).
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Adds step `name` running `job`, with no dependencies.
    pub fn add<J: Job>(self, name: impl Into<String>, job: J) -> Self {
        self.step(Step::new(name, &job))
    }

    /// Adds step `name` running `job` once every step in `dependencies` is
    /// done. Dependencies must be added before it.
    pub fn add_after<J, I, S>(self, name: impl Into<String>, job: J, dependencies: I) -> Self
    where
        J: Job,
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.step(Step::new(name, &job).after(dependencies))
    }

    /// Adds a step built with [`Step`] (for [`Step::run_anyway`]).
    pub fn step(mut self, step: Step) -> Self {
        self.steps.push(step);
        self
    }

    /// This workflow as a job's child ([`JobContext::spawn`]): awaiting it
    /// returns step `output_step`'s output (a step of type `J`) once every
    /// step has ended, or fails with the first dead step's error.
    pub fn returning<J: Job>(self, output_step: impl Into<String>) -> ChildWorkflow<J> {
        ChildWorkflow {
            workflow: self,
            output_step: output_step.into(),
            output: std::marker::PhantomData,
        }
    }

    /// Enqueues the workflow on `conn` (typically `&mut *tx`): its steps
    /// without dependencies are due at once, the others wait for theirs.
    /// Returns the workflow's id.
    ///
    /// Fails with [`Error::InvalidWorkflow`] when it has no steps, two steps
    /// share a name, or a step depends on one not added before it.
    pub async fn enqueue(self, conn: &mut PgConnection) -> Result<Ulid, Error> {
        let known = HashSet::new();
        check_steps(&self.steps, &known).map_err(Error::InvalidWorkflow)?;
        let span = tracing::info_span!(
            "send",
            otel.name = format!("send workflow {}", self.name),
            otel.kind = "producer",
            messaging.system = "apalis",
            messaging.operation.type = "send",
            messaging.operation.name = "send",
            messaging.destination.name = "workflow",
            workflow.id = tracing::field::Empty,
            workflow.name = %self.name,
            workflow.steps = self.steps.len(),
        );
        async {
            let id = Ulid::generate();
            let created: Option<String> = sqlx::query_scalar(queries::INSERT_WORKFLOW)
                .bind(id.to_string())
                .bind(&self.name)
                .bind(&self.key)
                .fetch_optional(&mut *conn)
                .await?;
            let id = match created {
                Some(_) => {
                    add_steps(&mut *conn, &id.to_string(), &self.steps).await?;
                    id
                }
                None => {
                    let existing: String = sqlx::query_scalar(queries::WORKFLOW_BY_KEY)
                        .bind(&self.key)
                        .fetch_one(&mut *conn)
                        .await?;
                    existing.parse().map_err(|_| Error::CorruptId(existing))?
                }
            };
            tracing::Span::current().record("workflow.id", id.to_string());
            Ok(id)
        }
        .instrument(span)
        .await
    }
}

/// A [`Workflow`] to spawn as a job's child, with the step whose output the
/// parent awaits ([`Workflow::returning`]).
#[derive(Debug)]
pub struct ChildWorkflow<J> {
    pub(crate) workflow: Workflow,
    pub(crate) output_step: String,
    output: std::marker::PhantomData<fn() -> J>,
}

impl<J> Clone for ChildWorkflow<J> {
    fn clone(&self) -> Self {
        Self {
            workflow: self.workflow.clone(),
            output_step: self.output_step.clone(),
            output: std::marker::PhantomData,
        }
    }
}

impl<J: Job> ChildWorkflow<J> {
    /// Refuses an output step the workflow lacks, or of another type than `J`.
    pub(crate) fn check_output(&self) -> Result<(), Error> {
        match self
            .workflow
            .steps
            .iter()
            .find(|step| step.name == self.output_step)
        {
            Some(step) if step.job_type == J::NAME => Ok(()),
            Some(step) => Err(Error::InvalidWorkflow(format!(
                "its output step {:?} runs {}, not {}",
                self.output_step,
                step.job_type,
                J::NAME
            ))),
            None => Err(Error::InvalidWorkflow(format!(
                "it has no step {:?} to return",
                self.output_step
            ))),
        }
    }
}

/// Why `steps` cannot be added to a workflow whose existing steps are `known`
/// (dynamic additions may also depend on steps only the database knows: pass
/// `None` there and let it check).
fn check_steps(steps: &[Step], known: &HashSet<&str>) -> Result<(), String> {
    if steps.is_empty() && known.is_empty() {
        return Err("a workflow needs at least one step".to_owned());
    }
    let mut names: HashSet<&str> = HashSet::new();
    for step in steps {
        if let Err(err) = &step.payload {
            return Err(format!(
                "step {:?}: cannot encode its job: {err}",
                step.name
            ));
        }
        if let Some(missing) = step.depends_on.iter().find(|dependency| {
            !names.contains(dependency.as_str()) && !known.contains(dependency.as_str())
        }) {
            return Err(format!(
                "step {:?} depends on {missing:?}, which is not added before it",
                step.name
            ));
        }
        if !names.insert(&step.name) {
            return Err(format!("two steps are named {:?}", step.name));
        }
    }
    Ok(())
}

/// Adds `steps` to workflow `workflow` (one statement: all or none). Steps
/// whose names exist are skipped. Returns how many were added.
pub(crate) async fn add_steps<'e>(
    executor: impl PgExecutor<'e>,
    workflow: &str,
    steps: &[Step],
) -> Result<u64, Error> {
    let descriptions: Vec<Value> = steps
        .iter()
        .map(|step| {
            json!({
                "name": step.name,
                "job_type": step.job_type,
                "max_attempts": step.max_attempts,
                "depends_on": step.depends_on,
                "on_dependency_failure": step.on_dependency_failure.as_str(),
                "delay_secs": step.delay.map(|delay| delay.as_secs_f64()),
                "priority": step.priority,
                "concurrency_key": step.concurrency_key,
            })
        })
        .collect();
    let payloads: Vec<&[u8]> = steps
        .iter()
        .map(|step| step.payload.as_deref().unwrap_or_default())
        .collect();
    let job_ids: Vec<String> = steps.iter().map(|_| Ulid::generate().to_string()).collect();
    let (keys, values): (Vec<String>, Vec<String>) =
        observability::inject_current().into_iter().unzip();
    let added: i32 = sqlx::query_scalar(queries::ADD_WORKFLOW_STEPS)
        .bind(workflow)
        .bind(Value::Array(descriptions))
        .bind(&job_ids)
        .bind(&payloads)
        .bind(&keys)
        .bind(&values)
        .fetch_one(executor)
        .instrument(observability::db_span("INSERT", "apalis.workflow_steps"))
        .await
        .map_err(|err| match &err {
            sqlx::Error::Database(db) if db.code().as_deref() == Some("23503") => {
                Error::InvalidWorkflow(db.message().to_owned())
            }
            _ => Error::Database(err),
        })?;
    Ok(u64::try_from(added).unwrap_or_default())
}

/// The metadata keys a released step's job carries (set by
/// `apalis.release_workflow_step`).
pub(crate) const WORKFLOW_ID_KEY: &str = "workflow.id";
pub(crate) const WORKFLOW_STEP_KEY: &str = "workflow.step";
/// The dependencies' traceparents, comma-separated: the span links of a fan-in.
pub(crate) const WORKFLOW_LINKS_KEY: &str = "workflow.links";

/// Checks dynamic additions: names unique among themselves, payloads encoded.
pub(crate) fn check_added_steps(steps: &[Step]) -> Result<(), Error> {
    let mut names = HashSet::new();
    for step in steps {
        if let Err(err) = &step.payload {
            return Err(Error::InvalidWorkflow(format!(
                "step {:?}: cannot encode its job: {err}",
                step.name
            )));
        }
        if !names.insert(step.name.as_str()) {
            return Err(Error::InvalidWorkflow(format!(
                "two steps are named {:?}",
                step.name
            )));
        }
    }
    Ok(())
}

/// Decodes the results of dependencies of type `J` (rows of
/// `queries::DEPENDENCY_RESULTS`).
pub(crate) fn decode_results<J: Job>(
    rows: Vec<(String, Option<String>, Option<Value>)>,
) -> Result<Vec<(String, J::Output)>, Error> {
    rows.into_iter()
        .filter(|(_, status, _)| status.as_deref() == Some("Done"))
        .map(|(name, _, result)| {
            let value = result
                .and_then(|mut result| result.get_mut("Ok").map(Value::take))
                .unwrap_or(Value::Null);
            let output = decode_output::<J::Output>(&name, value)?;
            Ok((name, output))
        })
        .collect()
}

fn decode_output<T: DeserializeOwned>(step: &str, value: Value) -> Result<T, Error> {
    serde_json::from_value(value).map_err(|err| Error::StepResult {
        step: step.to_owned(),
        reason: err.to_string(),
    })
}

/// A workflow step's view of its workflow, while it runs.
impl<'a, C> JobContext<'a, C> {
    fn step_or_err(&self, wanted: &str) -> Result<&'a StepOf, Error> {
        self.step.ok_or_else(|| {
            Error::NotInWorkflow(format!("job {} is no workflow step: {wanted}", self.id))
        })
    }

    /// The results of this step's dependencies that are jobs of type `J` and
    /// are done, by step name (name order). A dependency that died or was
    /// cancelled has no result (see [`crate::OnDependencyFailure::Run`]).
    pub async fn dependency_results<J: Job>(&self) -> Result<Vec<(String, J::Output)>, Error> {
        let step = self.step_or_err("it has no dependencies")?;
        let rows = sqlx::query_as(queries::DEPENDENCY_RESULTS)
            .bind(&step.workflow)
            .bind(&step.step)
            .bind(J::NAME)
            .fetch_all(self.pool)
            .await?;
        decode_results::<J>(rows)
    }

    /// The result of dependency `name`, a job of type `J` that is done.
    pub async fn dependency<J: Job>(&self, name: &str) -> Result<J::Output, Error> {
        self.dependency_results::<J>()
            .await?
            .into_iter()
            .find(|(step, _)| step == name)
            .map(|(_, output)| output)
            .ok_or_else(|| {
                Error::NotInWorkflow(format!(
                    "step {name:?} is not a done {} dependency of this step",
                    J::NAME
                ))
            })
    }

    /// Adds steps to this job's workflow while it runs (dynamic fan-out: a
    /// planning step that learns how many chunks there are). They may depend
    /// on any step of the workflow, this one included (they then wait for it
    /// to finish). Steps whose names exist are skipped, so a re-run of this
    /// attempt adds nothing twice. Returns how many were added.
    pub async fn add_steps(&self, steps: impl IntoIterator<Item = Step>) -> Result<u64, Error> {
        let step = self.step_or_err("it cannot add steps")?;
        let steps: Vec<Step> = steps.into_iter().collect();
        check_added_steps(&steps)?;
        add_steps(self.pool, &step.workflow, &steps).await
    }

    /// Whether this step's workflow was asked to cancel: the handler should
    /// stop (return an error: it is not retried). Always false for a job
    /// outside a workflow.
    pub async fn cancel_requested(&self) -> Result<bool, Error> {
        let Some(step) = self.step else {
            return Ok(false);
        };
        let requested: Option<bool> = sqlx::query_scalar(queries::CANCEL_REQUESTED)
            .bind(&step.workflow)
            .fetch_optional(self.pool)
            .await?;
        Ok(requested.unwrap_or(false))
    }

    /// Completes once this step's workflow is asked to cancel (checked every
    /// half second; never, outside a workflow): `select!` on it beside long work.
    pub async fn cancelled(&self) {
        if self.step.is_none() {
            return std::future::pending().await;
        }
        loop {
            if let Ok(true) = self.cancel_requested().await {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Serialize, serde::Deserialize)]
    struct Noop;
    impl Job for Noop {
        const NAME: &'static str = "noop";
        type Context = ();
        type Output = ();
        async fn run(self, _: JobContext<'_, ()>) -> Result<(), crate::job::JobError> {
            Ok(())
        }
    }

    fn check(workflow: &Workflow) -> Result<(), String> {
        check_steps(&workflow.steps, &HashSet::new())
    }

    #[test]
    fn a_workflow_is_checked_before_it_is_enqueued() {
        assert!(check(&Workflow::new("empty")).is_err());
        let duplicate = Workflow::new("w").add("a", Noop).add("a", Noop);
        assert_eq!(
            check(&duplicate),
            Err(r#"two steps are named "a""#.to_owned())
        );
        let forward = Workflow::new("w")
            .add_after("b", Noop, ["a"])
            .add("a", Noop);
        assert!(check(&forward).is_err_and(|err| err.contains("not added before it")));
        let fine = Workflow::new("w")
            .add("a", Noop)
            .add("b", Noop)
            .step(Step::new("c", &Noop).after(["a", "b"]).run_anyway());
        assert_eq!(check(&fine), Ok(()));
    }
}
