//! The engine's queue backend (`storage.rs`) and claim function against the real schema.

use crate::support::TestDb;
use apalis::prelude::{Status, TaskId, TaskResult};
use apalis_core::backend::persistence::TaskEvent;
use durable_jobs::internals::{self as storage, Recorded};
use serde_json::{Value, json};
use ulid::Ulid;

/// Inserts `count` jobs of queue engine_test_a in `status`, locked by `worker` (registered if new).
async fn jobs_of(
    db: &TestDb,
    worker: &str,
    status: &str,
    count: i64,
) -> anyhow::Result<Vec<String>> {
    sqlx::query(
        "insert into apalis.workers (id, worker_type, storage_name, layers, last_seen)
         values ($1, 'engine_test_a', 'PgStorage', '', now()) on conflict (id) do nothing",
    )
    .bind(worker)
    .execute(&db.pool)
    .await?;
    Ok(sqlx::query_scalar(
        "insert into apalis.jobs (id, job_type, job, status, attempts, max_attempts, lock_by, lock_at)
         select apalis.generate_ulid(), 'engine_test_a', '\\x7b7d', $2, 0, 3, $1, now()
         from generate_series(1, $3)
         returning id",
    )
    .bind(worker)
    .bind(status)
    .bind(count)
    .fetch_all(&db.pool)
    .await?)
}

fn task_id(id: &str) -> anyhow::Result<TaskId> {
    Ok(TaskId::from_ulid(Ulid::from_string(id)?))
}

fn done(id: &str, attempt: usize) -> anyhow::Result<TaskEvent<Value>> {
    Ok(TaskEvent::Complete(TaskResult {
        task_id: task_id(id)?,
        attempt,
        status: Status::Done,
        result: Ok(Value::Null),
    }))
}

#[tokio::test]
async fn a_round_records_only_what_this_worker_still_holds() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let ours = jobs_of(&db, "w-ours", "Queued", 3).await?;
    // Recovered from us and claimed by another worker meanwhile.
    let theirs = jobs_of(&db, "w-theirs", "Queued", 1).await?;
    let failed = TaskEvent::Complete(TaskResult {
        task_id: task_id(&ours[1])?,
        attempt: 2,
        status: Status::Failed,
        result: Err("boom".to_owned()),
    });
    let events = vec![
        TaskEvent::Lock {
            task_id: task_id(&ours[0])?,
        },
        TaskEvent::Lock {
            task_id: task_id(&ours[2])?,
        },
        done(&ours[0], 1)?,
        failed,
        done(&theirs[0], 1)?,
        TaskEvent::Lock {
            task_id: task_id(&theirs[0])?,
        },
    ];
    let recorded =
        storage::record_events(&db.pool, events, "w-ours", durable_jobs::Backoff::DEFAULT).await?;
    assert_eq!(
        recorded,
        Recorded {
            finished: 2,
            started: 1
        }
    );

    let row = |id: String| {
        let pool = db.pool.clone();
        async move {
            let row: (String, i32, Option<Value>, String) = sqlx::query_as(
                "select status, attempts, last_result, lock_by from apalis.jobs where id = $1",
            )
            .bind(id)
            .fetch_one(&pool)
            .await?;
            anyhow::Ok(row)
        }
    };
    assert_eq!(
        row(ours[0].clone()).await?,
        ("Done".into(), 1, Some(json!({"Ok": null})), "w-ours".into())
    );
    assert_eq!(
        row(ours[1].clone()).await?,
        (
            "Failed".into(),
            2,
            Some(json!({"Err": "boom"})),
            "w-ours".into()
        )
    );
    assert_eq!(
        row(ours[2].clone()).await?,
        ("Running".into(), 0, None, "w-ours".into())
    );
    assert_eq!(
        row(theirs[0].clone()).await?,
        ("Queued".into(), 0, None, "w-theirs".into()),
        "another worker's job is left alone"
    );
    Ok(())
}

