//! Carrying a trace across the queue, and naming database spans.

use std::collections::HashMap;

use opentelemetry::trace::TraceContextExt as _;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The current span's trace context as W3C headers (`traceparent`,
/// `tracestate`), to store with a job. Empty when nothing is exported.
pub fn inject_current() -> HashMap<String, String> {
    let mut carrier = HashMap::new();
    let context = Span::current().context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut carrier);
    });
    carrier.retain(|_, value| !value.is_empty());
    carrier
}

/// Makes `span` (not yet entered) a child of the trace in `carrier`, and links
/// it to that context too, as the messaging conventions ask of a consumer.
/// Returns whether a valid context was found.
pub fn extract_into(span: &Span, carrier: &HashMap<String, String>) -> bool {
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(carrier));
    let remote = parent.span().span_context().clone();
    if !remote.is_valid() {
        return false;
    }
    span.add_link(remote);
    span.set_parent(parent).is_ok()
}

/// Links `span` (not yet entered) to each W3C `traceparent` in
/// `traceparents` (a fan-in's dependencies, say). Returns how many were valid.
pub fn link_traceparents<'a>(
    span: &Span,
    traceparents: impl IntoIterator<Item = &'a str>,
) -> usize {
    let mut linked = 0;
    for traceparent in traceparents {
        let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
        let context = opentelemetry::global::get_text_map_propagator(|p| p.extract(&carrier));
        let remote = context.span().span_context().clone();
        if remote.is_valid() {
            span.add_link(remote);
            linked += 1;
        }
    }
    linked
}

/// Makes `span` (not yet entered) a child of the remote context in `carrier`
/// (an incoming request's `traceparent`). Returns whether one was found.
pub fn set_remote_parent(span: &Span, carrier: &HashMap<String, String>) -> bool {
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(carrier));
    parent.span().span_context().is_valid() && span.set_parent(parent).is_ok()
}

/// A client span for one database statement, named `<OPERATION> <table>`
/// with the `db.*` semantic-convention attributes.
pub fn db_span(operation: &'static str, table: &'static str) -> Span {
    tracing::info_span!(
        "db",
        otel.name = format!("{operation} {table}"),
        otel.kind = "client",
        db.system.name = "postgresql",
        db.operation.name = operation,
        db.collection.name = table,
        db.query.summary = format!("{operation} {table}"),
    )
}

/// The 32-hex trace id of the current span, when it is part of an exported
/// trace (none when OTLP export is off).
pub fn current_trace_id() -> Option<String> {
    let context = Span::current().context();
    let span_context = context.span().span_context().clone();
    span_context
        .is_valid()
        .then(|| span_context.trace_id().to_string())
}

/// The trace id in a W3C `traceparent` value (`00-<trace id>-<span id>-<flags>`).
pub fn trace_id_of_traceparent(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.split('-');
    let (_version, trace_id) = (parts.next()?, parts.next()?);
    (trace_id.len() == 32
        && trace_id.bytes().all(|b| b.is_ascii_hexdigit())
        && trace_id.bytes().any(|b| b != b'0'))
    .then_some(trace_id)
}
