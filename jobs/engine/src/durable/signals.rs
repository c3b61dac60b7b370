//! Signals to waiting jobs: [`signal`] in the sender's own transaction, and,
//! for systems outside the app, [`JobContext::signal_url`] with the router
//! that serves it ([`router`], cargo feature `signals`).
//!
//! A job has at most one signal per name: the first is kept (sent before the
//! job waits, it is received when it does), later ones are refused with
//! [`Signalled::AlreadySignalled`]. A signal URL is `<mount>/<token>`, the
//! token being the job id, the signal's name and an HMAC-SHA256 of both
//! under a key the migrations made in the database: unguessable, and valid
//! until its signal is delivered.

use hmac::{Hmac, KeyInit as _, Mac as _};
use serde::Serialize;
use sha2::Sha256;
use sqlx::PgConnection;
use subtle::ConstantTimeEq as _;

use crate::{error::Error, job::JobContext, queries};

/// What [`signal`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signalled {
    /// Stored; the job, if it waits for it, is due now.
    Delivered,
    /// The job already had a signal of this name: this one is refused.
    AlreadySignalled,
    /// The job's wait for it ended without one (its timeout): refused.
    WaitEnded,
    /// The job is done or dead: refused.
    JobFinished,
    /// No job has this id (never, or pruned).
    NoSuchJob,
}

/// Sends signal `name` with `value` to job `job_id`, in the caller's
/// transaction: it is delivered (and the job woken) if and only if that
/// transaction commits. Exactly once: the first signal of a name wins.
pub async fn signal<T: Serialize>(
    conn: &mut PgConnection,
    job_id: &str,
    name: &str,
    value: &T,
) -> Result<Signalled, Error> {
    let value = serde_json::to_value(value)?;
    // The waiter's resumed run links to the sender's span.
    let sender = observability::inject_current().remove("traceparent");
    let outcome: String = sqlx::query_scalar(queries::SEND_SIGNAL)
        .bind(job_id)
        .bind(name)
        .bind(value)
        .bind(sender)
        .fetch_one(&mut *conn)
        .await?;
    let signalled = match outcome.as_str() {
        "delivered" => Signalled::Delivered,
        "already" => Signalled::AlreadySignalled,
        "wait_ended" => Signalled::WaitEnded,
        "finished" => Signalled::JobFinished,
        _ => Signalled::NoSuchJob,
    };
    tracing::info!(job.id = job_id, signal = name, outcome = ?signalled, "signal sent");
    Ok(signalled)
}

/// Hex digits of a token's MAC (128 bits).
const MAC_HEX: usize = 32;

fn mac(key: &[u8], job_id: &str, name: &str) -> String {
    let mut mac = <Hmac<Sha256>>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(job_id.as_bytes());
    mac.update(&[0]);
    mac.update(name.as_bytes());
    let digest = mac.finalize().into_bytes();
    let mut hex: String = digest.iter().map(|byte| format!("{byte:02x}")).collect();
    hex.truncate(MAC_HEX);
    hex
}

/// The token of signal `name` to job `job_id`: `<id>.<name, hex>.<mac>`.
pub(crate) fn token(key: &[u8], job_id: &str, name: &str) -> String {
    let name_hex: String = name.bytes().map(|byte| format!("{byte:02x}")).collect();
    format!("{job_id}.{name_hex}.{}", mac(key, job_id, name))
}

/// The job id and signal name a token names, if its MAC is right (compared
/// in constant time). Only the served router reads tokens.
#[cfg_attr(not(any(feature = "signals", test)), allow(dead_code))]
pub(crate) fn verify(key: &[u8], token: &str) -> Option<(String, String)> {
    let mut parts = token.split('.');
    let (job_id, name_hex, given) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || name_hex.len() % 2 != 0 || given.len() != MAC_HEX {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..name_hex.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(name_hex.get(at..at + 2)?, 16).ok())
        .collect();
    let name = String::from_utf8(bytes?).ok()?;
    let expected = mac(key, job_id, &name);
    bool::from(expected.as_bytes().ct_eq(given.as_bytes())).then(|| (job_id.to_owned(), name))
}

