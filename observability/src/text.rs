//! The human-readable log line: time, level, target, message and the
//! event's own fields, plus the `job.id` of the job it happened in.
//!
//! The span fields (OpenTelemetry's `otel.*`, `messaging.*`, `http.*`...) are
//! not repeated on every line, as tracing's default format does: they belong
//! to the spans, and reach OTLP and `LOG_FORMAT=json` whole. A line about a
//! deleted visit is ~110 characters instead of ~400.

use std::fmt;

use tracing::{Event, Subscriber, field::Field};
use tracing_subscriber::{
    Layer,
    fmt::{
        FmtContext, FormatEvent, FormatFields,
        format::Writer,
        time::{FormatTime as _, SystemTime},
    },
    layer::Context,
    registry::LookupSpan,
};

/// The span field carried onto the lines logged inside the span (when the
/// line does not name one itself): which job a line is about.
const CARRIED_FIELD: &str = "job.id";

/// Whether stdout gets colour: only on a terminal, and only without
/// `NO_COLOR` (<https://no-color.org>: set and not empty turns it off).
/// Redirected to a file or a pipe, lines are plain, so `grep 'visit.id=5'` works.
pub fn colour_wanted() -> bool {
    use std::io::IsTerminal as _;
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|value| !value.is_empty());
    std::io::stdout().is_terminal() && !no_color
}

/// Formats one text line (see the module doc).
#[derive(Debug, Clone, Copy, Default)]
pub struct TextLine;

impl<S, N> FormatEvent<S, N> for TextLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let ansi = writer.has_ansi_escapes();
        SystemTime.format_time(&mut writer)?;
        let level = *event.metadata().level();
        let (colour, reset) = match (ansi, level) {
            (false, _) => ("", ""),
            (true, tracing::Level::ERROR) => ("\x1b[31m", "\x1b[0m"),
            (true, tracing::Level::WARN) => ("\x1b[33m", "\x1b[0m"),
            (true, tracing::Level::INFO) => ("\x1b[32m", "\x1b[0m"),
            (true, _) => ("\x1b[2m", "\x1b[0m"),
        };
        write!(writer, " {colour}{level:>5}{reset} ")?;
        let (dim, undim) = if ansi {
            ("\x1b[2m", "\x1b[0m")
        } else {
            ("", "")
        };
        write!(writer, "{dim}{}:{undim} ", event.metadata().target())?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        if event.metadata().fields().field(CARRIED_FIELD).is_none()
            && let Some(scope) = ctx.event_scope()
            && let Some(value) = scope
                .from_root()
                .filter_map(|span| span.extensions().get::<Carried>().map(|c| c.0.clone()))
                .last()
        {
            write!(writer, " {CARRIED_FIELD}={value}")?;
        }
        writeln!(writer)
    }
}

/// The [`CARRIED_FIELD`] of a span, kept in its extensions by [`CarryJobId`].
struct Carried(String);

/// Keeps each span's `job.id` for [`TextLine`] (a span's fields are only
/// seen when it is created or recorded, not when a line is written in it).
#[derive(Debug, Clone, Copy, Default)]
pub struct CarryJobId;

impl<S> Layer<S> for CarryJobId
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: Context<'_, S>,
    ) {
        let mut found = FindField(None);
        attrs.record(&mut found);
        if let (Some(value), Some(span)) = (found.0, ctx.span(id)) {
            span.extensions_mut().insert(Carried(value));
        }
    }
}

struct FindField(Option<String>);

impl tracing::field::Visit for FindField {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == CARRIED_FIELD {
            self.0 = Some(value.to_owned());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == CARRIED_FIELD {
            self.0 = Some(format!("{value:?}"));
        }
    }
}
