//! The worker's settings ([`WorkerConfig`]): flags and environment variables,
//! their defaults and ranges, and the pools they size.

use std::time::Duration;

use apalis_postgres::PgPool;

use crate::{admin::Retention, error::Error, job::Backoff, schedule::Schedule};

/// Worker settings (flags and environment variables of `worker` and `web`).
#[derive(Debug, Clone, clap::Args)]
#[group(id = "worker")]
#[command(next_help_heading = "Worker")]
pub struct WorkerConfig {
    /// Jobs this process runs at once, per job type. The default suits short
    /// jobs (throughput needs many slots, since each claim and settle is a
    /// round trip); running jobs of every type share at most 8 database
    /// connections, and one that needs a connection waits for it.
    #[arg(long, env = "WORKER_CONCURRENCY", default_value_t = defaults::CONCURRENCY, value_parser = clap::value_parser!(u16).range(1..))]
    pub concurrency: u16,
    /// Most jobs a worker claims at a time (default: the concurrency), in
    /// two claims in flight of half as many each. A claim never takes more
    /// than the free slots, so a worker holds no job it cannot start at
    /// once; a smaller cap spreads a burst over more workers.
    #[arg(long, env = "WORKER_CLAIM_BATCH", value_parser = clap::value_parser!(u16).range(1..))]
    pub claim_batch: Option<u16>,
    /// Seconds between queue polls, on top of LISTEN/NOTIFY wake-ups; picks up
    /// delayed and retried jobs, which send no notification.
    #[arg(long, env = "WORKER_POLL_INTERVAL", default_value = defaults::POLL_INTERVAL, value_parser = ranges::POLL_INTERVAL.parser())]
    pub poll_interval: Duration,
    /// Seconds after which a silent worker's jobs are handed to another worker
    /// (heartbeats run at a third of this).
    #[arg(long, env = "JOB_LEASE", default_value = defaults::LEASE, value_parser = ranges::LEASE.parser())]
    pub lease: Duration,
    /// Seconds a shutdown waits for running jobs before abandoning them (they
    /// are then recovered by another worker once the lease expires).
    #[arg(long, env = "WORKER_SHUTDOWN_GRACE", default_value = defaults::SHUTDOWN_GRACE, value_parser = ranges::SHUTDOWN_GRACE.parser())]
    pub shutdown_grace: Duration,
    /// Seconds one attempt may run before it is cancelled and counted as
    /// failed, for every job type (default: each type's own, 60 s unless it
    /// says otherwise).
    #[arg(long, env = "JOB_TIMEOUT", value_parser = ranges::JOB_TIMEOUT.parser())]
    pub job_timeout: Option<Duration>,
    /// Seconds before the first retry, for every job type; each further retry
    /// waits twice as long (±10 % jitter). Default: each type's own (1 s
    /// unless it says otherwise).
    #[arg(long, env = "JOB_BACKOFF_BASE", value_parser = ranges::BACKOFF.parser())]
    pub backoff_base: Option<Duration>,
    /// Longest wait between retries, in seconds, for every job type (default:
    /// each type's own, an hour unless it says otherwise).
    #[arg(long, env = "JOB_BACKOFF_MAX", value_parser = ranges::BACKOFF.parser())]
    pub backoff_max: Option<Duration>,
    /// Seconds a done job is kept before it is pruned.
    #[arg(long, env = "JOB_RETENTION_DONE", default_value = defaults::RETENTION_DONE, value_parser = ranges::RETENTION.parser())]
    pub retention_done: Duration,
    /// Seconds a dead job is kept (visible to operators) before it is pruned.
    #[arg(long, env = "JOB_RETENTION_DEAD", default_value = defaults::RETENTION_DEAD, value_parser = ranges::RETENTION.parser())]
    pub retention_dead: Duration,
    /// When finished jobs are pruned: the engine's periodic `prune_jobs` job,
    /// once per tick across all workers. A cron expression of six fields,
    /// seconds first, in UTC (default: every minute).
    #[arg(long, env = "JOB_PRUNE_SCHEDULE", default_value = defaults::PRUNE_SCHEDULE, value_parser = Schedule::cron)]
    pub prune_schedule: Schedule,
    /// Seconds a due job of a type that no worker of any process has
    /// registered for that long may wait before it is killed, with a reason
    /// naming the types the fleet does handle (room for rolling deploys that
    /// add job types). Other services' job types on the same database are
    /// safe while their workers heartbeat.
    #[arg(long, env = "JOB_UNKNOWN_GRACE", default_value = defaults::UNKNOWN_GRACE, value_parser = ranges::UNKNOWN_GRACE.parser())]
    pub unknown_grace: Duration,
    /// Kill jobs of types nobody handles after `JOB_UNKNOWN_GRACE`
    /// (true/false). Off: such jobs wait until some worker handles them.
    #[arg(long, env = "JOB_KILL_UNHANDLED", default_value_t = true, action = clap::ArgAction::Set)]
    pub kill_unhandled: bool,
    /// Wait for the disk flush on the queue's own bookkeeping too (claims,
    /// start and finish marks, heartbeats; true/false). By default these commit
    /// asynchronously (`synchronous_commit=off` on those connections only),
    /// which helps where a flush is slow and bookkeeping commits are many
    /// (measured: 1.4-1.7x with small claims; about even with the default
    /// concurrency's large batches, see BENCHMARKS.md): a Postgres crash
    /// may then forget the last fraction of a second of them, and the jobs
    /// concerned run again, as after a worker crash. Enqueues and the jobs'
    /// own writes always wait for the flush.
    #[arg(long, env = "WORKER_SYNC_BOOKKEEPING", default_value_t = false, action = clap::ArgAction::Set)]
    pub sync_bookkeeping: bool,
}

