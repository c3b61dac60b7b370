#![doc = include_str!("../README.md")]

mod config;
mod error;
pub mod routes;
mod state;
mod telemetry;
pub mod views;
pub mod visits;

use std::{future::Future, net::SocketAddr};

use axum::{Router, http::StatusCode, response::IntoResponse};
use tokio::net::TcpListener;
use tower_http::trace::TraceLayer;

pub use config::Config;
pub use error::Error;
pub use state::AppState;

/// The whole HTTP surface.
pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(routes::visits::router())
        .merge(routes::health::router())
        .merge(routes::assets::router())
        .merge(routes::admin::router())
        .merge(routes::metrics::router())
        .fallback(not_found)
        .layer(axum::middleware::from_fn(routes::metrics::track))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(telemetry::request_span)
                .on_response(telemetry::record_response)
                // Errors are logged once, where they are turned into a page.
                .on_failure(()),
        )
        .with_state(state)
}

async fn not_found() -> impl IntoResponse {
    (
        StatusCode::NOT_FOUND,
        views::errors::page(StatusCode::NOT_FOUND),
    )
}

/// Serves `router(state)` on `listener` until `shutdown` completes, then lets
/// in-flight requests finish.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        router(state).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}
