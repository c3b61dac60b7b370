//! Schema setup: idempotent, and safe from several processes at once.

use std::time::Duration;

use tests::{Process, TestDb};

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