impl WorkerConfig {
    /// Refuses settings outside their ranges (the command line refuses them
    /// while parsing; this catches a config built in code). `run` calls it
    /// first. The message names the variable, the value and the range.
    pub fn check(&self) -> Result<(), Error> {
        let durations = [
            (
                "WORKER_POLL_INTERVAL",
                ranges::POLL_INTERVAL,
                Some(self.poll_interval),
            ),
            ("JOB_LEASE", ranges::LEASE, Some(self.lease)),
            (
                "WORKER_SHUTDOWN_GRACE",
                ranges::SHUTDOWN_GRACE,
                Some(self.shutdown_grace),
            ),
            ("JOB_TIMEOUT", ranges::JOB_TIMEOUT, self.job_timeout),
            ("JOB_BACKOFF_BASE", ranges::BACKOFF, self.backoff_base),
            ("JOB_BACKOFF_MAX", ranges::BACKOFF, self.backoff_max),
            (
                "JOB_RETENTION_DONE",
                ranges::RETENTION,
                Some(self.retention_done),
            ),
            (
                "JOB_RETENTION_DEAD",
                ranges::RETENTION,
                Some(self.retention_dead),
            ),
            (
                "JOB_UNKNOWN_GRACE",
                ranges::UNKNOWN_GRACE,
                Some(self.unknown_grace),
            ),
        ];
        for (setting, range, value) in durations {
            if let Some(value) = value {
                range.check(setting, value).map_err(Error::Config)?;
            }
        }
        if self.concurrency == 0 {
            return Err(Error::Config(
                "WORKER_CONCURRENCY=0 is out of range: it must be from 1 to 65535".to_owned(),
            ));
        }
        if self.claim_batch == Some(0) {
            return Err(Error::Config(
                "WORKER_CLAIM_BATCH=0 is out of range: it must be from 1 to 65535".to_owned(),
            ));
        }
        Ok(())
    }

    /// The retry backoff of a job type that declares `declared`.
    pub fn backoff(&self, declared: Backoff) -> Backoff {
        Backoff {
            base: self.backoff_base.unwrap_or(declared.base),
            max: self.backoff_max.unwrap_or(declared.max),
            max_doublings: declared.max_doublings,
        }
    }

    /// The retention these settings describe.
    pub fn retention(&self) -> Retention {
        Retention {
            done: self.retention_done,
            dead: self.retention_dead,
        }
    }

    /// Database connections a worker process with these settings needs in the
    /// pool it is given: one per running job (its own writes), shared by
    /// every queue and at most 8, plus three for the runtime's upkeep (lost
    /// attempts, schedules, wake-ups). Beyond that cap, a job that needs a
    /// connection waits for one (up to the pool's acquire timeout): a large
    /// concurrency, which short jobs need for throughput, and a registry of
    /// many mostly idle queues stay within a small Postgres's connection
    /// limit (measured: per-queue pools of 6 put three test workers of five
    /// queues over Postgres's default 100, and their heartbeats failed). The
    /// queues' bookkeeping and the process's listener use a small pool of
    /// their own, built from this one.
    pub fn connections_needed(&self) -> u32 {
        u32::from(self.concurrency).min(JOB_CONNECTIONS) + 3
    }

    /// The pool for the queues' own bookkeeping (claims, start and finish
    /// marks, heartbeats) and the process's listener: a small lazy twin of
    /// `pool` with session settings for that work alone. One connection per
    /// queue and three more: the listener, and for a busy queue its two
    /// claims and its settle beside the other queues' polls. Every queue
    /// registers and claims at once at start, which opens most of the pool,
    /// and the pool keeps what it opened (measured: an idle worker of five
    /// queues held 14 connections in all with two per queue and one here, 12 now):
    ///
    /// - `plan_cache_mode=force_generic_plan`: bookkeeping is a few statements
    ///   repeated with other ids, and a custom plan re-plans on every call
    ///   (measured: 0.3 ms of each 0.8 ms event round). The generic plans
    ///   are the ones we want: rows found by primary key or by the claim
    ///   index, whoever the worker is.
    /// - `synchronous_commit=off` unless `sync_bookkeeping`. Losing the newest
    ///   of these writes in a crash is safe: Postgres loses only a suffix of
    ///   its log, so a finish mark that survived means the job's own
    ///   (synchronous, earlier) writes survived too, and a lost mark or claim
    ///   puts the job back in the queue, to run again.
    pub(crate) fn bookkeeping_pool(&self, pool: &PgPool, queues: u32) -> PgPool {
        let mut settings = vec![("plan_cache_mode", "force_generic_plan")];
        if !self.sync_bookkeeping {
            settings.push(("synchronous_commit", "off"));
        }
        let connect = pool.connect_options().as_ref().clone().options(settings);
        pool.options()
            .clone()
            .min_connections(0)
            .max_connections(queues + 3)
            .connect_lazy_with(connect)
    }
}

