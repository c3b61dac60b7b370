#![doc = include_str!("../README.md")]

use tracing_subscriber::{EnvFilter, layer::SubscriberExt as _, util::SubscriberInitExt as _};

/// What can go wrong while installing telemetry.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `RUST_LOG` does not parse as a tracing filter.
    #[error("invalid RUST_LOG filter: {0}")]
    Filter(#[from] tracing_subscriber::filter::ParseError),
    /// A global subscriber was already installed in this process.
    #[error("telemetry already initialised: {0}")]
    AlreadyInitialised(#[from] tracing_subscriber::util::TryInitError),
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

/// Telemetry settings, shared by both binaries' command lines.
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
        default_value = "info,sqlx::postgres::notice=warn"
    )]
    pub log_filter: String,
}

/// Keeps telemetry running; dropping it flushes and shuts exporters down.
#[must_use = "telemetry stops when the guard is dropped"]
#[derive(Debug)]
pub struct Guard {
    service_name: String,
}

impl Drop for Guard {
    fn drop(&mut self) {
        tracing::debug!(service.name = %self.service_name, "telemetry shut down");
    }
}

/// Installs the global tracing subscriber for `service_name`.
pub fn init(service_name: &str, config: &Config) -> Result<Guard, Error> {
    let filter = EnvFilter::try_new(&config.log_filter)?;
    let registry = tracing_subscriber::registry().with(filter);
    match config.log_format {
        LogFormat::Text => registry.with(tracing_subscriber::fmt::layer()).try_init()?,
        LogFormat::Json => registry
            .with(tracing_subscriber::fmt::layer().json())
            .try_init()?,
    }
    tracing::info!(
        service.name = service_name,
        "telemetry: logs to stdout, OTLP export off"
    );
    Ok(Guard {
        service_name: service_name.to_owned(),
    })
}
