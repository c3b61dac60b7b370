//! The `worker` binary: migrates the database, then runs VisitMe's background
//! jobs until SIGTERM or SIGINT; its subcommands operate the queue.

use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use durable_jobs::cli::{Command, printable};
use jobs::WorkerConfig;
use migrations::PoolSettings;

/// Runs VisitMe's background jobs (trimming old visits) from the Postgres queue.
///
/// Start as many as you like, on any machine that reaches the database: they
/// share the queue, and a crashed worker's jobs are taken over by another once
/// its lease expires. Failed attempts are retried with exponential backoff
/// until the job's max attempts, then the job is dead (see `worker dead`).
/// SIGTERM/SIGINT stop it gracefully: no new jobs are claimed, running ones
/// finish (up to the shutdown grace), and the process exits 0. It exits 1 if
/// the worker keeps dying on its own.
#[derive(Debug, Parser)]
#[command(name = "worker", version)]
struct Cli {
    /// Postgres URL; the database is created if missing and migrated at start.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://localhost/visitme",
        hide_env_values = true,
        global = true
    )]
    database_url: String,

    /// Serve Prometheus metrics (jobs run, failed, retried, dead, durations)
    /// at http://<address>/metrics, e.g. `0.0.0.0:9100`; off when unset.
    #[arg(long, env = "METRICS_BIND")]
    metrics_bind: Option<std::net::SocketAddr>,

    #[command(flatten)]
    worker: WorkerConfig,

    #[command(flatten)]
    jobs: jobs::JobSettings,

    #[command(flatten)]
    telemetry: observability::Config,

    /// Without a command: run jobs until stopped.
    #[command(subcommand)]
    command: Option<Command>,
}

fn main() -> std::process::ExitCode {
    let mut cli: Cli = durable_jobs::cli::parse("worker");
    if let Err(err) = cli.worker.check() {
        durable_jobs::cli::refuse("worker", &err.to_string());
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => return observability::exit_code("worker", Err(anyhow::Error::from(err))),
    };
    let Some(command) = cli.command.take() else {
        return observability::exit_code("worker", runtime.block_on(run(cli)));
    };
    // An operator command's output is its answer alone, for people and
    // scripts: no telemetry (so no start-up or migration log lines), and an
    // error once, on stderr.
    match runtime.block_on(operate(&cli, command)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("worker: {}", printable(&observability::one_line(&*err)));
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs jobs until SIGTERM or SIGINT.
async fn run(cli: Cli) -> anyhow::Result<()> {
    let _telemetry = observability::init("visitme-worker", &cli.telemetry)?;
    let shutdown = jobs::shutdown::on_signal();
    if let Some(address) = cli.metrics_bind {
        observability::metrics::serve(address)
            .with_context(|| format!("cannot serve metrics on {address}"))?;
        tracing::info!(%address, "metrics at http://{address}/metrics");
    }

    let pool_settings = PoolSettings {
        max_connections: cli.worker.connections_needed(),
        // Patient: a short database blip must not fail heartbeats.
        acquire_timeout: Duration::from_secs(30),
        ..PoolSettings::default()
    };
    let pool = tokio::select! {
        pool = migrations::connect(&cli.database_url, &pool_settings) => pool.context("cannot connect to the database")?,
        () = shutdown.cancelled() => return Ok(()),
    };
    migrations::run(&pool)
        .await
        .context("cannot migrate the database")?;

    jobs::run(pool.clone(), cli.worker, cli.jobs, shutdown).await?;
    jobs::shutdown::close_pool(&pool).await;
    Ok(())
}

/// Connects, migrates (as the worker would), runs one operator command.
async fn operate(cli: &Cli, command: Command) -> anyhow::Result<()> {
    let pool = migrations::connect(&cli.database_url, &PoolSettings::default())
        .await
        .context("cannot connect to the database")?;
    migrations::run(&pool)
        .await
        .context("cannot migrate the database")?;
    let result = durable_jobs::cli::answer(&pool, command, cli.worker.retention()).await;
    pool.close().await;
    Ok(result?)
}
