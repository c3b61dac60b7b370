//! Job types shared by the tests and their worker process
//! (`examples/test_worker.rs`, which includes this file).

use std::time::Duration;

use durable_jobs::{Backoff, Job, JobContext, JobError, Step, Workflow};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

/// Records each attempt in `engine_test_runs` (attempt, start, end), after
/// sleeping `sleep_millis`: duplicates and orderings are visible.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Names the runs.
    pub key: String,
    /// How long each attempt takes.
    pub sleep_millis: u64,
}

impl Job for Record {
    const NAME: &'static str = "engine_test_record";
    const MAX_ATTEMPTS: u32 = 3;
    type Context = PgPool;
    type Output = ();

    async fn run(self, job: JobContext<'_, PgPool>) -> Result<(), JobError> {
        let run: i64 = sqlx::query_scalar(
            "insert into engine_test_runs (key, attempt) values ($1, $2) returning id",
        )
        .bind(&self.key)
        .bind(i32::try_from(job.attempt())?)
        .fetch_one(job.context())
        .await?;
        tokio::time::sleep(Duration::from_millis(self.sleep_millis)).await;
        sqlx::query("update engine_test_runs set finished_at = clock_timestamp() where id = $1")
            .bind(run)
            .execute(job.context())
            .await?;
        Ok(())
    }
}

/// The table `Record` writes to (idempotent: the tests and each worker
/// process create it).
pub async fn create_runs_table(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(
        "create table if not exists engine_test_runs (
             id bigint generated always as identity primary key, key text not null,
             attempt int not null, started_at timestamptz not null default clock_timestamp(),
             finished_at timestamptz)",
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// [`Record`]'s run for a queue with limits: at most 4 at once across every
/// process (declared), keyed by `tenant` for key concurrency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limited {
    /// Its concurrency key.
    pub tenant: String,
    /// Names the run (`engine_test_runs.key` is `<tenant>/<n>`).
    pub n: u32,
    /// How long each attempt takes.
    pub sleep_millis: u64,
}

impl Job for Limited {
    const NAME: &'static str = "engine_test_limited";
    const MAX_ATTEMPTS: u32 = 3;
    type Context = PgPool;
    type Output = ();

    fn limits() -> durable_jobs::Limits {
        durable_jobs::Limits::none().concurrency(4)
    }

    fn concurrency_key(&self) -> Option<String> {
        Some(self.tenant.clone())
    }

    async fn run(self, job: JobContext<'_, PgPool>) -> Result<(), JobError> {
        Record {
            key: format!("{}/{}", self.tenant, self.n),
            sleep_millis: self.sleep_millis,
        }
        .run(job)
        .await
    }
}

/// Fails every attempt (each recorded as [`Record`] does) until its age
/// limit of 2 s ends it, long before its attempts run out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Aging {
    /// Names the runs.
    pub key: String,
}

impl Job for Aging {
    const NAME: &'static str = "engine_test_aging";
    const MAX_ATTEMPTS: u32 = 1000;
    const MAX_AGE: Option<Duration> = Some(Duration::from_secs(2));
    const BACKOFF: Backoff = Backoff::new(Duration::from_millis(300), Duration::from_millis(300));
    type Context = PgPool;
    type Output = ();

    async fn run(self, job: JobContext<'_, PgPool>) -> Result<(), JobError> {
        Record {
            key: self.key,
            sleep_millis: 0,
        }
        .run(job)
        .await?;
        Err(JobError::retry("the partner is still down"))
    }
}

/// Asks to run again `after_millis` later on its first attempt (a partner's
/// `Retry-After`), and succeeds on the next; each attempt recorded as
/// [`Record`] does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snoozing {
    /// Names the runs.
    pub key: String,
    /// The delay the first attempt asks for.
    pub after_millis: u64,
}

impl Job for Snoozing {
    const NAME: &'static str = "engine_test_snoozing";
    type Context = PgPool;
    type Output = ();

    async fn run(self, job: JobContext<'_, PgPool>) -> Result<(), JobError> {
        let first = job.attempt() == 1;
        Record {
            key: self.key,
            sleep_millis: 0,
        }
        .run(job)
        .await?;
        if first {
            return Err(JobError::retry_after(
                Duration::from_millis(self.after_millis),
                "the partner answered 429 with Retry-After",
            ));
        }
        Ok(())
    }
}

/// Every job type of the tests, as the tests' worker process registers them.
pub fn registry() -> durable_jobs::Registry<PgPool> {
    durable_jobs::Registry::new()
        .register::<Record>()
        .register::<Limited>()
        .register::<Aging>()
        .register::<Snoozing>()
        .register::<Steps>()
        .register::<InsertOnce>()
        .register::<Sleeper>()
        .register::<Approval>()
        .register::<Parent>()
        .register::<Doomed>()
}

/// Records a run of `engine_test_runs` under `key` (started and finished at once).
async fn mark(pool: &PgPool, key: String, attempt: u32) -> Result<(), sqlx::Error> {
    sqlx::query(
        "insert into engine_test_runs (key, attempt, finished_at) values ($1, $2, clock_timestamp())",
    )
    .bind(key)
    .bind(i32::try_from(attempt).unwrap_or(i32::MAX))
    .execute(pool)
    .await?;
    Ok(())
}

/// Three checkpointed steps, each recording a run `<key>/<step>`; with
/// `kill_after_two`, its first attempt SIGKILLs its own process after the
/// second step. Its output is the sum of the steps' results (1 + 2 + 3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Steps {
    /// Names the runs.
    pub key: String,
    /// Whether the first attempt kills its worker after step two.
    pub kill_after_two: bool,
}

