#![doc = include_str!("../README.md")]

use std::time::{Duration, Instant};

use sqlx::{
    ConnectOptions, Connection, PgConnection, PgPool,
    migrate::Migrator,
    postgres::{PgConnectOptions, PgPoolOptions},
};

/// Our own migrations, embedded at compile time from `migrations/sql/`.
/// Migrations 2-7 of 2026-11 were the queue's and moved to the engine
/// (`durable_jobs::migrate`), whose migrations adopt a database that ran
/// them; such a database still lists them as applied, hence `ignore_missing`.
fn migrator() -> Migrator {
    let mut migrator = sqlx::migrate!("./sql");
    migrator.set_ignore_missing(true);
    migrator
}

/// What can go wrong while preparing the database.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `DATABASE_URL` is not a valid Postgres URL.
    #[error("invalid database URL: {0}")]
    InvalidUrl(#[source] sqlx::Error),
    /// Postgres did not answer within the allowed wait.
    #[error("gave up after {waited:?}: {advice}")]
    Unreachable {
        /// How long we kept trying.
        waited: Duration,
        /// What was wrong and what to do, in one line ([`advice`]).
        advice: String,
    },
    /// Postgres refused us in a way a newcomer meets (no such role, wrong
    /// password, no right to create the database): what to do, in one line.
    #[error("{0}")]
    Refused(String),
    /// The database named in the URL is missing and could not be created.
    #[error("could not create database {name:?}: {source}")]
    CreateDatabase {
        /// The database we tried to create.
        name: String,
        /// Why Postgres refused.
        #[source]
        source: sqlx::Error,
    },
    /// One of our migrations failed.
    #[error("applying VisitMe migrations failed: {0}")]
    Ours(#[from] sqlx::migrate::MigrateError),
    /// The queue's migrations (the engine's) failed.
    #[error("applying the job queue's migrations failed: {0}")]
    Queue(#[from] durable_jobs::Error),
    /// A query against the migration history failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// Options for the pools our binaries open.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// Most connections the pool holds open.
    pub max_connections: u32,
    /// How long a caller waits for a connection before failing; keeps
    /// requests from hanging while Postgres is down.
    pub acquire_timeout: Duration,
    /// How long to keep retrying at startup before giving up.
    pub startup_wait: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            max_connections: 10,
            acquire_timeout: Duration::from_secs(3),
            startup_wait: Duration::from_secs(60),
        }
    }
}

/// Connects to `database_url`, creating the database if it does not exist.
///
/// While Postgres is unreachable it retries with a growing delay (logging
/// each attempt) until `settings.startup_wait` has passed.
pub async fn connect(database_url: &str, settings: &PoolSettings) -> Result<PgPool, Error> {
    let options = parse_url(database_url)?;
    let started = Instant::now();
    let mut delay = Duration::from_millis(250);
    loop {
        match try_connect(&options, settings).await {
            Ok(pool) => return Ok(pool),
            Err(Error::Database(source)) if is_unreachable(&source) => {
                let waited = started.elapsed();
                let advice = advice(&source, &options)
                    .unwrap_or_else(|| format!("database not reachable: {source}"));
                if waited >= settings.startup_wait {
                    return Err(Error::Unreachable { waited, advice });
                }
                tracing::warn!("{advice}; retrying in {delay:?}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(Error::Database(source)) => {
                return Err(match advice(&source, &options) {
                    Some(advice) => Error::Refused(advice),
                    None => Error::Database(source),
                });
            }
            Err(Error::CreateDatabase { name, source }) => {
                return Err(match advice(&source, &options) {
                    Some(advice) => Error::Refused(advice),
                    None => Error::CreateDatabase { name, source },
                });
            }
            Err(other) => return Err(other),
        }
    }
}

/// Parses a Postgres URL. Without a user in the URL or `PGUSER`, connect as the
/// operating-system account, as `psql` does (sqlx would say "anonymous" where
/// no login name is set in the environment, as in containers and CI).
pub fn parse_url(database_url: &str) -> Result<PgConnectOptions, Error> {
    if !(database_url.starts_with("postgres://") || database_url.starts_with("postgresql://")) {
        return Err(Error::InvalidUrl(sqlx::Error::Configuration(
            "expected postgres://[user[:password]@]host[:port]/database".into(),
        )));
    }
    let options: PgConnectOptions = database_url.parse().map_err(Error::InvalidUrl)?;
    let names_user = url::Url::parse(database_url)
        .map(|url| !url.username().is_empty() || url.query_pairs().any(|(k, _)| k == "user"))
        .unwrap_or(true);
    if names_user || std::env::var_os("PGUSER").is_some() {
        return Ok(options);
    }
    match nix::unistd::User::from_uid(nix::unistd::getuid()) {
        Ok(Some(account)) => Ok(options.username(&account.name)),
        _ => Ok(options),
    }
}

async fn try_connect(options: &PgConnectOptions, settings: &PoolSettings) -> Result<PgPool, Error> {
    create_database_if_missing(options).await?;
    let pool = PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(settings.acquire_timeout)
        .connect_with(options.clone())
        .await?;
    Ok(pool)
}

/// What a newcomer should do about a connection error they are likely to
/// meet, in one line without library internals; `None` for other errors.
pub fn advice(error: &sqlx::Error, options: &PgConnectOptions) -> Option<String> {
    let (host, port) = (options.get_host(), options.get_port());
    let user = options.get_username();
    let database = options.get_database().unwrap_or(user);
    let url = format!("DATABASE_URL=postgres://USER:PASSWORD@{host}:{port}/{database}");
    match error {
        sqlx::Error::Io(io) => Some(format!(
            "cannot reach PostgreSQL at {host}:{port} ({}): is PostgreSQL running on {host}:{port}? \
             Start it (`sudo service postgresql start`, or `docker run -d -p 5432:5432 \
             -e POSTGRES_HOST_AUTH_METHOD=trust postgres`), or set {url}",
            io_reason(io)
        )),
        sqlx::Error::Database(db) => match db.code().as_deref() {
            // 28000 invalid_authorization_specification: no such role (or pg_hba refused it).
            Some("28000") if db.message().contains("does not exist") => Some(format!(
                "PostgreSQL at {host}:{port} has no user {user:?}: create it \
                 (`sudo -u postgres createuser --createdb {user}`), or set {url}"
            )),
            Some("28000") => Some(format!(
                "PostgreSQL at {host}:{port} does not let user {user:?} connect \
                 (pg_hba.conf): allow it, or set {url} with a user it lets in"
            )),
            // 28P01 invalid_password.
            Some("28P01") => Some(format!(
                "PostgreSQL at {host}:{port} refused the password of user {user:?}: \
                 put the right one in {url} (or set it: `ALTER ROLE {user} PASSWORD '...'`)"
            )),
            // 42501 insufficient_privilege (CREATE DATABASE without CREATEDB).
            Some("42501") => Some(format!(
                "user {user:?} may not create database {database:?}: create it once \
                 (`sudo -u postgres createdb -O {user} {database}`), or allow it \
                 (`ALTER ROLE {user} CREATEDB`)"
            )),
            _ => None,
        },
        _ => None,
    }
}

/// "connection refused", "timed out", ...: an I/O error's kind in words.
fn io_reason(error: &std::io::Error) -> String {
    match error.kind() {
        std::io::ErrorKind::ConnectionRefused => "connection refused".to_owned(),
        std::io::ErrorKind::TimedOut => "timed out".to_owned(),
        std::io::ErrorKind::NotFound => "no such host or socket".to_owned(),
        _ => error.to_string(),
    }
}

/// Errors that mean "Postgres is not there (yet)", worth retrying.
fn is_unreachable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => true,
        // 57P03: cannot_connect_now (the server is starting up or shutting down).
        sqlx::Error::Database(db) => db.code().as_deref() == Some("57P03"),
        _ => false,
    }
}

