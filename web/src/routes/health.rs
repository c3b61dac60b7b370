//! Liveness and readiness probes.

use axum::{Router, extract::State, http::StatusCode, routing::get};

use crate::AppState;

/// `/healthz` and `/readyz`.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
}

/// 200 while the process runs.
async fn healthz() -> &'static str {
    "ok"
}

/// 200 when Postgres answers, every migration is applied and the embedded
/// worker (if any) runs, else 503 with the reason (an exhausted pool is told
/// apart from a database that does not answer).
async fn readyz(State(state): State<AppState>) -> (StatusCode, String) {
    let worker = state.worker_health.as_ref().map(jobs::Health::state);
    match worker {
        Some(jobs::WorkerState::Restarting) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: the embedded worker is restarting".to_owned(),
            );
        }
        Some(jobs::WorkerState::WaitingForDatabase) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: the embedded worker waits for the database".to_owned(),
            );
        }
        _ => {}
    }
    match migrations::is_up_to_date(&state.pool).await {
        Ok(true) => (StatusCode::OK, "ready".to_owned()),
        Ok(false) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: migrations pending".to_owned(),
        ),
        // Every connection busy (a flood, or slow queries): Postgres may be fine.
        Err(migrations::Error::Database(sqlx::Error::PoolTimedOut)) => {
            let options = state.pool.options();
            let reason = format!(
                "database pool exhausted: no connection within {:?} (all {} in use)",
                options.get_acquire_timeout(),
                options.get_max_connections()
            );
            tracing::warn!("readiness check failed: {reason}");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {reason}"),
            )
        }
        Err(err) => {
            tracing::warn!(error = %err, "readiness check failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: database unavailable".to_owned(),
            )
        }
    }
}
