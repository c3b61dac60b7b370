//! Workflows (`durable_jobs::Workflow`): fan-out, fan-in exactly once,
//! results, failure policies, cancel, dynamic steps, retention, and with
//! worker processes (`test_worker`) a fan-in after a SIGKILL.

use std::{sync::Arc, time::Duration};

use crate::{
    jobs::{Record, create_runs_table},
    support::{POOL_SIZE, Process, TestDb, fast_config, fast_env},
};
use anyhow::Context as _;
use durable_jobs::{Job, JobContext, JobError, Registry, Step, Workflow, admin, testing};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Records its run, then returns `n * 10`, or dies when `fail`.
#[derive(Debug, Serialize, Deserialize)]
struct Part {
    n: u32,
    fail: bool,
}

impl Job for Part {
    const NAME: &'static str = "workflow_test_part";
    const MAX_ATTEMPTS: u32 = 3;
    type Context = PgPool;
    type Output = u32;

    async fn run(self, job: JobContext<'_, PgPool>) -> Result<u32, JobError> {
        record(&job, i64::from(self.n)).await?;
        if self.fail {
            return Err(JobError::fatal(format!("part {} fails as asked", self.n)));
        }
        Ok(self.n * 10)
    }
}

/// A fan-in: records the sum of its `Part` dependencies' results.
#[derive(Debug, Serialize, Deserialize)]
struct Collect;

impl Job for Collect {
    const NAME: &'static str = "workflow_test_collect";
    type Context = PgPool;
    type Output = u32;

    async fn run(self, job: JobContext<'_, PgPool>) -> Result<u32, JobError> {
        let results = job.dependency_results::<Part>().await?;
        let sum: u32 = results.iter().map(|(_, n)| n).sum();
        record(&job, i64::from(sum)).await?;
        Ok(sum)
    }
}

/// Plans `parts` parts after itself and a `Collect` after them all, while it
/// runs (adding them twice: the second time adds nothing).
#[derive(Debug, Serialize, Deserialize)]
struct Plan {
    parts: u32,
}

impl Job for Plan {
    const NAME: &'static str = "workflow_test_plan";
    type Context = PgPool;
    type Output = ();

    async fn run(self, job: JobContext<'_, PgPool>) -> Result<(), JobError> {
        let names: Vec<String> = (1..=self.parts).map(|n| format!("part-{n}")).collect();
        let steps = || {
            let parts = (1..=self.parts)
                .map(|n| Step::new(format!("part-{n}"), &Part { n, fail: false }).after(["plan"]));
            parts.chain([Step::new("collect", &Collect).after(names.clone())])
        };
        let added = job.add_steps(steps()).await?;
        let again = job.add_steps(steps()).await?;
        record(&job, i64::try_from(added * 1000 + again)?).await?;
        Ok(())
    }
}

/// Runs until its workflow is cancelled, then fails (which must not retry).
#[derive(Debug, Serialize, Deserialize)]
struct AwaitCancel;

impl Job for AwaitCancel {
    const NAME: &'static str = "workflow_test_await_cancel";
    type Context = PgPool;
    type Output = ();
    const TIMEOUT: Duration = Duration::from_secs(30);

    async fn run(self, job: JobContext<'_, PgPool>) -> Result<(), JobError> {
        record(&job, 0).await?;
        tokio::time::timeout(Duration::from_secs(20), job.cancelled())
            .await
            .map_err(|_| JobError::fatal("never cancelled"))?;
        Err(JobError::retry("stopped: the workflow was cancelled"))
    }
}

async fn record(job: &JobContext<'_, PgPool>, value: i64) -> Result<(), JobError> {
    let step = job.workflow().map(|step| step.step.clone());
    sqlx::query(
        "insert into workflow_test_runs (step, job_id, attempt, value) values ($1, $2, $3, $4)",
    )
    .bind(step)
    .bind(job.id())
    .bind(i32::try_from(job.attempt())?)
    .bind(value)
    .execute(job.context())
    .await?;
    Ok(())
}

fn registry() -> Registry<PgPool> {
    Registry::new()
        .register::<Part>()
        .register::<Collect>()
        .register::<Plan>()
        .register::<AwaitCancel>()
}

