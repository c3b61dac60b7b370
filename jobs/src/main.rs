//! The `worker` binary: migrates the database, then runs VisitMe's background
//! jobs until SIGTERM or SIGINT; its subcommands operate the queue.

use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use jobs::{WorkerConfig, admin};
use migrations::PoolSettings;
use sqlx::PgPool;

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

/// Operator commands (they do not run jobs).
#[derive(Debug, Subcommand)]
enum Command {
    /// Show how many jobs each queue has in each state, and the periodic
    /// jobs' schedules with their last and next run.
    Status,
    /// List dead jobs (out of attempts, killed, or cancelled) with their last error.
    Dead {
        /// How many to list, newest first.
        #[arg(long, default_value_t = 20)]
        limit: i64,
    },
    /// Put a dead job back in the queue with fresh attempts.
    Retry {
        /// The job id (a ULID, as `worker dead` shows).
        id: String,
    },
    /// Cancel a job that has not started yet; it ends dead.
    Cancel {
        /// The job id (a ULID).
        id: String,
    },
    /// Delete finished jobs older than the retention settings now.
    Prune,
    /// Without an id: the newest workflows. With one: its steps, their
    /// dependencies, states, attempts, timings, and results or errors.
    Workflow {
        /// The workflow id (a ULID).
        id: Option<String>,
        /// How many workflows to list, newest first (without an id).
        #[arg(long, default_value_t = 20)]
        limit: i64,
    },
    /// Cancel a workflow: steps not started are cancelled, running ones are
    /// asked to stop and are not retried.
    CancelWorkflow {
        /// The workflow id (a ULID).
        id: String,
    },
}

fn main() -> std::process::ExitCode {
    let mut cli: Cli = jobs::cli::parse("worker");
    if let Err(err) = cli.worker.check() {
        jobs::cli::refuse("worker", &err.to_string());
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
    let result = answer(&pool, command, &cli.worker).await;
    pool.close().await;
    result
}

/// Text from the database for a terminal: a job's error (or a hand-written
/// row) may hold control characters, e.g. escape sequences that rewrite the
/// screen, so everything not printable is shown escaped (`\u{1b}`, `\n`).
fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            // Printable, but `escape_debug` would add a backslash.
            '"' | '\'' | '\\' => out.push(c),
            _ => out.extend(c.escape_debug()),
        }
    }
    out
}

/// Prints one operator command's result to stdout.
async fn answer(pool: &PgPool, command: Command, config: &WorkerConfig) -> anyhow::Result<()> {
    match command {
        Command::Status => {
            let counts = admin::queue_status(pool).await?;
            if counts.is_empty() {
                println!("the queue is empty");
            }
            println!("{:<16} {:<10} {:>8}", "QUEUE", "STATE", "JOBS");
            for row in counts {
                let (queue, state) = (printable(&row.queue), printable(&row.state));
                println!("{queue:<16} {state:<10} {:>8}", row.count);
            }
            print_schedules(&admin::schedules(pool).await?);
        }
        Command::Dead { limit } => {
            let dead = admin::dead_jobs(pool, limit).await?;
            if dead.is_empty() {
                println!("no dead jobs");
            }
            for job in dead {
                let died = job
                    .died_at
                    .map(|t| t.to_rfc3339())
                    .unwrap_or_else(|| "-".to_owned());
                println!(
                    "{}  {}  attempts={}  died={died}\n    {}",
                    printable(&job.id),
                    printable(&job.queue),
                    job.attempts,
                    job.last_error
                        .as_deref()
                        .map_or_else(|| "(no error recorded)".to_owned(), printable)
                );
            }
        }
        Command::Retry { id } => {
            admin::retry(pool, &id).await?;
            println!("job {} is pending again", printable(&id));
        }
        Command::Cancel { id } => {
            admin::cancel(pool, &id).await?;
            println!("job {} cancelled", printable(&id));
        }
        Command::Prune => {
            let pruned = admin::prune(pool, config.retention()).await?;
            println!(
                "pruned {} done and {} dead jobs, {} finished workflows, {} stale workers",
                pruned.done, pruned.dead, pruned.workflows, pruned.workers
            );
        }
        Command::Workflow { id: None, limit } => {
            let workflows = admin::latest_workflows(pool, limit).await?;
            if workflows.is_empty() {
                println!("no workflows");
                return Ok(());
            }
            println!(
                "{:<26} {:<20} {:>6} {:>6} {:>6} {:>6}  CREATED",
                "WORKFLOW", "NAME", "STEPS", "DONE", "FAILED", "OPEN"
            );
            for w in workflows {
                let cancelled = if w.cancel_requested_at.is_some() {
                    "  (cancelled)"
                } else {
                    ""
                };
                println!(
                    "{:<26} {:<20} {:>6} {:>6} {:>6} {:>6}  {}{cancelled}",
                    printable(&w.id),
                    printable(&w.name),
                    w.steps,
                    w.done,
                    w.failed,
                    w.open,
                    w.created_at
                        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                );
            }
        }
        Command::Workflow { id: Some(id), .. } => {
            let Some(workflow) = admin::workflow(pool, &id).await? else {
                anyhow::bail!("no workflow with id {}", printable(&id));
            };
            print!("{}", render_workflow(&workflow));
        }
        Command::CancelWorkflow { id } => {
            let cancelled = admin::cancel_workflow(pool, &id).await?;
            println!(
                "workflow {}: {} steps cancelled, {} running asked to stop",
                printable(&id),
                cancelled.cancelled,
                cancelled.running
            );
        }
    }
    Ok(())
}

