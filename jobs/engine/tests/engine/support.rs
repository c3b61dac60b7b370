//! The tests' harness: a fresh migrated database per test, an in-process
//! worker, and worker processes (`examples/test_worker.rs`).
//!
//! Postgres comes from `TEST_DATABASE_URL` (default
//! `postgres://root@127.0.0.1:5432/postgres`): the maintenance database from
//! which each test's database is created and dropped.

use std::{
    path::PathBuf,
    process::{ExitStatus, Stdio},
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use anyhow::{Context as _, bail};
use durable_jobs::WorkerConfig;
use sqlx::{
    ConnectOptions as _, Connection as _, PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};
use tokio::{
    io::{AsyncBufReadExt as _, BufReader},
    process::{Child, Command},
    sync::{OnceCell, Semaphore, SemaphorePermit},
};
use ulid::Ulid;

/// Connections this test binary may hold at once, all tests together: the
/// server's `max_connections` less 10 (for short-lived connections: create
/// and drop database), or `TEST_CONNECTION_BUDGET` if set. Each test
/// reserves what it will open (its pool, its workers' pools) before it
/// creates its database, so any number of test threads stays within this.
async fn budget() -> &'static (Semaphore, u32) {
    static BUDGET: OnceCell<(Semaphore, u32)> = OnceCell::const_new();
    BUDGET
        .get_or_init(|| async {
            let total = match std::env::var("TEST_CONNECTION_BUDGET")
                .ok()
                .and_then(|value| value.parse().ok())
            {
                Some(total) => total,
                None => server_max_connections()
                    .await
                    .map_or(90, |max| max.saturating_sub(10).max(default_reserve())),
            };
            (Semaphore::new(total as usize), total)
        })
        .await
}

async fn server_max_connections() -> anyhow::Result<u32> {
    let mut conn = connect(&maintenance_options()?).await?;
    let max: String = sqlx::query_scalar("show max_connections")
        .fetch_one(&mut conn)
        .await?;
    conn.close().await?;
    Ok(max.parse()?)
}

/// What most tests reserve: a pool of [`POOL_SIZE`] and one in-process
/// worker's bookkeeping pool.
pub fn default_reserve() -> u32 {
    POOL_SIZE + bookkeeping_connections()
}

/// The most connections a worker of the test registry opens beside the pool
/// it is given: its bookkeeping pool, one per queue (the engine's prune
/// among them) and three (see `WorkerConfig::bookkeeping_pool`). Under-reserved,
/// tests beside each other fill the server and time out on connecting.
pub fn bookkeeping_connections() -> u32 {
    u32::try_from(crate::jobs::registry().queues().len()).expect("a few queues") + 3
}

/// The most connections a worker process of [`fast_env`] opens: its pool
/// (`WorkerConfig::connections_needed`) and its bookkeeping.
pub fn process_connections() -> u32 {
    fast_config().connections_needed() + bookkeeping_connections()
}

/// The test pool's size unless a test asks for more.
pub const POOL_SIZE: u32 = 5;

fn maintenance_options() -> anyhow::Result<PgConnectOptions> {
    let url = std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/postgres".to_owned());
    url.parse()
        .with_context(|| format!("TEST_DATABASE_URL {url:?}"))
}

/// Connects, waiting (up to a minute) while Postgres has no connection
/// slot free: other test runs share it, and their peaks pass.
async fn connect(options: &PgConnectOptions) -> anyhow::Result<sqlx::PgConnection> {
    let give_up = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match options.connect().await {
            Err(sqlx::Error::Database(err))
                if err.code().as_deref() == Some("53300")
                    && tokio::time::Instant::now() < give_up =>
            {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            result => return result.context("connect to Postgres"),
        }
    }
}

/// A database of its own for one test, with the queue's schema; dropped
/// (forcibly) when this is dropped.
#[derive(Debug)]
pub struct TestDb {
    /// A pool on the test database ([`POOL_SIZE`] connections).
    pub pool: PgPool,
    /// Its URL, for worker processes.
    pub url: String,
    name: String,
    _reserved: SemaphorePermit<'static>,
}

impl TestDb {
    /// A migrated database, reserving [`default_reserve`] connections.
    pub async fn new() -> anyhow::Result<Self> {
        Self::reserving(default_reserve(), POOL_SIZE).await
    }