async fn test_db() -> anyhow::Result<TestDb> {
    let db = TestDb::new().await?;
    create_table(&db).await?;
    Ok(db)
}

async fn create_table(db: &TestDb) -> anyhow::Result<()> {
    sqlx::raw_sql(
        "create table workflow_test_runs (
             n bigint generated always as identity, step text, job_id text,
             attempt int, value bigint, at timestamptz default clock_timestamp())",
    )
    .execute(&db.pool)
    .await?;
    Ok(())
}

/// Runs a worker for the test registry on `db` until the token is cancelled.
fn start(
    db: &TestDb,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<Result<(), durable_jobs::Error>>,
) {
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(
        durable_jobs::Worker::new(db.pool.clone(), registry(), db.pool.clone())
            .config(fast_config())
            .run(shutdown.clone()),
    );
    (shutdown, worker)
}

async fn enqueue(db: &TestDb, workflow: Workflow) -> anyhow::Result<String> {
    let mut tx = db.pool.begin().await?;
    let id = workflow.enqueue(&mut tx).await?;
    tx.commit().await?;
    Ok(id.to_string())
}

/// Waits until workflow `id` has no open step; returns it (at once after a drain).
async fn wait_for_end(db: &TestDb, id: &str) -> anyhow::Result<admin::WorkflowView> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let workflow = admin::workflow(&db.pool, id)
            .await?
            .context("the workflow exists")?;
        if !matches!(workflow.state(), "running" | "cancelling") {
            return Ok(workflow);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "workflow still open: {workflow:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn runs_of(db: &TestDb, step: &str) -> anyhow::Result<Vec<(i32, i64)>> {
    Ok(
        sqlx::query_as("select attempt, value from workflow_test_runs where step = $1 order by n")
            .bind(step)
            .fetch_all(&db.pool)
            .await?,
    )
}

fn step<'a>(workflow: &'a admin::WorkflowView, name: &str) -> anyhow::Result<&'a admin::StepView> {
    workflow
        .steps
        .iter()
        .find(|s| s.name == name)
        .with_context(|| format!("no step {name}"))
}

fn state_of<'a>(workflow: &'a admin::WorkflowView, step: &str) -> &'a str {
    workflow
        .steps
        .iter()
        .find(|s| s.name == step)
        .map_or("missing", |s| s.state.as_str())
}

/// How the parts of a fan-in end in [`fan_in_released_exactly_once`].
#[derive(Debug, Clone, Copy)]
enum Ender {
    /// One `UPDATE` per part: the row trigger ends each step on its own (a
    /// recovery's or an operator's write does this).
    RowByRow,
    /// A worker's settle (`RECORD_EVENTS`) of all its parts at once:
    /// `apalis.end_workflow_steps` ends them together.
    WorkerSettle,
}

#[tokio::test]
async fn fifty_dependencies_completing_at_once_release_their_fan_in_exactly_once_200_times()
-> anyhow::Result<()> {
    fan_in_released_exactly_once(Ender::RowByRow).await
}

#[tokio::test]
async fn fifty_dependencies_settled_at_once_by_ten_workers_release_their_fan_in_exactly_once_200_times()
-> anyhow::Result<()> {
    fan_in_released_exactly_once(Ender::WorkerSettle).await
}

