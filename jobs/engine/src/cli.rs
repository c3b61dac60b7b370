//! The operator's command line, for any app's worker binary (feature
//! `cli`): flatten [`Command`] into its clap parser as an optional
//! subcommand and hand it to [`answer`], and parse its settings with
//! [`parse`], which refuses a wrong value in one line (exit 2).
//!
//! ```ignore
//! #[derive(clap::Parser)]
//! struct Cli {
//!     #[command(flatten)]
//!     worker: durable_jobs::WorkerConfig,
//!     #[command(subcommand)]
//!     command: Option<durable_jobs::cli::Command>,
//! }
//! let cli: Cli = durable_jobs::cli::parse("my-worker");
//! if let Some(command) = cli.command {
//!     durable_jobs::cli::answer(&pool, command, cli.worker.retention()).await?;
//! }
//! ```

use clap::{CommandFactory, FromArgMatches, error::ContextKind, error::ErrorKind};
use sqlx::PgPool;

use crate::{
    admin::{self, Retention},
    error::Error,
    limits::{Limits, Rate},
};

/// The exit code of a refused setting (clap's own for usage errors).
const CONFIG_EXIT_CODE: i32 = 2;

/// Parses the command line and the environment into `T`. `--help` and
/// `--version` print and exit 0; anything else clap refuses is one line on
/// stderr, `<binary>: …`, and exit 2.
pub fn parse<T: CommandFactory + FromArgMatches>(binary: &str) -> T {
    let mut command = T::command();
    let parsed = command
        .try_get_matches_from_mut(std::env::args_os())
        .and_then(|mut matches| T::from_arg_matches_mut(&mut matches));
    match parsed {
        Ok(parsed) => parsed,
        Err(error) => match error.kind() {
            ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => error.exit(),
            _ => refuse(binary, &describe(&command, &error)),
        },
    }
}

/// Prints `<binary>: <message>` on stderr and exits 2.
pub fn refuse(binary: &str, message: &str) -> ! {
    eprintln!("{binary}: {}", message.replace('\n', " "));
    std::process::exit(CONFIG_EXIT_CODE)
}

/// One line for a clap error: for a bad value, the setting's variable and
/// flag, the value (unless the setting hides it: secrets) and the rule.
fn describe(command: &clap::Command, error: &clap::Error) -> String {
    let flag = match error.get(ContextKind::InvalidArg) {
        Some(clap::error::ContextValue::String(flag)) => Some(flag.clone()),
        _ => None,
    };
    let value = match error.get(ContextKind::InvalidValue) {
        Some(clap::error::ContextValue::String(value)) => Some(value.clone()),
        _ => None,
    };
    let arg = flag.as_deref().and_then(|flag| {
        let long = flag.trim_start_matches('-').split([' ', '=']).next()?;
        command
            .get_arguments()
            .find(|arg| arg.get_long() == Some(long))
    });
    let rule = match std::error::Error::source(error) {
        Some(source) => source.to_string(),
        None => first_line(error),
    };
    match (arg, value) {
        (Some(arg), Some(value)) if error.kind() == ErrorKind::ValueValidation => {
            let long = arg.get_long().unwrap_or_default();
            let name = arg.get_env().map_or_else(
                || format!("--{long}"),
                |env| env.to_string_lossy().into_owned(),
            );
            let shown = if arg.is_hide_env_values_set() {
                "(hidden)".to_owned()
            } else {
                format!("{value:?}")
            };
            format!("invalid {name}={shown} (--{long}): {rule}")
        }
        _ => first_line(error),
    }
}

/// The first line of clap's own message, without its `error: ` prefix.
fn first_line(error: &clap::Error) -> String {
    let rendered = error.render().to_string();
    let line = rendered.lines().next().unwrap_or_default();
    format!(
        "{} (see --help)",
        line.strip_prefix("error: ").unwrap_or(line)
    )
}

/// Operator commands (they do not run jobs).
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
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
        /// The job id (a ULID, as the `dead` command shows).
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
    /// A queue's flow control, on every worker at once: pause, resume,
    /// limits, purge.
    #[command(subcommand)]
    Queue(QueueCommand),
}

/// `queue ...`: what operators change about a queue without a deploy.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum QueueCommand {
    /// Start nothing more from the queue (jobs already running finish).
    Pause {
        /// The queue (a job type's name, as `status` lists it).
        queue: String,
    },
    /// Start the queue's jobs again.
    Resume {
        /// The queue.
        queue: String,
    },
    /// Without options: the limits in force and the declared ones. With
    /// options: replace the declared limits with these (any not given is
    /// lifted) until `--reset`.
    Limits {
        /// The queue.
        queue: String,
        /// At most this many claimed or running at once, across every worker.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        concurrency: Option<u32>,
        /// At most this many starts per second (a token bucket).
        #[arg(long)]
        rate: Option<f64>,
        /// With --rate: the most starts at once after a quiet spell.
        #[arg(long, requires = "rate", value_parser = clap::value_parser!(u32).range(1..))]
        burst: Option<u32>,
        /// At most this many claimed or running per concurrency key.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        key_concurrency: Option<u32>,
        /// Back to the limits the job type declares.
        #[arg(long, conflicts_with_all = ["concurrency", "rate", "burst", "key_concurrency"])]
        reset: bool,
    },
    /// End every waiting job of the queue (due, scheduled or retrying; not
    /// running ones) as dead: "purged by an operator".
    Purge {
        /// The queue.
        queue: String,
    },
}

