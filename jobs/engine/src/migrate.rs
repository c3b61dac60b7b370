//! The queue's schema ships with the engine: [`migrate`].

use apalis_postgres::PostgresStorage;
use sqlx::{PgPool, migrate::Migrator};

use crate::{error::Error, queries};

/// Where the engine records its own migrations (apart from the app's, in
/// `public._sqlx_migrations`, and apalis-postgres's, in `apalis._sqlx_migrations`).
const HISTORY_TABLE: &str = "apalis._durable_jobs_migrations";

fn migrator() -> Migrator {
    let mut migrator = sqlx::migrate!("./migrations");
    migrator.dangerous_set_table_name(HISTORY_TABLE);
    migrator
}

/// Creates or upgrades the queue's schema: apalis-postgres's tables, then the
/// engine's additions (claim function, unique keys, row checks, the
/// `apalis.job_states` view). Run it before the app's own migrations, which
/// may refer to the queue's tables.
///
/// Safe to call from many processes at once (each migrator holds an advisory
/// lock while it runs) and any number of times.
pub async fn migrate(pool: &PgPool) -> Result<(), Error> {
    PostgresStorage::setup(pool)
        .await
        .map_err(|err| match err {
            apalis_postgres::Error::Database(err) => Error::Database(err),
            other => Error::QueueSchema(other.to_string()),
        })?;
    let migrator = migrator();
    accept_reworded(pool, &migrator).await?;
    migrator.run(pool).await?;
    Ok(())
}

/// Engine migrations whose text changed after release without changing what
/// they do (comments, and a step that moved to the app that needed it), by
/// version, with the SHA-384 checksum their first text had. sqlx refuses a
/// database that applied a migration whose text it no longer has; such a
/// database applied what the new text does, so its record takes the new
/// checksum.
const REWORDED: &[(i64, &str)] = &[(
    20261201000001,
    "bc054e1e79fff09d6c0171ec3bc13cc137e629fbbda6f2f5f026272b04ebdcb5\
     15659b04ff7414a8bf8b1a6a476762ed",
)];

async fn accept_reworded(pool: &PgPool, migrator: &Migrator) -> Result<(), Error> {
    let recorded: bool = sqlx::query_scalar(queries::MIGRATION_HISTORY_EXISTS)
        .fetch_one(pool)
        .await?;
    if !recorded {
        return Ok(());
    }
    for (version, old_checksum) in REWORDED {
        let Some(migration) = migrator.iter().find(|m| m.version == *version) else {
            continue;
        };
        sqlx::query(queries::ACCEPT_REWORDED_MIGRATION)
            .bind(version)
            .bind(migration.checksum.as_ref())
            .bind(*old_checksum)
            .execute(pool)
            .await?;
    }
    Ok(())
}

/// Whether every queue migration this build knows is applied.
pub async fn is_migrated(pool: &PgPool) -> Result<bool, Error> {
    let tables_exist: bool = sqlx::query_scalar(
        "select to_regclass('apalis._sqlx_migrations') is not null
            and to_regclass($1) is not null",
    )
    .bind(HISTORY_TABLE)
    .fetch_one(pool)
    .await?;
    if !tables_exist {
        return Ok(false);
    }
    // The table name is our constant, not input.
    let (apalis, engine): (Option<i64>, Option<i64>) =
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "select (select max(version) from apalis._sqlx_migrations where success),
                (select max(version) from {HISTORY_TABLE} where success)"
        )))
        .fetch_one(pool)
        .await?;
    let latest = |migrator: &Migrator| migrator.iter().map(|m| m.version).max();
    Ok(apalis >= latest(&PostgresStorage::migrations()) && engine >= latest(&migrator()))
}
