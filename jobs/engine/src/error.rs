//! The engine's one error type.

/// What can go wrong while migrating, enqueueing, operating or running jobs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A job's arguments could not be serialised to JSON.
    #[error("could not encode job arguments: {0}")]
    Encode(#[from] serde_json::Error),
    /// apalis-postgres could not set up its part of the schema (the message
    /// is its error's; a database error is [`Error::Database`]).
    #[error("setting up apalis-postgres's tables failed: {0}")]
    QueueSchema(String),
    /// A database query failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// Applying the queue's migrations failed.
    #[error("applying the job queue's migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A job id in the queue is not a ULID.
    #[error("job id {0:?} in apalis.jobs is not a ULID")]
    CorruptId(String),
    /// A unique job was claimed under every enqueue attempt (practically
    /// impossible: each retry finds the key free or a newer window).
    #[error("could not enqueue a {0} job: its pending job kept being claimed")]
    EnqueueRaced(&'static str),
    /// No job with this id is in a state that allows the operation.
    #[error("no {expected} job with id {id}")]
    NoSuchJob {
        /// The id asked for.
        id: String,
        /// Which states were acceptable, e.g. "dead".
        expected: &'static str,
    },
    /// A periodic job's cron expression is not one (see `Schedule::cron`).
    #[error(
        "invalid schedule {expression:?}: {reason} (expected six fields, seconds first: \
         \"second minute hour day-of-month month day-of-week\", in UTC, \
         e.g. \"0 * * * * *\" for every minute)"
    )]
    Schedule {
        /// The expression given.
        expression: String,
        /// What the cron parser said.
        reason: String,
    },
    /// The worker kept dying while the database answered, and was not
    /// restarted again.
    #[error("worker stopped {restarts} times in a row without a shutdown request; giving up")]
    WorkerDied {
        /// How many times it was restarted before giving up.
        restarts: u32,
    },
    /// A setting is outside the range it may take (see [`crate::SecondsRange`]).
    #[error("{0}")]
    Config(String),
    /// No workflow has this id.
    #[error("no workflow with id {0}")]
    NoSuchWorkflow(String),
    /// A workflow (or steps added to one) is not a DAG of named steps.
    #[error("invalid workflow: {0}")]
    InvalidWorkflow(String),
    /// A dependency's stored result does not decode as its job's output.
    #[error("the result of workflow step {step:?} does not decode: {reason}")]
    StepResult {
        /// The dependency's name.
        step: String,
        /// What serde said.
        reason: String,
    },
    /// A workflow operation was asked of a job that is no workflow step, or
    /// of a step that is not a dependency.
    #[error("{0}")]
    NotInWorkflow(String),
    /// A job's stored payload does not decode as its type (see `testing::enqueued`).
    #[error("the payload of {queue} job {id} does not decode: {reason}")]
    Decode {
        /// The job's id.
        id: String,
        /// Its queue (job type name).
        queue: &'static str,
        /// What serde said.
        reason: String,
    },
    /// A `testing` drain reached its deadline with jobs unfinished.
    #[error("{} jobs unfinished after {after:?}: {}", jobs.len(), jobs.join("; "))]
    Unfinished {
        /// The drain's deadline.
        after: std::time::Duration,
        /// Each unfinished job: id, queue, state, attempts and last error.
        jobs: Vec<String>,
    },
}
