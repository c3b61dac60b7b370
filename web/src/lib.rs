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
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn(security_headers))
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

async fn method_not_allowed() -> impl IntoResponse {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        views::errors::page(StatusCode::METHOD_NOT_ALLOWED),
    )
}

/// Headers every response carries: pages load only our own stylesheet, run
/// no script, cannot be framed, and send no referrer to other sites
/// (`same-origin`, not `no-referrer`: with that, browsers send `Origin: null`
/// on our own form posts and the dashboard could not check them).
async fn security_headers(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::http::{HeaderValue, header};
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; \
             frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
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