#[tokio::test]
async fn results_are_found_by_id_however_many_jobs_the_worker_finished() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    // Statistics that know an old worker well and a new one not at all: the
    // new worker then looks like it holds a handful of rows through lock_by.
    jobs_of(&db, "w-old", "Done", 5_000).await?;
    sqlx::query("analyze apalis.jobs").execute(&db.pool).await?;
    jobs_of(&db, "w-new", "Done", 5_000).await?;
    let queued = jobs_of(&db, "w-new", "Queued", 10).await?;

    let attempts = vec![1i32; queued.len()];
    let statuses = vec!["Done"; queued.len()];
    let outcomes = vec![json!({"Ok": null}); queued.len()];
    // The settle runs inside `apalis.record_events` (its plan is not one
    // EXPLAIN can show): what it read, in this transaction, says how it
    // found its rows. Generic plans, as the worker's bookkeeping pool uses.
    let mut tx = db.pool.begin().await?;
    sqlx::query("set local plan_cache_mode = force_generic_plan")
        .execute(&mut *tx)
        .await?;
    let (finished, started): (i64, i64) = sqlx::query_as(storage::RECORD_EVENTS)
        .bind(&queued)
        .bind(&attempts)
        .bind(&statuses)
        .bind(&outcomes)
        .bind(&queued)
        .bind("w-new")
        .bind(1.0_f64)
        .bind(3600.0_f64)
        .bind(vec![None::<f64>; queued.len()])
        .bind(30_i32)
        .bind(vec![None::<String>; queued.len()])
        .bind(vec![None::<String>; queued.len()])
        .fetch_one(&mut *tx)
        .await?;
    assert_eq!((finished, started), (10, 0));
    let scanned: i64 = sqlx::query_scalar(
        "select coalesce(seq_tup_read, 0) from pg_stat_xact_user_tables
         where schemaname = 'apalis' and relname = 'jobs'",
    )
    .fetch_one(&mut *tx)
    .await?;
    let index_scans: Vec<(String, i64)> = sqlx::query_as(
        "select index.relname::text, pg_stat_get_xact_numscans(index.oid)
         from pg_index join pg_class as index on index.oid = pg_index.indexrelid
         where pg_index.indrelid = 'apalis.jobs'::regclass
           and pg_stat_get_xact_numscans(index.oid) > 0
         order by 1",
    )
    .fetch_all(&mut *tx)
    .await?;
    tx.rollback().await?;
    assert!(
        scanned == 0
            && index_scans.iter().any(|(index, _)| index == "jobs_pkey")
            && !index_scans
                .iter()
                .any(|(index, _)| index.contains("lock_by") || index == "lidx"),
        "a round must find its rows by id, not through every job the worker finished: \
         {scanned} rows read by sequential scans; index scans {index_scans:?}"
    );
    Ok(())
}

/// What a settle may change: id, status, lock_by, attempts, last_result, run_at.
type JobRow = (
    String,
    String,
    Option<String>,
    i32,
    Option<Value>,
    chrono::DateTime<chrono::Utc>,
);

#[tokio::test]
async fn batches_from_a_worker_whose_jobs_were_taken_over_change_nothing() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    // Six jobs w-old claimed and started, then lost: it stopped heartbeating.
    let lost = jobs_of(&db, "w-old", "Running", 6).await?;
    sqlx::query(
        "update apalis.workers set last_seen = now() - interval '1 hour' where id = 'w-old'",
    )
    .execute(&db.pool)
    .await?;
    // Recovery hands them back: pending again, or dead when out of attempts.
    sqlx::query("update apalis.jobs set attempts = 2 where id = $1")
        .bind(&lost[5])
        .execute(&db.pool)
        .await?;
    let recovered = storage::recover_orphans(&db.pool, "engine_test_a", 30).await?;
    assert_eq!(recovered, 6);
    // w-new claims two of them; one of those it has started.
    jobs_of(&db, "w-new", "Queued", 0).await?;
    sqlx::query("update apalis.jobs set status = 'Queued', lock_by = 'w-new', lock_at = now() where id = any($1)")
        .bind(&lost[0..2])
        .execute(&db.pool)
        .await?;
    sqlx::query("update apalis.jobs set status = 'Running' where id = $1")
        .bind(&lost[1])
        .execute(&db.pool)
        .await?;
    // And a seventh, whose result w-old lost: the reaper ended its attempt
    // (Failed, retry due) without clearing w-old's claim.
    let reaped = jobs_of(&db, "w-old", "Running", 1).await?;
    sqlx::query(
        "update apalis.jobs set status = 'Failed', attempts = 1, run_at = now(), done_at = now(),
                last_result = '{\"Err\": \"attempt lost\"}' where id = $1",
    )
    .bind(&reaped[0])
    .execute(&db.pool)
    .await?;

    let rows = || {
        let pool = db.pool.clone();
        async move {
            let rows: Vec<JobRow> = sqlx::query_as(
                "select id, status, lock_by, attempts, last_result, run_at
                     from apalis.jobs order by id",
            )
            .fetch_all(&pool)
            .await?;
            anyhow::Ok(rows)
        }
    };
    let before = rows().await?;

    // w-old's late batches: successes, failures and start marks alike.
    let all: Vec<&String> = lost.iter().chain(&reaped).collect();
    let mut successes = Vec::new();
    let mut failures = Vec::new();
    for (n, id) in all.iter().enumerate() {
        successes.push(TaskEvent::Lock {
            task_id: task_id(id)?,
        });
        if n % 2 == 0 {
            successes.push(done(id, 1)?);
        } else {
            failures.push(TaskEvent::Complete(TaskResult {
                task_id: task_id(id)?,
                attempt: 1,
                status: Status::Failed,
                result: Err("late failure".to_owned()),
            }));
        }
    }
    for batch in [successes, failures] {
        let recorded =
            storage::record_events(&db.pool, batch, "w-old", durable_jobs::Backoff::DEFAULT)
                .await?;
        assert_eq!(
            recorded,
            Recorded::default(),
            "a stale worker's batch records nothing"
        );
    }
    assert_eq!(rows().await?, before, "no row changed");
    Ok(())
}

