//! The `TrimVisits` job and the worker that runs it.

use std::time::Duration;

use chrono::{TimeDelta, Utc};
use jobs::TrimVisits;
use tests::{Process, TestApp, TestDb};

/// Values of `field` in the JSON log lines of a process.
fn logged_values(lines: &[String], field: &str) -> Vec<i64> {
    lines
        .iter()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter_map(|record| record["fields"][field].as_i64())
        .collect()
}

#[tokio::test]
async fn worker_process_trims_to_the_ten_shown_and_logs_each_deleted_id() -> anyhow::Result<()> {
    tests::budget::runs_processes(1);
    let app = TestApp::spawn().await?;
    let mut page = None;
    for n in 1..=25 {
        page = Some(app.visit(&format!("browser-{n}")).await?);
    }
    let shown = page.expect("visits were made").ids();
    let before = app.db.visit_ids().await?;
    let oldest_fifteen: Vec<i64> = before[..15].to_vec();

    let mut worker = Process::spawn(
        "worker",
        &[
            ("DATABASE_URL", app.db.url.as_str()),
            ("LOG_FORMAT", "json"),
        ],
    )?;
    worker
        .wait_for_line("worker started", Duration::from_secs(60))
        .await?;
    app.db.drain_queue(Duration::from_secs(30)).await?;

    let mut remaining = app.db.visit_ids().await?;
    remaining.reverse();
    assert_eq!(remaining, shown, "exactly the 10 visits shown remain");

    // The summary lines are written after the per-id records, so wait for the last one.
    worker
        .wait_for_line("Deleting", Duration::from_secs(10))
        .await?;
    let mut logged = logged_values(&worker.output(), "visit.id");
    logged.sort_unstable();
    assert_eq!(
        logged, oldest_fifteen,
        "each deleted visit is logged once with visit.id"
    );
    let summarised: i64 = logged_values(&worker.output(), "visits.deleted")
        .iter()
        .sum();
    assert_eq!(summarised, 15, "summaries add up to the deleted count");

    let status = worker.terminate(Duration::from_secs(30)).await?;
    assert!(status.success(), "worker exits 0 on SIGTERM, got {status}");
    app.stop().await
}

#[tokio::test]
async fn running_the_same_trim_twice_is_harmless() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    for n in 1..=12 {
        app.visit(&format!("browser-{n}")).await?;
    }
    let ids = app.db.visit_ids().await?;
    let third_oldest: chrono::DateTime<Utc> =
        sqlx::query_scalar("select created_at from visits where id = $1")
            .bind(ids[2])
            .fetch_one(&app.db.pool)
            .await?;
    let job = TrimVisits {
        older_than: third_oldest,
    };

    let first = job.perform(&app.db.pool, "first").await?;
    let second = job.perform(&app.db.pool, "second").await?;
    assert_eq!(first.deleted, 2, "the two visits before the threshold go");
    assert_eq!(second.deleted, 0, "the second run finds nothing");
    assert_eq!(app.db.visit_ids().await?, ids[2..].to_vec());
    app.stop().await
}

