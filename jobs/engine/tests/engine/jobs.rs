//! Job types shared by the tests and their worker process
//! (`examples/test_worker.rs`, which includes this file).

use std::time::Duration;

use durable_jobs::{Backoff, Job, JobContext, JobError};
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