impl<C> JobContext<'_, C> {
    /// An unguessable path for signal `name` to this job, for a system
    /// outside the app: it POSTs a JSON body to `<where the app mounts
    /// [`router`]>/<this>`, which delivers it as [`signal`] does. The same
    /// for every attempt of the job; refused (404) once the signal arrived.
    pub fn signal_url(&self, name: &str) -> String {
        format!("/{}", token(self.signal_key, self.id, name))
    }
}

#[cfg(feature = "signals")]
pub use served::router;

#[cfg(feature = "signals")]
mod served {
    use std::sync::Arc;

    use axum::{
        Json, Router,
        body::Bytes,
        extract::{DefaultBodyLimit, Path, State},
        http::StatusCode,
        response::{IntoResponse, Response},
        routing::post,
    };
    use serde_json::{Value, json};
    use sqlx::PgPool;
    use tokio::sync::OnceCell;

    use super::{Signalled, signal, verify};
    use crate::durable::signal_key;

    /// The largest signal body taken (64 KiB); a larger one is answered 413.
    pub const MAX_BODY: usize = 64 * 1024;

    struct Signals {
        pool: PgPool,
        key: OnceCell<Vec<u8>>,
    }

    /// The router of signal URLs ([`super::JobContext::signal_url`]): mount
    /// it where the URLs say (`app.nest("/signals", router(pool))`).
    /// `POST /<token>` with a JSON body delivers it: 202 when delivered; 404
    /// for a token that is not one, names no job, or whose signal already
    /// arrived; 400 for a body that is not JSON; 413 past [`MAX_BODY`].
    pub fn router<S: Clone + Send + Sync + 'static>(pool: PgPool) -> Router<S> {
        let state = Arc::new(Signals {
            pool,
            key: OnceCell::new(),
        });
        Router::new()
            .route("/{token}", post(deliver))
            .layer(DefaultBodyLimit::max(MAX_BODY))
            .with_state(state)
    }

    fn answer(status: StatusCode, body: Value) -> Response {
        (status, Json(body)).into_response()
    }

    async fn deliver(
        State(signals): State<Arc<Signals>>,
        Path(token): Path<String>,
        body: Bytes,
    ) -> Response {
        let not_found = || answer(StatusCode::NOT_FOUND, json!({ "error": "no such signal" }));
        let key = match signals
            .key
            .get_or_try_init(|| signal_key(&signals.pool))
            .await
        {
            Ok(key) => key,
            Err(err) => {
                tracing::error!(error = %err, "signals: cannot read the signing key");
                return answer(
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({ "error": "unavailable" }),
                );
            }
        };
        let Some((job_id, name)) = verify(key, &token) else {
            return not_found();
        };
        let value: Value = match serde_json::from_slice(&body) {
            Ok(value) => value,
            Err(err) => {
                return answer(
                    StatusCode::BAD_REQUEST,
                    json!({ "error": format!("the body is not JSON: {err}") }),
                );
            }
        };
        let delivered = async {
            let mut tx = signals.pool.begin().await?;
            let outcome = signal(&mut tx, &job_id, &name, &value).await?;
            tx.commit().await?;
            Ok::<_, crate::error::Error>(outcome)
        }
        .await;
        match delivered {
            Ok(Signalled::Delivered) => answer(StatusCode::ACCEPTED, json!({ "delivered": true })),
            Ok(_) => not_found(),
            Err(err) => {
                tracing::error!(error = %err, "signals: delivery failed");
                answer(
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({ "error": "unavailable" }),
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_verifies_only_unchanged_and_under_its_key() {
        let key = b"a key of the database";
        let token = token(key, "01JOB", "approval.v2");
        assert_eq!(
            verify(key, &token),
            Some(("01JOB".to_owned(), "approval.v2".to_owned()))
        );
        assert_eq!(verify(b"another key", &token), None);
        let mut tampered = token.clone();
        tampered.replace_range(0..1, "1");
        assert_eq!(verify(key, &tampered), None, "another job");
        assert_eq!(verify(key, "01JOB.61.0000"), None);
        assert_eq!(verify(key, ""), None);
        assert_eq!(verify(key, &format!("{token}.x")), None);
    }
}
