//! A whole axum app on durable-jobs: `GET /` writes a note and, in the same
//! transaction, enqueues a job that delivers it; a worker in this process
//! runs the job; the dashboard is at `/jobs` (put your auth in front of it).
//! `DATABASE_URL=postgres://user@localhost/db BIND=127.0.0.1:3000 cargo run
//! -p durable-jobs --features dashboard --example quickstart`

use axum::{Router, extract::State, http::StatusCode, routing::get};
use durable_jobs::{Job, JobContext, JobError, Registry, Worker, WorkerConfig, dashboard};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

/// Delivers a welcome note; running it twice delivers it once (public: the engine's tests use it).
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub struct DeliverNote {
    /// The note to deliver.
    pub note_id: i64,
}

impl Job for DeliverNote {
    const NAME: &'static str = "deliver_note";
    type Context = PgPool;
    type Output = ();

    async fn run(self, job: JobContext<'_, PgPool>) -> Result<(), JobError> {
        sqlx::query("update notes set delivered_at = now() where id = $1 and delivered_at is null")
            .bind(self.note_id)
            .execute(job.context())
            .await?;
        tracing::info!(note.id = self.note_id, job.id = job.id(), "note delivered");
        Ok(())
    }
}

/// Writes a note and enqueues its delivery: both commit, or neither.
pub async fn welcome(State(pool): State<PgPool>) -> Result<String, (StatusCode, String)> {
    let note = async {
        let mut tx = pool.begin().await?;
        let note_id: i64 =
            sqlx::query_scalar("insert into notes (text) values ('Welcome!') returning id")
                .fetch_one(&mut *tx)
                .await?;
        let job = durable_jobs::enqueue(&mut tx, &DeliverNote { note_id }).await?;
        tx.commit().await?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(format!(
            "note {note_id} written; job {job} delivers it (see /jobs)\n"
        ))
    };
    note.await
        .map_err(|err| (StatusCode::SERVICE_UNAVAILABLE, err.to_string()))
}

/// The app's one table.
pub const NOTES: &str = "create table if not exists notes (id bigint generated always as \
                         identity primary key, text text not null, delivered_at timestamptz)";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt::init();
    let pool = PgPool::connect(&std::env::var("DATABASE_URL")?).await?;
    durable_jobs::migrate(&pool).await?; // the queue's schema, then the app's:
    sqlx::raw_sql(NOTES).execute(&pool).await?;

    let shutdown = durable_jobs::shutdown::on_signal();
    let registry = Registry::new().register::<DeliverNote>();
    let worker = Worker::new(pool.clone(), registry, pool.clone()).config(WorkerConfig::default());
    let worker = tokio::spawn(worker.run(shutdown.clone()));

    let app = Router::new()
        .route("/", get(welcome))
        .with_state(pool.clone())
        .nest("/jobs", dashboard::router(dashboard::Dashboard::new(pool)));
    let bind = std::env::var("BIND").unwrap_or_else(|_| "127.0.0.1:3000".to_owned());
    let listener = tokio::net::TcpListener::bind(&bind).await?;
    println!("quickstart: http://{}/", listener.local_addr()?);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .await?;
    worker.await??;
    Ok(())
}
