//! `just bench`: VisitMe measured against the physical limit.
//!
//! Runs against the local Postgres on a fresh database, with the real `web`
//! and `worker` binaries as separate processes (this program is the load
//! generator), prints a table and writes `target/bench/results.json` (JSON
//! lines `{"metric", "value", "unit"}`). `--quick` sizes every part for CI
//! (under a minute). Benchmarks, not tests: nothing here asserts a speed.

use std::{
    io::Write as _,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use chrono::{DateTime, TimeDelta, Utc};
use tests::{Process, TestDb};

/// One measured number.
struct Metric {
    section: &'static str,
    name: String,
    value: f64,
    unit: &'static str,
}

#[derive(Default)]
struct Report(Vec<Metric>);

impl Report {
    fn add(
        &mut self,
        section: &'static str,
        name: impl Into<String>,
        value: f64,
        unit: &'static str,
    ) {
        let name = name.into();
        println!("  {name:<44} {value:>12.2} {unit}");
        self.0.push(Metric {
            section,
            name,
            value,
            unit,
        });
    }

    fn write(&self, path: &PathBuf) -> anyhow::Result<()> {
        std::fs::create_dir_all(path.parent().context("results path has a parent")?)?;
        let mut file = std::fs::File::create(path)?;
        for m in &self.0 {
            let line = serde_json::json!({ "section": m.section, "metric": m.name, "value": m.value, "unit": m.unit });
            writeln!(file, "{line}")?;
        }
        Ok(())
    }

    fn value(&self, name: &str) -> Option<f64> {
        self.0.iter().find(|m| m.name == name).map(|m| m.value)
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index].as_secs_f64() * 1000.0
}

struct Sizes {
    web_seconds: u64,
    queue_jobs: i64,
    /// Runs of the default-settings drain (each alternating with the baseline).
    default_drains: usize,
    pickups: usize,
    scaling_jobs: usize,
    trim_tables: &'static [i64],
    fan_ins: usize,
    chains: usize,
    backlog: i64,
    /// Jobs waiting at the start of the drains at depth (section 10).
    depth: i64,
    /// Jobs in the one `enqueue_many` call of section 10.
    enqueue_many: usize,
}

const QUICK: Sizes = Sizes {
    web_seconds: 3,
    queue_jobs: 5_000,
    default_drains: 1,
    pickups: 50,
    scaling_jobs: 400,
    trim_tables: &[10_000, 100_000],
    fan_ins: 10,
    chains: 200,
    backlog: 100_000,
    depth: 100_000,
    enqueue_many: 10_000,
};
const FULL: Sizes = Sizes {
    web_seconds: 10,
    queue_jobs: 20_000,
    default_drains: 3,
    pickups: 300,
    scaling_jobs: 2_000,
    trim_tables: &[10_000, 100_000, 1_000_000],
    fan_ins: 50,
    chains: 1_000,
    backlog: 1_000_000,
    depth: 1_000_000,
    enqueue_many: 100_000,
};
const LONG: Sizes = Sizes {
    web_seconds: 30,
    queue_jobs: 100_000,
    default_drains: 5,
    pickups: 1_000,
    scaling_jobs: 8_000,
    trim_tables: &[10_000, 100_000, 1_000_000],
    fan_ins: 200,
    chains: 5_000,
    backlog: 1_000_000,
    depth: 1_000_000,
    enqueue_many: 100_000,
};

/// The parts of the benchmark, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Section {
    /// 1-2: `GET /` at 1/16/64 connections and pgbench running the same SQL.
    Web,
    /// 3: draining bulk-enqueued no-op jobs with one worker process.
    Queue,
    /// 4: enqueue-commit to handler-start latency on an idle queue.
    Pickup,
    /// 5: 20 ms jobs with 1, 2 and 4 worker processes.
    Scaling,
    /// 6: deleting the same old rows from tables of growing size.
    Trim,
    /// 7: workflows: fan-in latency, 3-step chains per second, a trim of a
    /// huge backlog as a workflow of chunks.
    Workflows,
    /// 8: flow control: a drain with key concurrency 1 over 100 keys, a
    /// rate-limited queue's achieved rate, the claim's cost over 100,000
    /// waiting jobs of 1,000 keys.
    Flow,
    /// 9: durable execution: resume latency after a signal, a 1,000-step
    /// job against 1,000 chained jobs.
    Durable,
    /// 10: the queue at depth: a drain of 1,000,000 waiting jobs, the same
    /// while another session holds a transaction open (no vacuum can remove
    /// dead rows), the table's size before and after; `enqueue_many` of
    /// 100,000 jobs in one transaction.
    Depth,
}

/// VisitMe measured against the physical limit: web throughput and latency,
/// the pgbench ceiling, queue throughput, pickup latency, worker scaling and
/// trim cost.
///
/// Runs the release `web` and `worker` binaries as separate processes against
/// a fresh database on the local Postgres (TEST_DATABASE_URL, default
/// postgres://localhost/postgres), prints a table and writes
/// target/bench/results.json (one JSON object per line).
#[derive(Debug, clap::Parser)]
#[command(name = "bench")]
struct Args {
    /// CI-sized run: every section shortened, under a minute in all.
    #[arg(long, conflicts_with = "long")]
    quick: bool,
    /// Longer runs (about 3x the default) for steadier numbers.
    #[arg(long)]
    long: bool,
    /// Run only these sections (comma-separated; default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Section>,
    /// A `worker` binary built from an older commit (with `--features
    /// probes`): the queue section then runs its default-settings drain with
    /// that binary too, alternating old and new, for a side-by-side figure,
    /// the pickup section measures its pickup latency after this one's, and
    /// the workflows section its fan-in latency and chains before this one's.
    #[arg(long)]
    baseline_worker: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = <Args as clap::Parser>::parse();
    let sizes = match (args.quick, args.long) {
        (true, _) => QUICK,
        (_, true) => LONG,
        _ => FULL,
    };
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(run(sizes, &args.only, args.baseline_worker.as_deref()))
}

async fn run(
    sizes: Sizes,
    only: &[Section],
    baseline_worker: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let wanted = |section: Section| only.is_empty() || only.contains(&section);
    let mut report = Report::default();
    println!("building the release binaries…");
    tests::binary("web")?;
    let db = TestDb::migrated().await?;
    println!("bench database ready\n");

    if wanted(Section::Web) {
        web_and_ceiling(&db, &sizes, &mut report).await?;
    }
    if wanted(Section::Queue) {
        queue_throughput(&db, &sizes, baseline_worker, &mut report).await?;
    }
    if wanted(Section::Pickup) {
        pickup_latency(&db, &sizes, baseline_worker, &mut report).await?;
    }
    if wanted(Section::Scaling) {
        scaling(&db, &sizes, &mut report).await?;
    }
    if wanted(Section::Trim) {
        trim_cost(&db, &sizes, &mut report).await?;
    }
    if wanted(Section::Workflows) {
        workflows(&db, &sizes, baseline_worker, &mut report).await?;
    }
    if wanted(Section::Flow) {
        flow_control(&db, &sizes, &mut report).await?;
    }
    if wanted(Section::Durable) {
        durable_execution(&db, &sizes, &mut report).await?;
    }
    if wanted(Section::Depth) {
        queue_at_depth(&db, &sizes, &mut report).await?;
    }
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench/results.json");
    report.write(&path)?;
    println!("\nresults: {}", path.canonicalize()?.display());
    Ok(())
}

