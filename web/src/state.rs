//! State shared by all handlers.

use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;

use crate::routes::{admin::AdminAuth, visits::VisitorIp};

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
}

impl AppState {
    /// State for tests and embedding: proxy headers ignored, full addresses
    /// (the binary defaults to `VISITOR_IP=masked`), dashboard disabled.
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            trust_proxy: false,
            visitor_ip: VisitorIp::Full,
            admin: None,
            metrics: observability::metrics::handle(),
            worker_health: None,
        }
    }

    /// Enables `/admin` with `token`.
    pub fn with_admin_token(mut self, token: &str) -> Self {
        self.admin = Some(Arc::new(AdminAuth::new(token)));
        self
    }
}
