//! The worker process of the engine's own tests (jobs/engine/tests/engine):
//! their job types, the engine's settings from the environment (the same
//! flags and variables as VisitMe's `worker`), until SIGTERM. A test
//! fixture, not an example to follow.

use clap::Parser as _;
use durable_jobs::WorkerConfig;
use sqlx::postgres::PgPoolOptions;

#[path = "../tests/engine/jobs.rs"]
mod jobs;

/// Runs the tests' registry on `DATABASE_URL`.
#[derive(Debug, clap::Parser)]
struct Args {
    /// The test's database.
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    #[command(flatten)]
    worker: WorkerConfig,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let registry = jobs::registry();
    let pool = PgPoolOptions::new()
        .max_connections(args.worker.connections_needed())
        .connect(&args.database_url)
        .await?;
    jobs::create_runs_table(&pool).await?;
    jobs::create_rows_table(&pool).await?;
    let shutdown = durable_jobs::shutdown::on_signal();
    durable_jobs::Worker::new(pool.clone(), registry, pool)
        .config(args.worker)
        .run(shutdown)
        .await?;
    Ok(())
}