fn worker_env<'a>(db: &'a TestDb, concurrency: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("DATABASE_URL", db.url.as_str()),
        ("WORKER_CONCURRENCY", concurrency),
        ("WORKER_POLL_INTERVAL", "0.1"),
    ]
}

async fn web_and_ceiling(db: &TestDb, sizes: &Sizes, report: &mut Report) -> anyhow::Result<()> {
    println!("1-2. web GET / with 2 workers trimming, and pgbench running the same SQL");
    let mut web = Process::spawn(
        "web",
        &[
            ("DATABASE_URL", db.url.as_str()),
            ("BIND", "127.0.0.1:0"),
            ("EMBEDDED_WORKER", "false"),
        ],
    )?;
    let address = web.web_address().await?;
    let mut workers = Vec::new();
    for _ in 0..2 {
        let worker = Process::started_worker(&worker_env(db, "4")).await?;
        workers.push(worker);
    }
    let script = std::env::temp_dir().join(format!("visitme-pgbench-{}.sql", std::process::id()));
    std::fs::write(&script, PGBENCH_SCRIPT)?;
    for connections in [1usize, 16, 64] {
        let latencies = Arc::new(Mutex::new(Vec::new()));
        let deadline = Instant::now() + Duration::from_secs(sizes.web_seconds);
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(connections)
            .build()?;
        let clients: Vec<_> = (0..connections)
            .map(|_| {
                let (http, latencies, url) = (
                    http.clone(),
                    latencies.clone(),
                    format!("http://{address}/"),
                );
                tokio::spawn(async move {
                    let mut errors = 0u64;
                    while Instant::now() < deadline {
                        let sent = Instant::now();
                        match http.get(&url).send().await {
                            Ok(r) if r.status().is_success() => {
                                let _ = r.bytes().await;
                                latencies.lock().expect("latencies").push(sent.elapsed());
                            }
                            _ => errors += 1,
                        }
                    }
                    errors
                })
            })
            .collect();
        let mut errors = 0;
        for client in clients {
            errors += client.await?;
        }
        let mut latencies = latencies.lock().expect("latencies").clone();
        latencies.sort_unstable();
        let rps = latencies.len() as f64 / sizes.web_seconds as f64;
        report.add(
            "web",
            format!("web c={connections} throughput"),
            rps,
            "req/s",
        );
        report.add(
            "web",
            format!("web c={connections} latency p50"),
            percentile(&latencies, 0.50),
            "ms",
        );
        report.add(
            "web",
            format!("web c={connections} latency p95"),
            percentile(&latencies, 0.95),
            "ms",
        );
        report.add(
            "web",
            format!("web c={connections} latency p99"),
            percentile(&latencies, 0.99),
            "ms",
        );
        report.add(
            "web",
            format!("web c={connections} errors"),
            errors as f64,
            "requests",
        );
        db.wait_until_idle(Duration::from_secs(60)).await?;
        let rows: i64 = sqlx::query_scalar("select count(*) from visits")
            .fetch_one(&db.pool)
            .await?;
        report.add(
            "web",
            format!("web c={connections} visits rows after the trims"),
            rows as f64,
            "rows",
        );

        let tps = pgbench(db, &script, connections, sizes.web_seconds, "").await?;
        report.add(
            "ceiling",
            format!("pgbench c={connections} same SQL"),
            tps,
            "tx/s",
        );
        report.add(
            "ceiling",
            format!("web/pgbench c={connections}"),
            100.0 * rps / tps.max(1.0),
            "%",
        );
    }
    let _ = std::fs::remove_file(&script);
    // pgbench's own trims run too; one more page view and its trim settle the table.
    reqwest::get(format!("http://{address}/"))
        .await?
        .error_for_status()?;
    tokio::time::sleep(Duration::from_millis(600)).await;
    db.wait_until_idle(Duration::from_secs(60)).await?;
    let visits: i64 = sqlx::query_scalar("select count(*) from visits")
        .fetch_one(&db.pool)
        .await?;
    report.add("web", "visits table rows at the end", visits as f64, "rows");
    for process in workers.into_iter().chain([web]) {
        process.terminate(Duration::from_secs(30)).await?;
    }
    Ok(())
}

/// What `GET /` does in SQL: the visit insert, the top-10 select and the
/// (coalescing) job insert as one transaction, then the background-work
/// panel's newest trim (its queue counts are cached for 2 s, so left out).
const PGBENCH_SCRIPT: &str = r#"\set n random(1, 1000000)
BEGIN;
INSERT INTO visits (visitor) VALUES ('127.0.0.1: pgbench ' || :n) RETURNING id, visitor, created_at;
SELECT min(created_at) AS t FROM (SELECT id, visitor, created_at FROM visits ORDER BY created_at DESC, id DESC LIMIT 10) AS shown \gset
INSERT INTO apalis.jobs AS jobs (id, job_type, job, status, attempts, max_attempts, run_at, priority, metadata, unique_key)
  SELECT apalis.generate_ulid(), 'trim_visits', convert_to(json_build_object('older_than', :t::timestamptz)::text, 'UTF8'),
         'Pending', 0, 5, to_timestamp((w + 1) * 0.5), 0, hstore('unique.order', :t::text), 'all@' || w
  FROM (SELECT floor(extract(epoch FROM clock_timestamp()) / 0.5)::bigint AS w) AS clock
  ON CONFLICT (job_type, unique_key) WHERE unique_key IS NOT NULL
  DO UPDATE SET
    job = CASE WHEN (:t::text) > coalesce(jobs.metadata -> 'unique.order', '') THEN excluded.job ELSE jobs.job END,
    metadata = CASE WHEN (:t::text) > coalesce(jobs.metadata -> 'unique.order', '')
                    THEN excluded.metadata ELSE jobs.metadata END
  WHERE jobs.status = 'Pending'
  RETURNING id;
END;
SELECT id, job_type AS queue, state, status, attempts, max_attempts, run_at, lock_at,
       lock_by, done_at, job AS payload, hstore_to_json(metadata)::text AS metadata,
       last_result::text AS last_result, unique_key
FROM apalis.job_states WHERE job_type = 'trim_visits' ORDER BY id DESC LIMIT 1;
"#;

