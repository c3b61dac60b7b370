//! The `worker` binary: migrates the database, then runs VisitMe's background
//! jobs until SIGTERM or SIGINT.

use anyhow::Context as _;
use clap::Parser;
use jobs::WorkerConfig;
use migrations::PoolSettings;

/// Runs VisitMe's background jobs (trimming old visits) from the Postgres queue.
///
/// Start as many as you like, on any machine that reaches the database: they
/// share the queue, and a crashed worker's jobs are taken over by another once
/// its lease expires. SIGTERM/SIGINT stop it gracefully: no new jobs are
/// claimed, running ones finish (up to the shutdown grace), and the process
/// exits 0. It exits 1 if the worker keeps dying on its own.
#[derive(Debug, Parser)]
#[command(name = "worker", version)]
struct Cli {
    /// Postgres URL; the database is created if missing and migrated at start.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://localhost/visitme",
        hide_env_values = true
    )]
    database_url: String,

    #[command(flatten)]
    worker: WorkerConfig,

    #[command(flatten)]
    telemetry: observability::Config,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _telemetry = observability::init("visitme-worker", &cli.telemetry)?;
    let shutdown = jobs::shutdown::on_signal();

    let pool_settings = PoolSettings {
        // One connection per running job, plus LISTEN, heartbeat and acks.
        max_connections: u32::from(cli.worker.concurrency) + 3,
        acquire_timeout: std::time::Duration::from_secs(30),
        ..PoolSettings::default()
    };
    let pool = tokio::select! {
        pool = migrations::connect(&cli.database_url, &pool_settings) => pool.context("cannot connect to the database")?,
        () = shutdown.cancelled() => return Ok(()),
    };
    migrations::run(&pool)
        .await
        .context("cannot migrate the database")?;

    jobs::run(pool.clone(), cli.worker, shutdown).await?;
    pool.close().await;
    Ok(())
}
