//! Durable execution: checkpointed steps, exactly-once database steps,
//! durable sleep, signals and awaited children, none holding a slot.

use std::time::Duration;

use durable_jobs::{Job as _, Signalled, WorkerConfig};
use sqlx::PgPool;

use crate::{
    flow::{db_now, start_with, stop},
    jobs::{Approval, InsertOnce, Parent, Sleeper, Steps, create_rows_table, create_runs_table},
    support::{
        POOL_SIZE, Process, TestDb, enqueue, fast_config, fast_env, process_connections, wait_until,
    },
};

/// The keys of the runs recorded, in order.
async fn run_keys(pool: &PgPool) -> anyhow::Result<Vec<String>> {
    Ok(
        sqlx::query_scalar("select key from engine_test_runs order by id")
            .fetch_all(pool)
            .await?,
    )
}

async fn state_of(pool: &PgPool, id: &str) -> anyhow::Result<String> {
    Ok(
        sqlx::query_scalar("select state from apalis.job_states where id = $1")
            .bind(id)
            .fetch_one(pool)
            .await?,
    )
}

async fn send(pool: &PgPool, id: &str, value: &str) -> anyhow::Result<Signalled> {
    let mut tx = pool.begin().await?;
    let sent = durable_jobs::signal(&mut tx, id, "approval", &value).await?;
    tx.commit().await?;
    Ok(sent)
}

#[tokio::test]
async fn a_job_killed_after_two_of_three_steps_runs_only_the_third_again() -> anyhow::Result<()> {
    let db = TestDb::reserving(POOL_SIZE + 2 * process_connections(), POOL_SIZE).await?;
    create_runs_table(&db.pool).await?;
    let env = fast_env();
    let mut doomed = Process::started_worker(&db, &env).await?;
    let id = enqueue(
        &db.pool,
        &Steps {
            key: "k".to_owned(),
            kill_after_two: true,
        },
    )
    .await?;
    let status = doomed.wait(Duration::from_secs(30)).await?;
    assert!(!status.success(), "the job killed its worker: {status}");
    let survivor = Process::started_worker(&db, &env).await?;
    db.wait_for_status(&id, "Done", Duration::from_secs(30))
        .await?;
    assert_eq!(run_keys(&db.pool).await?, ["k/one", "k/two", "k/three"]);
    let (attempts, result): (i32, serde_json::Value) =
        sqlx::query_as("select attempts, last_result from apalis.jobs where id = $1")
            .bind(&id)
            .fetch_one(&db.pool)
            .await?;
    assert_eq!(attempts, 2, "the kill cost one attempt");
    assert_eq!(
        result,
        serde_json::json!({"Ok": 6}),
        "1 + 2 + 3, two of them replayed"
    );
    assert!(survivor.terminate(Duration::from_secs(30)).await?.success());
    Ok(())
}