    /// A migrated database whose test opens at most `reserve` connections in
    /// all, `pool_size` of them in [`TestDb::pool`].
    pub async fn reserving(reserve: u32, pool_size: u32) -> anyhow::Result<Self> {
        let (budget, total) = budget().await;
        let reserved = budget
            .acquire_many(reserve.min(*total))
            .await
            .context("the connection budget is never closed")?;
        let name = format!(
            "durable_jobs_test_{}",
            Ulid::generate().to_string().to_lowercase()
        );
        let admin = maintenance_options()?;
        let mut conn = connect(&admin).await?;
        // A generated identifier (lowercase ULID): safe to splice.
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("create database {name}")))
            .execute(&mut conn)
            .await?;
        conn.close().await?;
        let options = admin.clone().database(&name);
        let pool = PgPoolOptions::new()
            .max_connections(pool_size)
            .connect_lazy_with(options.clone());
        // Its first connection, through the same wait as ours.
        connect(&options).await?.close().await?;
        let url = format!(
            "postgres://{}@{}:{}/{name}",
            options.get_username(),
            options.get_host(),
            options.get_port()
        );
        let db = Self {
            pool,
            url,
            name,
            _reserved: reserved,
        };
        durable_jobs::migrate(&db.pool).await?;
        Ok(db)
    }

    /// `(status, last_result ->> 'Err')` of job `id`.
    pub async fn job_outcome(&self, id: &str) -> anyhow::Result<(String, Option<String>)> {
        Ok(
            sqlx::query_as("select status, last_result ->> 'Err' from apalis.jobs where id = $1")
                .bind(id)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// Waits until job `id` has `status`, polling every 20 ms; fails after
    /// `within` with the job's outcome. Returns how long it took.
    pub async fn wait_for_status(
        &self,
        id: &str,
        status: &str,
        within: Duration,
    ) -> anyhow::Result<Duration> {
        let started = tokio::time::Instant::now();
        loop {
            let outcome = self.job_outcome(id).await?;
            if outcome.0 == status {
                return Ok(started.elapsed());
            }
            if started.elapsed() >= within {
                bail!("job {id} is not {status} after {within:?}: {outcome:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until no job is waiting, claimed, running or due for a retry.
    pub async fn wait_until_idle(&self, deadline: Duration) -> anyhow::Result<()> {
        let give_up = tokio::time::Instant::now() + deadline;
        loop {
            let open: Vec<(String, String)> = sqlx::query_as(
                "select id, state from apalis.job_states where state not in ('done', 'dead')",
            )
            .fetch_all(&self.pool)
            .await?;
            if open.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= give_up {
                bail!("jobs still open after {deadline:?}: {open:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let Ok(admin) = maintenance_options() else {
            return;
        };
        // Drop runs outside async: a short-lived runtime on its own thread.
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let mut conn = connect(&admin).await?;
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                    "drop database if exists {name} with (force)"
                )))
                .execute(&mut conn)
                .await?;
                anyhow::Ok(())
            })
        });
        match cleanup.join() {
            Ok(Err(err)) => eprintln!("could not drop test database {}: {err:#}", self.name),
            Err(_) => eprintln!("dropping test database {} panicked", self.name),
            Ok(Ok(())) => {}
        }
    }
}

/// The engine's periodic prune on a schedule no test lives to see (midnight,
/// January 1st): every minute it would add a `prune_jobs` job to the
/// queues the tests count.
pub const QUIET_PRUNE_SCHEDULE: &str = "0 0 0 1 1 *";

/// Worker settings scaled down for tests: quick polls, short backoff, lease
/// and timeout, few slots (few connections), the prune on
/// [`QUIET_PRUNE_SCHEDULE`].
pub fn fast_config() -> WorkerConfig {
    WorkerConfig {
        concurrency: 4,
        prune_schedule: QUIET_PRUNE_SCHEDULE
            .parse()
            .expect("the quiet prune schedule parses"),
        poll_interval: Duration::from_millis(50),
        lease: Duration::from_secs(3),
        job_timeout: Some(Duration::from_secs(2)),
        backoff_base: Some(Duration::from_millis(200)),
        ..WorkerConfig::default()
    }
}