#[tokio::test]
async fn a_batch_insert_notifies_once_per_queue_not_once_per_row() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let mut listener = sqlx::postgres::PgListener::connect_with(&db.pool).await?;
    listener.listen("apalis::job::insert").await?;
    // 500 due jobs of two queues and 50 delayed ones, in one statement.
    sqlx::query(
        "insert into apalis.jobs (id, job_type, job, status, attempts, max_attempts, run_at)
         select apalis.generate_ulid(), case when n % 2 = 0 then 'engine_test_a' else 'engine_test_b' end,
                '\\x7b7d', 'Pending', 0, 3,
                case when n > 500 then now() + interval '1 hour' else now() end
         from generate_series(1, 550) as n",
    )
    .execute(&db.pool)
    .await?;
    let (mut due, mut timed) = (Vec::new(), Vec::new());
    while let Ok(notification) =
        tokio::time::timeout(std::time::Duration::from_millis(500), listener.recv()).await
    {
        let payload: Value = serde_json::from_str(notification?.payload())?;
        let queue = payload["job_type"].as_str().unwrap_or_default().to_owned();
        match payload["due_in"].as_f64() {
            None => due.push(queue),
            Some(due_in) => timed.push((queue, due_in.round())),
        }
    }
    due.sort();
    timed.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        due,
        ["engine_test_a", "engine_test_b"],
        "one wake-up per queue with due jobs"
    );
    assert_eq!(
        timed,
        [
            ("engine_test_a".to_owned(), 3600.0),
            ("engine_test_b".to_owned(), 3600.0)
        ],
        "and one per queue with jobs for later, saying when"
    );
    Ok(())
}

#[tokio::test]
async fn a_worker_without_its_row_claims_nothing() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let pending: String = sqlx::query_scalar(
        "insert into apalis.jobs (id, job_type, job, status, attempts, max_attempts, run_at)
         values (apalis.generate_ulid(), 'engine_test_a', '\\x7b7d', 'Pending', 0, 3, now() - interval '1 second')
         returning id",
    )
    .fetch_one(&db.pool)
    .await?;
    // No foreign key checks lock_by any more (a cost on every claimed row):
    // the claim checks its worker's row once, so that every claimed job
    // names a worker that recovery can find.
    let claimed = sqlx::query("select id from apalis.get_jobs('nobody', 'engine_test_a', 5)")
        .fetch_all(&db.pool)
        .await;
    let error = claimed.expect_err("an unregistered worker's claim fails");
    assert!(
        error.to_string().contains("is not registered"),
        "the reason is given: {error}"
    );
    let (status, lock_by): (String, Option<String>) =
        sqlx::query_as("select status, lock_by from apalis.jobs where id = $1")
            .bind(&pending)
            .fetch_one(&db.pool)
            .await?;
    assert_eq!((status.as_str(), lock_by), ("Pending", None));
    // Registered, the same claim takes it.
    jobs_of(&db, "somebody", "Done", 0).await?;
    let ids: Vec<String> =
        sqlx::query_scalar("select id from apalis.get_jobs('somebody', 'engine_test_a', 5)")
            .fetch_all(&db.pool)
            .await?;
    assert_eq!(ids, [pending]);
    Ok(())
}

