//! Recording a visit and reading the newest ones: the data side of `GET /`.

use chrono::{DateTime, Utc};
use durable_jobs::admin::OpenCounts;
use jobs::TrimVisits;
use sqlx::PgConnection;
use tracing::Instrument as _;

use crate::Error;

/// How many visits the page shows (and therefore keeps).
pub const SHOWN_VISITS: i64 = 10;

/// One row of `visits`.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Visit {
    /// Database id.
    pub id: i64,
    /// `"<address>: <user agent>"`.
    pub visitor: String,
    /// When the visit was recorded (database clock).
    pub created_at: DateTime<Utc>,
}

/// What a page view recorded and read, ready to render.
#[derive(Debug, Clone)]
pub struct RecordedVisit {
    /// The newest visits, newest first (this one included).
    pub visits: Vec<Visit>,
    /// The oldest shown visit's time: older visits are being deleted.
    pub threshold: DateTime<Utc>,
    /// The id of the enqueued `TrimVisits` job.
    pub job_id: String,
    /// The id of the visit this page view recorded.
    pub visit_id: i64,
}

/// The newest [`SHOWN_VISITS`] visits, newest first (ties broken by id).
pub async fn newest_visits(conn: &mut PgConnection) -> Result<Vec<Visit>, Error> {
    Ok(sqlx::query_as(
        "select id, visitor, created_at from visits
         order by created_at desc, id desc
         limit $1",
    )
    .bind(SHOWN_VISITS)
    .fetch_all(&mut *conn)
    .instrument(observability::db_span("SELECT", "visits"))
    .await?)
}

/// The trim threshold for a page showing `shown` (newest first): the oldest
/// shown visit's time, so the page's own job never deletes what it shows.
pub fn trim_threshold(shown: &[Visit]) -> Option<DateTime<Utc>> {
    shown.iter().map(|visit| visit.created_at).min()
}

/// Inserts a visit, reads the newest [`SHOWN_VISITS`], and enqueues
/// `TrimVisits { older_than: <oldest shown> }`, all on `conn`.
///
/// Call it inside a transaction (`&mut *tx`): the visit and its job then
/// commit or roll back together.
pub async fn record_visit(conn: &mut PgConnection, visitor: &str) -> Result<RecordedVisit, Error> {
    let new_visit: Visit = sqlx::query_as(
        "insert into visits (visitor) values ($1) returning id, visitor, created_at",
    )
    .bind(visitor)
    .fetch_one(&mut *conn)
    .instrument(observability::db_span("INSERT", "visits"))
    .await?;
    let visits = newest_visits(conn).await?;
    // Our own insert is visible in this transaction, so the list is never empty;
    // fall back to it anyway rather than trusting that in an `expect`.
    let threshold = trim_threshold(&visits).unwrap_or(new_visit.created_at);
    let job_id = jobs::enqueue(
        conn,
        &TrimVisits {
            older_than: threshold,
        },
    )
    .await?;
    Ok(RecordedVisit {
        visits,
        threshold,
        job_id: job_id.to_string(),
        visit_id: new_visit.id,
    })
}

/// What the page's background-work panel shows: the newest trim and the
/// trim queue's unfinished jobs, read through the engine's admin API.
#[derive(Debug, Clone)]
pub struct BackgroundWork {
    /// The newest `TrimVisits` job, if any.
    pub last_trim: Option<durable_jobs::admin::JobDetail>,
    /// Its queue's waiting, running and retrying jobs.
    pub queue: OpenCounts,
    /// The trim that waits for an operator's approval, if one does
    /// (`TRIM_APPROVAL_ABOVE`).
    pub awaiting_approval: Option<durable_jobs::admin::JobSummary>,
}

impl BackgroundWork {
    /// What the last trim returned, once it succeeded.
    pub fn last_outcome(&self) -> Option<jobs::TrimOutcome> {
        let output = self.last_trim.as_ref()?.output()?;
        serde_json::from_value(output).ok()
    }
}

/// Loads the panel's data: the newest trim (an index probe, read fresh) and
/// the queue's counts through `counts`.
pub async fn background_work(
    pool: &sqlx::PgPool,
    counts: &TrimQueueCounts,
) -> Result<BackgroundWork, Error> {
    use durable_jobs::Job as _;
    Ok(BackgroundWork {
        last_trim: durable_jobs::admin::latest_job_of(pool, TrimVisits::NAME).await?,
        queue: counts.get(pool).await?,
        awaiting_approval: durable_jobs::admin::oldest_waiting_for(
            pool,
            TrimVisits::NAME,
            jobs::APPROVAL,
        )
        .await?,
    })
}

/// The trim queue's open counts for the panel, counted at most once per
/// [`TrimQueueCounts::REFRESH`] however many pages show it. Counting the
/// claimed and running jobs scans the table (no index covers `status`):
/// ~40 ms over 200,000 finished jobs, too much for every page view and poll.
#[derive(Debug, Clone, Default)]
pub struct TrimQueueCounts {
    /// The last count and when it was made; held across the count, so that
    /// concurrent views wait for one count instead of each running their own.
    last: std::sync::Arc<tokio::sync::Mutex<Option<(std::time::Instant, OpenCounts)>>>,
}

impl TrimQueueCounts {
    /// How old a count may be.
    pub const REFRESH: std::time::Duration = std::time::Duration::from_secs(2);

    /// The counts, counted anew if the last count is older than [`Self::REFRESH`].
    pub async fn get(&self, pool: &sqlx::PgPool) -> Result<OpenCounts, Error> {
        use durable_jobs::Job as _;
        let mut last = self.last.lock().await;
        if let Some((at, counts)) = *last
            && at.elapsed() < Self::REFRESH
        {
            return Ok(counts);
        }
        let counts = durable_jobs::admin::open_counts_of(pool, TrimVisits::NAME).await?;
        *last = Some((std::time::Instant::now(), counts));
        Ok(counts)
    }
}