/// Text from the database for a terminal: a job's error (or a hand-written
/// row) may hold control characters, e.g. escape sequences that rewrite the
/// screen, so everything not printable is shown escaped (`\u{1b}`, `\n`).
pub fn printable(text: &str) -> String {
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

/// Runs one operator command and prints its result to stdout (its answer
/// alone: scripts read it). `retention` is what `prune` keeps.
pub async fn answer(pool: &PgPool, command: Command, retention: Retention) -> Result<(), Error> {
    match command {
        Command::Status => {
            let counts = admin::queue_status(pool).await?;
            if counts.is_empty() {
                println!("the queue is empty");
            }
            println!("{:<16} {:<10} {:>8}  NEXT DUE", "QUEUE", "STATE", "JOBS");
            let now = chrono::Utc::now();
            for row in counts {
                let (queue, state) = (printable(&row.queue), row.state.as_str());
                // Sleeping and waiting jobs are due when they wake (a wait
                // at its timeout, or at once when its signal arrives).
                let next = row
                    .next_due
                    .map(|at| {
                        format!(
                            "  {} ({})",
                            at.format("%Y-%m-%d %H:%M:%S UTC"),
                            due_in(at - now)
                        )
                    })
                    .unwrap_or_default();
                println!("{queue:<16} {state:<10} {:>8}{next}", row.count);
            }
            print_schedules(&admin::schedules(pool).await?);
            print_controls(&admin::queue_controls(pool).await?);
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
            let pruned = admin::prune(pool, retention).await?;
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
                return Err(Error::NoSuchWorkflow(printable(&id)));
            };
            print!("{}", render_workflow(&workflow));
        }
        Command::Queue(command) => answer_queue(pool, command).await?,
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

async fn answer_queue(pool: &PgPool, command: QueueCommand) -> Result<(), Error> {
    match command {
        QueueCommand::Pause { queue } => {
            admin::pause(pool, &queue).await?;
            println!(
                "queue {} paused: it starts nothing until resumed",
                printable(&queue)
            );
        }
        QueueCommand::Resume { queue } => {
            admin::resume(pool, &queue).await?;
            println!("queue {} resumed", printable(&queue));
        }
        QueueCommand::Purge { queue } => {
            let purged = admin::purge(pool, &queue).await?;
            println!("queue {}: {purged} waiting jobs purged", printable(&queue));
        }
        QueueCommand::Limits {
            queue,
            concurrency,
            rate,
            burst,
            key_concurrency,
            reset,
        } => {
            if reset {
                admin::reset_limits(pool, &queue).await?;
            } else if concurrency.is_some() || rate.is_some() || key_concurrency.is_some() {
                let mut limits = Limits::none();
                if let Some(n) = concurrency {
                    limits = limits.concurrency(n);
                }
                if let Some(per_second) = rate {
                    let mut rate = Rate::per_second(per_second);
                    if let Some(burst) = burst {
                        rate = rate.burst(burst);
                    }
                    limits = limits.rate(rate);
                }
                if let Some(n) = key_concurrency {
                    limits = limits.key_concurrency(n);
                }
                admin::set_limits(pool, &queue, limits).await?;
            }
            let controls = admin::queue_controls_of(pool, &queue).await?;
            println!(
                "queue {}{}: in force {}{}; declared {}",
                printable(&queue),
                if controls.paused { " (paused)" } else { "" },
                controls.in_force,
                if controls.overridden {
                    " (set by an operator)"
                } else {
                    ""
                },
                controls.declared,
            );
        }
    }
    Ok(())
}

/// `status`'s lines for the queues with controls.
fn print_controls(controls: &[admin::QueueControls]) {
    if controls.is_empty() {
        return;
    }
    println!();
    println!("{:<24} {:<8} LIMITS IN FORCE", "QUEUE", "PAUSED");
    for control in controls {
        println!(
            "{:<24} {:<8} {}{}",
            printable(&control.queue),
            if control.paused { "yes" } else { "no" },
            control.in_force,
            if control.overridden {
                " (set by an operator)"
            } else {
                ""
            }
        );
    }
}

/// The `workflow <id>` command: a header, then one block per step.
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

/// The schedules part of the `status` command (nothing before a worker first
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
            (Some(_), Some(state)) => state.as_str().to_owned(),
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

/// `in 4m 10s`, `in 2h 5m`, `now` (due or past).
fn due_in(left: chrono::TimeDelta) -> String {
    let seconds = left.num_seconds();
    if seconds <= 0 {
        return "now".to_owned();
    }
    let (d, h, m, s) = (
        seconds / 86_400,
        seconds / 3600 % 24,
        seconds / 60 % 60,
        seconds % 60,
    );
    match (d, h, m) {
        (0, 0, 0) => format!("in {s}s"),
        (0, 0, _) => format!("in {m}m {s}s"),
        (0, _, _) => format!("in {h}h {m}m"),
        _ => format!("in {d}d {h}h"),
    }
}

#[cfg(test)]
mod due_in_tests {
    use super::due_in;
    use chrono::TimeDelta;

    #[test]
    fn due_times_read_in_the_two_largest_units() {
        assert_eq!(due_in(TimeDelta::seconds(-3)), "now");
        assert_eq!(due_in(TimeDelta::seconds(5)), "in 5s");
        assert_eq!(due_in(TimeDelta::seconds(250)), "in 4m 10s");
        assert_eq!(due_in(TimeDelta::seconds(7500)), "in 2h 5m");
        assert_eq!(due_in(TimeDelta::seconds(90_000)), "in 1d 1h");
    }
}
