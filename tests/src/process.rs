//! The real `web` and `worker` binaries as child processes.

use std::{
    path::PathBuf,
    process::{ExitStatus, Stdio},
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use anyhow::{Context as _, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use tokio::{
    io::{AsyncBufReadExt as _, BufReader},
    process::{Child, Command},
};

/// Path of a workspace binary (`web` or `worker`), built once per test run.
///
/// `cargo test` builds libraries and test harnesses but not other packages'
/// executables, so the first call runs `cargo build --bins` for them, in the
/// same profile and target directory as this test binary.
///
/// With `VISITME_BIN_DIR` set, the binaries are taken from there instead and
/// nothing is built: to run tests against other builds, e.g. an older release,
/// to see a regression test fail.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("VISITME_BIN_DIR") {
        return Ok(PathBuf::from(dir).join(name));
    }
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let dir = BUILT
        .get_or_init(|| build_binaries().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)?;
    Ok(dir.join(name))
}

/// The path of the engine's example `name` (built with the binaries).
pub fn example(name: &str) -> anyhow::Result<PathBuf> {
    let web = binary("web")?;
    let dir = web.parent().context("binaries have a directory")?;
    Ok(dir.join("examples").join(name))
}

fn build_binaries() -> anyhow::Result<PathBuf> {
    // <target>/<profile>/deps/integration-<hash> (a test) or
    // <target>/<profile>/bench (a binary)  ->  <target>/<profile>
    let exe = std::env::current_exe()?;
    let mut profile_dir = exe
        .parent()
        .context("executable has a directory")?
        .to_path_buf();
    if profile_dir.ends_with("deps") {
        profile_dir.pop();
    }
    // The cargo that runs us (tests, `cargo run`), else rustup's proxy on PATH:
    // a toolchain's cargo called directly would let each dependency's own
    // rust-toolchain.toml (sqlx ships one) choose its compiler.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = std::process::Command::new(cargo);
    // With the probe job, as the tests' own build of `jobs` has it; and the
    // engine's quickstart example.
    build.args([
        "build",
        "--quiet",
        "-p",
        "web",
        "-p",
        "jobs",
        "-p",
        "durable-jobs",
        "--bins",
        "--example",
        "quickstart",
        "--features",
        "jobs/probes,durable-jobs/dashboard",
    ]);
    for key in cargo_crate_env() {
        build.env_remove(key);
    }
    if !cfg!(debug_assertions) {
        build.arg("--release");
    }
    let status = build.status().context("run cargo build for the binaries")?;
    if !status.success() {
        bail!("cargo build of the web/worker binaries failed: {status}");
    }
    Ok(profile_dir)
}

/// Variables cargo sets for the crate it runs (this test binary), to remove
/// from the environment of a nested `cargo build` (ours, or a script's).
/// Build scripts that watch one (ring watches CARGO_MANIFEST_DIR) would see
/// it change between that build and the outer one and rebuild ring, rustls
/// and sqlx every time.
pub fn cargo_crate_env() -> Vec<String> {
    std::env::vars_os()
        .map(|(key, _)| key.to_string_lossy().into_owned())
        .filter(|key| {
            key.starts_with("CARGO_PKG_")
                || key.starts_with("CARGO_BIN_")
                || [
                    "CARGO_MANIFEST_DIR",
                    "CARGO_MANIFEST_PATH",
                    "CARGO_CRATE_NAME",
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                ]
                .contains(&key.as_str())
        })
        .collect()
}

/// A running child process whose stdout+stderr lines are collected.
/// Killed (SIGKILL), with its whole process group, if still running when dropped.
#[derive(Debug)]
pub struct Process {
    name: String,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    readers: Vec<tokio::task::JoinHandle<()>>,
    /// The test's connection budget, counting it if it connects to Postgres.
    _share: Option<std::sync::Arc<crate::budget::Reservation>>,
}

impl Process {
    /// Spawns binary `name` with extra environment variables, logging at
    /// `info` (a `RUST_LOG` in `env` is overridden; see [`Process::spawn_logging`]),
    /// with the prune on [`crate::QUIET_PRUNE_SCHEDULE`] unless `env` sets
    /// `JOB_PRUNE_SCHEDULE`.
    pub fn spawn(name: &str, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        Self::spawn_logging(
            name,
            env,
            "info,sqlx::postgres::notice=warn,opentelemetry=warn",
        )
    }