#[tokio::test]
async fn a_rerun_of_the_same_trim_job_reports_what_the_first_run_deleted() -> anyhow::Result<()> {
    let db = TestDb::migrated().await?;
    let old = "insert into visits (visitor, created_at)
               select 'old', now() - interval '1 hour' from generate_series(1, 5)";
    sqlx::query(old).execute(&db.pool).await?;
    let job = TrimVisits {
        older_than: Utc::now(),
    };
    // A re-run (same job id: its acknowledgement was lost) deletes nothing
    // and reports the recorded deletion, not 0.
    let first = job.perform(&db.pool, "lost-ack").await?;
    let again = job.perform(&db.pool, "lost-ack").await?;
    assert_eq!(first.deleted, 5);
    assert_eq!(
        again, first,
        "the re-run reports what the first run deleted"
    );
    let logged: bool = sqlx::query_scalar(
        "select logged_at is not null from trim_deletions where job_id = 'lost-ack'",
    )
    .fetch_one(&db.pool)
    .await?;
    assert!(logged, "the record says its ids were logged");

    // Two attempts at once (a lease expired under the first): one deletes,
    // both report it.
    sqlx::query(old).execute(&db.pool).await?;
    let (one, other) = tokio::join!(
        job.perform(&db.pool, "two-attempts"),
        job.perform(&db.pool, "two-attempts")
    );
    let (one, other) = (one?, other?);
    assert_eq!(one.deleted, 5);
    assert_eq!(one, other, "both attempts report the one deletion");
    assert!(db.visit_ids().await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn the_trim_job_prunes_deletion_records_older_than_a_week() -> anyhow::Result<()> {
    let mut app = TestApp::spawn().await?;
    sqlx::query(
        "insert into trim_deletions (job_id, deleted, ids, recorded_at) values
             ('eight-days', 1, '{1}', now() - interval '8 days'),
             ('six-days', 1, '{2}', now() - interval '6 days')",
    )
    .execute(&app.db.pool)
    .await?;
    app.start_worker();
    let mut tx = app.db.pool.begin().await?;
    jobs::enqueue(
        &mut tx,
        &TrimVisits {
            older_than: Utc::now(),
        },
    )
    .await?;
    tx.commit().await?;
    app.db.drain_queue(Duration::from_secs(30)).await?;
    let kept: Vec<String> = sqlx::query_scalar("select job_id from trim_deletions order by job_id")
        .fetch_all(&app.db.pool)
        .await?;
    assert_eq!(kept, ["six-days"], "records past the retention are pruned");
    app.stop().await
}

#[tokio::test]
async fn trim_older_than_every_visit_deletes_nothing() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    for n in 1..=3 {
        app.visit(&format!("browser-{n}")).await?;
    }
    let job = TrimVisits {
        older_than: Utc::now() - TimeDelta::days(365),
    };
    assert_eq!(job.perform(&app.db.pool, "ancient").await?.deleted, 0);
    assert_eq!(app.db.visit_ids().await?.len(), 3);
    app.stop().await
}

#[tokio::test]
async fn trim_deletes_only_visits_strictly_older_than_threshold() -> anyhow::Result<()> {
    let db = TestDb::migrated().await?;
    let at = Utc::now();
    for offset in [-2, -1, 0, 1] {
        sqlx::query("insert into visits (visitor, created_at) values ('x', $1)")
            .bind(at + TimeDelta::microseconds(offset))
            .execute(&db.pool)
            .await?;
    }
    let outcome = TrimVisits { older_than: at }
        .perform(&db.pool, "edge")
        .await?;
    assert_eq!(
        outcome.deleted, 2,
        "a visit exactly at the threshold is kept"
    );
    Ok(())
}

#[tokio::test]
async fn undecodable_job_dies_with_its_reason_and_the_worker_keeps_going() -> anyhow::Result<()> {
    let mut app = TestApp::spawn().await?;
    // Rows no handler can decode: invalid JSON, and valid JSON of the wrong shape.
    for (queue, payload) in [("trim_visits", "{not json"), ("probe", r#"{"key": 42}"#)] {
        sqlx::query(
            "insert into apalis.jobs (id, job_type, job, status, attempts, max_attempts, run_at)
             values (apalis.generate_ulid(), $1, convert_to($2, 'UTF8'), 'Pending', 0, 5, now())",
        )
        .bind(queue)
        .bind(payload)
        .execute(&app.db.pool)
        .await?;
    }
    app.start_worker();
    app.db.wait_until_idle(Duration::from_secs(30)).await?;
    app.visit("after the bad rows").await?;
    app.db.wait_until_idle(Duration::from_secs(30)).await?;

    let outcomes: Vec<(String, String, i32)> = sqlx::query_as(
        "select status, coalesce(last_result::text, ''), attempts from apalis.jobs order by id",
    )
    .fetch_all(&app.db.pool)
    .await?;
    let dead: Vec<_> = outcomes.iter().filter(|(s, _, _)| s == "Killed").collect();
    assert_eq!(dead.len(), 2, "both bad rows are dead: {outcomes:?}");
    assert!(
        dead.iter()
            .any(|(_, r, _)| r.contains("cannot decode trim_visits payload")),
        "{outcomes:?}"
    );
    assert!(
        dead.iter()
            .any(|(_, r, _)| r.contains("cannot decode probe payload")),
        "{outcomes:?}"
    );
    assert!(
        dead.iter().all(|(_, _, attempts)| *attempts == 1),
        "no retries of a decode error: {outcomes:?}"
    );
    let done = outcomes.iter().filter(|(s, _, _)| s == "Done").count();
    assert_eq!(done, 1, "the good job after them still ran: {outcomes:?}");
    app.stop().await
}

#[tokio::test]
async fn a_pending_trim_with_a_corrupt_payload_is_replaced_not_fatal() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    // A corrupt trim pending in the current coalescing window; the view must
    // merge into it. Should the window close between the insert and the view
    // (it lasts 0.5 s), the view starts the next window's job: try again.
    for _ in 0..5 {
        sqlx::query("delete from apalis.jobs")
            .execute(&app.db.pool)
            .await?;
        sqlx::query(
            "insert into apalis.jobs (id, job_type, job, status, attempts, max_attempts, run_at, unique_key)
             select apalis.generate_ulid(), 'trim_visits', convert_to('garbage', 'UTF8'), 'Pending', 0, 5,
                    to_timestamp((n + 1) * 0.5), 'all@' || n
             from (select floor(extract(epoch from clock_timestamp()) / 0.5)::bigint as n) as clock",
        )
        .execute(&app.db.pool)
        .await?;
        let page = app.visit("next visitor").await?;
        let payloads: Vec<serde_json::Value> = sqlx::query_scalar(
            "select convert_from(job, 'UTF8')::jsonb from apalis.jobs where job <> convert_to('garbage', 'UTF8')",
        )
        .fetch_all(&app.db.pool)
        .await?;
        let jobs: i64 = sqlx::query_scalar("select count(*) from apalis.jobs")
            .fetch_one(&app.db.pool)
            .await?;
        if jobs == 2 {
            continue; // the window closed in between
        }
        assert_eq!(payloads.len(), 1, "the corrupt payload was replaced");
        let job: TrimVisits = serde_json::from_value(payloads[0].clone())?;
        assert_eq!(job.older_than, page.threshold);
        return app.stop().await;
    }
    anyhow::bail!("the coalescing window closed between insert and view five times")
}

#[tokio::test]
async fn a_large_trim_runs_as_a_workflow_of_bounded_chunks_and_logs_one_summary()
-> anyhow::Result<()> {
    tests::budget::runs_processes(1);
    let app = TestApp::spawn().await?;
    // A backlog: 25,000 visits from yesterday, then one page view.
    sqlx::raw_sql(
        "insert into visits (visitor, created_at)
         select 'old-' || n, now() - interval '1 day' + n * interval '1 ms'
         from generate_series(1, 25000) as n;
         -- How many rows each DELETE statement on visits removed.
         create table delete_sizes (rows bigint not null);
         create function record_delete_size() returns trigger language plpgsql as $$
         begin
             insert into delete_sizes select count(*) from gone;
             return null;
         end $$;
         create trigger record_delete_size after delete on visits
             referencing old table as gone for each statement
             execute function record_delete_size();",
    )
    .execute(&app.db.pool)
    .await?;
    let shown = app.visit("browser").await?.ids();
    let before = app.db.visit_ids().await?;

    let mut worker = Process::spawn(
        "worker",
        &[
            ("DATABASE_URL", app.db.url.as_str()),
            ("LOG_FORMAT", "json"),
        ],
    )?;
    worker
        .wait_for_line("worker started", Duration::from_secs(60))
        .await?;
    app.db.drain_queue(Duration::from_secs(120)).await?;
    let mut remaining = app.db.visit_ids().await?;
    remaining.reverse();
    assert_eq!(remaining, shown, "exactly the 10 newest visits remain");

    worker
        .wait_for_line("Deleting", Duration::from_secs(10))
        .await?;
    let deleted: Vec<i64> = before
        .iter()
        .copied()
        .filter(|id| !shown.contains(id))
        .collect();
    assert_eq!(deleted.len(), 24_991);
    let mut logged = logged_values(&worker.output(), "visit.id");
    logged.sort_unstable();
    assert!(
        logged == deleted,
        "each deleted visit is logged once with visit.id ({} logged)",
        logged.len()
    );
    let summaries: Vec<String> = worker
        .output()
        .into_iter()
        .filter(|line| line.contains("Deleting "))
        .collect();
    assert_eq!(summaries.len(), 1, "one summary: {summaries:?}");
    assert_eq!(
        logged_values(&summaries, "visits.deleted"),
        [24_991],
        "the summary has the total"
    );
    assert!(
        summaries[0].contains("(and 24891 more)"),
        "the first 100 ids, then how many more: {}",
        summaries[0]
    );

    let (statements, largest): (i64, Option<i64>) =
        sqlx::query_as("select count(*), max(rows) from delete_sizes where rows > 0")
            .fetch_one(&app.db.pool)
            .await?;
    assert!(
        statements >= 25,
        "the trim ran in chunks: {statements} deletes"
    );
    assert!(
        largest <= Some(1000),
        "no DELETE touched more than TRIM_CHUNK rows: {largest:?}"
    );
    let status = worker.terminate(Duration::from_secs(30)).await?;
    assert!(status.success(), "worker exits 0 on SIGTERM, got {status}");
    app.stop().await
}

#[tokio::test]
async fn two_trims_never_delete_at_once_the_queue_declares_one_at_a_time() -> anyhow::Result<()> {
    let mut app = TestApp::spawn().await?;
    // Each trim's delete takes a second.
    sqlx::raw_sql(
        "create function slow_trim() returns trigger language plpgsql as $$
         begin perform pg_sleep(1); return null; end $$;
         create trigger slow_trim before delete on visits
             for each statement execute function slow_trim();
         insert into visits (visitor, created_at) values ('old', now() - interval '1 hour');",
    )
    .execute(&app.db.pool)
    .await?;
    // Two trims, due at once (no coalescing: each is a job of its own).
    let mut tx = app.db.pool.begin().await?;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let id = durable_jobs::enqueue_with(
            &mut tx,
            &TrimVisits {
                older_than: Utc::now(),
            },
            durable_jobs::Enqueue::new(),
        )
        .await?;
        ids.push(id.to_string());
        sqlx::query("update apalis.jobs set unique_key = null where id = $1")
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    app.start_worker(); // 4 slots: only the limit keeps them apart
    for id in &ids {
        app.db
            .wait_for_status(id, "Done", Duration::from_secs(30))
            .await?;
    }
    let runs: Vec<(chrono::DateTime<Utc>, chrono::DateTime<Utc>)> = sqlx::query_as(
        "select lock_at, done_at from apalis.jobs where id = any($1) order by lock_at",
    )
    .bind(&ids)
    .fetch_all(&app.db.pool)
    .await?;
    println!("two trims: {runs:?}");
    assert!(
        runs[0].1 <= runs[1].0,
        "the second started after the first ended: {runs:?}"
    );
    let controls = durable_jobs::admin::queue_controls_of(&app.db.pool, "trim_visits").await?;
    assert_eq!(
        controls.declared,
        durable_jobs::Limits::none().concurrency(1)
    );
    app.stop().await
}
