//! Postgres connections shared by the tests that run at once.
//!
//! Postgres allows about 100 connections and a `worker` or `web` process opens
//! up to 18, so tests running in parallel would run out. Each test reserves,
//! before its first [`crate::TestDb`], what it will hold at its peak: its own
//! pools ([`PER_TEST`]) and [`PER_PROCESS`] for each process it runs at once,
//! declared up front with [`runs_processes`]. A test waits until its whole
//! reservation is free, takes it in one step and keeps it to its end, so no
//! test holds part of the budget while waiting for more (no deadlock, however
//! many test threads), and the connections in use never pass the budget
//! (`total`).
//!
//! A test is known by its thread (libtest names each test's thread after the
//! test, and a `#[tokio::test]` body runs on it). A process spawned past the
//! test's declaration fails the test at once, so a missing declaration shows
//! on the first run, not as a rare "too many clients".

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, OnceLock},
};

use tokio::sync::Notify;

/// A test's pool ([`crate::TestDb::pool`]) unless it declares a larger one
/// ([`uses_pool`]).
pub const POOL: u32 = 10;

/// What a test reserves for itself: its pool ([`POOL`]) and
/// an in-process worker's bookkeeping pool (a connection per queue and
/// three: 7 for VisitMe's four queues).
pub const PER_TEST: u32 = 17;

/// What a `web` or `worker` process of the tests opens at most: its job pool
/// (`WorkerConfig::connections_needed`, at most 11) and its bookkeeping pool
/// (7). Measured over a whole run: at most 60 connections open at once
/// (14 on average) under this accounting.
pub const PER_PROCESS: u32 = 18;

/// Connections all tests together may hold: the server's `max_connections`
/// less 10 (for the harness's short-lived connections: create and drop
/// database, a worker's registration check), at most [`MOST`], or
/// `TEST_CONNECTION_BUDGET` if set. With Postgres's default 100 that is 90.
async fn total() -> u32 {
    static TOTAL: tokio::sync::OnceCell<u32> = tokio::sync::OnceCell::const_new();
    *TOTAL
        .get_or_init(|| async {
            if let Some(budget) = std::env::var("TEST_CONNECTION_BUDGET")
                .ok()
                .and_then(|value| value.parse().ok())
            {
                return budget;
            }
            server_max_connections()
                .await
                .map_or(90, |max| max.saturating_sub(10).clamp(PER_TEST, MOST))
        })
        .await
}

async fn server_max_connections() -> anyhow::Result<u32> {
    use sqlx::{ConnectOptions as _, Connection as _};
    let mut conn = crate::admin_options()?.connect().await?;
    let max: String = sqlx::query_scalar("show max_connections")
        .fetch_one(&mut conn)
        .await?;
    conn.close().await?;
    Ok(max.parse()?)
}

/// Past this many connections the two cores, not Postgres, are the limit:
/// on a server allowing 300, the integration tests took 198 s with 90,
/// 212 s with 290 and longer with 120 (more tests at once, each slower, and
/// tests with 3 s leases or 2 s job timeouts failed).
const MOST: u32 = 90;

/// The connections not reserved, handed out first come first served except
/// that a small request may pass a large one that does not fit yet, unless
/// that one has waited [`PATIENCE`]: a test needing 4 processes does not
/// hold back the light tests behind it, nor wait for all of them.
#[derive(Debug)]
struct Pool {
    state: Mutex<PoolState>,
    released: Notify,
}

#[derive(Debug)]
struct PoolState {
    free: u32,
    /// Tickets of waiting requests and when they started waiting.
    waiting: Vec<(u64, std::time::Instant)>,
    next_ticket: u64,
}

/// How long a request may be passed by later, smaller ones.
const PATIENCE: std::time::Duration = std::time::Duration::from_secs(15);

async fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    let total = total().await;
    POOL.get_or_init(|| Pool {
        state: Mutex::new(PoolState {
            free: total,
            waiting: Vec::new(),
            next_ticket: 0,
        }),
        released: Notify::new(),
    })
}