/// The most connections running jobs get from the worker's pool, all queues
/// together (see [`WorkerConfig::connections_needed`]).
const JOB_CONNECTIONS: u32 = 8;

/// The worker's defaults, written once: the command line's and [`Default`]'s.
mod defaults {
    pub(super) const CONCURRENCY: u16 = 128;
    pub(super) const POLL_INTERVAL: &str = "1";
    pub(super) const LEASE: &str = "30";
    pub(super) const SHUTDOWN_GRACE: &str = "25";
    pub(super) const RETENTION_DONE: &str = "86400";
    pub(super) const RETENTION_DEAD: &str = "604800";
    pub(super) const PRUNE_SCHEDULE: &str = "0 * * * * *";
    pub(super) const UNKNOWN_GRACE: &str = "3600";
}

impl Default for WorkerConfig {
    fn default() -> Self {
        // The defaults are constants of ours, so they parse.
        let seconds = |value| parse_seconds(value).expect("a default number of seconds");
        Self {
            concurrency: defaults::CONCURRENCY,
            claim_batch: None,
            poll_interval: seconds(defaults::POLL_INTERVAL),
            lease: seconds(defaults::LEASE),
            shutdown_grace: seconds(defaults::SHUTDOWN_GRACE),
            job_timeout: None,
            backoff_base: None,
            backoff_max: None,
            retention_done: seconds(defaults::RETENTION_DONE),
            retention_dead: seconds(defaults::RETENTION_DEAD),
            prune_schedule: Schedule::cron(defaults::PRUNE_SCHEDULE)
                .expect("the default prune schedule parses"),
            unknown_grace: seconds(defaults::UNKNOWN_GRACE),
            kill_unhandled: true,
            sync_bookkeeping: false,
        }
    }
}

fn parse_seconds(value: &str) -> Result<Duration, String> {
    let seconds: f64 = value
        .parse()
        .map_err(|_| format!("{value:?} is not a number of seconds"))?;
    Duration::try_from_secs_f64(seconds).map_err(|err| format!("{value:?}: {err}"))
}

/// The range of each duration setting: wide enough for any real use, narrow
/// enough that the runtime's timers and Postgres's intervals and timestamps
/// hold (a year is about 3.2e7 s; a timestamp overflows near 9e12 s from now).
mod ranges {
    use crate::seconds::SecondsRange;

    /// Polls need a pause: 0 panicked the timer.
    pub(super) const POLL_INTERVAL: SecondsRange = SecondsRange::new(0.01, 3600.0);
    /// Heartbeats run at a third of the lease: under a second, a busy
    /// worker's heartbeat misses it, and others take its jobs.
    pub(super) const LEASE: SecondsRange = SecondsRange::new(1.0, 86_400.0);
    pub(super) const SHUTDOWN_GRACE: SecondsRange = SecondsRange::new(0.0, 86_400.0);
    /// An attempt needs some time: 0 failed every attempt.
    pub(super) const JOB_TIMEOUT: SecondsRange = SecondsRange::new(0.001, 7.0 * 86_400.0);
    pub(super) const BACKOFF: SecondsRange = SecondsRange::new(0.0, 30.0 * 86_400.0);
    pub(super) const RETENTION: SecondsRange = SecondsRange::new(0.0, 10.0 * 365.0 * 86_400.0);
    pub(super) const UNKNOWN_GRACE: SecondsRange = SecondsRange::new(0.0, 365.0 * 86_400.0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        worker: WorkerConfig,
    }

    #[test]
    fn the_command_lines_defaults_are_the_default_config() {
        use clap::{CommandFactory as _, FromArgMatches as _};
        // The command line without its environment: a WORKER_*/JOB_*
        // variable set where the test runs must not change the defaults read.
        let command = Cli::command().mut_args(|arg| arg.env(None::<&str>));
        let matches = command
            .try_get_matches_from(["worker"])
            .expect("no arguments parse");
        let parsed = Cli::from_arg_matches(&matches).expect("the defaults convert");
        assert_eq!(
            format!("{:?}", parsed.worker),
            format!("{:?}", WorkerConfig::default())
        );
    }
}
