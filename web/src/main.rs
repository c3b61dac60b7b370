//! The `web` binary: migrates the database, serves the VisitMe page, and (by
//! default) runs a job worker in the same process.

use std::time::Duration;

use anyhow::Context as _;
use migrations::PoolSettings;
use tokio::net::TcpListener;
use web::{AppState, Config};

fn main() -> std::process::ExitCode {
    let result = tokio::runtime::Runtime::new()
        .map_err(anyhow::Error::from)
        .and_then(|runtime| runtime.block_on(run()));
    observability::exit_code("web", result)
}

/// How long `web` waits before starting an embedded worker that gave up again.
const EMBEDDED_RESTART_PAUSE: Duration = Duration::from_secs(30);

async fn run() -> anyhow::Result<()> {
    // A setting that is wrong: one line naming it, exit 2, before anything else.
    let config: Config = durable_jobs::cli::parse("web");
    if let Err(err) = config.check() {
        durable_jobs::cli::refuse("web", &err.to_string());
    }
    let _telemetry = observability::init("visitme-web", &config.telemetry)?;
    let shutdown = jobs::shutdown::on_signal();

    // Bind first, so a port in use is reported at once, before any waiting on the database.
    let listener = TcpListener::bind(config.bind)
        .await
        .with_context(|| format!("cannot listen on {}", config.bind))?;
    let address = listener.local_addr()?;
    let metrics_listener = match config.metrics_bind {
        Some(bind) => Some(
            TcpListener::bind(bind)
                .await
                .with_context(|| format!("cannot listen on {bind} (METRICS_BIND)"))?,
        ),
        None => None,
    };

    let request_pool = PoolSettings::default();
    let pool = tokio::select! {
        pool = migrations::connect(&config.database_url, &request_pool) => pool.context("cannot connect to the database")?,
        () = shutdown.cancelled() => return Ok(()),
    };
    migrations::run(&pool)
        .await
        .context("cannot migrate the database")?;

    let health = jobs::Health::default();
    let worker = if config.embedded_worker {
        // Its own pool with a patient acquire timeout: a short database blip
        // must not fail heartbeats, while requests should fail fast.
        let worker_pool = PoolSettings {
            max_connections: config.worker.connections_needed(),
            acquire_timeout: Duration::from_secs(30),
            ..PoolSettings::default()
        };
        let worker_pool = migrations::connect(&config.database_url, &worker_pool).await?;
        let token = shutdown.clone();
        let worker_config = config.worker.clone();
        let job_settings = config.jobs;
        let health = health.clone();
        Some(tokio::spawn(async move {
            // The page does not need the worker: whatever happens to it, web
            // keeps serving, reports it on /readyz and starts it again.
            loop {
                let run = jobs::run_reporting(
                    worker_pool.clone(),
                    worker_config.clone(),
                    job_settings,
                    token.clone(),
                    &health,
                );
                let Err(err) = run.await else { return };
                health.set(jobs::WorkerState::Restarting);
                tracing::error!(error = %err, "embedded worker gave up; web keeps serving and starts it again in {EMBEDDED_RESTART_PAUSE:?}");
                tokio::select! {
                    () = tokio::time::sleep(EMBEDDED_RESTART_PAUSE) => {}
                    () = token.cancelled() => return,
                }
            }
        }))
    } else {
        tracing::info!("embedded worker off (EMBEDDED_WORKER=false): run `worker` processes");
        None
    };

    let mut state = AppState::from_config(pool.clone(), &config)?;
    state.worker_health = config.embedded_worker.then_some(health);
    if let Some(metrics) = &metrics_listener {
        let metrics = metrics.local_addr()?;
        tracing::info!(%metrics, "metrics on http://{metrics}/metrics");
    }
    tracing::info!(%address, "VisitMe is up: open http://{address}/");
    web::serve_with(
        listener,
        metrics_listener,
        state,
        &config.http,
        shutdown.clone().cancelled_owned(),
    )
    .await?;
    shutdown.cancel();
    if let Some(worker) = worker {
        worker.await.context("worker task panicked")?;
    }
    jobs::shutdown::close_pool(&pool).await;
    tracing::info!("web stopped");
    Ok(())
}
