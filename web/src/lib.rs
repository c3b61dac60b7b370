#![doc = include_str!("../README.md")]

mod config;
mod error;
pub mod routes;
mod serve;
mod state;
mod telemetry;
pub mod views;
pub mod visits;

use std::{future::Future, time::Duration};

use axum::{Router, http::StatusCode, response::IntoResponse};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::{timeout::TimeoutLayer, trace::TraceLayer};

pub use config::{Config, HttpConfig};
pub use error::Error;
pub use state::AppState;

/// The whole HTTP surface, with the default request timeout.
pub fn router(state: AppState) -> Router {
    app(state, true, HttpConfig::default().request_timeout)
}

/// The HTTP surface; `/metrics` only with `with_metrics`. A request running
/// longer than `request_timeout` is cancelled and answered 503 (inside the
/// metrics and trace layers, so it is counted and traced like any answer).
fn app(state: AppState, with_metrics: bool, request_timeout: Duration) -> Router {
    let mut router = Router::new()
        .merge(routes::visits::router())
        .merge(routes::health::router())
        .merge(routes::assets::router())
        .merge(routes::admin::router(&state));
    if with_metrics {
        router = router.merge(routes::metrics::router());
    }
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            request_timeout,
        ))
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

/// Headers every response carries: pages load only our own stylesheet and
/// script (no inline code, no other origin; the script fetches only from
/// us), cannot be framed, and send no referrer to other sites
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
            "default-src 'none'; style-src 'self'; script-src 'self'; connect-src 'self'; \
             img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
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

/// Serves `router(state)` on `listener` with the default [`HttpConfig`]
/// until `shutdown` completes, then lets in-flight requests finish.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, None, state, &HttpConfig::default(), shutdown).await
}

/// Serves the app on `listener` within the limits of `config` until
/// `shutdown` completes. With a `metrics` listener, `/metrics` is served
/// there only (and answers 404 on `listener`), within the same limits.
pub async fn serve_with(
    listener: TcpListener,
    metrics: Option<TcpListener>,
    state: AppState,
    config: &HttpConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let queue_depth = state.queue_depth.clone();
    let per_client = config.per_client_limit(state.trust_proxy);
    let result = match metrics {
        None => {
            let app = app(state, true, config.request_timeout);
            serve::run(listener, app, config, per_client, shutdown).await
        }
        Some(metrics) => {
            let stop = CancellationToken::new();
            let stopper = stop.clone();
            tokio::spawn(async move {
                shutdown.await;
                stopper.cancel();
            });
            let metrics_app = routes::metrics::router()
                .layer(TimeoutLayer::with_status_code(
                    StatusCode::SERVICE_UNAVAILABLE,
                    config.request_timeout,
                ))
                .with_state(state.clone());
            let app = app(state, false, config.request_timeout);
            let (main, metrics) = tokio::join!(
                serve::run(
                    listener,
                    app,
                    config,
                    per_client,
                    stop.clone().cancelled_owned()
                ),
                serve::run(
                    metrics,
                    metrics_app,
                    config,
                    per_client,
                    stop.clone().cancelled_owned()
                ),
            );
            main.and(metrics)
        }
    };
    queue_depth.close().await;
    result
}
