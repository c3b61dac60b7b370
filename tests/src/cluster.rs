//! A private PostgreSQL cluster (initdb + pg_ctl on a free port under a temp
//! directory) for tests that stop and start the database, so nothing else on
//! the machine is disturbed.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

/// A running cluster; stopped and deleted on drop.
#[derive(Debug)]
pub struct PrivateCluster {
    dir: PathBuf,
    bin: PathBuf,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

fn postgres_bin() -> anyhow::Result<PathBuf> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL server binaries (/usr/lib/postgresql) are not installed")?
        .filter_map(|entry| Some(entry.ok()?.path().join("bin")))
        .filter(|bin| bin.join("pg_ctl").exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .context("no pg_ctl under /usr/lib/postgresql")
}

impl PrivateCluster {
    /// Creates and starts a cluster whose superuser is `root` (trust auth).
    pub fn start() -> anyhow::Result<Self> {
        let bin = postgres_bin()?;
        let dir = std::env::temp_dir().join(format!("visitme-pg-{}", ulid::Ulid::generate()));
        std::fs::create_dir_all(&dir)?;
        let as_root = nix::unistd::geteuid().is_root();
        if as_root {
            // initdb and postgres refuse to run as root.
            let owner = nix::unistd::User::from_name("postgres")?.context("no postgres account")?;
            std::os::unix::fs::chown(&dir, Some(owner.uid.as_raw()), Some(owner.gid.as_raw()))?;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let cluster = Self { dir, bin, port };
        cluster.run(
            "initdb",
            &[
                "-D",
                &cluster.data(),
                "-A",
                "trust",
                "-U",
                "root",
                "--no-sync",
            ],
        )?;
        cluster.resume()?;
        Ok(cluster)
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    fn run(&self, tool: &str, args: &[&str]) -> anyhow::Result<()> {
        let program = self.bin.join(tool);
        let mut command = if nix::unistd::geteuid().is_root() {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(&program);
            command
        } else {
            Command::new(&program)
        };
        let output = command.args(args).current_dir(&self.dir).output()?;
        if !output.status.success() {
            bail!("{tool} failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        Ok(())
    }

    /// A URL for database `name` on this cluster.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://root@127.0.0.1:{}/{name}", self.port)
    }

    /// Stops the server (fast shutdown: connections are cut).
    pub fn stop(&self) -> anyhow::Result<()> {
        self.run("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "stop"])
    }

    /// Crashes the server: SIGKILLs the postmaster (its pid from
    /// `data/postmaster.pid`) and every process it forked, as a power cut
    /// would end them, so that [`PrivateCluster::resume`] runs crash recovery.
    /// Returns once they are all gone.
    pub fn crash(&self) -> anyhow::Result<()> {
        let pid_file = self.dir.join("data").join("postmaster.pid");
        let postmaster: i32 = std::fs::read_to_string(&pid_file)?
            .lines()
            .next()
            .context("empty postmaster.pid")?
            .trim()
            .parse()?;
        let postmaster = Pid::from_raw(postmaster);
        // Stopped, it forks no new backend between the listing and the kill.
        kill(postmaster, Signal::SIGSTOP)?;
        let children = children_of(postmaster)?;
        kill(postmaster, Signal::SIGKILL)?;
        for &child in &children {
            let _ = kill(child, Signal::SIGKILL);
        }
        let give_up = std::time::Instant::now() + Duration::from_secs(10);
        while children
            .iter()
            .chain([&postmaster])
            .any(|&pid| is_alive(pid))
        {
            if std::time::Instant::now() >= give_up {
                bail!("the server's processes outlived SIGKILL by 10 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // A killed postmaster left unreaped (a zombie: no init reaps orphans
        // in some containers) still answers kill(pid, 0), which the next
        // postmaster reads as "another server is running" from its lock
        // files (the data directory's and the socket's). After a real crash
        // that pid is gone, so the lock files are stale.
        if Path::new(&format!("/proc/{postmaster}")).exists() {
            std::fs::remove_file(&pid_file)?;
            let socket_lock = self.dir.join(format!(".s.PGSQL.{}.lock", self.port));
            if socket_lock.exists() {
                std::fs::remove_file(socket_lock)?;
            }
        }
        Ok(())
    }

    /// Starts the server again (and the first time).
    pub fn resume(&self) -> anyhow::Result<()> {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off -c max_connections=200",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("server.log");
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-o",
                &options,
                "-l",
                &log.display().to_string(),
                "-w",
                "start",
            ],
        )
        .map_err(|err| {
            // pg_ctl only says "examine the log output": the log goes away with the cluster.
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(10).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            err.context(format!("server log:\n{}", tail.join("\n")))
        })
    }

    /// The cluster's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// The processes whose parent is `parent` (from `/proc/<pid>/stat`).
fn children_of(parent: Pid) -> anyhow::Result<Vec<Pid>> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let Ok(pid) = entry?.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Some((_, ppid)) = stat(pid)
            && ppid == parent.as_raw()
        {
            children.push(Pid::from_raw(pid));
        }
    }
    Ok(children)
}

/// `(state, parent pid)` of process `pid`, if it exists.
fn stat(pid: i32) -> Option<(char, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid ...`: comm may hold spaces and parentheses.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Whether `pid` still runs (a zombie has ended).
fn is_alive(pid: Pid) -> bool {
    stat(pid.as_raw()).is_some_and(|(state, _)| state != 'Z' && state != 'X')
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let _ = self.run(
            "pg_ctl",
            &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
