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

/// 200 when Postgres answers and every migration is applied, else 503.
async fn readyz(State(state): State<AppState>) -> (StatusCode, String) {
    match migrations::is_up_to_date(&state.pool).await {
        Ok(true) => (StatusCode::OK, "ready".to_owned()),
        Ok(false) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: migrations pending".to_owned(),
        ),
        Err(err) => {
            tracing::warn!(error = %err, "readiness check failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: database unavailable".to_owned(),
            )
        }
    }
}