impl Job for Steps {
    const NAME: &'static str = "engine_test_steps";
    type Context = PgPool;
    type Output = u32;

    async fn run(self, job: JobContext<'_, PgPool>) -> Result<u32, JobError> {
        let pool = job.context().clone();
        let mut sum = 0;
        for (n, name) in [(1, "one"), (2, "two"), (3, "three")] {
            let (pool, key, attempt) =
                (pool.clone(), format!("{}/{name}", self.key), job.attempt());
            sum += job
                .step(name, async move {
                    mark(&pool, key, attempt).await?;
                    Ok::<u32, sqlx::Error>(n)
                })
                .await?;
            if n == 2 && self.kill_after_two && job.attempt() == 1 {
                nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL)?;
            }
        }
        Ok(sum)
    }
}

/// Inserts a row into `engine_test_rows` and completes, in one step's
/// transaction (`finish_tx`): exactly once, however its workers die.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InsertOnce {
    /// The row's key.
    pub key: String,
}

impl Job for InsertOnce {
    const NAME: &'static str = "engine_test_insert_once";
    type Context = PgPool;
    type Output = i64;

    async fn run(self, job: JobContext<'_, PgPool>) -> Result<i64, JobError> {
        let key = self.key.clone();
        job.finish_tx("insert", |tx| {
            Box::pin(async move {
                sqlx::query_scalar::<_, i64>(
                    "insert into engine_test_rows (key) values ($1) returning id",
                )
                .bind(key)
                .fetch_one(&mut **tx)
                .await
            })
        })
        .await
    }
}

/// The table [`InsertOnce`] writes to (no unique key: duplicates show).
pub async fn create_rows_table(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(
        "create table if not exists engine_test_rows (
             id bigint generated always as identity primary key, key text not null)",
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// Sleeps durably for `millis`, then ends (its row says so: no write of
/// its own, so that 10,000 of them measure the engine).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sleeper {
    /// Names the job.
    pub key: String,
    /// How long it sleeps.
    pub millis: u64,
}

impl Job for Sleeper {
    const NAME: &'static str = "engine_test_sleeper";
    type Context = PgPool;
    type Output = ();

    async fn run(self, job: JobContext<'_, PgPool>) -> Result<(), JobError> {
        job.sleep("nap", Duration::from_millis(self.millis)).await?;
        Ok(())
    }
}

/// Records its signal URL (`<key>/url`), waits up to `timeout_millis` for
/// signal `approval` (a string), and records what came (`<key>/<value or
/// none>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    /// Names the runs.
    pub key: String,
    /// How long it waits.
    pub timeout_millis: u64,
    /// Waits with `wait_for_choice` (Approve: "approved", Reject: "rejected").
    #[serde(default)]
    pub choices: bool,
}

impl Job for Approval {
    const NAME: &'static str = "engine_test_approval";
    type Context = PgPool;
    type Output = Option<String>;

    async fn run(self, job: JobContext<'_, PgPool>) -> Result<Option<String>, JobError> {
        let url = job.signal_url("approval");
        let (pool, key) = (job.context().clone(), format!("{}/url {url}", self.key));
        let attempt = job.attempt();
        job.step("url", async move { mark(&pool, key, attempt).await })
            .await?;
        let timeout = Duration::from_millis(self.timeout_millis);
        let approval: Option<String> = if self.choices {
            let choices = [
                ("Approve", "approved".to_owned()),
                ("Reject", "rejected".to_owned()),
            ];
            job.wait_for_choice("approval", timeout, &choices).await?
        } else {
            job.wait_for("approval", timeout).await?
        };
        let seen = approval.clone().unwrap_or_else(|| "none".to_owned());
        mark(job.context(), format!("{}/{seen}", self.key), job.attempt()).await?;
        Ok(approval)
    }
}

/// Spawns a [`Steps`] child (or, with `failing_child`, a [`Doomed`] one that
/// dies) and returns its result; with `workflow`, a chain of three steps
/// `a` -> `b` -> `c` (`b` a [`Doomed`] with `failing_child`) returning `c`'s.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Parent {
    /// Names the child's runs.
    pub key: String,
    /// Whether the child fails for good.
    pub failing_child: bool,
    /// Whether the child is a workflow.
    #[serde(default)]
    pub workflow: bool,
}

impl Job for Parent {
    const NAME: &'static str = "engine_test_parent";
    type Context = PgPool;
    type Output = u32;

    async fn run(self, job: JobContext<'_, PgPool>) -> Result<u32, JobError> {
        mark(job.context(), format!("{}/parent", self.key), job.attempt()).await?;
        let steps = |name: &str| Steps {
            key: format!("{}/{name}", self.key),
            kill_after_two: false,
        };
        if self.workflow {
            let middle = if self.failing_child {
                Step::new("b", &Doomed)
            } else {
                Step::new("b", &steps("b"))
            };
            let chain = Workflow::new("child chain")
                .add("a", steps("a"))
                .step(middle.after(["a"]))
                .add_after("c", steps("c"), ["b"])
                .returning::<Steps>("c");
            let child = job.spawn("chain", &chain).await?;
            return job.await_result(child).await;
        }
        if self.failing_child {
            let child = job.spawn("child", &Doomed).await?;
            job.await_result(child).await?;
            return Ok(0);
        }
        let child = job.spawn("child", &steps("child")).await?;
        job.await_result(child).await
    }
}

/// Dies at once with "the partner refused it".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Doomed;

impl Job for Doomed {
    const NAME: &'static str = "engine_test_doomed";
    type Context = PgPool;
    type Output = ();

    async fn run(self, _job: JobContext<'_, PgPool>) -> Result<(), JobError> {
        Err(JobError::fatal("the partner refused it"))
    }
}