#[tokio::test]
async fn a_failed_attempt_waits_the_backoff_with_its_doublings_then_linear_growth()
-> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let running = jobs_of(&db, "w-ours", "Running", 7).await?;
    // App Engine's example: min 10 s, max 300 s, 3 doublings.
    let backoff = durable_jobs::Backoff::new(
        std::time::Duration::from_secs(10),
        std::time::Duration::from_secs(300),
    )
    .max_doublings(3);
    let events = running
        .iter()
        .zip(1..)
        .map(|(id, attempt)| {
            Ok(TaskEvent::Complete(TaskResult {
                task_id: task_id(id)?,
                attempt,
                status: Status::Failed,
                result: Err("boom".to_owned()),
            }))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    storage::record_events(&db.pool, events, "w-ours", backoff).await?;
    for (id, attempt) in running.iter().zip(1..) {
        let waits: f64 = sqlx::query_scalar(
            "select extract(epoch from run_at - now())::float8 from apalis.jobs where id = $1",
        )
        .bind(id)
        .fetch_one(&db.pool)
        .await?;
        let nominal = backoff.nominal(attempt).as_secs_f64();
        println!("attempt {attempt}: waits {waits:.1} s (nominal {nominal} s)");
        assert!(
            (nominal * 0.9 - 0.5..=nominal * 1.1 + 0.5).contains(&waits),
            "attempt {attempt} waits {waits:.1} s, not about {nominal} s (10, 20, 40, 80, 160, 240, 300)"
        );
    }
    Ok(())
}

/// Rows of `apalis.jobs` read so far, every session's (by sequential scans,
/// and fetched through its indexes), and how often it was analyzed.
async fn job_table_reads(db: &TestDb) -> anyhow::Result<(i64, i64, i64)> {
    Ok(sqlx::query_as(
        "select coalesce(seq_tup_read, 0), coalesce(idx_tup_fetch, 0), analyze_count
         from pg_stat_user_tables where schemaname = 'apalis' and relname = 'jobs'",
    )
    .fetch_one(&db.pool)
    .await?)
}

#[tokio::test]
async fn a_queue_vacuumed_empty_then_filled_is_claimed_and_settled_by_index_not_by_scans()
-> anyhow::Result<()> {
    use std::time::{Duration, Instant};
    const JOBS: i64 = 3_000;
    let db = TestDb::new().await?;
    crate::jobs::create_runs_table(&db.pool).await?;
    // Statistics that say the table is empty (a queue drained and vacuumed,
    // with no autovacuum to analyze it again), and a worker whose sessions
    // plan their statements against them while it polls the empty queue.
    sqlx::raw_sql("vacuum analyze apalis.jobs")
        .execute(&db.pool)
        .await?;
    let (_, _, analyzed_empty) = job_table_reads(&db).await?;
    // A lease of 10 minutes: the upkeep's check for lost attempts (a scan of
    // the table, `queries::REAP_LOST_ATTEMPTS`) runs at start and not again
    // while this test measures (CI's drain, slow enough to reach the second
    // check of a 30 s lease, read the table's 53,000 rows once more).
    let running = crate::flow::start_with(
        &db,
        durable_jobs::WorkerConfig {
            lease: Duration::from_secs(600),
            ..crate::support::fast_config()
        },
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Finished jobs of another queue, which a plan fit for the table never
    // reads, and which one made for an empty table reads on every call.
    jobs_of(&db, "w-finished", "Done", 50_000).await?;
    // Due in 3 s: the table is full before any claim can take a job, and
    // the worker has that long to bring its statistics (and plans) up to date.
    let jobs: Vec<crate::jobs::Record> = (0..JOBS)
        .map(|n| crate::jobs::Record {
            key: format!("r{n}"),
            sleep_millis: 0,
        })
        .collect();
    let mut tx = db.pool.begin().await?;
    durable_jobs::enqueue_many_with(
        &mut tx,
        &jobs,
        durable_jobs::Enqueue::default().delay(Duration::from_secs(3)),
    )
    .await?;
    tx.commit().await?;
    let enqueued = Instant::now();
    let mut analyzed = analyzed_empty;
    while analyzed == analyzed_empty && enqueued.elapsed() < Duration::from_millis(1_500) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        (_, _, analyzed) = job_table_reads(&db).await?;
    }
    // What the sessions read until then, reported (at most once a second),
    // is not the drain's.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let (scanned_before, fetched_before, _) = job_table_reads(&db).await?;
    // The runs' table, not the queue's: this wait reads no job row.
    crate::support::wait_until(Duration::from_secs(120), "every job ran", || async {
        let ran: i64 = sqlx::query_scalar("select count(*) from engine_test_runs")
            .fetch_one(&db.pool)
            .await?;
        Ok(ran >= JOBS)
    })
    .await?;
    let drained = enqueued.elapsed();
    // Sessions report their statistics at most once a second.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (scanned, fetched, _) = job_table_reads(&db).await?;
    let (scanned, fetched) = (scanned - scanned_before, fetched - fetched_before);
    crate::flow::stop(running).await?;
    println!(
        "{JOBS} jobs due 3 s after their enqueue drained {drained:?} after it; from their due \
         time, job rows read: {scanned} by sequential scans, {fetched} through indexes"
    );
    assert!(
        analyzed > analyzed_empty,
        "the worker analyzed the queue's table once it outgrew its statistics"
    );
    // A claim or a settle that walks the table (or a whole index) reads
    // its 53,000 rows once per batch; by index, a job's row is read a few
    // times in all, and the finished ones not at all.
    assert!(
        scanned + fetched < 20 * JOBS,
        "claims and settles find their rows by index, not by walking the queue: \
         {scanned} rows scanned and {fetched} fetched through indexes to drain {JOBS} jobs"
    );
    Ok(())
}

/// Index entries of `apalis.jobs` that index scans returned so far, every
/// session's (live or not: an entry of a row version that a transaction
/// held open keeps from being removed is returned, and skipped).
async fn job_index_entries_read(db: &TestDb) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "select coalesce(sum(idx_tup_read), 0)::bigint from pg_stat_user_indexes
         where schemaname = 'apalis' and relname = 'jobs'",
    )
    .fetch_one(&db.pool)
    .await?)
}

