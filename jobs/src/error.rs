//! The one error type of the `jobs` crate.

/// What can go wrong while enqueueing or running jobs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A job's arguments could not be serialised to JSON.
    #[error("could not encode job arguments: {0}")]
    Encode(#[from] serde_json::Error),
    /// The queue (apalis-postgres) refused the operation.
    #[error("job queue error: {0}")]
    Queue(#[from] apalis_postgres::Error),
    /// A database query failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The worker kept dying and was not restarted again.
    #[error("worker stopped {restarts} times in a row without a shutdown request; giving up")]
    WorkerDied {
        /// How many times it was restarted before giving up.
        restarts: u32,
    },
}
