//! VisitMe's test harness: real Postgres, real router, real worker, real binaries.
//!
//! - [`TestDb`]: a fresh, migrated database per test, dropped afterwards.
//! - [`TestApp`]: the real router on `127.0.0.1:0` over a `TestDb`, plus the
//!   real worker on demand.
//! - [`Process`]: the `web` / `worker` binaries spawned as processes, with
//!   their stdout captured.
//!
//! Postgres comes from `TEST_DATABASE_URL` (default
//! `postgres://localhost/postgres`): any database there works as the
//! maintenance database from which test databases are created.

pub mod admin;
pub mod browser;
pub mod budget;
pub mod cluster;
pub mod otlp;
mod process;

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context as _, bail};
use sqlx::{
    ConnectOptions as _, Connection as _, PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use ulid::Ulid;

pub use process::{Process, binary, cargo_crate_env, example};

/// Shows this process's logs in the test output (captured unless the test
/// fails); `RUST_LOG` filters, default `info`.
pub fn init_logs() {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// Where test databases are created.
pub fn maintenance_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://localhost/postgres".to_owned())
}

/// A database of its own for one test; dropped (forcibly) when this is dropped.
#[derive(Debug)]
pub struct TestDb {
    /// A pool on the test database.
    pub pool: PgPool,
    /// URL of the test database, to hand to spawned processes.
    pub url: String,
    name: String,
    /// The test's share of the connections (see [`budget`]).
    _share: Option<std::sync::Arc<budget::Reservation>>,
}

impl TestDb {
    /// Creates an empty database (not migrated).
    pub async fn empty() -> anyhow::Result<Self> {
        let share = budget::reserve().await;
        let name = format!(
            "visitme_test_{}",
            Ulid::generate().to_string().to_lowercase()
        );
        let admin = admin_options()?;
        let mut conn = admin
            .connect()
            .await
            .context("connect to the maintenance database")?;
        // Test-generated identifier (lowercase ULID), safe to splice.
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("create database {name}")))
            .execute(&mut conn)
            .await?;
        conn.close().await?;
        let options = admin.clone().database(&name);
        let pool = PgPoolOptions::new()
            .max_connections(
                share
                    .as_ref()
                    .map_or(budget::POOL, |share| share.pool_size()),
            )
            .connect_with(options.clone())
            .await?;
        let url = database_url(&options, &name);
        Ok(Self {
            pool,
            url,
            name,
            _share: share,
        })
    }

    /// Creates a database and applies every migration to it.
    pub async fn migrated() -> anyhow::Result<Self> {
        let db = Self::empty().await?;
        migrations::run(&db.pool).await?;
        Ok(db)
    }

    /// A URL naming a database that does not exist yet (dropped with this one's).
    pub fn sibling_url(&self, suffix: &str) -> String {
        self.url
            .replace(&self.name, &format!("{}_{suffix}", self.name))
    }

    /// Jobs in the queue by status, e.g. `[("Done", 25)]`.
    pub async fn job_counts(&self) -> anyhow::Result<Vec<(String, i64)>> {
        Ok(sqlx::query_as(
            "select status, count(*) from apalis.jobs group by status order by status",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// Waits until no job is waiting or running (with a deadline), then checks
    /// that every job ended `Done`: the queue-drain check of every test.
    pub async fn drain_queue(&self, deadline: Duration) -> anyhow::Result<()> {
        self.wait_until_idle(deadline).await?;
        let not_done: Vec<(String, Option<String>)> = sqlx::query_as(
            "select status, last_result::text from apalis.jobs where status <> 'Done'",
        )
        .fetch_all(&self.pool)
        .await?;
        if !not_done.is_empty() {
            bail!("jobs that did not end Done: {not_done:?}");
        }
        Ok(())
    }

    /// Waits until no job is waiting, claimed, running or due for a retry.
    pub async fn wait_until_idle(&self, deadline: Duration) -> anyhow::Result<()> {
        self.wait_until_idle_polling(deadline, Duration::from_millis(50))
            .await
    }

    /// [`Self::wait_until_idle`], checking every `poll` (the benchmark polls
    /// rarely, so that its count of open jobs takes no CPU from a drain).
    pub async fn wait_until_idle_polling(
        &self,
        deadline: Duration,
        poll: Duration,
    ) -> anyhow::Result<()> {
        let give_up = tokio::time::Instant::now() + deadline;
        loop {
            let open: i64 = sqlx::query_scalar(
                "select count(*) from apalis.jobs
                 where status in ('Pending', 'Queued', 'Running')
                    or (status = 'Failed' and attempts < max_attempts)",
            )
            .fetch_one(&self.pool)
            .await?;
            if open == 0 {
                break;
            }
            if tokio::time::Instant::now() >= give_up {
                bail!(
                    "{open} jobs still open after {deadline:?}: {:?}",
                    self.job_counts().await?
                );
            }
            tokio::time::sleep(poll).await;
        }
        Ok(())
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

    /// Ids of all visits, ascending.
    pub async fn visit_ids(&self) -> anyhow::Result<Vec<i64>> {
        Ok(sqlx::query_scalar("select id from visits order by id")
            .fetch_all(&self.pool)
            .await?)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let Ok(admin) = admin_options() else { return };
        // Drop runs outside async; a short-lived runtime on its own thread does the cleanup.
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let mut conn = admin.connect().await?;
                // One statement each: DROP DATABASE refuses to run in the implicit
                // transaction of a multi-statement query.
                for db in [name.clone(), format!("{name}_second")] {
                    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                        "drop database if exists {db} with (force)"
                    )))
                    .execute(&mut conn)
                    .await?;
                }
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

fn admin_options() -> anyhow::Result<PgConnectOptions> {
    Ok(migrations::parse_url(&maintenance_url())?)
}

fn database_url(options: &PgConnectOptions, name: &str) -> String {
    format!(
        "postgres://{}@{}:{}/{name}",
        options.get_username(),
        options.get_host(),
        options.get_port()
    )
}

/// The real router on `127.0.0.1:0` over a fresh migrated database.
#[derive(Debug)]
pub struct TestApp {
    /// The test's database.
    pub db: TestDb,
    /// Where the router listens.
    pub address: SocketAddr,
    /// An HTTP client (no redirects followed, so tests see what the server said).
    pub client: reqwest::Client,
    shutdown: CancellationToken,
    server: JoinHandle<std::io::Result<()>>,
    worker: Option<JoinHandle<Result<(), jobs::Error>>>,
}

impl TestApp {
    /// Starts the router (no worker yet; see [`TestApp::start_worker`]).
    pub async fn spawn() -> anyhow::Result<Self> {
        let db = TestDb::migrated().await?;
        let state = web::AppState::new(db.pool.clone());
        Self::spawn_with(db, state).await
    }

    /// Starts the router with a given state (e.g. a pool to an unreachable server).
    pub async fn spawn_with(db: TestDb, state: web::AppState) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(web::serve(
            listener,
            state,
            shutdown.clone().cancelled_owned(),
        ));
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(30))
            .build()?;
        Ok(Self {
            db,
            address,
            client,
            shutdown,
            server,
            worker: None,
        })
    }

    /// `http://<address><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    /// `GET /` with a user agent; fails unless the answer is 200.
    pub async fn visit(&self, user_agent: &str) -> anyhow::Result<VisitsPage> {
        let response = self
            .client
            .get(self.url("/"))
            .header("user-agent", user_agent)
            .send()
            .await?;
        let status = response.status();
        let body = response.text().await?;
        if status != 200 {
            bail!("GET / answered {status}: {body}");
        }
        VisitsPage::parse(&body)
    }

    /// Starts the real job worker (the same `jobs::run` the binaries use)
    /// with [`fast_worker_config`].
    pub fn start_worker(&mut self) {
        self.start_worker_with(fast_worker_config());
    }

    /// Starts the real job worker with `config`.
    pub fn start_worker_with(&mut self, config: jobs::WorkerConfig) {
        self.start_worker_with_settings(config, jobs::JobSettings::default());
    }

    /// Starts the real job worker with `config` and VisitMe's job `settings`.
    pub fn start_worker_with_settings(
        &mut self,
        config: jobs::WorkerConfig,
        settings: jobs::JobSettings,
    ) {
        self.worker = Some(tokio::spawn(jobs::run(
            self.db.pool.clone(),
            config,
            settings,
            self.shutdown.clone(),
        )));
    }

    /// Stops the server and worker gracefully and reports how they ended.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.server.await??;
        if let Some(worker) = self.worker {
            worker.await??;
        }
        Ok(())
    }
}

