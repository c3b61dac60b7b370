//! State shared by all handlers.

use std::{sync::Arc, time::Duration};

use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;

use crate::{
    Config, Error,
    routes::{admin::AdminAuth, metrics::QueueDepth, visits::VisitorIp},
};

/// Cheap to clone: a pool handle, flags, and shared read-only settings.
#[derive(Debug, Clone)]
pub struct AppState {
    /// Database pool for request handling (short acquire timeout, so requests
    /// fail fast with a 503 while Postgres is down instead of hanging).
    pub pool: PgPool,
    /// Whether `X-Forwarded-For` is trusted for the visitor's address.
    pub trust_proxy: bool,
    /// How much of the visitor's address is stored.
    pub visitor_ip: VisitorIp,
    /// The jobs dashboard's credentials; `None` disables `/admin`.
    pub admin: Option<Arc<AdminAuth>>,
    /// This process's Prometheus metrics, rendered on `/metrics`.
    pub metrics: PrometheusHandle,
    /// The embedded worker's state, when this process runs one (`/readyz`).
    pub worker_health: Option<jobs::Health>,
    /// The cached queue depth of `/metrics`, on its own connection.
    pub queue_depth: QueueDepth,
    /// Jaeger's UI (no trailing slash): pages link to their traces there.
    pub jaeger_ui_url: Option<Arc<str>>,
    /// The page panel's cached trim-queue counts.
    pub trim_queue: crate::visits::TrimQueueCounts,
}

impl AppState {
    /// State for tests and embedding: proxy headers ignored, full addresses
    /// (the binary defaults to `VISITOR_IP=masked`), dashboard disabled.
    pub fn new(pool: PgPool) -> Self {
        Self {
            trust_proxy: false,
            visitor_ip: VisitorIp::Full,
            admin: None,
            metrics: observability::metrics::handle(),
            worker_health: None,
            queue_depth: QueueDepth::new(&pool, Duration::from_secs(5)),
            jaeger_ui_url: None,
            trim_queue: crate::visits::TrimQueueCounts::default(),
            pool,
        }
    }

    /// The `web` binary's state: `new(pool)` with the settings of `config`.
    /// Fails on settings that must not run (a short `ADMIN_TOKEN`).
    pub fn from_config(pool: PgPool, config: &Config) -> Result<Self, Error> {
        config.check()?;
        let mut state = Self::new(pool);
        state.trust_proxy = config.trust_proxy;
        state.visitor_ip = config.visitor_ip;
        state.queue_depth = QueueDepth::new(&state.pool, config.metrics_queue_refresh);
        if let Some(url) = config.jaeger_ui_url.as_deref().filter(|u| !u.is_empty()) {
            state = state.with_jaeger_ui(url);
        }
        match config.admin_token.as_deref().filter(|t| !t.is_empty()) {
            Some(token) => state = state.with_admin_token(token),
            None => tracing::info!("jobs dashboard disabled: set ADMIN_TOKEN to enable /admin"),
        }
        Ok(state)
    }

    /// Links pages to their traces in the Jaeger UI at `url`.
    pub fn with_jaeger_ui(mut self, url: &str) -> Self {
        self.jaeger_ui_url = Some(Arc::from(url.trim_end_matches('/')));
        self
    }

    /// Enables `/admin` with `token`.
    pub fn with_admin_token(self, token: &str) -> Self {
        self.with_admin(AdminAuth::new(token))
    }

    /// Enables `/admin` with these credentials.
    pub fn with_admin(mut self, auth: AdminAuth) -> Self {
        self.admin = Some(Arc::new(auth));
        self
    }
}
