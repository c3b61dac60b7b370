//! Helpers for an app's tests, in the spirit of Oban's `Oban.Testing` and
//! River's `rivertest`: see what a piece of code enqueued ([`enqueued`]),
//! and run a registry's jobs to the end in the test's own database
//! ([`drain`], [`Drain`]), with a deadline and an error that lists the jobs
//! still unfinished.
//!
//! They use the engine as an app does: [`crate::Worker::run`] with test settings
//! ([`config`]) and the `apalis.jobs` / `apalis.job_states` tables.
//!
//! ```no_run
//! use durable_jobs::{Job, JobContext, JobError, Registry, testing};
//! use serde::{Deserialize, Serialize};
//! use sqlx::PgPool;
//!
//! #[derive(Debug, PartialEq, Serialize, Deserialize)]
//! struct SendWelcome {
//!     user_id: i64,
//! }
//!
//! impl Job for SendWelcome {
//!     const NAME: &'static str = "send_welcome";
//!     type Context = PgPool;
//!     type Output = ();
//!
//!     async fn run(self, _: JobContext<'_, PgPool>) -> Result<(), JobError> {
//!         Ok(())
//!     }
//! }
//!
//! # async fn sign_up(tx: &mut sqlx::PgConnection, user_id: i64) -> Result<(), durable_jobs::Error> {
//! #     durable_jobs::enqueue(tx, &SendWelcome { user_id }).await?;
//! #     Ok(())
//! # }
//! # async fn test(pool: PgPool) -> Result<(), durable_jobs::Error> {
//! let mut tx = pool.begin().await?;
//! sign_up(&mut tx, 7).await?;
//! // Seen inside the transaction, before it commits.
//! assert_eq!(testing::enqueued::<SendWelcome>(&mut *tx).await?, [SendWelcome { user_id: 7 }]);
//! tx.commit().await?;
//!
//! let registry = Registry::new().register::<SendWelcome>();
//! let drained = testing::drain(&pool, registry, pool.clone()).await?;
//! assert!(drained.all_done(), "{drained:?}");
//! assert_eq!(drained.of(SendWelcome::NAME).len(), 1);
//! # Ok(())
//! # }
//! ```

use std::time::Duration;

use serde_json::Value;
use sqlx::{PgExecutor, PgPool};
use tokio_util::sync::CancellationToken;

use crate::{
    error::Error,
    job::Job,
    runtime::{Worker, config::WorkerConfig, registry::Registry},
    schedule::Schedule,
};

/// How long [`drain`] waits by default before giving up.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(30);

/// The payloads of the jobs of type `J` that wait to run (pending, or
/// scheduled: delayed or waiting for a retry), oldest first. `conn` may be a
/// transaction that has not committed (`&mut *tx`), which sees its own
/// enqueues, or a pool.
pub async fn enqueued<'c, J: Job>(conn: impl PgExecutor<'c>) -> Result<Vec<J>, Error> {
    let rows: Vec<(String, Vec<u8>)> = sqlx::query_as(
        "select id, job from apalis.job_states
         where job_type = $1 and state in ('pending', 'scheduled')
         order by id",
    )
    .bind(J::NAME)
    .fetch_all(conn)
    .await?;
    rows.into_iter()
        .map(|(id, payload)| {
            serde_json::from_slice(&payload).map_err(|err| Error::Decode {
                id,
                queue: J::NAME,
                reason: err.to_string(),
            })
        })
        .collect()
}

/// Runs `registry`'s jobs with [`config`] until none of its queues has a
/// job waiting, claimed or running (retries included), for at most
/// [`DEFAULT_DEADLINE`]; returns the jobs that ended meanwhile. See [`Drain`]
/// for a deadline, other settings, or a wait for one job.
pub async fn drain<C: Clone + Send + Sync + 'static>(
    pool: &PgPool,
    registry: Registry<C>,
    context: C,
) -> Result<Drained, Error> {
    Drain::new(registry, context).run(pool).await
}

/// Worker settings for tests: polls every 20 ms, retries at once (no
/// backoff), a short shutdown grace, and the periodic prune on a schedule
/// no test lives to see (it would add `prune_jobs` jobs to the queue).
pub fn config() -> WorkerConfig {
    WorkerConfig {
        concurrency: 4,
        poll_interval: Duration::from_millis(20),
        shutdown_grace: Duration::from_secs(1),
        backoff_base: Some(Duration::ZERO),
        backoff_max: Some(Duration::ZERO),
        // Midnight, January 1st.
        prune_schedule: Schedule::cron("0 0 0 1 1 *").expect("a valid cron expression"),
        ..WorkerConfig::default()
    }
}

/// A drain with options: `Drain::new(registry, context).deadline(..).run(&pool)`.
#[derive(Debug)]
pub struct Drain<C> {
    registry: Registry<C>,
    context: C,
    config: WorkerConfig,
    deadline: Duration,
    until: Option<String>,
}