/// 200 times: a fan-in of 50 parts whose parts end in ten transactions
/// committing at the same instant is released exactly once.
async fn fan_in_released_exactly_once(ender: Ender) -> anyhow::Result<()> {
    const WIDTH: usize = 50;
    const ROUNDS: usize = 200;
    // Transactions open at once, each ending WIDTH / ENDERS parts: ten
    // connections, not fifty, on a Postgres shared by parallel tests.
    const ENDERS: usize = 10;
    // Its pool of ENDERS, and ours.
    let db = TestDb::reserving(ENDERS as u32 + POOL_SIZE, POOL_SIZE).await?;
    create_table(&db).await?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(ENDERS as u32)
        .connect(&db.url)
        .await?;
    for round in 0..ROUNDS {
        let mut workflow = Workflow::new("fan-in");
        for n in 0..WIDTH {
            workflow = workflow.add(format!("part-{n}"), Part { n: 0, fail: false });
        }
        let parts: Vec<String> = (0..WIDTH).map(|n| format!("part-{n}")).collect();
        let id = enqueue(&db, workflow.add_after("collect", Collect, parts)).await?;
        let jobs: Vec<String> =
            sqlx::query_scalar("select id from apalis.jobs where workflow_id = $1 order by id")
                .bind(&id)
                .fetch_all(&db.pool)
                .await?;
        assert_eq!(jobs.len(), WIDTH, "only the parts are released at first");
        // The parts end in ENDERS transactions, all at the same instant: each
        // is open when the barrier lets them send their updates (one per
        // part) and commit.
        let barrier = Arc::new(tokio::sync::Barrier::new(ENDERS));
        let ends: Vec<_> = jobs
            .chunks(WIDTH / ENDERS)
            .map(|chunk| {
                let (pool, barrier, chunk) = (pool.clone(), barrier.clone(), chunk.to_vec());
                tokio::spawn(async move {
                    // Each chunk is held by a worker of its own, as a claim
                    // leaves it, so that its settle may end it.
                    let worker = format!("ender-{}", chunk[0]);
                    if let Ender::WorkerSettle = ender {
                        sqlx::query(
                            "update apalis.jobs set status = 'Running', lock_by = $2, lock_at = now()
                             where id = any($1)",
                        )
                        .bind(&chunk)
                        .bind(&worker)
                        .execute(&pool)
                        .await?;
                    }
                    let mut tx = pool.begin().await?;
                    // A missing connection fails the test instead of hanging it.
                    tokio::time::timeout(Duration::from_secs(30), barrier.wait())
                        .await
                        .context("not every transaction began")?;
                    match ender {
                        Ender::RowByRow => {
                            for job in &chunk {
                                sqlx::query(
                                    r#"update apalis.jobs set status = 'Done', done_at = now(),
                                           last_result = '{"Ok": 0}' where id = $1"#,
                                )
                                .bind(job)
                                .execute(&mut *tx)
                                .await?;
                            }
                        }
                        Ender::WorkerSettle => {
                            let (finished, _started): (i64, i64) =
                                sqlx::query_as(durable_jobs::internals::RECORD_EVENTS)
                                    .bind(&chunk)
                                    .bind(vec![1_i32; chunk.len()])
                                    .bind(vec!["Done"; chunk.len()])
                                    .bind(vec![serde_json::json!({"Ok": 0}); chunk.len()])
                                    .bind(Vec::<String>::new())
                                    .bind(&worker)
                                    .bind(1.0_f64)
                                    .bind(60.0_f64)
                                    .bind(vec![None::<f64>; chunk.len()])
                                    .bind(5_i32)
                                    .bind(vec![None::<String>; chunk.len()])
                                    .bind(vec![None::<String>; chunk.len()])
                                    .fetch_one(&mut *tx)
                                    .await?;
                            anyhow::ensure!(finished == chunk.len() as i64, "settled {finished}");
                        }
                    }
                    tx.commit().await?;
                    anyhow::Ok(())
                })
            })
            .collect();
        for end in ends {
            end.await??;
        }
        let (released, state, waiting_for): (i64, String, i32) = sqlx::query_as(
            "select (select count(*) from apalis.jobs j where j.id = s.job_id), s.state, s.waiting_for
             from apalis.workflow_steps s where s.workflow_id = $1 and s.name = 'collect'",
        )
        .bind(&id)
        .fetch_one(&db.pool)
        .await?;
        assert_eq!(
            (released, state.as_str(), waiting_for),
            (1, "released", 0),
            "round {round}: the fan-in is released once"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_fan_in_runs_once_after_all_its_dependencies_and_reads_their_results()
-> anyhow::Result<()> {
    let db = test_db().await?;
    let mut workflow = Workflow::new("sum");
    for n in 1..=10 {
        workflow = workflow.add(format!("part-{n}"), Part { n, fail: false });
    }
    // A chain into the fan-in, too: part-10 -> twice -> collect.
    let workflow = workflow.add_after(
        "twice",
        Part {
            n: 1000,
            fail: false,
        },
        ["part-10"],
    );
    let deps: Vec<String> = (1..=9)
        .map(|n| format!("part-{n}"))
        .chain(["twice".to_owned()])
        .collect();
    let id = enqueue(&db, workflow.add_after("collect", Collect, deps)).await?;
    let drained = testing::drain(&db.pool, registry(), db.pool.clone()).await?;
    assert!(!drained.jobs.is_empty(), "{drained:?}");
    let ended = wait_for_end(&db, &id).await?;
    assert_eq!(ended.state(), "done", "{ended:#?}");
    // 10 + 20 + ... + 90 from part-1..9, and 10,000 from `twice`.
    assert_eq!(runs_of(&db, "collect").await?, [(1, 450 + 10_000)]);
    let collect = step(&ended, "collect")?;
    assert_eq!(collect.result, Some(serde_json::json!(10_450)));
    let started_after: bool = sqlx::query_scalar(
        "select (select min(at) from workflow_test_runs where step = 'collect')
              > (select max(at) from workflow_test_runs where step <> 'collect')",
    )
    .fetch_one(&db.pool)
    .await?;
    assert!(
        started_after,
        "the fan-in started after every dependency ran"
    );
    Ok(())
}

#[tokio::test]
async fn a_dead_dependency_cancels_its_dependents_unless_they_run_anyway() -> anyhow::Result<()> {
    let db = test_db().await?;
    let workflow = Workflow::new("failing")
        .add("ok", Part { n: 1, fail: false })
        .add("broken", Part { n: 2, fail: true })
        .add_after("collect", Collect, ["ok", "broken"])
        .add_after("after-collect", Part { n: 3, fail: false }, ["collect"])
        .step(
            Step::new("report", &Collect)
                .after(["ok", "broken"])
                .run_anyway(),
        );
    let id = enqueue(&db, workflow).await?;
    let drained = testing::drain(&db.pool, registry(), db.pool.clone()).await?;
    assert!(!drained.jobs.is_empty(), "{drained:?}");
    let ended = wait_for_end(&db, &id).await?;
    assert_eq!(ended.state(), "failed");
    assert_eq!(state_of(&ended, "broken"), "dead");
    assert_eq!(state_of(&ended, "collect"), "cancelled");
    assert_eq!(
        state_of(&ended, "after-collect"),
        "cancelled",
        "cancelled down the graph"
    );
    assert_eq!(state_of(&ended, "report"), "done");
    assert!(runs_of(&db, "collect").await?.is_empty());
    assert_eq!(
        runs_of(&db, "report").await?,
        [(1, 10)],
        "a run-anyway step sees the results of the dependencies that are done"
    );
    let broken_attempts = step(&ended, "broken")?;
    assert_eq!(broken_attempts.attempts, 1, "a fatal error is not retried");
    Ok(())
}

#[tokio::test]
async fn cancelling_a_workflow_stops_its_running_step_without_retry_and_cancels_the_rest()
-> anyhow::Result<()> {
    let db = test_db().await?;
    let (shutdown, worker) = start(&db);
    let workflow = Workflow::new("to-cancel")
        .add("waits", AwaitCancel)
        .add("blocked", AwaitCancel)
        .add_after("after", Part { n: 1, fail: false }, ["waits"]);
    let id = enqueue(&db, workflow).await?;
    // Both AwaitCancel steps run (concurrency 4); then cancel.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while runs_of(&db, "waits").await?.is_empty() || runs_of(&db, "blocked").await?.is_empty() {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "steps never started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cancelled = admin::cancel_workflow(&db.pool, &id).await?;
    assert_eq!(cancelled.running, 2);
    assert_eq!(cancelled.cancelled, 1, "the waiting step");
    let ended = wait_for_end(&db, &id).await?;
    assert_eq!(ended.state(), "cancelled", "{ended:#?}");
    for step in ["waits", "blocked", "after"] {
        assert_eq!(state_of(&ended, step), "cancelled", "{step}: {ended:#?}");
    }
    assert_eq!(
        runs_of(&db, "waits").await?.len(),
        1,
        "the stopped step is not retried"
    );
    let waits = step(&ended, "waits")?;
    assert!(
        waits
            .error
            .as_deref()
            .is_some_and(|e| e.starts_with("cancelled with its workflow")),
        "{waits:?}"
    );
    shutdown.cancel();
    worker.await??;
    Ok(())
}

#[tokio::test]
async fn a_running_step_fans_out_and_the_new_fan_in_reads_the_results() -> anyhow::Result<()> {
    let db = test_db().await?;
    let id = enqueue(&db, Workflow::new("dynamic").add("plan", Plan { parts: 7 })).await?;
    let drained = testing::drain(&db.pool, registry(), db.pool.clone()).await?;
    assert!(!drained.jobs.is_empty(), "{drained:?}");
    let ended = wait_for_end(&db, &id).await?;
    assert_eq!(ended.state(), "done", "{ended:#?}");
    assert_eq!(ended.steps.len(), 1 + 7 + 1);
    assert_eq!(
        runs_of(&db, "plan").await?,
        [(1, 8 * 1000)],
        "8 steps added, and none the second time"
    );
    assert_eq!(runs_of(&db, "collect").await?, [(1, 280)]);
    Ok(())
}

#[tokio::test]
async fn steps_added_to_a_workflow_must_depend_on_steps_it_has() -> anyhow::Result<()> {
    let db = test_db().await?;
    let mut tx = db.pool.begin().await?;
    let invalid = Workflow::new("bad")
        .add_after("b", Part { n: 1, fail: false }, ["a"])
        .enqueue(&mut tx)
        .await;
    assert!(
        matches!(invalid, Err(durable_jobs::Error::InvalidWorkflow(_))),
        "{invalid:?}"
    );
    // An idempotency key: the second enqueue returns the first workflow.
    let first = Workflow::new("keyed")
        .key("k-1")
        .add("a", Part { n: 1, fail: false })
        .enqueue(&mut tx)
        .await?;
    let second = Workflow::new("keyed")
        .key("k-1")
        .add("a", Part { n: 1, fail: false })
        .add("b", Part { n: 2, fail: false })
        .enqueue(&mut tx)
        .await?;
    assert_eq!(first, second);
    let steps: i64 =
        sqlx::query_scalar("select count(*) from apalis.workflow_steps where workflow_id = $1")
            .bind(first.to_string())
            .fetch_one(&mut *tx)
            .await?;
    assert_eq!(steps, 1);
    Ok(())
}

#[tokio::test]
async fn retention_prunes_a_finished_workflow_whole_and_an_open_one_not_at_all()
-> anyhow::Result<()> {
    let db = test_db().await?;
    let finished = enqueue(
        &db,
        Workflow::new("finished")
            .add("a", Part { n: 1, fail: false })
            .add_after("b", Part { n: 2, fail: false }, ["a"]),
    )
    .await?;
    let open = enqueue(
        &db,
        Workflow::new("open")
            .add("a", Part { n: 1, fail: false })
            .add_after("b", Part { n: 2, fail: false }, ["a"]),
    )
    .await?;
    // Both workflows' `a` ended long ago; only `finished` has ended `b` too.
    for workflow in [&finished, &open] {
        sqlx::query(
            r#"update apalis.jobs set status = 'Done', last_result = '{"Ok": 10}' where workflow_id = $1"#,
        )
        .bind(workflow)
        .execute(&db.pool)
        .await?;
    }
    sqlx::query(
        r#"update apalis.jobs set status = 'Done', last_result = '{"Ok": 20}' where workflow_id = $1 and status <> 'Done'"#,
    )
    .bind(&finished)
    .execute(&db.pool)
    .await?;
    sqlx::raw_sql(
        "update apalis.jobs set done_at = now() - interval '2 days';
         update apalis.workflow_steps set finished_at = now() - interval '2 days' where finished_at is not null",
    )
    .execute(&db.pool)
    .await?;
    let retention = admin::Retention {
        done: Duration::from_secs(86_400),
        dead: Duration::from_secs(7 * 86_400),
    };
    let pruned = admin::prune(&db.pool, retention).await?;
    assert_eq!(pruned.workflows, 1);
    assert_eq!(
        pruned.done, 0,
        "a workflow's jobs go with their workflow only"
    );
    assert!(admin::workflow(&db.pool, &finished).await?.is_none());
    let left: Vec<(Option<String>, String)> =
        sqlx::query_as("select workflow_id, status from apalis.jobs order by id")
            .fetch_all(&db.pool)
            .await?;
    assert!(
        left.iter()
            .all(|(w, _)| w.as_deref() == Some(open.as_str())),
        "{left:?}"
    );
    let open_view = admin::workflow(&db.pool, &open).await?.context("kept")?;
    assert_eq!(
        open_view.steps.len(),
        2,
        "the open workflow keeps every step"
    );
    Ok(())
}

/// `Record` runs under `key`, as `(attempt, finished)`.
async fn record_runs(db: &TestDb, key: &str) -> anyhow::Result<Vec<(i32, bool)>> {
    Ok(sqlx::query_as(
        "select attempt, finished_at is not null from engine_test_runs where key = $1 order by id",
    )
    .bind(key)
    .fetch_all(&db.pool)
    .await?)
}

#[tokio::test]
async fn a_worker_killed_while_completing_the_last_dependency_leaves_the_fan_in_to_run_once()
-> anyhow::Result<()> {
    // Ours, and one worker process at a time (its pool of 7, bookkeeping 5).
    let db = TestDb::reserving(POOL_SIZE + 14, POOL_SIZE).await?;
    create_runs_table(&db.pool).await?;
    let env = fast_env();
    let mut first = Process::started_worker(&db, &env).await?;
    let record = |key: &str, sleep_millis| Record {
        key: key.to_owned(),
        sleep_millis,
    };
    let id = {
        let mut tx = db.pool.begin().await?;
        let id = Workflow::new("kill-during-fan-in")
            .add("early", record("early", 0))
            .add("last", record("last", 1500))
            .add_after("fan-in", record("fan-in", 0), ["early", "last"])
            .enqueue(&mut tx)
            .await?;
        tx.commit().await?;
        id.to_string()
    };
    // Hold the fan-in's row, so that recording `last`'s end (which releases
    // the fan-in, in the same transaction) blocks half-way.
    let mut holder = db.pool.begin().await?;
    sqlx::query(
        "select 1 from apalis.workflow_steps where workflow_id = $1 and name = 'fan-in' for update",
    )
    .bind(&id)
    .execute(&mut *holder)
    .await?;
    let our_backend: i32 = sqlx::query_scalar("select pg_backend_pid()")
        .fetch_one(&mut *holder)
        .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let blocked: i64 = sqlx::query_scalar(
            "select count(*) from pg_stat_activity
             where datname = current_database() and wait_event_type = 'Lock' and pid <> $1",
        )
        .bind(our_backend)
        .fetch_one(&db.pool)
        .await?;
        if blocked > 0 && record_runs(&db, "last").await? == [(1, true)] {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the last dependency's end never blocked on the fan-in"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The crash: the process dies, and with it its half-done transaction.
    first.signal(nix::sys::signal::Signal::SIGKILL)?;
    sqlx::query(
        "select pg_terminate_backend(pid) from pg_stat_activity
         where datname = current_database() and wait_event_type = 'Lock' and pid <> $1",
    )
    .bind(our_backend)
    .execute(&db.pool)
    .await?;
    first.wait(Duration::from_secs(10)).await?;
    holder.commit().await?;
    let fan_in_state: String = sqlx::query_scalar(
        "select state from apalis.workflow_steps where workflow_id = $1 and name = 'fan-in'",
    )
    .bind(&id)
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(
        fan_in_state, "waiting",
        "the end of `last` was lost with its worker"
    );

    let second = Process::started_worker(&db, &env).await?;
    let ended = wait_for_end(&db, &id).await?;
    assert_eq!(ended.state(), "done", "{ended:#?}");
    assert_eq!(
        record_runs(&db, "last").await?.len(),
        2,
        "the lost dependency ran again (at least once)"
    );
    assert_eq!(
        record_runs(&db, "fan-in").await?,
        [(1, true)],
        "the fan-in ran exactly once"
    );
    let after_last: bool = sqlx::query_scalar(
        "select (select started_at from engine_test_runs where key = 'fan-in')
              > (select max(finished_at) from engine_test_runs where key = 'last')",
    )
    .fetch_one(&db.pool)
    .await?;
    assert!(after_last, "the fan-in started only once `last` was done");
    let status = second.terminate(Duration::from_secs(30)).await?;
    assert!(status.success(), "{status}");
    Ok(())
}