#[tokio::test]
async fn finish_tx_inserts_and_completes_exactly_once_while_workers_are_killed()
-> anyhow::Result<()> {
    let db = TestDb::reserving(POOL_SIZE + 2 * process_connections(), POOL_SIZE).await?;
    create_runs_table(&db.pool).await?;
    create_rows_table(&db.pool).await?;
    let env = fast_env();
    let mut tx = db.pool.begin().await?;
    let jobs: Vec<InsertOnce> = (0..200)
        .map(|n| InsertOnce {
            key: format!("row-{n}"),
        })
        .collect();
    durable_jobs::enqueue_many(&mut tx, &jobs).await?;
    tx.commit().await?;
    // Meanwhile, in every snapshot, a job whose row is committed is done:
    // the row and the completion commit in one transaction.
    let stop_watching = tokio_util::sync::CancellationToken::new();
    let watching = tokio::spawn({
        let (pool, stop) = (db.pool.clone(), stop_watching.clone());
        async move {
            let mut seen_unfinished = Vec::new();
            while !stop.is_cancelled() {
                let unfinished: Vec<String> = sqlx::query_scalar(
                    "select rows.key from engine_test_rows as rows
                     join apalis.jobs on jobs.job_type = 'engine_test_insert_once'
                      and convert_from(jobs.job, 'UTF8')::jsonb ->> 'key' = rows.key
                     where jobs.status <> 'Done'",
                )
                .fetch_all(&pool)
                .await?;
                seen_unfinished.extend(unfinished);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            anyhow::Ok(seen_unfinished)
        }
    });
    let mut kills = 0;
    let mut rng = 0x9e37_79b9_u64;
    while kills < 8 {
        let worker = Process::started_worker(&db, &env).await?;
        // A pseudo-random moment 20..220 ms into its run.
        rng = rng.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        tokio::time::sleep(Duration::from_millis(20 + (rng >> 33) % 200)).await;
        let open: i64 = sqlx::query_scalar(
            "select count(*) from apalis.jobs where job_type = $1 and status not in ('Done', 'Killed')",
        )
        .bind(InsertOnce::NAME)
        .fetch_one(&db.pool)
        .await?;
        if open == 0 {
            assert!(worker.terminate(Duration::from_secs(30)).await?.success());
            break;
        }
        worker.signal(nix::sys::signal::Signal::SIGKILL)?;
        kills += 1;
    }
    let survivor = Process::started_worker(&db, &env).await?;
    db.wait_until_idle(Duration::from_secs(120)).await?;
    let duplicated: Vec<(String, i64)> = sqlx::query_as(
        "select key, count(*) from engine_test_rows group by key having count(*) <> 1",
    )
    .fetch_all(&db.pool)
    .await?;
    let rows: i64 = sqlx::query_scalar("select count(distinct key) from engine_test_rows")
        .fetch_one(&db.pool)
        .await?;
    let done: i64 = sqlx::query_scalar(
        "select count(*) from apalis.jobs where job_type = $1 and status = 'Done'",
    )
    .bind(InsertOnce::NAME)
    .fetch_one(&db.pool)
    .await?;
    println!("{kills} kills: {rows} rows, {done} jobs done, duplicated {duplicated:?}");
    assert!(duplicated.is_empty(), "rows inserted twice: {duplicated:?}");
    assert_eq!((rows, done), (200, 200), "every row once, every job done");
    stop_watching.cancel();
    let seen = watching.await??;
    assert!(
        seen.is_empty(),
        "rows committed before their job was done: {seen:?}"
    );
    assert!(survivor.terminate(Duration::from_secs(30)).await?.success());
    Ok(())
}

#[tokio::test]
async fn ten_thousand_jobs_sleeping_five_seconds_hold_no_slot_and_use_no_attempt()
-> anyhow::Result<()> {
    const SLEEPERS: i64 = 10_000;
    let db = TestDb::new().await?;
    create_runs_table(&db.pool).await?;
    let running = start_with(
        &db,
        WorkerConfig {
            concurrency: 8,
            ..fast_config()
        },
    );
    // Every connection to the test's database but this sampler's.
    let connections = "select count(*) from pg_stat_activity
                       where datname = current_database() and pid <> pg_backend_pid()";
    // The idle figure: the worker's pools open connections as work needs
    // them and keep them, so it is taken after a warm-up of sleepers that
    // filled the 8 slots, sampled for a second (the most seen).
    const WARM_UP: i64 = 16;
    let warm_up: Vec<Sleeper> = (0..WARM_UP)
        .map(|n| Sleeper {
            key: format!("warm{n}"),
            millis: 100,
        })
        .collect();
    let mut tx = db.pool.begin().await?;
    durable_jobs::enqueue_many(&mut tx, &warm_up).await?;
    tx.commit().await?;
    db.wait_until_idle(Duration::from_secs(60)).await?;
    let mut idle = 0i64;
    for _ in 0..10 {
        idle = idle.max(sqlx::query_scalar(connections).fetch_one(&db.pool).await?);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sleepers: Vec<Sleeper> = (0..SLEEPERS)
        .map(|n| Sleeper {
            key: format!("s{n}"),
            millis: 5_000,
        })
        .collect();
    let mut tx = db.pool.begin().await?;
    durable_jobs::enqueue_many(&mut tx, &sleepers).await?;
    tx.commit().await?;
    let started = std::time::Instant::now();
    // Sampled until every sleeper is done: how many sleep at once, how many
    // attempts run and have been used meanwhile, how many connections.
    let (mut most_asleep, mut most_running, mut most_connections) = (0, 0, 0);
    loop {
        let (asleep, running_now, attempts, done, open): (i64, i64, i64, i64, i64) =
            sqlx::query_as(
                "select count(*) filter (where state = 'sleeping'),
                        count(*) filter (where state = 'running'),
                        coalesce(sum(attempts) filter (where state = 'sleeping'), 0)::int8,
                        count(*) filter (where state = 'done'),
                        count(*) filter (where state not in ('done', 'dead'))
                 from apalis.job_states where job_type = $1",
            )
            .bind(Sleeper::NAME)
            .fetch_one(&db.pool)
            .await?;
        let now: i64 = sqlx::query_scalar(connections).fetch_one(&db.pool).await?;
        assert_eq!(attempts, 0, "a sleeping job has used no attempt");
        most_asleep = most_asleep.max(asleep);
        most_running = most_running.max(running_now);
        most_connections = most_connections.max(now);
        if open == 0 {
            assert_eq!(done, WARM_UP + SLEEPERS, "all woke and finished");
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(240),
            "{open} sleepers still open after {:?} ({done} done)",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "{SLEEPERS} sleepers of 5 s done after {:?}: at most {most_asleep} asleep at once, \
         {most_running} attempts running, {most_connections} connections (idle: {idle})",
        started.elapsed()
    );
    assert!(
        most_running <= 8,
        "only the worker's 8 slots run attempts (claimed ones wait for one): {most_running}"
    );
    assert!(
        most_asleep >= 1_000,
        "sleepers beyond the 8 slots slept at once: {most_asleep}"
    );
    assert!(
        most_connections <= idle,
        "the worker held no more connections than idle: {most_connections} > {idle}"
    );
    let attempts: i64 = sqlx::query_scalar(
        "select coalesce(max(attempts), 0)::int8 from apalis.jobs where job_type = $1",
    )
    .bind(Sleeper::NAME)
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(attempts, 1, "each used one attempt, the one that finished");
    stop(running).await
}

#[tokio::test]
async fn a_signal_is_received_sent_before_or_during_the_wait_and_refused_after()
-> anyhow::Result<()> {
    let db = TestDb::new().await?;
    create_runs_table(&db.pool).await?;
    // Sent before the job waits (in the transaction that enqueues it).
    let mut tx = db.pool.begin().await?;
    let early = durable_jobs::enqueue(
        &mut tx,
        &Approval {
            key: "early".to_owned(),
            timeout_millis: 60_000,
            choices: false,
        },
    )
    .await?
    .to_string();
    let sent = durable_jobs::signal(&mut tx, &early, "approval", &"yes").await?;
    tx.commit().await?;
    assert_eq!(sent, Signalled::Delivered);
    let running = start_with(&db, fast_config());
    db.wait_for_status(&early, "Done", Duration::from_secs(30))
        .await?;

    // Sent while it waits: it resumes at once.
    let during = enqueue(
        &db.pool,
        &Approval {
            key: "during".to_owned(),
            timeout_millis: 60_000,
            choices: false,
        },
    )
    .await?;
    wait_until(Duration::from_secs(30), "waiting", || async {
        Ok(state_of(&db.pool, &during).await? == "waiting")
    })
    .await?;
    let signalled = db_now(&db.pool).await?;
    // Two senders at once: one wins, the other is told.
    let (first, second) = tokio::join!(
        send(&db.pool, &during, "from ops"),
        send(&db.pool, &during, "from a bot")
    );
    let mut outcomes = [first?, second?];
    outcomes.sort_by_key(|outcome| format!("{outcome:?}"));
    assert_eq!(
        outcomes,
        [Signalled::AlreadySignalled, Signalled::Delivered]
    );
    db.wait_for_status(&during, "Done", Duration::from_secs(30))
        .await?;
    let resumed: chrono::DateTime<chrono::Utc> = sqlx::query_scalar(
        "select started_at from engine_test_runs where key like 'during/from %'",
    )
    .fetch_one(&db.pool)
    .await?;
    let latency = (resumed - signalled).as_seconds_f64();
    println!("resumed {latency:.3} s after the signal");
    assert!(
        latency < 1.0,
        "woken by the signal, not a poll: {latency:.3} s"
    );

    // No signal: the timeout gives None; a signal then is refused.
    let late = enqueue(
        &db.pool,
        &Approval {
            key: "late".to_owned(),
            timeout_millis: 1_000,
            choices: false,
        },
    )
    .await?;
    db.wait_for_status(&late, "Done", Duration::from_secs(30))
        .await?;
    assert_eq!(
        send(&db.pool, &late, "too late").await?,
        Signalled::JobFinished
    );
    assert_eq!(
        send(&db.pool, "01NOSUCHJOB0000000000000000", "x").await?,
        Signalled::NoSuchJob
    );
    let keys = run_keys(&db.pool).await?;
    let outcomes: Vec<&String> = keys.iter().filter(|key| !key.contains("/url ")).collect();
    assert_eq!(outcomes.len(), 3, "{keys:?}");
    assert!(outcomes.contains(&&"early/yes".to_owned()), "{keys:?}");
    assert!(outcomes.contains(&&"late/none".to_owned()), "{keys:?}");
    assert!(
        outcomes.iter().any(|key| key.starts_with("during/from ")),
        "{keys:?}"
    );
    stop(running).await
}

#[tokio::test]
async fn a_wait_for_a_choice_is_answered_once_by_its_label() -> anyhow::Result<()> {
    use durable_jobs::admin;
    let db = TestDb::new().await?;
    create_runs_table(&db.pool).await?;
    let running = start_with(&db, fast_config());
    let asking = Approval {
        key: "ask".to_owned(),
        timeout_millis: 60_000,
        choices: true,
    };
    let id = enqueue(&db.pool, &asking).await?;
    wait_until(Duration::from_secs(30), "waiting", || async {
        Ok(state_of(&db.pool, &id).await? == "waiting")
    })
    .await?;
    let waiting = admin::oldest_waiting_for(&db.pool, Approval::NAME, "approval").await?;
    assert_eq!(waiting.map(|job| job.id), Some(id.clone()));
    let checkpoints = admin::checkpoints(&db.pool, &id).await?;
    let wait = checkpoints
        .iter()
        .find(|checkpoint| checkpoint.name == "approval")
        .expect("the wait's checkpoint");
    assert_eq!(wait.choices(), ["Approve", "Reject"]);
    // Only a label of the wait's choices is an answer.
    assert_eq!(
        admin::answer(&db.pool, &id, "approval", "Maybe").await?,
        Signalled::NoSuchJob
    );
    assert_eq!(
        admin::answer(&db.pool, &id, "other", "Approve").await?,
        Signalled::NoSuchJob
    );
    assert_eq!(
        admin::answer(&db.pool, &id, "approval", "Reject").await?,
        Signalled::Delivered
    );
    db.wait_for_status(&id, "Done", Duration::from_secs(30))
        .await?;
    let keys = run_keys(&db.pool).await?;
    assert_eq!(
        keys.iter()
            .filter(|key| !key.contains("/url "))
            .collect::<Vec<_>>(),
        ["ask/rejected"]
    );
    // Answered: the buttons go, and a second answer is refused.
    let checkpoints = admin::checkpoints(&db.pool, &id).await?;
    assert!(
        checkpoints.iter().all(|c| c.choices().is_empty()),
        "{checkpoints:?}"
    );
    assert_eq!(
        admin::answer(&db.pool, &id, "approval", "Approve").await?,
        Signalled::WaitEnded
    );
    assert_eq!(
        admin::oldest_waiting_for(&db.pool, Approval::NAME, "approval").await?,
        None
    );
    stop(running).await
}

#[tokio::test]
async fn a_signal_url_takes_one_json_body_and_refuses_the_rest() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    create_runs_table(&db.pool).await?;
    let app = axum::Router::new().nest("/signals", durable_jobs::signals::router(db.pool.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let running = start_with(&db, fast_config());
    let id = enqueue(
        &db.pool,
        &Approval {
            key: "url".to_owned(),
            timeout_millis: 60_000,
            choices: false,
        },
    )
    .await?;
    wait_until(Duration::from_secs(30), "waiting", || async {
        Ok(state_of(&db.pool, &id).await? == "waiting")
    })
    .await?;
    let path: String = sqlx::query_scalar(
        "select split_part(key, ' ', 2) from engine_test_runs where key like 'url/url %'",
    )
    .fetch_one(&db.pool)
    .await?;
    let client = reqwest::Client::new();
    let post = |path: String, body: Vec<u8>| {
        client
            .post(format!("http://{address}/signals{path}"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let mut forged = path.clone();
    forged.pop();
    forged.push(if path.ends_with('0') { '1' } else { '0' });
    assert_eq!(
        post(forged, b"\"yes\"".to_vec()).await?.status(),
        404,
        "a wrong token"
    );
    assert_eq!(
        post("/nonsense".to_owned(), b"\"yes\"".to_vec())
            .await?
            .status(),
        404
    );
    assert_eq!(
        post(path.clone(), b"{not json".to_vec()).await?.status(),
        400
    );
    let huge = vec![b' '; 10 * 1024 * 1024];
    assert_eq!(
        post(path.clone(), huge).await?.status(),
        413,
        "a 10 MB body"
    );
    assert_eq!(
        state_of(&db.pool, &id).await?,
        "waiting",
        "nothing refused woke it"
    );
    assert_eq!(
        post(path.clone(), b"\"by url\"".to_vec()).await?.status(),
        202
    );
    assert_eq!(
        post(path, b"\"again\"".to_vec()).await?.status(),
        404,
        "a used token"
    );
    db.wait_for_status(&id, "Done", Duration::from_secs(30))
        .await?;
    assert!(run_keys(&db.pool).await?.contains(&"url/by url".to_owned()));
    server.abort();
    stop(running).await
}

#[tokio::test]
async fn a_parent_awaits_its_child_and_fails_with_it_and_cancelling_it_cancels_the_child()
-> anyhow::Result<()> {
    let db = TestDb::new().await?;
    create_runs_table(&db.pool).await?;
    let running = start_with(&db, fast_config());
    let parent = enqueue(
        &db.pool,
        &Parent {
            key: "p".to_owned(),
            failing_child: false,
            workflow: false,
        },
    )
    .await?;
    db.wait_for_status(&parent, "Done", Duration::from_secs(30))
        .await?;
    let (result, attempts): (serde_json::Value, i32) =
        sqlx::query_as("select last_result, attempts from apalis.jobs where id = $1")
            .bind(&parent)
            .fetch_one(&db.pool)
            .await?;
    assert_eq!(result, serde_json::json!({"Ok": 6}), "the child's result");
    assert_eq!(attempts, 1, "waiting for the child used no attempt");
    assert_eq!(
        run_keys(&db.pool).await?,
        [
            "p/parent",
            "p/child/one",
            "p/child/two",
            "p/child/three",
            "p/parent"
        ],
        "the parent ran twice (spawn, then resume), the child once"
    );

    let failing = enqueue(
        &db.pool,
        &Parent {
            key: "f".to_owned(),
            failing_child: true,
            workflow: false,
        },
    )
    .await?;
    db.wait_for_status(&failing, "Killed", Duration::from_secs(30))
        .await?;
    let error = db.job_outcome(&failing).await?.1.unwrap_or_default();
    assert!(
        error.contains("died: the partner refused it"),
        "the child's error: {error}"
    );

    // A parent waiting for a child that cannot start (its queue paused):
    // cancelling the parent cancels the child.
    durable_jobs::admin::pause(&db.pool, Steps::NAME).await?;
    let waiting = enqueue(
        &db.pool,
        &Parent {
            key: "c".to_owned(),
            failing_child: false,
            workflow: false,
        },
    )
    .await?;
    wait_until(Duration::from_secs(30), "the parent waits", || async {
        Ok(state_of(&db.pool, &waiting).await? == "waiting")
    })
    .await?;
    durable_jobs::admin::cancel(&db.pool, &waiting).await?;
    let child_state: String =
        sqlx::query_scalar("select state from apalis.job_states where parent_id = $1")
            .bind(&waiting)
            .fetch_one(&db.pool)
            .await?;
    assert_eq!(child_state, "dead", "cancelled with its parent");
    durable_jobs::admin::resume(&db.pool, Steps::NAME).await?;
    db.wait_until_idle(Duration::from_secs(30)).await?;
    stop(running).await
}

#[tokio::test]
async fn a_parent_awaits_a_child_workflow_and_fails_with_it_and_cancelling_it_cancels_the_workflow()
-> anyhow::Result<()> {
    let db = TestDb::new().await?;
    create_runs_table(&db.pool).await?;
    let running = start_with(&db, fast_config());
    let parent = |key: &str, failing_child| Parent {
        key: key.to_owned(),
        failing_child,
        workflow: true,
    };
    let done = enqueue(&db.pool, &parent("w", false)).await?;
    db.wait_for_status(&done, "Done", Duration::from_secs(30))
        .await?;
    let (result, attempts): (serde_json::Value, i32) =
        sqlx::query_as("select last_result, attempts from apalis.jobs where id = $1")
            .bind(&done)
            .fetch_one(&db.pool)
            .await?;
    assert_eq!(result, serde_json::json!({"Ok": 6}), "step c's result");
    assert_eq!(attempts, 1, "waiting for the workflow used no attempt");
    let runs = run_keys(&db.pool).await?;
    let expected: Vec<String> = std::iter::once("w/parent".to_owned())
        .chain(
            ["a", "b", "c"]
                .iter()
                .flat_map(|step| ["one", "two", "three"].map(|part| format!("w/{step}/{part}"))),
        )
        .chain(std::iter::once("w/parent".to_owned()))
        .collect();
    assert_eq!(
        runs, expected,
        "the parent ran twice (spawn, then resume once every step had ended), each step once"
    );
    // The job page lists the workflow; the workflow page links back.
    let children = durable_jobs::admin::child_workflows(&db.pool, &done).await?;
    assert_eq!(children.len(), 1, "one child workflow: {children:?}");
    assert_eq!((children[0].steps, children[0].done), (3, 3));
    let app = axum::Router::new().nest(
        "/jobs",
        durable_jobs::dashboard::router(durable_jobs::dashboard::Dashboard::new(db.pool.clone())),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let job_page = reqwest::get(format!("http://{address}/jobs/jobs/{done}"))
        .await?
        .text()
        .await?;
    let child = &children[0].id;
    assert!(
        job_page.contains(&format!(r#"data-workflow-id="{child}""#)),
        "the job page lists its child workflow: {job_page}"
    );
    let workflow_page = reqwest::get(format!("http://{address}/jobs/workflows/{child}"))
        .await?
        .text()
        .await?;
    assert!(
        workflow_page.contains(&format!(
            r#"id="workflow-parent-link" href="/jobs/jobs/{done}""#
        )),
        "the workflow page links to its parent: {workflow_page}"
    );
    server.abort();

    let failing = enqueue(&db.pool, &parent("wf", true)).await?;
    db.wait_for_status(&failing, "Killed", Duration::from_secs(30))
        .await?;
    let error = db.job_outcome(&failing).await?.1.unwrap_or_default();
    assert!(
        error.contains("died: the partner refused it"),
        "the dead step's error: {error}"
    );

    // A parent waiting for a workflow that cannot start (its first step's
    // queue paused): cancelling the parent cancels the workflow.
    durable_jobs::admin::pause(&db.pool, Steps::NAME).await?;
    let waiting = enqueue(&db.pool, &parent("wc", false)).await?;
    wait_until(Duration::from_secs(30), "the parent waits", || async {
        Ok(state_of(&db.pool, &waiting).await? == "waiting")
    })
    .await?;
    durable_jobs::admin::cancel(&db.pool, &waiting).await?;
    let steps: Vec<(String, String)> = sqlx::query_as(
        "select step.name, coalesce(job.state, step.state)
         from apalis.workflows as wf
         join apalis.workflow_steps as step on step.workflow_id = wf.id
         left join apalis.job_states as job on job.id = step.job_id
         where wf.parent_id = $1 and wf.cancel_requested_at is not null
         order by step.name",
    )
    .bind(&waiting)
    .fetch_all(&db.pool)
    .await?;
    assert_eq!(
        steps,
        [
            ("a".to_owned(), "dead".to_owned()),
            ("b".to_owned(), "cancelled".to_owned()),
            ("c".to_owned(), "cancelled".to_owned())
        ],
        "the workflow was cancelled with its parent"
    );
    durable_jobs::admin::resume(&db.pool, Steps::NAME).await?;
    db.wait_until_idle(Duration::from_secs(30)).await?;
    assert!(
        !run_keys(&db.pool)
            .await?
            .iter()
            .any(|key| key.starts_with("wc/a")),
        "no step of the cancelled workflow ran"
    );
    stop(running).await
}