/// Enqueues `job` in a transaction of its own; returns its id.
pub async fn enqueue<J: durable_jobs::Job>(pool: &PgPool, job: &J) -> anyhow::Result<String> {
    let mut tx = pool.begin().await?;
    let id = durable_jobs::enqueue(&mut tx, job).await?.to_string();
    tx.commit().await?;
    Ok(id)
}

/// The same settings as environment variables, for worker processes.
pub fn fast_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("WORKER_CONCURRENCY", "4"),
        ("WORKER_POLL_INTERVAL", "0.05"),
        ("JOB_LEASE", "3"),
        ("JOB_TIMEOUT", "2"),
        ("JOB_BACKOFF_BASE", "0.2"),
    ]
}

/// Polls `check` every 20 ms until it is true; fails after `deadline` with
/// `what`.
pub async fn wait_until<F, Fut>(deadline: Duration, what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<bool>>,
{
    let give_up = tokio::time::Instant::now() + deadline;
    while !check().await? {
        if tokio::time::Instant::now() >= give_up {
            bail!("{what} (waited {deadline:?})");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// The path of this package's example `name`. `cargo test` (of the package
/// or the workspace) builds the examples beside the tests, and that build is
/// used when it is newer than every file of the package; otherwise (`cargo test
/// --test engine` builds no example) a nested cargo builds them once per run,
/// with the dashboard feature the quickstart needs.
pub fn example(name: &str) -> anyhow::Result<PathBuf> {
    if let Some(built) = built_by_cargo_test(name) {
        return Ok(built);
    }
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let dir = BUILT
        .get_or_init(|| build_examples().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)?;
    Ok(dir.join("examples").join(name))
}

/// `<profile>/examples/<name>` if it is newer than every file of the
/// package.
fn built_by_cargo_test(name: &str) -> Option<PathBuf> {
    fn newest(path: &std::path::Path) -> Option<std::time::SystemTime> {
        let meta = std::fs::metadata(path).ok()?;
        if !meta.is_dir() {
            return meta.modified().ok();
        }
        std::fs::read_dir(path)
            .ok()?
            .filter_map(|entry| newest(&entry.ok()?.path()))
            .max()
    }
    let exe = std::env::current_exe().ok()?;
    let deps = exe.parent()?;
    let profile = if deps.ends_with("deps") {
        deps.parent()?
    } else {
        deps
    };
    let example = profile.join("examples").join(name);
    let built = std::fs::metadata(&example).ok()?.modified().ok()?;
    // Every file of the package: its migrations are compiled in, and the
    // test worker includes a file of the tests.
    let sources = newest(std::path::Path::new(env!("CARGO_MANIFEST_DIR")))?;
    (built >= sources).then_some(example)
}

fn build_examples() -> anyhow::Result<PathBuf> {
    // <target>/<profile>/deps/engine-<hash>  ->  <target>/<profile>
    let exe = std::env::current_exe()?;
    let mut profile_dir = exe.parent().context("a directory")?.to_path_buf();
    if profile_dir.ends_with("deps") {
        profile_dir.pop();
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = std::process::Command::new(cargo);
    build.args([
        "build",
        "--quiet",
        "-p",
        "durable-jobs",
        "--features",
        "dashboard",
        "--example",
        "test_worker",
        "--example",
        "quickstart",
    ]);
    // Variables cargo set for this test binary: build scripts that watch
    // one would see it change and rebuild (ring watches CARGO_MANIFEST_DIR).
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_BIN_")
            || [
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_CRATE_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
            ]
            .contains(&key.as_ref())
        {
            build.env_remove(key.as_ref());
        }
    }
    if !cfg!(debug_assertions) {
        build.arg("--release");
    }
    let status = build.status().context("run cargo build for the examples")?;
    if !status.success() {
        bail!("cargo build of the examples failed: {status}");
    }
    Ok(profile_dir)
}

/// A running child process whose stdout+stderr lines are collected; killed
/// (SIGKILL) if still running when dropped.
#[derive(Debug)]
pub struct Process {
    name: String,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Process {
    /// Spawns a `test_worker` on `db` with `env` (e.g. [`fast_env`]; the
    /// prune on [`QUIET_PRUNE_SCHEDULE`] unless `env` sets one) and waits
    /// until it has registered a worker for each of its queues, i.e. is
    /// about to claim.
    pub async fn started_worker(db: &TestDb, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let mut command = Command::new(example("test_worker")?);
        command
            .env("JOB_PRUNE_SCHEDULE", QUIET_PRUNE_SCHEDULE)
            .envs(env.iter().copied())
            .env("DATABASE_URL", &db.url)
            .env("RUST_LOG", "info,sqlx::postgres::notice=warn")
            .env("NO_COLOR", "1");
        let mut worker = Self::start("test_worker", command)?;
        worker.wait_until_registered(db).await?;
        Ok(worker)
    }

    /// apalis registers a worker row just before its first claim, after
    /// "worker started" is logged: a test that enqueues on that line races
    /// the start-up.
    async fn wait_until_registered(&mut self, db: &TestDb) -> anyhow::Result<()> {
        let pid = self.child.id().context("worker already reaped")?;
        let started = self
            .wait_for_line("worker started", Duration::from_secs(60))
            .await?;
        let queues = started
            .split_once("queues=\"")
            .and_then(|(_, rest)| rest.split('"').next())
            .context("the start line names the queues")?
            .split(", ")
            .count();
        let queues = i64::try_from(queues)?;
        // Worker names end `-<pid>-<start ms>-<generation>`.
        let pattern = format!("-{pid}-[0-9]+-[0-9]+$");
        let give_up = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let registered: i64 = sqlx::query_scalar(
                "select count(distinct worker_type) from apalis.workers where id ~ $1",
            )
            .bind(&pattern)
            .fetch_one(&db.pool)
            .await?;
            if registered >= queues {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited ({status}) before registering:\n{}",
                    self.name,
                    self.output().join("\n")
                );
            }
            if tokio::time::Instant::now() >= give_up {
                bail!(
                    "{} registered {registered} of {queues} workers within a minute:\n{}",
                    self.name,
                    self.output().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Spawns `command`, collecting its output.
    pub fn start(name: &str, mut command: Command) -> anyhow::Result<Self> {
        command
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().with_context(|| format!("spawn {name}"))?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().context("stdout")?;
        let stderr = child.stderr.take().context("stderr")?;
        for stream in [
            Box::new(stdout) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
            Box::new(stderr),
        ] {
            let lines = lines.clone();
            tokio::spawn(async move {
                let mut reader = BufReader::new(stream);
                let mut line = Vec::new();
                while let Ok(n) = reader.read_until(b'\n', &mut line).await {
                    if n == 0 {
                        break;
                    }
                    let text = String::from_utf8_lossy(&line).trim_end().to_owned();
                    lines.lock().expect("log buffer lock").push(text);
                    line.clear();
                }
            });
        }
        Ok(Self {
            name: name.to_owned(),
            child,
            lines,
        })
    }

    /// Every line printed so far.
    pub fn output(&self) -> Vec<String> {
        self.lines.lock().expect("log buffer lock").clone()
    }

    /// Waits for a line containing `needle`; fails on exit or after `deadline`.
    pub async fn wait_for_line(
        &mut self,
        needle: &str,
        deadline: Duration,
    ) -> anyhow::Result<String> {
        let give_up = tokio::time::Instant::now() + deadline;
        loop {
            if let Some(line) = self.output().into_iter().find(|l| l.contains(needle)) {
                return Ok(line);
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited ({status}) before printing {needle:?}:\n{}",
                    self.name,
                    self.output().join("\n")
                );
            }
            if tokio::time::Instant::now() >= give_up {
                bail!(
                    "{} did not print {needle:?} within {deadline:?}:\n{}",
                    self.name,
                    self.output().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: nix::sys::signal::Signal) -> anyhow::Result<()> {
        let pid = self.child.id().context("process already reaped")?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(pid)?), signal)?;
        Ok(())
    }

    /// Waits (with a deadline) for the process to exit.
    pub async fn wait(&mut self, deadline: Duration) -> anyhow::Result<ExitStatus> {
        match tokio::time::timeout(deadline, self.child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => bail!(
                "{} still running after {deadline:?}:\n{}",
                self.name,
                self.output().join("\n")
            ),
        }
    }

    /// Sends SIGTERM and waits (with a deadline) for the exit status.
    pub async fn terminate(mut self, deadline: Duration) -> anyhow::Result<ExitStatus> {
        self.signal(nix::sys::signal::Signal::SIGTERM)?;
        self.wait(deadline).await
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id().and_then(|pid| i32::try_from(pid).ok()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}