#[tokio::test]
async fn with_a_transaction_held_open_each_claim_starts_past_what_the_last_one_claimed()
-> anyhow::Result<()> {
    use std::time::Duration;
    const JOBS: i64 = 4_000;
    let db = TestDb::new().await?;
    crate::jobs::create_runs_table(&db.pool).await?;
    // Another session's transaction, with an xid, open for the whole drain:
    // no row version a claim leaves behind can be removed, nor its entry in
    // the claim index marked dead.
    let mut held = db.pool.begin().await?;
    sqlx::query("select pg_current_xact_id()")
        .execute(&mut *held)
        .await?;
    let jobs: Vec<crate::jobs::Record> = (0..JOBS)
        .map(|n| crate::jobs::Record {
            key: format!("h{n}"),
            sleep_millis: 0,
        })
        .collect();
    let mut tx = db.pool.begin().await?;
    durable_jobs::enqueue_many(&mut tx, &jobs).await?;
    tx.commit().await?;
    let before = job_index_entries_read(&db).await?;
    // Four slots: a thousand claims of a few jobs each, each of which, from
    // the claim index's start, walked every entry claimed before it.
    let started = std::time::Instant::now();
    let running = crate::flow::start_with(&db, crate::support::fast_config());
    crate::support::wait_until(Duration::from_secs(120), "every job ran", || async {
        let ran: i64 = sqlx::query_scalar("select count(*) from engine_test_runs")
            .fetch_one(&db.pool)
            .await?;
        Ok(ran >= JOBS)
    })
    .await?;
    let drain = started.elapsed();
    // Ended with the drain: the idle worker's claims (from the whole queue,
    // every 50 ms) walk the entries left behind only while it is held, and
    // an idle tail as long as a loaded machine makes it is not the drain's.
    held.rollback().await?;
    // A stopped worker's sessions have reported what they read.
    crate::flow::stop(running).await?;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let read = job_index_entries_read(&db).await? - before;
    println!(
        "{JOBS} jobs drained in {drain:?} with a transaction held open: {read} index entries read"
    );
    // Measured: 51,000-92,000 (a job's entries read a few times: its claim,
    // its settle by id; and the claim from the whole queue once a second,
    // nine of them in a drain of ten seconds, each reading at most an entry
    // per job). With every claim from the claim index's start 7,300,000;
    // with the lost workers' jobs looked up by a join that walks the
    // `lock_by` index, 300,000-490,000. A loaded machine's slower drain
    // makes more of the once-a-second claims (CI: 168,000).
    let full_claims = drain.as_secs() as i64 + 2;
    assert!(
        read < 20 * JOBS + full_claims * JOBS,
        "claims start past what the worker claimed before: {read} index entries read to drain \
         {JOBS} jobs in {drain:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_worker_over_100_000_jobs_not_yet_due_reads_none_of_them_while_it_waits()
-> anyhow::Result<()> {
    use std::time::Duration;
    let db = TestDb::new().await?;
    crate::jobs::create_runs_table(&db.pool).await?;
    let jobs: Vec<crate::jobs::Record> = (0..100_000)
        .map(|n| crate::jobs::Record {
            key: format!("later{n}"),
            sleep_millis: 0,
        })
        .collect();
    let mut tx = db.pool.begin().await?;
    durable_jobs::enqueue_many_with(
        &mut tx,
        &jobs,
        durable_jobs::Enqueue::default().delay(Duration::from_secs(3_600)),
    )
    .await?;
    tx.commit().await?;
    sqlx::query("analyze apalis.jobs").execute(&db.pool).await?;
    // Polls every 50 ms: its claims and the due-job waker run 20 times a
    // second. What the upkeep checks at start and then once a lease (lost
    // attempts, jobs of types no worker handles: scans of the table) is
    // over before we count.
    let running = crate::flow::start_with(
        &db,
        durable_jobs::WorkerConfig {
            lease: Duration::from_secs(600),
            ..crate::support::fast_config()
        },
    );
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let (scanned_before, fetched_before, _) = job_table_reads(&db).await?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (scanned, fetched, _) = job_table_reads(&db).await?;
    crate::flow::stop(running).await?;
    let (scanned, fetched) = (scanned - scanned_before, fetched - fetched_before);
    let ran: i64 = sqlx::query_scalar("select count(*) from engine_test_runs")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(ran, 0, "no job is due for an hour");
    // A waker that scanned the table read its 100,000 rows per poll
    // (8,000,000 in the four seconds).
    assert!(
        scanned + fetched < 10_000,
        "waiting for 100,000 jobs due in an hour, the worker read {scanned} of their rows \
         by sequential scans and {fetched} through indexes in four seconds"
    );
    Ok(())
}

#[tokio::test]
async fn a_claim_of_100_reads_its_100_rows_with_100_000_waiting() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    // The claimer's worker row (a claim without one claims nothing).
    jobs_of(&db, "w-claimer", "Done", 0).await?;
    sqlx::query(
        "insert into apalis.jobs (id, job_type, job, status, attempts, max_attempts, run_at)
         select apalis.generate_ulid(), 'engine_test_a', '\\x7b7d', 'Pending', 0, 3,
                now() - interval '1 second'
         from generate_series(1, 100000)",
    )
    .execute(&db.pool)
    .await?;
    sqlx::query("analyze apalis.jobs").execute(&db.pool).await?;
    // As the worker's bookkeeping sessions plan it: once, for any limit.
    let mut tx = db.pool.begin().await?;
    sqlx::query("set local plan_cache_mode = force_generic_plan")
        .execute(&mut *tx)
        .await?;
    for _ in 0..3 {
        let claimed: i64 = sqlx::query_scalar(
            "select count(*) from apalis.get_jobs('w-claimer', 'engine_test_a', 100)",
        )
        .fetch_one(&mut *tx)
        .await?;
        assert_eq!(claimed, 100);
    }
    let (scanned, fetched): (i64, i64) = sqlx::query_as(
        "select coalesce(seq_tup_read, 0), coalesce(idx_tup_fetch, 0)
         from pg_stat_xact_user_tables where schemaname = 'apalis' and relname = 'jobs'",
    )
    .fetch_one(&mut *tx)
    .await?;
    tx.rollback().await?;
    // A plan that takes the limit for a tenth of the table joins the claimed
    // ids to all of it (a hash of a sequential scan).
    assert!(
        scanned == 0 && fetched <= 3 * 100 * 4,
        "three claims of 100 read {scanned} rows by sequential scans and {fetched} through indexes"
    );
    Ok(())
}