/// Runs `script` by pgbench (prepared statements) for `seconds`; `server_options`
/// are server settings for its sessions (`PGOPTIONS`, e.g. the worker's
/// `-c synchronous_commit=off`), empty for none. Returns its tps.
async fn pgbench(
    db: &TestDb,
    script: &std::path::Path,
    clients: usize,
    seconds: u64,
    server_options: &str,
) -> anyhow::Result<f64> {
    // The web process and the workers keep the connections they opened
    // (a few dozen), and Postgres allows 100 by default: 64 clients may not
    // fit. Then pgbench runs with as many as do (still far beyond the two
    // cores' saturation), and says so.
    let free: i64 = sqlx::query_scalar(
        "select current_setting('max_connections')::int
                - current_setting('superuser_reserved_connections')::int
                - (select count(*) from pg_stat_activity where backend_type = 'client backend')
                - 4",
    )
    .fetch_one(&db.pool)
    .await?;
    let fitting = usize::try_from(free).unwrap_or(1).max(1);
    if fitting < clients {
        println!(
            "   pgbench: {clients} clients do not fit in Postgres's free connections; running {fitting}"
        );
    }
    let clients = clients.min(fitting);
    let options = migrations::parse_url(&db.url)?;
    let output = tokio::process::Command::new("pgbench")
        .env("PGOPTIONS", server_options)
        .args([
            "-n",
            "-M",
            "prepared",
            "-T",
            &seconds.to_string(),
            "-c",
            &clients.to_string(),
        ])
        .args(["-j", &clients.min(2).to_string(), "-f"])
        .arg(script)
        .args([
            "-h",
            options.get_host(),
            "-p",
            &options.get_port().to_string(),
            "-U",
            options.get_username(),
        ])
        .arg(options.get_database().context("bench database name")?)
        .output()
        .await
        .context("run pgbench (Debian package postgresql-client or postgresql-contrib)")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| {
            l.trim_start_matches("tps = ")
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .with_context(|| {
            format!(
                "pgbench printed no tps: {stdout}{}",
                String::from_utf8_lossy(&output.stderr)
            )
        })
}

/// Empties the queue's table for the next figure, as a new deployment's:
/// no dead rows, and statistics that know nothing (`TRUNCATE` leaves
/// `reltuples` unknown and makes every session plan again). A `DELETE`
/// left the dead rows of every earlier drain (this machine's Postgres runs
/// no autovacuum), and a `VACUUM` of the emptied table left statistics that
/// say it is empty: a worker's plans made on them walk the whole table once
/// it fills, for good on a worker without the engine's own check (a
/// baseline's drains after it ran at 160-2,800 jobs/s; see the engine's
/// INTERNALS.md, "Statistics that keep up").
async fn empty_jobs(db: &TestDb) -> anyhow::Result<()> {
    sqlx::query("truncate apalis.jobs cascade")
        .execute(&db.pool)
        .await?;
    Ok(())
}

/// Bulk-enqueues `count` probe jobs of `behaviour` (raw SQL, one statement).
/// Inserts `count` due probes; with `keys`, their concurrency keys cycle
/// through that many (`key-0` ..).
async fn bulk_enqueue(
    db: &TestDb,
    count: i64,
    behaviour: &str,
    keys: Option<i64>,
) -> anyhow::Result<()> {
    // Without keys, only the columns every schema has: a baseline worker's
    // database (older migrations) has no `concurrency_key`.
    let Some(keys) = keys else {
        sqlx::query(
            "insert into apalis.jobs (id, job_type, job, status, attempts, max_attempts, run_at, priority)
             select apalis.generate_ulid(), 'probe',
                    convert_to(format('{\"key\":\"bulk-%s\",\"behaviour\":%s}', n, $2::text), 'UTF8'),
                    'Pending', 0, 3, now() - interval '1 second', 0
             from generate_series(1, $1) as n",
        )
        .bind(count)
        .bind(behaviour)
        .execute(&db.pool)
        .await?;
        return Ok(());
    };
    sqlx::query(
        "insert into apalis.jobs (id, job_type, job, status, attempts, max_attempts, run_at, priority,
                                  concurrency_key)
         select apalis.generate_ulid(), 'probe',
                convert_to(format('{\"key\":\"bulk-%s\",\"behaviour\":%s}', n, $2::text), 'UTF8'),
                'Pending', 0, 3, now() - interval '1 second', 0, 'key-' || (n % $3::bigint)
         from generate_series(1, $1) as n",
    )
    .bind(count)
    .bind(behaviour)
    .bind(keys)
    .execute(&db.pool)
    .await?;
    Ok(())
}

/// Starts `processes` idle workers, then enqueues `count` jobs and times the drain.
async fn drain_with_workers(
    db: &TestDb,
    processes: usize,
    concurrency: &str,
    claim_batch: Option<&str>,
    count: i64,
    behaviour: &str,
) -> anyhow::Result<Duration> {
    let mut env = worker_env(db, concurrency);
    env.extend(claim_batch.map(|batch| ("WORKER_CLAIM_BATCH", batch)));
    drain(db, None, &env, processes, count, behaviour, None).await
}

/// Starts `processes` idle workers (the `binary`, else this commit's
/// `worker`) with exactly `env`, then enqueues `count` jobs and times the
/// drain.
async fn drain(
    db: &TestDb,
    binary: Option<&std::path::Path>,
    env: &[(&str, &str)],
    processes: usize,
    count: i64,
    behaviour: &str,
    keys: Option<i64>,
) -> anyhow::Result<Duration> {
    let drained = drain_measured(db, binary, env, processes, count, behaviour, keys).await?;
    anyhow::ensure!(
        drained.done == count,
        "{} of {count} jobs still open after {DRAIN_TIME_LIMIT:?}",
        count - drained.done
    );
    Ok(drained.took)
}

/// How long a drain may take before the bench stops it and reports the
/// jobs it did (a drain at depth under a held-back vacuum took longer).
const DRAIN_TIME_LIMIT: Duration = Duration::from_secs(600);

/// A drain's time, how many of its jobs it did (all, unless it ran out of
/// [`DRAIN_TIME_LIMIT`]), and `apalis.jobs`'s size (heap, indexes) at its
/// start and end.
struct Drained {
    took: Duration,
    done: i64,
    size_at_start: (i64, i64),
    size_at_end: (i64, i64),
}

/// The bytes of `apalis.jobs`'s heap and of its indexes.
async fn jobs_table_size(db: &TestDb) -> anyhow::Result<(i64, i64)> {
    Ok(
        sqlx::query_as("select pg_relation_size('apalis.jobs'), pg_indexes_size('apalis.jobs')")
            .fetch_one(&db.pool)
            .await?,
    )
}

