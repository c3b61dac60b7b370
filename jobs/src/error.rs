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
    /// A job id in the queue is not a ULID.
    #[error("job id {0:?} in apalis.jobs is not a ULID")]
    CorruptId(String),
    /// A coalesced job was claimed under every enqueue attempt (practically
    /// impossible: each retry falls in a newer window).
    #[error("could not enqueue a {0} job: its coalescing window kept closing")]
    EnqueueRaced(&'static str),
    /// No job with this id is in a state that allows the operation.
    #[error("no {expected} job with id {id}")]
    NoSuchJob {
        /// The id asked for.
        id: String,
        /// Which states were acceptable, e.g. "dead".
        expected: &'static str,
    },
    /// The worker kept dying and was not restarted again.
    #[error("worker stopped {restarts} times in a row without a shutdown request; giving up")]
    WorkerDied {
        /// How many times it was restarted before giving up.
        restarts: u32,
    },
}
