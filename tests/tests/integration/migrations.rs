//! Schema setup: idempotent, and safe from several processes at once.

use std::time::Duration;

use jobs::probe::{Behaviour, Probe};
use tests::{Process, TestApp, TestDb, enqueue_probes};

#[tokio::test]
async fn migrations_run_twice_without_error() -> anyhow::Result<()> {
    let db = TestDb::empty().await?;
    assert!(!migrations::is_up_to_date(&db.pool).await?);
    migrations::run(&db.pool).await?;
    migrations::run(&db.pool).await?;
    assert!(migrations::is_up_to_date(&db.pool).await?);
    Ok(())
}

#[tokio::test]
async fn migrations_run_concurrently_in_one_process() -> anyhow::Result<()> {
    let db = TestDb::empty().await?;
    let (a, b, c) = tokio::join!(
        migrations::run(&db.pool),
        migrations::run(&db.pool),
        migrations::run(&db.pool)
    );
    a?;
    b?;
    c?;
    assert!(migrations::is_up_to_date(&db.pool).await?);
    Ok(())
}

#[tokio::test]
async fn two_processes_create_and_migrate_a_missing_database_at_once() -> anyhow::Result<()> {
    tests::budget::runs_processes(2);
    let db = TestDb::empty().await?;
    // A database that does not exist yet: both processes race to create and migrate it.
    let url = db.sibling_url("second");
    let env = [("DATABASE_URL", url.as_str())];
    let mut first = Process::spawn("worker", &env)?;
    let mut second = Process::spawn("worker", &env)?;
    first
        .wait_for_line("worker started", Duration::from_secs(60))
        .await?;
    second
        .wait_for_line("worker started", Duration::from_secs(60))
        .await?;
    for process in [first, second] {
        let status = process.terminate(Duration::from_secs(30)).await?;
        assert!(status.success(), "exit {status}");
    }
    let pool = sqlx::PgPool::connect_with(migrations::parse_url(&url)?).await?;
    assert!(migrations::is_up_to_date(&pool).await?);
    pool.close().await;
    Ok(())
}

#[tokio::test]
async fn claims_go_through_our_plan_caching_get_jobs() -> anyhow::Result<()> {
    let mut app = TestApp::spawn().await?;
    // Count calls of PL/pgSQL functions in every new session on this database
    // (the worker's pools are opened after this). `pl` does not count
    // LANGUAGE sql functions, so apalis's own get_jobs would show no calls.
    sqlx::raw_sql(
        "do $$ begin
           execute format('alter database %I set track_functions = %L', current_database(), 'pl');
         end $$",
    )
    .execute(&app.db.pool)
    .await?;
    app.start_worker();
    enqueue_probes(
        &app.db.pool,
        (0..5).map(|n| Probe {
            key: format!("claimed-{n}"),
            behaviour: Behaviour::Succeed,
        }),
    )
    .await?;
    app.db.drain_queue(Duration::from_secs(30)).await?;
    let ran: i64 = sqlx::query_scalar("select count(distinct probe) from job_probe_runs")
        .fetch_one(&app.db.pool)
        .await?;
    assert_eq!(ran, 5, "the worker claimed and ran every job");

    // Sessions report their counts when idle (at most once a second).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let calls = loop {
        let calls: Option<i64> = sqlx::query_scalar(
            "select calls from pg_stat_user_functions
             where schemaname = 'apalis' and funcname = 'get_jobs'",
        )
        .fetch_optional(&app.db.pool)
        .await?;
        if let Some(calls @ 1..) = calls {
            break calls;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the worker's claims never called the PL/pgSQL apalis.get_jobs (calls: {calls:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!("apalis.get_jobs (PL/pgSQL) called {calls} times for 5 jobs");
    app.stop().await
}

#[tokio::test]
async fn worker_bookkeeping_connections_carry_their_session_settings() -> anyhow::Result<()> {
    let db = TestDb::migrated().await?;
    let settings = |pool: sqlx::PgPool| async move {
        let row: (String, String) = sqlx::query_as(
            "select current_setting('synchronous_commit'), current_setting('plan_cache_mode')",
        )
        .fetch_one(&pool)
        .await?;
        anyhow::Ok(row)
    };
    let default = jobs::WorkerConfig::default();
    assert_eq!(
        settings(durable_jobs::internals::bookkeeping_pool(
            &default, &db.pool
        ))
        .await?,
        ("off".to_owned(), "force_generic_plan".to_owned())
    );
    let sync = jobs::WorkerConfig {
        sync_bookkeeping: true,
        ..default
    };
    assert_eq!(
        settings(durable_jobs::internals::bookkeeping_pool(&sync, &db.pool)).await?,
        ("on".to_owned(), "force_generic_plan".to_owned())
    );
    // The pool handed in (enqueues, the jobs' own writes) stays synchronous.
    assert_eq!(settings(db.pool.clone()).await?.0, "on");
    Ok(())
}

#[tokio::test]
async fn the_jobs_table_has_no_duplicate_indexes() -> anyhow::Result<()> {
    let db = TestDb::migrated().await?;
    // Same definition but for the name: every job write would pay for both.
    let duplicates: Vec<String> = sqlx::query_scalar(
        r"select string_agg(indexname, ' = ' order by indexname)
          from pg_indexes where schemaname = 'apalis' and tablename = 'jobs'
          group by regexp_replace(indexdef, 'INDEX \S+ ON', 'INDEX ON')
          having count(*) > 1",
    )
    .fetch_all(&db.pool)
    .await?;
    assert!(duplicates.is_empty(), "duplicate indexes: {duplicates:?}");
    Ok(())
}

#[tokio::test]
async fn a_database_migrated_before_the_engines_first_migration_was_reworded_still_migrates()
-> anyhow::Result<()> {
    let db = TestDb::migrated().await?;
    // As a build before the rewording recorded it (the SHA-384 of its first text).
    sqlx::query(
        "update apalis._durable_jobs_migrations
         set checksum = decode('bc054e1e79fff09d6c0171ec3bc13cc137e629fbbda6f2f5f026272b04ebdcb515659b04ff7414a8bf8b1a6a476762ed', 'hex')
         where version = 20261201000001",
    )
    .execute(&db.pool)
    .await?;
    // And with the index that step used to drop, which VisitMe's own migration now drops.
    sqlx::query("delete from _sqlx_migrations where version = 20261203000010")
        .execute(&db.pool)
        .await?;
    sqlx::query(
        "create unique index jobs_one_pending_trim_visits on apalis.jobs (job_type)
         where job_type = 'trim_visits' and status = 'Pending'",
    )
    .execute(&db.pool)
    .await?;
    migrations::run(&db.pool).await?;
    let left: Option<String> =
        sqlx::query_scalar("select to_regclass('apalis.jobs_one_pending_trim_visits')::text")
            .fetch_one(&db.pool)
            .await?;
    assert_eq!(left, None, "the old index is gone");
    migrations::run(&db.pool).await?;
    Ok(())
}