/// `worker workflow <id>`: a header, then one block per step.
fn render_workflow(workflow: &admin::WorkflowView) -> String {
    use std::fmt::Write as _;
    let time = |t: Option<chrono::DateTime<chrono::Utc>>| {
        t.map_or_else(
            || "-".to_owned(),
            |t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        )
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "workflow {} ({}): {}, {} steps, created {}",
        printable(&workflow.id),
        printable(&workflow.name),
        workflow.state(),
        workflow.steps.len(),
        time(Some(workflow.created_at))
    );
    for step in &workflow.steps {
        let after = if step.depends_on.is_empty() {
            String::new()
        } else {
            let anyway = if step.on_dependency_failure == "run" {
                ", run anyway"
            } else {
                ""
            };
            format!("  after {}{anyway}", printable(&step.depends_on.join(", ")))
        };
        let _ = writeln!(
            out,
            "  {:<24} {:<10} {}/{} attempts  {}  job {}{after}",
            printable(&step.name),
            step.state,
            step.attempts,
            step.max_attempts,
            printable(&step.job_type),
            printable(&step.job_id),
        );
        let _ = writeln!(
            out,
            "      added {}  released {}  started {}  finished {}",
            time(Some(step.added_at)),
            time(step.released_at),
            time(step.started_at),
            time(step.finished_at)
        );
        if let Some(error) = &step.error {
            let _ = writeln!(out, "      error: {}", printable(error));
        } else if let Some(result) = &step.result {
            let mut text = result.to_string();
            if text.len() > 200 {
                let cut = (0..=200)
                    .rev()
                    .find(|&i| text.is_char_boundary(i))
                    .unwrap_or(0);
                text.truncate(cut);
                text.push_str("...");
            }
            let _ = writeln!(out, "      result: {}", printable(&text));
        }
    }
    out
}

/// The schedules part of `worker status` (nothing before a worker first
/// kept one): each with its newest tick that got a job, that job's state,
/// and the next tick ("overdue" a minute past it: no worker keeps it).
fn print_schedules(schedules: &[admin::ScheduleStatus]) {
    if schedules.is_empty() {
        return;
    }
    let time = |at: Option<chrono::DateTime<chrono::Utc>>| {
        at.map_or_else(
            || "-".to_owned(),
            |at| at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        )
    };
    println!();
    println!(
        "{:<16} {:<16} {:<9} {:<21} {:<9} NEXT RUN",
        "SCHEDULE", "CRON", "CATCH-UP", "LAST RUN", "STATE"
    );
    let overdue_before = chrono::Utc::now() - chrono::TimeDelta::minutes(1);
    for schedule in schedules {
        let state = match (&schedule.last_job_id, &schedule.last_job_state) {
            (None, _) => "-".to_owned(),
            (Some(_), None) => "pruned".to_owned(),
            (Some(_), Some(state)) => printable(state),
        };
        let overdue = if schedule.next_tick.is_some_and(|next| next < overdue_before) {
            " (overdue)"
        } else {
            ""
        };
        println!(
            "{:<16} {:<16} {:<9} {:<21} {state:<9} {}{overdue}",
            printable(&schedule.queue),
            printable(&schedule.expression),
            printable(&schedule.catch_up),
            time(schedule.last_tick),
            time(schedule.next_tick),
        );
    }
}