/// The engine's periodic prune on a schedule no test lives to see (midnight,
/// January 1st), for every worker the tests start unless a test says
/// otherwise: every minute, it would add a `prune_jobs` job to queues whose
/// jobs the tests count.
pub const QUIET_PRUNE_SCHEDULE: &str = "0 0 0 1 1 *";

/// Worker settings scaled down for tests: quick polls, short backoff, lease
/// and timeout; the prune on [`QUIET_PRUNE_SCHEDULE`].
pub fn fast_worker_config() -> jobs::WorkerConfig {
    jobs::WorkerConfig {
        prune_schedule: QUIET_PRUNE_SCHEDULE
            .parse()
            .expect("the quiet prune schedule parses"),
        poll_interval: Duration::from_millis(50),
        lease: Duration::from_secs(3),
        job_timeout: Some(Duration::from_secs(2)),
        backoff_base: Some(Duration::from_millis(200)),
        ..jobs::WorkerConfig::default()
    }
}

/// The same settings as environment variables, for `worker` processes.
pub fn fast_worker_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("WORKER_POLL_INTERVAL", "0.05"),
        ("JOB_LEASE", "3"),
        ("JOB_TIMEOUT", "2"),
        ("JOB_BACKOFF_BASE", "0.2"),
    ]
}

