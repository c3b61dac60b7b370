//! `GET /metrics` (Prometheus text) and the middleware counting requests.

use std::time::Instant;

use axum::{
    Router,
    extract::{MatchedPath, Request, State},
    http::header,
    middleware::Next,
    response::{IntoResponse, Response},
    routing::get,
};

use crate::AppState;

/// `/metrics`.
pub fn router() -> Router<AppState> {
    Router::new().route("/metrics", get(render))
}

/// Counts every request by method, route and status, and times it.
pub async fn track(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().to_string();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("visitme_http_requests_total", "method" => method.clone(), "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("visitme_http_request_duration_seconds", "method" => method, "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

/// Refreshes the queue-depth gauges from the database, then renders.
async fn render(State(state): State<AppState>) -> impl IntoResponse {
    match jobs::admin::queue_status(&state.pool).await {
        Ok(counts) => {
            // Zero every known state first, so a state that emptied reads 0.
            let mut queues: Vec<&str> = counts.iter().map(|c| c.queue.as_str()).collect();
            queues.dedup();
            for queue in queues {
                for job_state in jobs::admin::STATES {
                    metrics::gauge!("visitme_queue_jobs", "queue" => queue.to_owned(), "state" => job_state).set(0.0);
                }
            }
            for count in &counts {
                metrics::gauge!("visitme_queue_jobs", "queue" => count.queue.clone(), "state" => count.state.clone())
                    .set(count.count as f64);
            }
        }
        Err(err) => tracing::warn!(error = %err, "queue depth unavailable for /metrics"),
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}