impl<C: Clone + Send + Sync + 'static> Drain<C> {
    /// A drain of `registry`'s queues with [`config`] and [`DEFAULT_DEADLINE`].
    pub fn new(registry: Registry<C>, context: C) -> Self {
        Self {
            registry,
            context,
            config: config(),
            deadline: DEFAULT_DEADLINE,
            until: None,
        }
    }

    /// Gives up (with [`Error::Unfinished`]) after `deadline`.
    #[must_use]
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// Runs the worker with `config` instead of [`config`].
    #[must_use]
    pub fn config(mut self, config: WorkerConfig) -> Self {
        self.config = config;
        self
    }

    /// Stops as soon as job `id` has ended (done or dead), whatever else is
    /// still open.
    #[must_use]
    pub fn until(mut self, id: impl ToString) -> Self {
        self.until = Some(id.to_string());
        self
    }

    /// Runs the worker in this process on `pool` until the drain's end, then
    /// stops it and reports what ended meanwhile.
    pub async fn run(self, pool: &PgPool) -> Result<Drained, Error> {
        let Self {
            registry,
            context,
            config,
            deadline,
            until,
        } = self;
        let until = until.as_deref();
        let queues: Vec<String> = registry.queues().into_iter().map(str::to_owned).collect();
        let started: chrono::DateTime<chrono::Utc> =
            sqlx::query_scalar("select now()").fetch_one(pool).await?;
        let shutdown = CancellationToken::new();
        let mut worker = tokio::spawn(
            Worker::new(pool.clone(), registry, context)
                .config(config)
                .run(shutdown.clone()),
        );
        let give_up = tokio::time::Instant::now() + deadline;
        let waited = loop {
            match ended(pool, &queues, until).await {
                Ok(true) => break Ok(()),
                Ok(false) => {}
                Err(err) => break Err(err),
            }
            if tokio::time::Instant::now() >= give_up {
                break Err(Error::Unfinished {
                    after: deadline,
                    jobs: unfinished(pool, &queues, until).await?,
                });
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(20)) => {}
                // The worker gave up by itself (a bad config, say): its error says why.
                stopped = &mut worker => {
                    return Err(match stopped {
                        Ok(Err(err)) => err,
                        Ok(Ok(())) | Err(_) => Error::WorkerDied { restarts: 0 },
                    });
                }
            }
        };
        shutdown.cancel();
        let stopped = worker.await;
        waited?;
        match stopped {
            Ok(result) => result?,
            Err(_) => return Err(Error::WorkerDied { restarts: 0 }),
        }
        let jobs = sqlx::query_as(
            "select id, job_type as queue, state, attempts,
                    last_result -> 'Ok' as result,
                    regexp_replace(last_result ->> 'Err', '^AbortError: ', '') as error
             from apalis.job_states
             where job_type = any($1) and state in ('done', 'dead') and done_at >= $2
             order by done_at, id",
        )
        .bind(&queues)
        .bind(started)
        .fetch_all(pool)
        .await?;
        Ok(Drained { jobs })
    }
}

/// Whether the drain is over: job `until` has ended, or else no job of
/// `queues` is open.
async fn ended(pool: &PgPool, queues: &[String], until: Option<&str>) -> Result<bool, Error> {
    Ok(match until {
        Some(id) => {
            sqlx::query_scalar::<_, bool>(
                "select exists (select 1 from apalis.job_states
                                where id = $1 and state in ('done', 'dead'))",
            )
            .bind(id)
            .fetch_one(pool)
            .await?
        }
        None => {
            !sqlx::query_scalar::<_, bool>(
                "select exists (select 1 from apalis.job_states
                                where job_type = any($1) and state not in ('done', 'dead'))",
            )
            .bind(queues)
            .fetch_one(pool)
            .await?
        }
    })
}

/// `id queue state (attempts n): last error` of every job the drain waits for.
async fn unfinished(
    pool: &PgPool,
    queues: &[String],
    until: Option<&str>,
) -> Result<Vec<String>, Error> {
    let rows: Vec<(String, String, String, i32, Option<String>)> = sqlx::query_as(
        "select id, job_type, state, attempts, last_result ->> 'Err' from apalis.job_states
             where (job_type = any($1) or id = $2) and state not in ('done', 'dead')
             order by id",
    )
    .bind(queues)
    .bind(until)
    .fetch_all(pool)
    .await?;
    let mut jobs: Vec<String> = rows
        .into_iter()
        .map(|(id, queue, state, attempts, error)| {
            let error = error.map(|e| format!(": {e}")).unwrap_or_default();
            format!("{id} {queue} {state} (attempts {attempts}){error}")
        })
        .collect();
    if let Some(id) = until
        && !jobs.iter().any(|job| job.starts_with(id))
    {
        jobs.push(format!("{id} (no such job)"));
    }
    Ok(jobs)
}

/// What a drain ran: the jobs of the registry's queues that ended while it
/// ran, in the order they ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Drained {
    /// Every job that ended.
    pub jobs: Vec<Ran>,
}

impl Drained {
    /// Whether every job that ended is done (none died).
    pub fn all_done(&self) -> bool {
        self.jobs.iter().all(|job| job.state == "done")
    }

    /// The jobs that ended dead.
    pub fn dead(&self) -> Vec<&Ran> {
        self.jobs.iter().filter(|job| job.state == "dead").collect()
    }

    /// The jobs of queue `queue` (a job type's `NAME`).
    pub fn of(&self, queue: &str) -> Vec<&Ran> {
        self.jobs.iter().filter(|job| job.queue == queue).collect()
    }

    /// Job `id`, if it ended during the drain.
    pub fn job(&self, id: impl ToString) -> Option<&Ran> {
        let id = id.to_string();
        self.jobs.iter().find(|job| job.id == id)
    }
}

/// One job that ended during a drain.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Ran {
    /// Job id (ULID).
    pub id: String,
    /// Its queue (job type name).
    pub queue: String,
    /// `done` or `dead`.
    pub state: String,
    /// Attempts used.
    pub attempts: i32,
    /// The job's output as JSON, when done.
    pub result: Option<Value>,
    /// The last attempt's error, when dead (without apalis's `AbortError: `).
    pub error: Option<String>,
}
