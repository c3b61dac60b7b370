//! The HTTP SERVER span of each request (OpenTelemetry HTTP conventions).

use std::{collections::HashMap, time::Duration};

use axum::{
    body::Body,
    extract::MatchedPath,
    http::{Request, Response},
};
use tracing::Span;

/// Opens the request's span: named `<METHOD> <route>`, continuing an incoming
/// W3C `traceparent` when the caller sent one.
pub fn request_span(request: &Request<Body>) -> Span {
    let method = request.method().as_str();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(MatchedPath::as_str);
    let span = tracing::info_span!(
        "request",
        otel.name = match route {
            Some(route) => format!("{method} {route}"),
            None => method.to_owned(),
        },
        otel.kind = "server",
        http.request.method = method,
        http.route = route,
        url.path = request.uri().path(),
        http.response.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    let carrier: HashMap<String, String> = ["traceparent", "tracestate"]
        .into_iter()
        .filter_map(|key| {
            let value = request.headers().get(key)?.to_str().ok()?;
            Some((key.to_owned(), value.to_owned()))
        })
        .collect();
    if !carrier.is_empty() {
        observability::set_remote_parent(&span, &carrier);
    }
    span
}

/// Records the status; a 5xx marks the span as an error.
pub fn record_response(response: &Response<Body>, latency: Duration, span: &Span) {
    let status = response.status();
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        span.record("otel.status_code", "error");
    }
    tracing::debug!(status = status.as_u16(), ?latency, "response sent");
}
