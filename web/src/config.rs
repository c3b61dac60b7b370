//! The `web` binary's settings: flags with environment-variable fallbacks.

use std::{net::SocketAddr, time::Duration};

use clap::{ArgAction, Parser};

pub use crate::routes::visits::VisitorIp;
pub use crate::serve::HttpConfig;
use crate::{Error, routes::admin::MIN_TOKEN_CHARS, serve::ranges};
use jobs::WorkerConfig;

/// Serves the VisitMe page: records each visit, lists the 10 newest, and
/// enqueues a background job that deletes older visits.
///
/// By default the same process also runs a job worker, so this one command is
/// the whole app; set EMBEDDED_WORKER=false when running `worker` processes
/// separately.
#[derive(Debug, Clone, Parser)]
#[command(name = "web", version)]
pub struct Config {
    /// Postgres URL; the database is created if missing and migrated at start.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://localhost/visitme",
        hide_env_values = true
    )]
    pub database_url: String,

    /// Address the HTTP server listens on (port 0 picks a free port).
    #[arg(long, env = "BIND", default_value = "127.0.0.1:8080")]
    pub bind: SocketAddr,

    /// Also run a job worker inside this process (true/false).
    #[arg(long, env = "EMBEDDED_WORKER", default_value_t = true, action = ArgAction::Set)]
    pub embedded_worker: bool,

    /// Take the visitor's address from the last `X-Forwarded-For` entry, i.e.
    /// the address our reverse proxy saw (true/false). Only enable behind a
    /// proxy you run: anyone can send that header.
    #[arg(long, env = "TRUST_PROXY", default_value_t = false, action = ArgAction::Set)]
    pub trust_proxy: bool,

    /// How much of the visitor's address is stored and shown (the page shows
    /// visits to everyone): `full`, `masked` (IPv4 last octet and IPv6 last 80
    /// bits zeroed) or `none`.
    #[arg(long, env = "VISITOR_IP", value_enum, default_value_t = VisitorIp::Masked)]
    pub visitor_ip: VisitorIp,

    /// Secret that unlocks the jobs dashboard at /admin (login form or
    /// `Authorization: Bearer`), at least 16 characters (`web` refuses to
    /// start with a shorter one); without it the dashboard is disabled.
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// Serve Prometheus metrics at http://<METRICS_BIND>/metrics, e.g. on an
    /// address only the monitoring network reaches; `/metrics` then answers
    /// 404 on BIND. Unset: `/metrics` is served on BIND.
    #[arg(long, env = "METRICS_BIND")]
    pub metrics_bind: Option<SocketAddr>,

    /// Seconds between two counts of the queue depth for /metrics (scrapes
    /// in between get the last count; one count runs at a time).
    #[arg(long, env = "METRICS_QUEUE_REFRESH", default_value = "5", value_parser = ranges::METRICS_REFRESH.parser())]
    pub metrics_queue_refresh: Duration,

    /// Jaeger's web UI, e.g. `http://localhost:16686`: the page and the jobs
    /// dashboard then link to `<JAEGER_UI_URL>/trace/<trace id>` (with OTLP
    /// export on; without it there is no trace to link to).
    #[arg(long, env = "JAEGER_UI_URL")]
    pub jaeger_ui_url: Option<String>,

    /// HTTP server limits.
    #[command(flatten)]
    pub http: HttpConfig,

    /// Worker settings (used when the embedded worker runs).
    #[command(flatten)]
    pub worker: WorkerConfig,

    /// Settings of VisitMe's jobs (used when the embedded worker runs).
    #[command(flatten)]
    pub jobs: jobs::JobSettings,

    /// Logging and telemetry settings.
    #[command(flatten)]
    pub telemetry: observability::Config,
}

impl Config {
    /// Refuses settings that parse but must not run, in one line that names
    /// the variable, the value (never a secret) and what it may be.
    pub fn check(&self) -> Result<(), Error> {
        self.worker
            .check()
            .map_err(|err| Error::Config(err.to_string()))?;
        if let Some(token) = self.admin_token.as_deref().filter(|t| !t.is_empty()) {
            let chars = token.chars().count();
            if chars < MIN_TOKEN_CHARS {
                return Err(Error::Config(format!(
                    "ADMIN_TOKEN is {chars} characters long, it must be at least \
                     {MIN_TOKEN_CHARS}: a short token can be guessed (use e.g. `openssl rand -hex 32`)"
                )));
            }
            if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(Error::Config(format!(
                    "ADMIN_TOKEN holds spaces or control characters; it must be {MIN_TOKEN_CHARS} \
                     or more printable characters without spaces (use e.g. `openssl rand -hex 32`)"
                )));
            }
        }
        if let Some(jaeger) = &self.jaeger_ui_url {
            check_jaeger_url(jaeger)?;
        }
        self.http.check_file_descriptors()
    }
}

/// `JAEGER_UI_URL` becomes a link on the pages: only an `http`/`https` URL
/// with a host (not `javascript:`, `data:`, or a relative path).
fn check_jaeger_url(value: &str) -> Result<(), Error> {
    let refuse = || {
        Error::Config(format!(
            "invalid JAEGER_UI_URL={:?}: it must be an http:// or https:// URL with a host, \
             e.g. http://localhost:16686",
            value.escape_debug().to_string()
        ))
    };
    let url = url::Url::parse(value).map_err(|_| refuse())?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none_or(str::is_empty) {
        return Err(refuse());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    #[test]
    fn the_flags_are_a_valid_command_line() {
        super::Config::command().debug_assert();
    }
}