impl Pool {
    async fn acquire(&'static self, wanted: u32) -> Permit {
        let ticket = {
            let mut state = self.state.lock().expect("budget pool lock");
            state.next_ticket += 1;
            let ticket = state.next_ticket;
            state.waiting.push((ticket, std::time::Instant::now()));
            ticket
        };
        // Off the waiting list however this ends (a cancelled wait too).
        let _waiting = Waiting { pool: self, ticket };
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            {
                let mut state = self.state.lock().expect("budget pool lock");
                // The oldest waiter past its patience goes first.
                let overdue = state
                    .waiting
                    .iter()
                    .find(|(_, since)| since.elapsed() >= PATIENCE)
                    .map(|(ticket, _)| *ticket);
                let my_turn = overdue.is_none_or(|first| first == ticket);
                if my_turn && state.free >= wanted {
                    state.free -= wanted;
                    return Permit {
                        pool: self,
                        connections: wanted,
                    };
                }
            }
            // Woken by a release, or to look again once patience runs out.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), released).await;
        }
    }
}

/// A request on the waiting list until dropped.
struct Waiting {
    pool: &'static Pool,
    ticket: u64,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Ok(mut state) = self.pool.state.lock() {
            state.waiting.retain(|(ticket, _)| *ticket != self.ticket);
        }
    }
}

/// Connections reserved from the [`Pool`], returned when dropped.
#[derive(Debug)]
struct Permit {
    pool: &'static Pool,
    connections: u32,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Ok(mut state) = self.pool.state.lock() {
            state.free += self.connections;
        }
        self.pool.released.notify_waiters();
    }
}

/// One test's share: its reservation, the processes it declared and runs.
#[derive(Debug)]
pub struct Reservation {
    test: String,
    processes_declared: u32,
    /// Pids of its processes that may still run.
    processes_running: Mutex<Vec<u32>>,
    /// The size of its databases' pools.
    pool_size: u32,
    reserved: u32,
    waited: std::time::Duration,
    since: std::time::Instant,
    _permit: Permit,
}

#[derive(Debug, Default)]
struct Ledger {
    /// Processes declared by tests that have not reserved yet.
    declared: HashMap<String, u32>,
    /// Pool sizes declared by tests that have not reserved yet.
    pools: HashMap<String, u32>,
    /// Reservations in force, by test (weak: the test's databases and
    /// processes hold them, and the last one to go frees the share).
    reserved: HashMap<String, std::sync::Weak<Reservation>>,
}

fn ledger() -> &'static Mutex<Ledger> {
    static LEDGER: OnceLock<Mutex<Ledger>> = OnceLock::new();
    LEDGER.get_or_init(Mutex::default)
}

/// The running test's name (its thread's), if this is a test's thread.
fn current_test() -> Option<String> {
    let thread = std::thread::current();
    let name = thread.name()?;
    // Not a test: the main thread of a binary (the bench), tokio's workers.
    (name != "main" && !name.starts_with("tokio-")).then(|| name.to_owned())
}

/// Declares that the running test runs up to `processes` `web`/`worker`
/// processes at once (each may open [`PER_PROCESS`] connections). Call it
/// before the test's first [`crate::TestDb`] or [`crate::TestApp`].
///
/// # Panics
/// If the test has already reserved its share.
pub fn runs_processes(processes: u32) {
    let Some(test) = current_test() else { return };
    // Build the binaries now, before the test holds a share: the first
    // build takes a while and would keep the share idle meanwhile.
    if processes > 0 {
        let _ = crate::binary("worker");
    }
    let mut ledger = ledger().lock().expect("budget ledger lock");
    assert!(
        ledger
            .reserved
            .get(&test)
            .is_none_or(|held| held.strong_count() == 0),
        "{test}: declare runs_processes({processes}) before the test's first TestDb"
    );
    ledger.declared.insert(test, processes);
}

