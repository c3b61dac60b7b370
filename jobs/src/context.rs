//! What VisitMe's jobs need at run time.

use sqlx::PgPool;

/// Shared, cheap-to-clone resources handed to every job run (the registry's
/// context).
#[derive(Debug, Clone)]
pub struct JobContext {
    /// The application database (the same one that holds the queue).
    pub pool: PgPool,
}
