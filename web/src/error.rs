//! The web tier's error type and how it is shown to users.

use axum::{
    http::StatusCode,
    response::{IntoResponse, Response},
};

use crate::views;

/// What can fail while handling a request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database could not be reached (down, restarting, pool exhausted).
    #[error("database unavailable: {0}")]
    DatabaseUnavailable(#[source] sqlx::Error),
    /// A query failed for another reason.
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
    /// The job queue refused an operation (enqueue, dashboard query or action).
    #[error("job queue error: {0}")]
    Jobs(#[source] jobs::Error),
    /// The configuration cannot be used (reported at startup, never to a user).
    #[error("{0}")]
    Config(String),
}

impl From<jobs::Error> for Error {
    fn from(err: jobs::Error) -> Self {
        match err {
            // A database failure underneath is judged like any other (503 when down).
            jobs::Error::Database(db) => db.into(),
            other => Error::Jobs(other),
        }
    }
}

impl From<sqlx::Error> for Error {
    fn from(err: sqlx::Error) -> Self {
        let unavailable = match &err {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => true,
            // Class 08: connection exception; 57P0x: admin/crash shutdown, cannot connect now.
            sqlx::Error::Database(db) => db
                .code()
                .is_some_and(|code| code.starts_with("08") || code.starts_with("57P0")),
            _ => false,
        };
        if unavailable {
            Error::DatabaseUnavailable(err)
        } else {
            Error::Database(err)
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        // Logged once, here, inside the request span; the user sees no internals.
        let status = match &self {
            Error::DatabaseUnavailable(_) => {
                tracing::warn!(error = %self, "answering 503: database unavailable");
                StatusCode::SERVICE_UNAVAILABLE
            }
            Error::Database(_) | Error::Jobs(_) | Error::Config(_) => {
                tracing::error!(error = %self, "request failed");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        let mut response = (status, views::errors::page(status)).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("5"),
            );
        }
        response
    }
}