/// Enqueues probe jobs in one transaction (one statement: `enqueue_many`); returns their ids.
pub async fn enqueue_probes(
    pool: &PgPool,
    probes: impl IntoIterator<Item = jobs::probe::Probe>,
) -> anyhow::Result<Vec<String>> {
    let probes: Vec<jobs::probe::Probe> = probes.into_iter().collect();
    let mut tx = pool.begin().await?;
    let ids = jobs::enqueue_many(&mut tx, &probes).await?;
    tx.commit().await?;
    Ok(ids.iter().map(ToString::to_string).collect())
}

/// Enqueues (and commits) workflow `name` of two probe steps that succeed,
/// `first` then `second`; returns its id.
pub async fn enqueue_two_step_workflow(pool: &PgPool, name: &str) -> anyhow::Result<String> {
    let probe = |key: &str| jobs::probe::Probe {
        key: key.to_owned(),
        behaviour: jobs::probe::Behaviour::Succeed,
    };
    let mut tx = pool.begin().await?;
    let id = durable_jobs::Workflow::new(name)
        .add("first", probe("first"))
        .add_after("second", probe("second"), ["first"])
        .enqueue(&mut tx)
        .await?
        .to_string();
    tx.commit().await?;
    Ok(id)
}

/// Visits `http://<address>/` `count` times, one after another, with user
/// agents `<agent>-1`, `<agent>-2`, …; every answer must be a 200 visits page.
/// Returns the last page.
pub async fn visit_times(address: &str, count: usize, agent: &str) -> anyhow::Result<VisitsPage> {
    let client = reqwest::Client::new();
    let mut last = None;
    for n in 1..=count {
        let body = client
            .get(format!("http://{address}/"))
            .header("user-agent", format!("{agent}-{n}"))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        last = Some(VisitsPage::parse(&body)?);
    }
    last.context("at least one visit")
}

/// What a test reads off the visits page.
#[derive(Debug, Clone)]
pub struct VisitsPage {
    /// The whole HTML.
    pub html: String,
    /// `(data-visit-id, <time datetime>, visitor as stored)` per row, in page
    /// order; the visitor is the `title` of `.visitor` (shown on hover; the
    /// row's text is the address and a short browser name).
    pub rows: Vec<(i64, chrono::DateTime<chrono::Utc>, String)>,
    /// The `datetime` of `#trim-threshold time`.
    pub threshold: chrono::DateTime<chrono::Utc>,
}

impl VisitsPage {
    /// Parses the page; fails if a marker from DESIGN.md is missing.
    pub fn parse(html: &str) -> anyhow::Result<Self> {
        use scraper::{Html, Selector};
        let document = Html::parse_document(html);
        let selector =
            |s: &str| Selector::parse(s).map_err(|e| anyhow::anyhow!("selector {s}: {e}"));
        let (rows_sel, time_sel, visitor_sel, threshold_sel) = (
            selector("[data-visit-id]")?,
            selector("time")?,
            selector(".visitor")?,
            selector("#trim-threshold time")?,
        );
        let datetime =
            |element: scraper::ElementRef<'_>| -> anyhow::Result<chrono::DateTime<chrono::Utc>> {
                let value = element
                    .value()
                    .attr("datetime")
                    .context("time without datetime")?;
                Ok(chrono::DateTime::parse_from_rfc3339(value)?.to_utc())
            };
        let mut rows = Vec::new();
        for row in document.select(&rows_sel) {
            let id = row
                .value()
                .attr("data-visit-id")
                .context("row id")?
                .parse()?;
            let time = row.select(&time_sel).next().context("row without <time>")?;
            let visitor = row
                .select(&visitor_sel)
                .next()
                .context("row without visitor")?;
            let visitor = visitor
                .value()
                .attr("title")
                .context("visitor without title")?;
            rows.push((id, datetime(time)?, visitor.to_owned()));
        }
        let threshold = datetime(
            document
                .select(&threshold_sel)
                .next()
                .context("no #trim-threshold time")?,
        )?;
        Ok(Self {
            html: html.to_owned(),
            rows,
            threshold,
        })
    }

    /// The visit ids shown, in page order.
    pub fn ids(&self) -> Vec<i64> {
        self.rows.iter().map(|(id, _, _)| *id).collect()
    }
}