/// Declares that the running test's [`crate::TestDb`] pool holds up to
/// `connections` (more than [`POOL`]: a burst of concurrent requests on the
/// in-process router). Call it before the test's first database.
pub fn uses_pool(connections: u32) {
    let Some(test) = current_test() else { return };
    let mut ledger = ledger().lock().expect("budget ledger lock");
    ledger.pools.insert(test, connections.max(POOL));
}

/// The running test's share, reserved on its first call (waiting until it is
/// free) and shared by its later calls. `None` off a test's thread.
pub(crate) async fn reserve() -> Option<Arc<Reservation>> {
    let test = current_test()?;
    let (declared, pool_size) = {
        let ledger = ledger().lock().expect("budget ledger lock");
        if let Some(held) = ledger
            .reserved
            .get(&test)
            .and_then(std::sync::Weak::upgrade)
        {
            return Some(held);
        }
        (
            ledger.declared.get(&test).copied().unwrap_or(0),
            ledger.pools.get(&test).copied().unwrap_or(POOL),
        )
    };
    let wanted = (PER_TEST + (pool_size - POOL) + declared * PER_PROCESS).min(total().await);
    let asked = std::time::Instant::now();
    let permit = pool().await.acquire(wanted).await;
    let reservation = Arc::new(Reservation {
        test: test.clone(),
        processes_declared: declared,
        processes_running: Mutex::new(Vec::new()),
        pool_size,
        reserved: wanted,
        waited: asked.elapsed(),
        since: std::time::Instant::now(),
        _permit: permit,
    });
    let mut ledger = ledger().lock().expect("budget ledger lock");
    ledger.declared.remove(&test);
    ledger.pools.remove(&test);
    ledger.reserved.insert(test, Arc::downgrade(&reservation));
    Some(reservation)
}

/// A process of the running test that may connect to its databases
/// (`pid`): counts it against the declaration while it runs ([`crate::Process`]
/// calls this; a test that spawns its own processes calls it and keeps the
/// result as long as the process).
///
/// # Panics
/// If the test runs more such processes at once than it declared.
pub fn process_started(name: &str, pid: u32) -> Option<Arc<Reservation>> {
    let test = current_test()?;
    let reservation = ledger()
        .lock()
        .expect("budget ledger lock")
        .reserved
        .get(&test)
        .and_then(std::sync::Weak::upgrade)?;
    let mut running = reservation
        .processes_running
        .lock()
        .expect("process list lock");
    // A process killed and kept for its output no longer counts.
    running.retain(|pid| is_running(*pid));
    running.push(pid);
    assert!(
        running.len() <= reservation.processes_declared as usize,
        "{}: starts process {name} number {} at once but declared \
         tests::budget::runs_processes({}): declare what it runs at its peak",
        reservation.test,
        running.len(),
        reservation.processes_declared
    );
    drop(running);
    Some(reservation)
}

/// Whether `pid` runs (exists and is not a zombie waiting to be reaped).
fn is_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // `pid (comm) state ...`; comm may hold spaces and parentheses.
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X'))
    })
}

impl Reservation {
    /// The size of the test's database pools (see [`uses_pool`]).
    pub fn pool_size(&self) -> u32 {
        self.pool_size
    }
}

impl Drop for Reservation {
    /// With `TEST_TIMINGS=<file>`, appends a line per test: its name, the
    /// connections it reserved, how long it waited for them and held them.
    fn drop(&mut self) {
        let Some(path) = std::env::var_os("TEST_TIMINGS") else {
            return;
        };
        let line = format!(
            "{:>7.1} s held  {:>6.1} s waited  {:>3} connections  {}\n",
            self.since.elapsed().as_secs_f64(),
            self.waited.as_secs_f64(),
            self.reserved,
            self.test
        );
        if let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = std::io::Write::write_all(&mut file, line.as_bytes());
        }
    }
}