/// [`drain`], also measuring the table's size once the jobs are enqueued and
/// once they are done.
async fn drain_measured(
    db: &TestDb,
    binary: Option<&std::path::Path>,
    env: &[(&str, &str)],
    processes: usize,
    count: i64,
    behaviour: &str,
    keys: Option<i64>,
) -> anyhow::Result<Drained> {
    // A baseline's database is migrated by its first worker.
    let migrated: bool = sqlx::query_scalar("select to_regclass('apalis.jobs') is not null")
        .fetch_one(&db.pool)
        .await?;
    if migrated {
        empty_jobs(db).await?;
    }
    let mut workers = Vec::new();
    for _ in 0..processes {
        workers.push(worker_of(binary, env).await?);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    bulk_enqueue(db, count, behaviour, keys).await?;
    // From the commit (the jobs are all there, workers are woken by NOTIFY) to
    // the last result, both on the database's clock: the waiting below can
    // then poll rarely, and its queries take no CPU from the drain.
    let committed_at: DateTime<Utc> = sqlx::query_scalar("select clock_timestamp()")
        .fetch_one(&db.pool)
        .await?;
    let size_at_start = jobs_table_size(db).await?;
    let give_up = Instant::now() + DRAIN_TIME_LIMIT;
    // Probes only: the engine's periodic prune job may fall due meanwhile.
    let (done, last_done) = loop {
        let (open, done, last_done): (i64, i64, Option<DateTime<Utc>>) = sqlx::query_as(
            "select count(*) filter (where status in ('Pending', 'Queued', 'Running')
                                      or (status = 'Failed' and attempts < max_attempts)),
                    count(*) filter (where status = 'Done'),
                    max(done_at)
             from apalis.jobs where job_type = 'probe'",
        )
        .fetch_one(&db.pool)
        .await?;
        if open == 0 || Instant::now() >= give_up {
            break (done, last_done.unwrap_or(committed_at));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let took = (last_done - committed_at).to_std()?;
    let size_at_end = jobs_table_size(db).await?;
    for worker in workers {
        worker.terminate(Duration::from_secs(30)).await?;
    }
    Ok(Drained {
        took,
        done,
        size_at_start,
        size_at_end,
    })
}

/// No-op jobs of the default-settings drain (the issue's figure), whatever
/// the run's size.
const DEFAULT_DRAIN_JOBS: i64 = 20_000;

/// The default-settings drain, `runs` times each, alternating with the
/// `baseline` binary when given; reports the median of each.
/// One default-settings drain: the index of its figure, the `worker` binary
/// (none: this commit's) and the environment.
type DrainConfig<'a> = (
    usize,
    Option<&'a std::path::Path>,
    &'a TestDb,
    &'a [(&'a str, &'a str)],
);

async fn default_drains(
    db: &TestDb,
    baseline: Option<&std::path::Path>,
    runs: usize,
    report: &mut Report,
) -> anyhow::Result<()> {
    let defaults = [("DATABASE_URL", db.url.as_str())];
    let synced = [
        ("DATABASE_URL", db.url.as_str()),
        ("WORKER_SYNC_BOOKKEEPING", "true"),
    ];
    // The baseline drains a database of its own, which it migrates itself
    // at start: this commit's migrations (leaner claims, one notification
    // per statement) must not speed up the old build.
    let baseline_db = match baseline {
        Some(_) => Some(TestDb::empty().await?),
        None => None,
    };
    let baseline_url = baseline_db.as_ref().map_or("", |db| db.url.as_str());
    let baseline_defaults = [("DATABASE_URL", baseline_url)];
    let baseline_tuned = [("DATABASE_URL", baseline_url), ("WORKER_CONCURRENCY", "32")];
    let noop = r#"{"kind":"noop"}"#;
    let rate = |elapsed: Duration| DEFAULT_DRAIN_JOBS as f64 / elapsed.as_secs_f64();
    // Per configuration, in the order of `names`: one figure per run.
    let names = [
        "drain, default settings",
        "drain, default settings, WORKER_SYNC_BOOKKEEPING=true",
        "drain, default settings, baseline worker",
        "drain c=32, baseline worker",
    ];
    let mut figures: [Vec<f64>; 4] = Default::default();
    for run in 0..runs {
        let mut configs: Vec<DrainConfig<'_>> =
            vec![(0, None, db, &defaults), (1, None, db, &synced)];
        if let (Some(path), Some(old_db)) = (baseline, &baseline_db) {
            // Old and new alternate, so that the machine's drift hits both.
            configs.insert(0, (2, Some(path), old_db, &baseline_defaults));
            configs.insert(2, (3, Some(path), old_db, &baseline_tuned));
        }
        for (index, binary, db, env) in configs {
            let figure = rate(drain(db, binary, env, 1, DEFAULT_DRAIN_JOBS, noop, None).await?);
            println!("   run {}: {} {figure:.0} jobs/s", run + 1, names[index]);
            figures[index].push(figure);
        }
    }
    let median = |values: &[f64]| {
        let mut values = values.to_vec();
        values.sort_by(f64::total_cmp);
        values.get(values.len() / 2).copied()
    };
    let medians: Vec<Option<f64>> = figures.iter().map(|values| median(values)).collect();
    for (name, value) in names.iter().zip(&medians) {
        if let Some(value) = value {
            report.add("queue", *name, *value, "jobs/s");
        }
    }
    let ratio = |a: usize, b: usize| Some(medians[a]? / medians[b]?);
    let ratios = [
        ("synchronous / default bookkeeping", ratio(1, 0)),
        ("default settings / baseline's defaults", ratio(0, 2)),
        ("default settings / baseline at c=32", ratio(0, 3)),
    ];
    for (name, value) in ratios {
        if let Some(value) = value {
            report.add("queue", name, value, "x");
        }
    }
    Ok(())
}

async fn queue_throughput(
    db: &TestDb,
    sizes: &Sizes,
    baseline: Option<&std::path::Path>,
    report: &mut Report,
) -> anyhow::Result<()> {
    println!(
        "3. queue throughput: {DEFAULT_DRAIN_JOBS} no-op jobs with default settings (median of {}), then {} with tuned ones; one worker process",
        sizes.default_drains, sizes.queue_jobs
    );
    default_drains(db, baseline, sizes.default_drains, report).await?;
    claim_settle_limit(db, report).await?;
    // Claim batch = concurrency (the default), then a larger claim batch.
    for (concurrency, claim_batch) in [("10", None), ("32", None), ("10", Some("40"))] {
        let elapsed = drain_with_workers(
            db,
            1,
            concurrency,
            claim_batch,
            sizes.queue_jobs,
            r#"{"kind":"noop"}"#,
        )
        .await?;
        let name = match claim_batch {
            None => format!("drain c={concurrency}"),
            Some(batch) => format!("drain c={concurrency}, claim batch {batch}"),
        };
        report.add(
            "queue",
            name,
            sizes.queue_jobs as f64 / elapsed.as_secs_f64(),
            "jobs/s",
        );
    }
    Ok(())
}

/// The in-database limit of a drain: `tests/pgbench/claim_settle.sql` (the
/// engine's claim of 100 jobs, then their settle) run by pgbench with no
/// worker, at 1 and 2 clients; and the default drain as a fraction of it.
async fn claim_settle_limit(db: &TestDb, report: &mut Report) -> anyhow::Result<()> {
    const JOBS: i64 = 400_000;
    const SECONDS: u64 = 3;
    let script =
        std::env::temp_dir().join(format!("visitme-claim-settle-{}.sql", std::process::id()));
    std::fs::write(&script, include_str!("../../pgbench/claim_settle.sql"))?;
    sqlx::query(
        "insert into apalis.workers (id, worker_type, storage_name, layers, last_seen)
         values ('pgbench-claimer', 'probe', 'PgStorage', '', now())
         on conflict (id) do update set last_seen = now()",
    )
    .execute(&db.pool)
    .await?;
    for clients in [1, 2] {
        empty_jobs(db).await?;
        bulk_enqueue(db, JOBS, r#"{"kind":"noop"}"#, None).await?;
        // Statistics that know the jobs: pgbench's sessions plan on them.
        sqlx::query("vacuum analyze apalis.jobs")
            .execute(&db.pool)
            .await?;
        // As the worker's bookkeeping connections commit (`WorkerConfig`'s
        // `sync_bookkeeping` off, the default).
        pgbench(db, &script, clients, SECONDS, "-c synchronous_commit=off").await?;
        let done: i64 = sqlx::query_scalar(
            "select count(*) from apalis.jobs
             where job_type = 'probe' and status = 'Done' and lock_by = 'pgbench-claimer'",
        )
        .fetch_one(&db.pool)
        .await?;
        anyhow::ensure!(
            done < JOBS,
            "pgbench ran out of jobs: enqueue more than {JOBS}"
        );
        report.add(
            "queue",
            format!("claim + settle by pgbench, no worker, c={clients}"),
            done as f64 / SECONDS as f64,
            "jobs/s",
        );
    }
    // The 400,000 dead rows would otherwise slow the next drains' claims
    // (measured: 300 jobs/s instead of 4,600 at c=10).
    empty_jobs(db).await?;
    std::fs::remove_file(&script).ok();
    if let (Some(drain), Some(limit)) = (
        report.value("drain, default settings"),
        report.value("claim + settle by pgbench, no worker, c=1"),
    ) {
        report.add(
            "queue",
            "default drain / pgbench's claim + settle c=1",
            drain / limit,
            "x",
        );
    }
    Ok(())
}

async fn pickup_latency(
    db: &TestDb,
    sizes: &Sizes,
    baseline: Option<&std::path::Path>,
    report: &mut Report,
) -> anyhow::Result<()> {
    println!("4. pickup latency: commit to handler start, idle queue");
    empty_jobs(db).await?;
    let worker = Process::started_worker(&worker_env(db, "4")).await?;
    let latencies = pickups(db, sizes.pickups, "pickup").await?;
    worker.terminate(Duration::from_secs(30)).await?;
    report.add(
        "pickup",
        "pickup latency p50",
        percentile(&latencies, 0.50),
        "ms",
    );
    report.add(
        "pickup",
        "pickup latency p99",
        percentile(&latencies, 0.99),
        "ms",
    );
    let Some(path) = baseline else {
        return Ok(());
    };
    // The baseline on a database of its own, migrated by itself.
    let old_db = TestDb::empty().await?;
    let worker = worker_of(Some(path), &worker_env(&old_db, "4")).await?;
    let latencies = pickups(&old_db, sizes.pickups, "pickup").await?;
    worker.terminate(Duration::from_secs(30)).await?;
    report.add(
        "pickup",
        "pickup latency p50, baseline worker",
        percentile(&latencies, 0.50),
        "ms",
    );
    report.add(
        "pickup",
        "pickup latency p99, baseline worker",
        percentile(&latencies, 0.99),
        "ms",
    );
    Ok(())
}

/// `count` pickups, one at a time, on `db`'s idle worker: each a probe
/// inserted with the columns every schema has (a baseline's too), timed
/// from its commit to its run's start, both by the database's clock.
async fn pickups(db: &TestDb, count: usize, prefix: &str) -> anyhow::Result<Vec<Duration>> {
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut latencies = Vec::new();
    for n in 0..count {
        let key = format!("{prefix}-{n}");
        let mut tx = db.pool.begin().await?;
        sqlx::query(
            "insert into apalis.jobs (id, job_type, job, status, attempts, max_attempts, run_at, priority)
             values (apalis.generate_ulid(), 'probe',
                     convert_to(json_build_object('key', $1::text, 'behaviour',
                                json_build_object('kind', 'succeed'))::text, 'UTF8'),
                     'Pending', 0, 3, now(), 0)",
        )
        .bind(&key)
        .execute(&mut *tx)
        .await?;
        let committed_at: DateTime<Utc> = sqlx::query_scalar("select clock_timestamp()")
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let started_at = loop {
            let started: Option<DateTime<Utc>> =
                sqlx::query_scalar("select started_at from job_probe_runs where probe = $1")
                    .bind(&key)
                    .fetch_optional(&db.pool)
                    .await?;
            if let Some(at) = started {
                break at;
            }
            anyhow::ensure!(Instant::now() < deadline, "job {key} was not picked up");
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        latencies.push((started_at - committed_at).to_std().unwrap_or_default());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    latencies.sort_unstable();
    Ok(latencies)
}

/// Resume latency (a signal's commit to the waiting job running again, on
/// an idle queue, as pickup latency is measured), then a job of 1,000
/// trivial `step`s against a workflow chain of 1,000 no-op jobs.
async fn durable_execution(db: &TestDb, sizes: &Sizes, report: &mut Report) -> anyhow::Result<()> {
    use jobs::probe::{Behaviour, Probe};
    println!(
        "9. durable execution: resume after a signal; 1,000 steps in one job vs 1,000 chained jobs"
    );
    empty_jobs(db).await?;
    let worker = Process::started_worker(&worker_env(db, "4")).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let runs_of = |key: String| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, DateTime<Utc>>(
                "select started_at from job_probe_runs where probe = $1 order by id",
            )
            .bind(key)
            .fetch_all(&pool)
            .await
        }
    };
    let mut latencies = Vec::new();
    for n in 0..sizes.pickups.min(300) {
        let key = format!("resume-{n}");
        let mut tx = db.pool.begin().await?;
        let id = jobs::enqueue(
            &mut tx,
            &Probe {
                key: key.clone(),
                behaviour: Behaviour::AwaitSignal,
            },
        )
        .await?
        .to_string();
        tx.commit().await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let state: String =
                sqlx::query_scalar("select state from apalis.job_states where id = $1")
                    .bind(&id)
                    .fetch_one(&db.pool)
                    .await?;
            if state == "waiting" {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "job {key} never waited");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let mut tx = db.pool.begin().await?;
        durable_jobs::signal(&mut tx, &id, "go", &true).await?;
        let committed_at: DateTime<Utc> = sqlx::query_scalar("select clock_timestamp()")
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        let resumed_at = loop {
            if let Some(at) = runs_of(key.clone()).await?.get(1) {
                break *at;
            }
            anyhow::ensure!(Instant::now() < deadline, "job {key} was not resumed");
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        latencies.push((resumed_at - committed_at).to_std().unwrap_or_default());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    latencies.sort_unstable();
    report.add(
        "durable",
        "resume after a signal p50",
        percentile(&latencies, 0.50),
        "ms",
    );
    report.add(
        "durable",
        "resume after a signal p99",
        percentile(&latencies, 0.99),
        "ms",
    );

    // One job of 1,000 steps, then a chain of 1,000 jobs.
    const STEPS: u32 = 1_000;
    let mut tx = db.pool.begin().await?;
    let id = jobs::enqueue(
        &mut tx,
        &Probe {
            key: "steps".to_owned(),
            behaviour: Behaviour::Steps { count: STEPS },
        },
    )
    .await?
    .to_string();
    let committed_at: DateTime<Utc> = sqlx::query_scalar("select clock_timestamp()")
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    db.wait_for_status(&id, "Done", Duration::from_secs(300))
        .await?;
    let done_at: DateTime<Utc> =
        sqlx::query_scalar("select done_at from apalis.jobs where id = $1")
            .bind(&id)
            .fetch_one(&db.pool)
            .await?;
    let steps_took = (done_at - committed_at).to_std()?.as_secs_f64();
    report.add(
        "durable",
        "1,000-step job: total",
        steps_took * 1000.0,
        "ms",
    );
    report.add(
        "durable",
        "1,000-step job: per step",
        steps_took * 1000.0 / f64::from(STEPS),
        "ms",
    );

    let mut chain = durable_jobs::Workflow::new("bench-long-chain").add(
        "step-0",
        Probe {
            key: "chain-0".to_owned(),
            behaviour: Behaviour::Noop,
        },
    );
    for n in 1..STEPS {
        chain = chain.add_after(
            format!("step-{n}"),
            Probe {
                key: format!("chain-{n}"),
                behaviour: Behaviour::Noop,
            },
            [format!("step-{}", n - 1)],
        );
    }
    let mut tx = db.pool.begin().await?;
    chain.enqueue(&mut tx).await?;
    let chain_took =
        commit_and_time_workflows(db, tx, "bench-long-chain", Duration::from_millis(100)).await?;
    report.add(
        "durable",
        "1,000 chained jobs: total",
        chain_took * 1000.0,
        "ms",
    );
    report.add(
        "durable",
        "1,000 chained jobs: per job",
        chain_took * 1000.0 / f64::from(STEPS),
        "ms",
    );
    report.add(
        "durable",
        "chained jobs / steps, time",
        chain_took / steps_took,
        "x",
    );
    worker.terminate(Duration::from_secs(30)).await?;
    Ok(())
}

/// Commits `tx` (which enqueued workflows named `name`), waits until the
/// queue is idle (polling every `poll`), and returns the seconds from the
/// commit to the last of their jobs' ends, by the database's clock.
async fn commit_and_time_workflows(
    db: &TestDb,
    mut tx: sqlx::Transaction<'static, sqlx::Postgres>,
    name: &str,
    poll: Duration,
) -> anyhow::Result<f64> {
    let committed_at: DateTime<Utc> = sqlx::query_scalar("select clock_timestamp()")
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    db.wait_until_idle_polling(Duration::from_secs(600), poll)
        .await?;
    let last_done: DateTime<Utc> = sqlx::query_scalar(
        "select max(done_at) from apalis.jobs where workflow_id in
             (select id from apalis.workflows where name = $1)",
    )
    .bind(name)
    .fetch_one(&db.pool)
    .await?;
    Ok((last_done - committed_at).to_std()?.as_secs_f64())
}

async fn scaling(db: &TestDb, sizes: &Sizes, report: &mut Report) -> anyhow::Result<()> {
    println!(
        "5. scaling: {} jobs napping 20 ms (no writes of their own), concurrency 8 per worker",
        sizes.scaling_jobs
    );
    for processes in [1usize, 2, 4] {
        let elapsed = drain_with_workers(
            db,
            processes,
            "8",
            None,
            sizes.scaling_jobs as i64,
            r#"{"kind":"nap","millis":20}"#,
        )
        .await?;
        let rate = sizes.scaling_jobs as f64 / elapsed.as_secs_f64();
        report.add(
            "scaling",
            format!("{processes} worker(s) throughput"),
            rate,
            "jobs/s",
        );
        if let Some(one) = report.value("1 worker(s) throughput") {
            report.add(
                "scaling",
                format!("{processes} worker(s) speed-up"),
                rate / one,
                "x",
            );
        }
    }
    Ok(())
}

async fn trim_cost(db: &TestDb, sizes: &Sizes, report: &mut Report) -> anyhow::Result<()> {
    println!("6. trim cost: deleting the same 1,000 oldest rows from tables of growing size");
    let base = DateTime::<Utc>::from_timestamp(1_800_000_000, 0).context("base time")?;
    for &rows in sizes.trim_tables {
        sqlx::query("truncate visits").execute(&db.pool).await?;
        sqlx::query(
            "insert into visits (visitor, created_at)
             select 'bench', $2 + make_interval(secs => n / 1000.0) from generate_series(0, $1 - 1) as n",
        )
        .bind(rows)
        .bind(base)
        .execute(&db.pool)
        .await?;
        sqlx::query("analyze visits").execute(&db.pool).await?;
        let job = jobs::TrimVisits {
            older_than: base + TimeDelta::seconds(1),
        };
        let started = Instant::now();
        let deleted = job.delete_older(&db.pool).await?.len();
        let elapsed = started.elapsed();
        anyhow::ensure!(deleted == 1000, "expected 1000 deleted, got {deleted}");
        report.add(
            "trim",
            format!("delete 1000 of {rows} rows"),
            elapsed.as_secs_f64() * 1000.0,
            "ms",
        );
    }
    Ok(())
}

fn probe(key: String, behaviour: jobs::probe::Behaviour) -> jobs::probe::Probe {
    jobs::probe::Probe { key, behaviour }
}

/// A `worker` process of `binary` (none: this commit's) with `env`.
async fn worker_of(
    binary: Option<&std::path::Path>,
    env: &[(&str, &str)],
) -> anyhow::Result<Process> {
    let mut worker = match binary {
        None => Process::spawn("worker", env)?,
        Some(path) => {
            let mut command = tokio::process::Command::new(path);
            command
                .envs(env.iter().copied())
                .env(
                    "RUST_LOG",
                    "info,sqlx::postgres::notice=warn,opentelemetry=warn",
                )
                .env("NO_COLOR", "1");
            Process::start("worker", command)?
        }
    };
    worker.wait_until_registered(env).await?;
    Ok(worker)
}

/// Fan-in latency: from the last of 100 dependencies recorded done to the
/// fan-in's handler starting, one workflow at a time, `fan_ins` times.
async fn fan_in_latencies(db: &TestDb, fan_ins: usize) -> anyhow::Result<Vec<Duration>> {
    use durable_jobs::Workflow;
    use jobs::probe::Behaviour;
    let mut latencies = Vec::new();
    for round in 0..fan_ins {
        let mut workflow = Workflow::new("bench-fan-in");
        for n in 0..100 {
            workflow = workflow.add(
                format!("part-{n}"),
                probe(format!("part-{n}"), Behaviour::Noop),
            );
        }
        let parts: Vec<String> = (0..100).map(|n| format!("part-{n}")).collect();
        let key = format!("fan-in-{round}");
        let workflow = workflow.add_after("fan-in", probe(key.clone(), Behaviour::Succeed), parts);
        let mut tx = db.pool.begin().await?;
        let id = workflow.enqueue(&mut tx).await?.to_string();
        tx.commit().await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let started_at: DateTime<Utc> = loop {
            let started: Option<DateTime<Utc>> =
                sqlx::query_scalar("select started_at from job_probe_runs where probe = $1")
                    .bind(&key)
                    .fetch_optional(&db.pool)
                    .await?;
            if let Some(at) = started {
                break at;
            }
            anyhow::ensure!(Instant::now() < deadline, "fan-in {key} never started");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let last_done: DateTime<Utc> = sqlx::query_scalar(
            "select max(done_at) from apalis.jobs where workflow_id = $1 and job_type = 'probe'
               and id <> (select job_id from apalis.workflow_steps where workflow_id = $1 and name = 'fan-in')",
        )
        .bind(&id)
        .fetch_one(&db.pool)
        .await?;
        latencies.push((started_at - last_done).to_std().unwrap_or_default());
    }
    latencies.sort_unstable();
    Ok(latencies)
}

/// Throughput: `chains` 3-step chains named `name` enqueued in one
/// transaction, completed per second.
async fn chains_per_second(db: &TestDb, name: &str, chains: usize) -> anyhow::Result<f64> {
    use durable_jobs::Workflow;
    use jobs::probe::Behaviour;
    db.wait_until_idle(Duration::from_secs(60)).await?;
    let mut tx = db.pool.begin().await?;
    for n in 0..chains {
        Workflow::new(name)
            .add("a", probe(format!("{name}-{n}-a"), Behaviour::Noop))
            .add_after("b", probe(format!("{name}-{n}-b"), Behaviour::Noop), ["a"])
            .add_after("c", probe(format!("{name}-{n}-c"), Behaviour::Noop), ["b"])
            .enqueue(&mut tx)
            .await?;
    }
    let elapsed = commit_and_time_workflows(db, tx, name, Duration::from_millis(200)).await?;
    Ok(chains as f64 / elapsed)
}

async fn workflows(
    db: &TestDb,
    sizes: &Sizes,
    baseline: Option<&std::path::Path>,
    report: &mut Report,
) -> anyhow::Result<()> {
    println!(
        "7. workflows: {} fan-ins of 100, {} 3-step chains, a trim of {} old visits; one worker process",
        sizes.fan_ins, sizes.chains, sizes.backlog
    );
    // The baseline first, on a database of its own that it migrates itself,
    // then this commit's worker; each figure is the same run of each.
    if let Some(path) = baseline {
        let old_db = TestDb::empty().await?;
        let worker =
            fan_ins_and_chains(&old_db, Some(path), sizes, ", baseline worker", report).await?;
        worker.terminate(Duration::from_secs(30)).await?;
        chains_at_default_settings(&old_db, Some(path), sizes, ", baseline worker", report).await?;
    }
    chains_at_default_settings(db, None, sizes, "", report).await?;
    empty_jobs(db).await?;
    let worker = fan_ins_and_chains(db, None, sizes, "", report).await?;
    for (new, old, ratio) in [
        (
            "3-step chains completed",
            "3-step chains completed, baseline worker",
            "3-step chains / baseline's",
        ),
        (
            "3-step chains completed, default settings",
            "3-step chains completed, default settings, baseline worker",
            "3-step chains, default settings / baseline's",
        ),
    ] {
        if let (Some(old), Some(new)) = (report.value(old), report.value(new)) {
            report.add("workflows", ratio, new / old, "x");
        }
    }
    if let (Some(chains), Some(drain)) = (
        report.value("3-step chains completed, default settings"),
        report.value("drain, default settings"),
    ) {
        // What the issue's goal compares: a step's cost beside a plain
        // job's, both at default settings (0.4x: a step at most 2.5 jobs).
        report.add(
            "workflows",
            "steps/s at default settings / plain drain",
            chains * 3.0 / drain,
            "x",
        );
    }
    workflow_trim(db, sizes, worker, report).await
}

/// Chains per second with a `worker` of `binary` at default settings (no
/// `WORKER_CONCURRENCY`, as the plain drain's), five times the section's
/// chains so that the run lasts long enough to time. The table is emptied
/// first, so that old and new start alike whatever ran before.
async fn chains_at_default_settings(
    db: &TestDb,
    binary: Option<&std::path::Path>,
    sizes: &Sizes,
    label: &str,
    report: &mut Report,
) -> anyhow::Result<()> {
    empty_jobs(db).await?;
    let worker = worker_of(binary, &[("DATABASE_URL", db.url.as_str())]).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let chains = chains_per_second(db, "bench-chain-default", sizes.chains * 5).await?;
    report.add(
        "workflows",
        format!("3-step chains completed, default settings{label}"),
        chains,
        "workflows/s",
    );
    worker.terminate(Duration::from_secs(30)).await?;
    Ok(())
}

/// Fan-in latency and chains per second with a `worker` of `binary` (none:
/// this commit's) on `db`, reported with `label`; returns the worker, still
/// running.
async fn fan_ins_and_chains(
    db: &TestDb,
    binary: Option<&std::path::Path>,
    sizes: &Sizes,
    label: &str,
    report: &mut Report,
) -> anyhow::Result<Process> {
    let worker = worker_of(binary, &worker_env(db, "10")).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let latencies = fan_in_latencies(db, sizes.fan_ins).await?;
    report.add(
        "workflows",
        format!("fan-in latency p50 (100-way){label}"),
        percentile(&latencies, 0.50),
        "ms",
    );
    report.add(
        "workflows",
        format!("fan-in latency p99 (100-way){label}"),
        percentile(&latencies, 0.99),
        "ms",
    );
    let chains = chains_per_second(db, "bench-chain", sizes.chains).await?;
    report.add(
        "workflows",
        format!("3-step chains completed{label}"),
        chains,
        "workflows/s",
    );
    Ok(worker)
}

/// The rest of the workflows section, with this commit's `worker` running.
async fn workflow_trim(
    db: &TestDb,
    sizes: &Sizes,
    worker: Process,
    report: &mut Report,
) -> anyhow::Result<()> {
    // A backlog trimmed by one job: as one DELETE (before), then as a
    // workflow of TRIM_CHUNK-sized steps (now). Each DELETE statement on
    // visits records how long its transaction had run when it ended.
    let base = DateTime::<Utc>::from_timestamp(1_700_000_000, 0).context("base time")?;
    let fill = |rows: i64| {
        sqlx::query(
            "insert into visits (visitor, created_at)
             select 'backlog', $2 + make_interval(secs => n / 1000.0) from generate_series(1, $1) as n",
        )
        .bind(rows)
        .bind(base)
    };
    sqlx::query("truncate visits").execute(&db.pool).await?;
    fill(sizes.backlog).execute(&db.pool).await?;
    let started = Instant::now();
    let deleted = jobs::TrimVisits {
        older_than: Utc::now(),
    }
    .delete_older(&db.pool)
    .await?
    .len();
    report.add(
        "workflows",
        format!("trim {deleted} as one DELETE"),
        started.elapsed().as_secs_f64() * 1000.0,
        "ms",
    );
    fill(sizes.backlog).execute(&db.pool).await?;
    sqlx::raw_sql(
        "create table if not exists bench_delete_transactions (rows bigint, seconds float8);
         truncate bench_delete_transactions;
         create or replace function bench_record_delete() returns trigger language plpgsql as $$
         begin
             insert into bench_delete_transactions
             select count(*), extract(epoch from clock_timestamp() - now()) from gone;
             return null;
         end $$;
         drop trigger if exists bench_record_delete on visits;
         create trigger bench_record_delete after delete on visits
             referencing old table as gone for each statement execute function bench_record_delete();
         analyze visits;",
    )
    .execute(&db.pool)
    .await?;
    let mut tx = db.pool.begin().await?;
    jobs::enqueue(
        &mut tx,
        &jobs::TrimVisits {
            older_than: Utc::now(),
        },
    )
    .await?;
    let committed_at: DateTime<Utc> = sqlx::query_scalar("select clock_timestamp()")
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    let deadline = Instant::now() + Duration::from_secs(1800);
    let summary_done: DateTime<Utc> = loop {
        let done: Option<DateTime<Utc>> = sqlx::query_scalar(
            "select max(done_at) from apalis.jobs where job_type = 'trim_visits_summary' and status = 'Done'",
        )
        .fetch_one(&db.pool)
        .await?;
        if let Some(at) = done {
            break at;
        }
        anyhow::ensure!(Instant::now() < deadline, "the backlog trim never finished");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let wall = (summary_done - committed_at).to_std()?.as_secs_f64();
    let (rows, statements, longest): (Option<i64>, i64, Option<f64>) = sqlx::query_as(
        "select sum(rows)::int8, count(*), max(seconds) from bench_delete_transactions where rows > 0",
    )
    .fetch_one(&db.pool)
    .await?;
    let rows = rows.unwrap_or_default();
    report.add(
        "workflows",
        format!("trim {rows} as a workflow: wall time"),
        wall,
        "s",
    );
    report.add(
        "workflows",
        "trim as a workflow: rows deleted",
        rows as f64 / wall,
        "rows/s",
    );
    report.add(
        "workflows",
        format!("trim as a workflow: longest of {statements} transactions"),
        longest.unwrap_or_default() * 1000.0,
        "ms",
    );
    sqlx::raw_sql("drop trigger bench_record_delete on visits")
        .execute(&db.pool)
        .await?;
    worker.terminate(Duration::from_secs(30)).await?;
    Ok(())
}

/// Section 8: what the limits cost and whether they hold their figure.
async fn flow_control(db: &TestDb, sizes: &Sizes, report: &mut Report) -> anyhow::Result<()> {
    use durable_jobs::{Limits, Rate, admin};
    let jobs = sizes.queue_jobs;
    println!(
        "8. flow control: {jobs} no-op jobs over 100 keys at key concurrency 1; a rate limit's achieved rate; the claim over 100,000 waiting jobs of 1,000 keys"
    );
    let defaults = [("DATABASE_URL", db.url.as_str())];
    let noop = r#"{"kind":"noop"}"#;
    // The drain's own queue is migrated by now (earlier sections, or this).
    admin::reset_limits(&db.pool, "probe").await?;
    let plain = drain(db, None, &defaults, 1, jobs, noop, Some(100)).await?;
    report.add(
        "flow",
        "drain, default settings (keys set, no limit)",
        jobs as f64 / plain.as_secs_f64(),
        "jobs/s",
    );
    admin::set_limits(&db.pool, "probe", Limits::none().key_concurrency(1)).await?;
    let keyed = drain(db, None, &defaults, 1, jobs, noop, Some(100)).await?;
    report.add(
        "flow",
        "drain, key_concurrency(1) over 100 keys",
        jobs as f64 / keyed.as_secs_f64(),
        "jobs/s",
    );
    report.add(
        "flow",
        "key_concurrency(1) / no limit",
        plain.as_secs_f64() / keyed.as_secs_f64(),
        "x",
    );

    // A token bucket of 200/s, burst 10: what a worker achieves over a window.
    let window = Duration::from_secs(if sizes.default_drains > 1 { 30 } else { 10 });
    let limit = 200.0;
    admin::set_limits(
        &db.pool,
        "probe",
        Limits::none().rate(Rate::per_second(limit).burst(10)),
    )
    .await?;
    empty_jobs(db).await?;
    let worker = Process::started_worker(&defaults).await?;
    bulk_enqueue(
        db,
        (limit as i64) * (window.as_secs() as i64 + 10),
        noop,
        None,
    )
    .await?;
    // Past the burst, then count the starts of one window.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let started = |pool: sqlx::PgPool| async move {
        sqlx::query_scalar::<_, i64>(
            "select count(*) from apalis.jobs where job_type = 'probe' and status <> 'Pending'",
        )
        .fetch_one(&pool)
        .await
    };
    let before = started(db.pool.clone()).await?;
    let from = std::time::Instant::now();
    tokio::time::sleep(window).await;
    let after = started(db.pool.clone()).await?;
    let achieved = (after - before) as f64 / from.elapsed().as_secs_f64();
    worker.terminate(Duration::from_secs(30)).await?;
    report.add("flow", "rate limit 200/s: achieved", achieved, "jobs/s");
    report.add(
        "flow",
        "rate limit 200/s: achieved / limit",
        achieved / limit,
        "x",
    );

    // The claim alone (no worker): 100,000 waiting jobs of 1,000 keys.
    empty_jobs(db).await?;
    bulk_enqueue(db, 100_000, noop, Some(1_000)).await?;
    sqlx::query("analyze apalis.jobs").execute(&db.pool).await?;
    sqlx::query(
        "insert into apalis.workers (id, worker_type, storage_name, layers, last_seen)
         values ('bench-claimer', 'probe', 'PgStorage', '', now()) on conflict (id) do update set last_seen = now()",
    )
    .execute(&db.pool)
    .await?;
    // None: no control row at all (the claim of a queue without limits).
    let claim_ms = |limits: Option<Limits>| {
        let pool = db.pool.clone();
        async move {
            match limits {
                Some(limits) => admin::set_limits(&pool, "probe", limits).await?,
                None => admin::reset_limits(&pool, "probe").await?,
            }
            let mut times = Vec::new();
            for _ in 0..50 {
                let start = std::time::Instant::now();
                let claimed: i64 = sqlx::query_scalar(
                    "select count(*) from apalis.get_jobs('bench-claimer', 'probe', 10)",
                )
                .fetch_one(&pool)
                .await?;
                times.push(start.elapsed());
                anyhow::ensure!(claimed == 10, "a claim took {claimed} of 10");
            }
            // Back to waiting, for the next figure.
            sqlx::query(
                "update apalis.jobs set status = 'Pending', lock_by = null, lock_at = null
                 where status = 'Queued'",
            )
            .execute(&pool)
            .await?;
            times.sort();
            anyhow::Ok(percentile(&times, 0.5))
        }
    };
    let unlimited = claim_ms(None).await?;
    let keyed = claim_ms(Some(Limits::none().key_concurrency(1))).await?;
    let counted = claim_ms(Some(Limits::none().concurrency(1_000))).await?;
    report.add(
        "flow",
        "claim of 10, 100,000 waiting: no limit (p50)",
        unlimited,
        "ms",
    );
    report.add(
        "flow",
        "claim of 10, 100,000 waiting: concurrency(1000) (p50)",
        counted,
        "ms",
    );
    report.add(
        "flow",
        "claim of 10, 100,000 waiting over 1,000 keys: key_concurrency(1) (p50)",
        keyed,
        "ms",
    );
    admin::reset_limits(&db.pool, "probe").await?;
    empty_jobs(db).await?;
    Ok(())
}

/// Section 10: the default drain with `sizes.depth` jobs waiting, then the
/// same while another session holds a transaction open for the whole drain
/// (vacuum can then remove no dead row: every claim and settle leaves its
/// row's old version behind), with the table's size at start and end of
/// each; and one `enqueue_many` of `sizes.enqueue_many` probes.
async fn queue_at_depth(db: &TestDb, sizes: &Sizes, report: &mut Report) -> anyhow::Result<()> {
    println!(
        "10. the queue at depth: {} waiting no-op jobs, default settings, one worker",
        sizes.depth
    );
    let defaults = [("DATABASE_URL", db.url.as_str())];
    let noop = r#"{"kind":"noop"}"#;
    let mib = |bytes: i64| bytes as f64 / (1024.0 * 1024.0);
    for held_back in [false, true] {
        empty_jobs(db).await?;
        // A transaction with an xid, open until the drain ends.
        let mut holder = db.pool.acquire().await?;
        if held_back {
            sqlx::query("begin").execute(&mut *holder).await?;
            sqlx::query("select pg_current_xact_id()")
                .execute(&mut *holder)
                .await?;
        }
        let drained = drain_measured(db, None, &defaults, 1, sizes.depth, noop, None).await?;
        if held_back {
            sqlx::query("rollback").execute(&mut *holder).await?;
        }
        let name = if held_back {
            format!("drain of {} waiting, vacuum held back", sizes.depth)
        } else {
            format!("drain of {} waiting", sizes.depth)
        };
        let name = if drained.done < sizes.depth {
            format!(
                "{name} (stopped after {DRAIN_TIME_LIMIT:?}: {} done)",
                drained.done
            )
        } else {
            name
        };
        let rate = drained.done as f64 / drained.took.as_secs_f64();
        println!("   {name}: {rate:.0} jobs/s");
        report.add("depth", name.clone(), rate, "jobs/s");
        report.add(
            "depth",
            format!("{name}: table at start"),
            mib(drained.size_at_start.0),
            "MiB",
        );
        report.add(
            "depth",
            format!("{name}: indexes at start"),
            mib(drained.size_at_start.1),
            "MiB",
        );
        report.add(
            "depth",
            format!("{name}: table at end"),
            mib(drained.size_at_end.0),
            "MiB",
        );
        report.add(
            "depth",
            format!("{name}: indexes at end"),
            mib(drained.size_at_end.1),
            "MiB",
        );
        if let Some(shallow) = report.value("drain, default settings") {
            report.add(
                "depth",
                format!("{name} / drain of 20,000"),
                rate / shallow,
                "x",
            );
        }
    }
    empty_jobs(db).await?;

    let probes: Vec<jobs::probe::Probe> = (0..sizes.enqueue_many)
        .map(|n| probe(format!("many-{n}"), jobs::probe::Behaviour::Noop))
        .collect();
    let started = Instant::now();
    let mut tx = db.pool.begin().await?;
    durable_jobs::enqueue_many(&mut tx, &probes).await?;
    tx.commit().await?;
    let took = started.elapsed();
    report.add(
        "depth",
        format!("enqueue_many of {} in one transaction", sizes.enqueue_many),
        sizes.enqueue_many as f64 / took.as_secs_f64(),
        "jobs/s",
    );
    empty_jobs(db).await?;
    Ok(())
}
