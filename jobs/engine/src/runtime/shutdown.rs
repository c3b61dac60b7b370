//! Turning SIGTERM / SIGINT into a cancellation that every part can await.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// How long closing the pool waits for connections still in use.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Closes `pool` at exit, waiting at most 2 s for connections
/// still in use: a job abandoned at the end of the shutdown grace may hold
/// one, blocked in the database, and must not keep the process alive (its
/// attempt goes to another worker once the lease expires).
pub async fn close_pool(pool: &PgPool) {
    if tokio::time::timeout(CLOSE_WAIT, pool.close())
        .await
        .is_err()
    {
        tracing::warn!(
            connections = pool.size(),
            "exiting without waiting for database connections still in use"
        );
    }
}

/// Returns a token that is cancelled on the first SIGTERM or SIGINT (Ctrl-C).
///
/// Both binaries use it; tests cancel tokens of their own instead.
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let name = wait_for_signal().await;
        tracing::info!(signal = name, "shutdown requested");
        cancel.cancel();
    });
    token
}

#[cfg(unix)]
async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut sigterm) => tokio::select! {
            _ = sigterm.recv() => "SIGTERM",
            _ = tokio::signal::ctrl_c() => "SIGINT",
        },
        Err(err) => {
            tracing::warn!(error = %err, "cannot listen for SIGTERM; only Ctrl-C stops this process");
            let _ = tokio::signal::ctrl_c().await;
            "SIGINT"
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() -> &'static str {
    let _ = tokio::signal::ctrl_c().await;
    "Ctrl-C"
}
