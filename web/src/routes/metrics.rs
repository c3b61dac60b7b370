//! `GET /metrics` (Prometheus text) and the middleware counting requests.
//!
//! Every label value is from a fixed set, so no request can add a series:
//! the method is one of the known ones or `OTHER`, the route is the matched
//! route template (`/admin/jobs/{id}/{action}`) or `unmatched`, the status is
//! a number. (Before, each made-up method string became a series of its own:
//! 100,000 random methods made `/metrics` 190 MB.)
//!
//! The queue depth comes from [`QueueDepth`]: a cached count, read at most
//! once per refresh interval however many scrapers ask, on its own database
//! connection, so scrapes can never take connections from page views.

use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    extract::{MatchedPath, Request, State},
    http::{Method, header},
    middleware::Next,
    response::{IntoResponse, Response},
    routing::get,
};
use jobs::admin::StateCount;
use sqlx::{PgPool, postgres::PgPoolOptions};
use tokio::{sync::Mutex, time::Instant};

use crate::AppState;

/// `/metrics`.
pub fn router() -> Router<AppState> {
    Router::new().route("/metrics", get(render))
}

/// The method as a label value: one of a fixed set.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

/// Counts every request by method, route and status, and times it.
pub async fn track(request: Request, next: Next) -> Response {
    let started = std::time::Instant::now();
    let method = method_label(request.method());
    // Set by the router for matched routes only; never the raw path (unbounded).
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("visitme_http_requests_total", "method" => method, "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("visitme_http_request_duration_seconds", "method" => method, "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

/// The states counted as queue depth (finished jobs are the
/// `durable_jobs_*_total` counters instead).
const OPEN_STATES: [&str; 6] = [
    "pending",
    "scheduled",
    "sleeping",
    "waiting",
    "claimed",
    "running",
];

/// The queue depth for `/metrics`, counted at most once per `refresh`.
#[derive(Debug, Clone)]
pub struct QueueDepth {
    /// One connection of its own, with a short statement timeout.
    pool: PgPool,
    refresh: Duration,
    /// The last count and when it was attempted. Held across the query: that
    /// is what makes concurrent scrapes wait for one query instead of each
    /// running their own (single flight).
    last: Arc<Mutex<Option<Counted>>>,
}

/// When a count was attempted, and the last counts that succeeded.
type Counted = (Instant, Vec<StateCount>);

impl QueueDepth {
    /// Counts through a new pool of one connection to the same database as
    /// `pool` (opened on first use), refreshed at most once per `refresh`.
    pub fn new(pool: &PgPool, refresh: Duration) -> Self {
        let options = (*pool.connect_options())
            .clone()
            .application_name("visitme-web metrics")
            // A slow count is dropped, not waited for: scrapes stay fast.
            .options([("statement_timeout", "2s")]);
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .acquire_timeout(Duration::from_secs(2))
            .connect_lazy_with(options);
        Self {
            pool,
            refresh,
            last: Arc::default(),
        }
    }

    /// Sets the gauges `durable_jobs_queue_depth{queue,state}` from the cached
    /// count, counting anew if it is older than the refresh interval.
    async fn update_gauges(&self) {
        let mut last = self.last.lock().await;
        let fresh = last
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() < self.refresh);
        if fresh {
            return;
        }
        metrics::counter!("visitme_queue_depth_queries_total").increment(1);
        match jobs::admin::open_job_counts(&self.pool).await {
            Ok(counts) => {
                // Every open state of every queue seen so far gets a value, so a
                // state that emptied reads 0 instead of keeping its old count.
                let previous = last.take().map(|(_, counts)| counts).unwrap_or_default();
                let mut queues: Vec<&str> = previous
                    .iter()
                    .chain(&counts)
                    .map(|c| c.queue.as_str())
                    .collect();
                queues.sort_unstable();
                queues.dedup();
                for queue in queues {
                    for job_state in OPEN_STATES {
                        let count = counts
                            .iter()
                            .find(|c| c.queue == queue && c.state == job_state)
                            .map_or(0, |c| c.count);
                        metrics::gauge!("durable_jobs_queue_depth", "queue" => queue.to_owned(), "state" => job_state)
                            .set(count as f64);
                    }
                }
                *last = Some((Instant::now(), counts));
            }
            Err(err) => {
                // Keep the old gauges, and wait a refresh interval before trying again.
                tracing::warn!(error = %err, "queue depth unavailable for /metrics");
                let previous = last.take().map(|(_, counts)| counts).unwrap_or_default();
                *last = Some((Instant::now(), previous));
            }
        }
    }

    /// Closes the connection (at shutdown).
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Refreshes the queue-depth gauges (if due), then renders.
async fn render(State(state): State<AppState>) -> impl IntoResponse {
    state.queue_depth.update_gauges().await;
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}