async fn create_database_if_missing(options: &PgConnectOptions) -> Result<(), Error> {
    let Some(name) = options.get_database().map(str::to_owned) else {
        return Ok(()); // no database named: Postgres uses the user's default
    };
    // Try the target first: the common case costs one connection and no catalog query.
    match options.connect().await {
        Ok(conn) => {
            conn.close().await.ok();
            return Ok(());
        }
        // 3D000: invalid_catalog_name (database does not exist).
        Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("3D000") => {}
        Err(other) => return Err(Error::Database(other)),
    }
    let mut admin = connect_maintenance(options).await?;
    // CREATE DATABASE cannot take a bound parameter, so the name is quoted as
    // an identifier (double quotes doubled); it comes from our own config.
    let statement = format!("create database \"{}\"", name.replace('"', "\"\""));
    match sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
        .execute(&mut admin)
        .await
    {
        Ok(_) => tracing::info!(db.namespace = %name, "created database"),
        // 42P04 duplicate_database / 23505 unique_violation: another process won the race.
        Err(sqlx::Error::Database(db))
            if matches!(db.code().as_deref(), Some("42P04") | Some("23505")) => {}
        Err(source) => return Err(Error::CreateDatabase { name, source }),
    }
    admin.close().await.ok();
    Ok(())
}

/// Connects to a database that always exists, to run `CREATE DATABASE`.
async fn connect_maintenance(options: &PgConnectOptions) -> Result<PgConnection, Error> {
    let mut last = None;
    for maintenance in ["postgres", "template1"] {
        match options.clone().database(maintenance).connect().await {
            Ok(conn) => return Ok(conn),
            Err(err) => last = Some(err),
        }
    }
    Err(Error::Database(last.unwrap_or(sqlx::Error::PoolClosed)))
}

/// Applies the queue's schema (the engine's, on apalis-postgres's), then the
/// app's migrations.
///
/// Safe to call from many processes at once (each migrator holds an advisory
/// lock while it runs) and any number of times (applied ones are skipped).
pub async fn run(pool: &PgPool) -> Result<(), Error> {
    durable_jobs::migrate(pool).await?;
    migrator().run(pool).await?;
    tracing::info!("database migrations applied");
    Ok(())
}

/// True when every migration this build knows, ours and the queue's, is applied.
pub async fn is_up_to_date(pool: &PgPool) -> Result<bool, Error> {
    // Before the first run the history tables do not exist, and naming a missing
    // table is an error even inside a branch, so check for them first.
    let tables_exist: bool =
        sqlx::query_scalar("select to_regclass('public._sqlx_migrations') is not null")
            .fetch_one(pool)
            .await?;
    // The engine's database errors are database errors here too: as `Queue`
    // they read "applying the job queue's migrations failed" (on /readyz
    // when the pool was merely exhausted), though nothing was being applied.
    let queue_migrated = durable_jobs::is_migrated(pool)
        .await
        .map_err(|err| match err {
            durable_jobs::Error::Database(err) => Error::Database(err),
            other => Error::Queue(other),
        })?;
    if !tables_exist || !queue_migrated {
        return Ok(false);
    }
    let ours: Option<i64> =
        sqlx::query_scalar("select max(version) from public._sqlx_migrations where success")
            .fetch_one(pool)
            .await?;
    Ok(ours >= migrator().iter().map(|m| m.version).max())
}