    /// [`Process::spawn`] with the log filter `rust_log`.
    pub fn spawn_logging(name: &str, env: &[(&str, &str)], rust_log: &str) -> anyhow::Result<Self> {
        let mut command = Command::new(binary(name)?);
        command
            // Before `env`, which may set its own.
            .env("JOB_PRUNE_SCHEDULE", crate::QUIET_PRUNE_SCHEDULE)
            .envs(env.iter().copied())
            .env("RUST_LOG", rust_log)
            .env("NO_COLOR", "1");
        Self::start(name, command)
    }

    /// Spawns a `worker` process and waits until it is ready to claim jobs
    /// (see [`Process::wait_until_registered`]). `env` names its
    /// `DATABASE_URL` (else the binary's default).
    pub async fn started_worker(env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let mut worker = Self::spawn("worker", env)?;
        worker.wait_until_registered(env).await?;
        Ok(worker)
    }

    /// Waits until this `worker` process, spawned with `env`, has registered
    /// a worker row in `apalis.workers` for each of its queues: apalis
    /// registers a worker just before its first claim, while "worker started"
    /// is logged before any of that (a test that enqueues on that line races
    /// the start-up). Fails if the process exits or after a minute.
    pub async fn wait_until_registered(&mut self, env: &[(&str, &str)]) -> anyhow::Result<()> {
        // The last occurrence wins, as in the child's environment.
        let setting = |key: &str| env.iter().rev().find(|(k, _)| *k == key).map(|(_, v)| *v);
        let url = setting("DATABASE_URL").unwrap_or("postgres://localhost/visitme");
        let pid = self.pid().context("worker already reaped")?;
        let started = self
            .wait_for_line("worker started", Duration::from_secs(60))
            .await?;
        // Every queue the process names in that line (`queues="a, b"`: an
        // older build's, for the bench's baseline), else every queue of this
        // build's registry (the tests' builds have the probe job).
        let queues = match started.split_once("queues=\"") {
            Some((_, rest)) => rest.split('"').next().unwrap_or("").split(", ").count(),
            None => jobs::registry().queues().len(),
        };
        let queues = i64::try_from(queues)?;
        let db = sqlx::PgPool::connect_with(migrations::parse_url(url)?).await?;
        // Worker names end `-<pid>-<start ms>-<generation>` (jobs::worker::worker_name).
        let pattern = format!("-{pid}-[0-9]+-[0-9]+$");
        let give_up = tokio::time::Instant::now() + Duration::from_secs(60);
        let result = loop {
            let registered: i64 = sqlx::query_scalar(
                "select count(distinct worker_type) from apalis.workers where id ~ $1",
            )
            .bind(&pattern)
            .fetch_one(&db)
            .await?;
            if registered >= queues {
                break Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                break Err(anyhow::anyhow!(
                    "{} exited ({status}) before registering its workers:\n{}",
                    self.name,
                    self.output().join("\n")
                ));
            }
            if tokio::time::Instant::now() >= give_up {
                break Err(anyhow::anyhow!(
                    "{} registered {registered} of {queues} workers within a minute:\n{}",
                    self.name,
                    self.output().join("\n")
                ));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        };
        db.close().await;
        result
    }

    /// The process id, until the process has been reaped.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The exit status if the process has exited, without waiting.
    pub fn exited(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// Waits (with a deadline) for the process to exit on its own.
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

    /// Spawns any command, collecting its output like [`Process::spawn`].
    ///
    /// A command given a `DATABASE_URL` counts against the test's declared
    /// processes ([`crate::budget::runs_processes`]).
    pub fn start(name: &str, mut command: Command) -> anyhow::Result<Self> {
        let connects = command
            .as_std()
            .get_envs()
            .any(|(key, value)| key == "DATABASE_URL" && value.is_some());
        command
            // Its own process group, so that dropping it also ends its children.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().with_context(|| format!("spawn {name}"))?;
        let share = match child.id() {
            Some(pid) if connects => crate::budget::process_started(name, pid),
            _ => None,
        };
        let lines = Arc::new(Mutex::new(Vec::new()));
        let mut readers = Vec::new();
        let stdout = child.stdout.take().context("stdout")?;
        let stderr = child.stderr.take().context("stderr")?;
        for (stream, lines) in [
            (
                Box::new(stdout) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
                lines.clone(),
            ),
            (Box::new(stderr), lines.clone()),
        ] {
            readers.push(tokio::spawn(async move {
                // Bytes, not `lines()`: that stops at the first line that is
                // not UTF-8, and every later absence check would pass vacuously.
                let mut reader = BufReader::new(stream);
                let mut line = Vec::new();
                loop {
                    line.clear();
                    let text = match reader.read_until(b'\n', &mut line).await {
                        Ok(0) => break,
                        Ok(_) => String::from_utf8_lossy(&line)
                            .trim_end_matches(['\n', '\r'])
                            .to_owned(),
                        Err(err) => {
                            let note = format!("(test harness: reading output failed: {err})");
                            lines.lock().expect("log buffer lock").push(note);
                            break;
                        }
                    };
                    lines.lock().expect("log buffer lock").push(text);
                }
            }));
        }
        Ok(Self {
            name: name.to_owned(),
            child,
            lines,
            readers,
            _share: share,
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
                // Let the readers catch up with what it printed before exiting.
                tokio::time::sleep(Duration::from_millis(200)).await;
                if let Some(line) = self.output().into_iter().find(|l| l.contains(needle)) {
                    return Ok(line);
                }
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

    /// Waits for the web server's "VisitMe is up" line and returns its address.
    pub async fn web_address(&mut self) -> anyhow::Result<String> {
        let line = self
            .wait_for_line("VisitMe is up: open http://", Duration::from_secs(60))
            .await?;
        let start = line.find("http://").context("url in line")? + "http://".len();
        let rest = &line[start..];
        Ok(rest[..rest.find('/').context("url end")?].to_owned())
    }

    /// Sends `signal` to the process (not to its children).
    pub fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        let pid = self.child.id().context("process already reaped")?;
        kill(Pid::from_raw(i32::try_from(pid)?), signal)?;
        Ok(())
    }

    /// Sends SIGTERM and waits (with a deadline) for the exit status.
    pub async fn terminate(mut self, deadline: Duration) -> anyhow::Result<ExitStatus> {
        self.signal(Signal::SIGTERM)?;
        match tokio::time::timeout(deadline, self.child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => bail!(
                "{} still running {deadline:?} after SIGTERM:\n{}",
                self.name,
                self.output().join("\n")
            ),
        }
    }
}

impl Process {
    /// Sends SIGTERM, waits (with a deadline) for the exit, then for the end
    /// of its output, and returns both: everything it printed, up to its last
    /// line at shutdown.
    pub async fn terminate_with_output(
        mut self,
        deadline: Duration,
    ) -> anyhow::Result<(ExitStatus, Vec<String>)> {
        self.signal(Signal::SIGTERM)?;
        let status = match tokio::time::timeout(deadline, self.child.wait()).await {
            Ok(status) => status?,
            Err(_) => bail!(
                "{} still running {deadline:?} after SIGTERM:\n{}",
                self.name,
                self.output().join("\n")
            ),
        };
        for reader in std::mem::take(&mut self.readers) {
            tokio::time::timeout(Duration::from_secs(10), reader)
                .await
                .with_context(|| format!("{}'s output did not end after its exit", self.name))??;
        }
        Ok((status, self.output()))
    }

    /// Waits (with a deadline) for the process to exit, by itself or by a
    /// signal sent before, then for the end of its output, and returns
    /// everything it printed (a SIGKILLed worker's last lines included).
    pub async fn output_after_exit(mut self, deadline: Duration) -> anyhow::Result<Vec<String>> {
        self.wait(deadline).await?;
        for reader in std::mem::take(&mut self.readers) {
            tokio::time::timeout(deadline, reader)
                .await
                .with_context(|| format!("{}'s output did not end after its exit", self.name))??;
        }
        Ok(self.output())
    }

    /// Waits (with a deadline) for the process to exit by itself.
    pub async fn wait_exit(&mut self, deadline: Duration) -> anyhow::Result<ExitStatus> {
        match tokio::time::timeout(deadline, self.child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => bail!("{} still running after {deadline:?}", self.name),
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id().and_then(|pid| i32::try_from(pid).ok()) {
            let _ = nix::sys::signal::killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}
