#![doc = include_str!("../README.md")]

mod context;
mod export;
pub mod metrics;
mod text;

use opentelemetry_appender_tracing::layer::OpenTelemetryTracingBridge;
use opentelemetry_sdk::{logs::SdkLoggerProvider, trace::SdkTracerProvider};
use tracing_subscriber::{
    EnvFilter, Layer as _, layer::SubscriberExt as _, util::SubscriberInitExt as _,
};

pub use context::{
    current_trace_id, db_span, extract_into, inject_current, link_traceparents, set_remote_parent,
    trace_id_of_traceparent,
};
pub use export::Export;
pub use text::colour_wanted;

/// What can go wrong while installing telemetry.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `RUST_LOG` does not parse as a tracing filter.
    #[error("invalid RUST_LOG filter: {0}")]
    Filter(#[from] tracing_subscriber::filter::ParseError),
    /// A global subscriber was already installed in this process.
    #[error("telemetry already initialised: {0}")]
    AlreadyInitialised(#[from] tracing_subscriber::util::TryInitError),
    /// An OTLP exporter could not be built from the `OTEL_*` settings.
    #[error("cannot set up OTLP export: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    /// The Prometheus metrics endpoint could not be started.
    #[error("cannot serve metrics: {0}")]
    Metrics(String),
    /// An `OTEL_*` variable has a value we do not support.
    #[error("{variable}={value:?} is not supported (use {supported})")]
    Unsupported {
        /// The variable.
        variable: &'static str,
        /// Its value.
        value: String,
        /// What works instead.
        supported: &'static str,
    },
}

/// How log lines are written to stdout.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Telemetry settings, shared by both binaries' command lines. OTLP export
/// is configured by the standard `OTEL_*` environment variables (see the README).
#[derive(Debug, Clone, clap::Args)]
#[group(id = "telemetry")]
#[command(next_help_heading = "Telemetry")]
pub struct Config {
    /// Log line format on stdout.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter (tracing `EnvFilter` syntax), e.g. `info,jobs=debug`.
    #[arg(
        long = "log-filter",
        env = "RUST_LOG",
        default_value = "info,sqlx::postgres::notice=warn,opentelemetry=warn"
    )]
    pub log_filter: String,
}

/// Keeps telemetry running; [`Guard::shutdown`] (or dropping it) flushes
/// every buffered span and log record to the exporters and stops them.
#[must_use = "telemetry is flushed and stopped when the guard is dropped"]
#[derive(Debug)]
pub struct Guard {
    tracer: Option<SdkTracerProvider>,
    logger: Option<SdkLoggerProvider>,
}

impl Guard {
    /// Flushes and stops the exporters. Blocks until they are done (bounded
    /// by the exporters' timeouts); later calls do nothing.
    pub fn shutdown(&mut self) {
        // Errors go to stderr: the log pipeline is what is being shut down.
        if let Some(tracer) = self.tracer.take()
            && let Err(err) = tracer.shutdown()
        {
            eprintln!("telemetry: flushing spans failed: {err}");
        }
        if let Some(logger) = self.logger.take()
            && let Err(err) = logger.shutdown()
        {
            eprintln!("telemetry: flushing log records failed: {err}");
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A subscriber that exports to the given providers, with the same layers as
/// [`init`] (minus stdout), for tests that capture telemetry in memory:
/// install it with `tracing::subscriber::set_default`. Also installs the W3C
/// propagator, as `init` does.
pub fn subscriber_for_test(
    tracer: &SdkTracerProvider,
    logger: &SdkLoggerProvider,
) -> impl tracing::Subscriber + Send + Sync + 'static {
    use opentelemetry::trace::TracerProvider as _;
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    tracing_subscriber::registry()
        .with(EnvFilter::new("info"))
        .with(tracing_opentelemetry::layer().with_tracer(tracer.tracer("visitme-test")))
        .with(OpenTelemetryTracingBridge::new(logger))
}

/// Installs the global tracing subscriber: stdout logs, plus OTLP traces and
/// logs when the `OTEL_*` variables ask for them. `default_service_name` is
/// used unless `OTEL_SERVICE_NAME` (or `service.name` in
/// `OTEL_RESOURCE_ATTRIBUTES`) names the service. Logs one line saying where
/// telemetry goes.
pub fn init(default_service_name: &str, config: &Config) -> Result<Guard, Error> {
    let export = Export::from_env(default_service_name)?;
    let (tracer, logger) = export.providers()?;

    let otel_traces = tracer.as_ref().map(|provider| {
        use opentelemetry::trace::TracerProvider as _;
        tracing_opentelemetry::layer().with_tracer(provider.tracer("visitme"))
    });
    // The exporter's own HTTP/gRPC stack must not feed the log pipeline it is
    // exporting (a feedback loop), so those targets are off for the bridge.
    let otel_logs = logger.as_ref().map(|provider| {
        let quiet = EnvFilter::new("trace")
            .add_directive("hyper=off".parse().expect("static directive"))
            .add_directive("h2=off".parse().expect("static directive"))
            .add_directive("tonic=off".parse().expect("static directive"))
            .add_directive("reqwest=off".parse().expect("static directive"))
            .add_directive("opentelemetry=off".parse().expect("static directive"))
            .add_directive("opentelemetry_sdk=off".parse().expect("static directive"))
            .add_directive("opentelemetry_otlp=off".parse().expect("static directive"));
        OpenTelemetryTracingBridge::new(provider).with_filter(quiet)
    });
    let stdout = match config.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(text::colour_wanted())
            .event_format(text::TextLine)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer().json().boxed(),
    };
    tracing_subscriber::registry()
        .with(EnvFilter::try_new(&config.log_filter)?)
        .with(tracing_subscriber::filter::filter_fn(|event| {
            !is_duplicate_export_error(event)
        }))
        .with(text::CarryJobId)
        .with(stdout)
        .with(otel_traces)
        .with(otel_logs)
        .try_init()?;

    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    if let Some(provider) = &tracer {
        opentelemetry::global::set_tracer_provider(provider.clone());
    }
    tracing::info!(service.name = %export.service_name, "telemetry: {}", export.describe());
    Ok(Guard { tracer, logger })
}

/// A failed OTLP export is reported twice: a WARN from the exporter
/// ("OTLP export exhausted retries - telemetry data will be lost") and an
/// ERROR from the SDK's batch processor (`BatchSpanProcessor.ExportError`,
/// `BatchLogProcessor.ExportError`). A collector that is down is not an error
/// of this app, which keeps serving: the WARN says it, the ERROR is dropped.
fn is_duplicate_export_error(event: &tracing::Metadata<'_>) -> bool {
    *event.level() == tracing::Level::ERROR
        && event.target() == "opentelemetry_sdk"
        && event.name().ends_with(".ExportError")
}

/// An error and its causes on one line, `outer: cause: root cause`, skipping
/// a cause whose text the line already holds (many errors repeat their source).
pub fn one_line(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = String::new();
    let mut next = Some(error);
    while let Some(current) = next {
        let text = current.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
        next = current.source();
    }
    line
}

/// Ends a binary's `main`: success, or the error on one line (stderr and the
/// log) and exit code 1.
pub fn exit_code<E>(binary: &str, result: Result<(), E>) -> std::process::ExitCode
where
    E: std::ops::Deref<Target = dyn std::error::Error + Send + Sync + 'static>,
{
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            let line = one_line(&*error);
            tracing::error!("{line}");
            eprintln!("{binary}: {line}");
            std::process::ExitCode::FAILURE
        }
    }
}
