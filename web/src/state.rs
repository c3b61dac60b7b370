//! State shared by all handlers.

use sqlx::PgPool;

/// Cheap to clone: a pool handle and a few flags.
#[derive(Debug, Clone)]
pub struct AppState {
    /// Database pool for request handling (short acquire timeout, so requests
    /// fail fast with a 503 while Postgres is down instead of hanging).
    pub pool: PgPool,
    /// Whether `X-Forwarded-For` is trusted for the visitor's address.
    pub trust_proxy: bool,
}
