//! The HTTP server loop: hyper's HTTP/1 connection driver with the limits
//! `axum::serve` does not have.
//!
//! `axum::serve` gives hyper no timer, so hyper's header-read timeout is off:
//! a client sending a byte a second (slowloris) or an idle keep-alive socket
//! holds a connection, and a file descriptor, forever. It also has no cap on
//! connections and sleeps a fixed second on `EMFILE`. Here:
//! - HTTP/1 only (no h2c), with a header-read timeout that hyper re-arms
//!   while a keep-alive connection idles, so it also closes idle sockets;
//! - at most `max_connections` at once; the next one gets a plain 503 and is
//!   closed, instead of queueing until file descriptors run out;
//! - at most `max_connections_per_client` of them from one client address
//!   (IPv6 per /64), answered the same way beyond it: one client's idle
//!   sockets (512 of them answered everyone else 503) cannot take every slot;
//! - accept errors other than a vanished client (`EMFILE`, `ENFILE`, ...) are
//!   logged once per burst and retried with a growing pause (10 ms to 1 s);
//! - on shutdown: stop accepting, let connections finish their request, and
//!   give up on them after `shutdown_grace`.
//!
//! The per-request timeout is a tower layer on the router (see [`crate::app`]).

use std::{
    collections::HashMap,
    convert::Infallible,
    future::Future,
    io::ErrorKind,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::Router;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
    service::TowerToHyperService,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tower::Service as _;

/// Limits of the HTTP server (flags and environment variables of `web`).
#[derive(Debug, Clone, clap::Args)]
pub struct HttpConfig {
    /// Seconds a client has to send a request's headers; also how long an
    /// idle keep-alive connection stays open. Closes slowloris connections.
    #[arg(long = "http-header-timeout", env = "HTTP_HEADER_TIMEOUT", default_value = "10", value_parser = ranges::HEADER_TIMEOUT.parser())]
    pub header_timeout: Duration,

    /// Seconds one request may take before it is answered 503 (the handler is
    /// cancelled, its transaction rolled back).
    #[arg(long = "http-request-timeout", env = "HTTP_REQUEST_TIMEOUT", default_value = "15", value_parser = ranges::REQUEST_TIMEOUT.parser())]
    pub request_timeout: Duration,

    /// Most connections served at once; more get an immediate 503 and are
    /// closed. Keep it below `ulimit -n` minus the database pools (each
    /// connection is a file descriptor).
    #[arg(long = "http-max-connections", env = "HTTP_MAX_CONNECTIONS", default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,

    /// Most connections one client address (an IPv6 client per /64) may have
    /// open at once; its next ones get the same 503, while other clients are
    /// served. Unset: an eighth of HTTP_MAX_CONNECTIONS (64 of 512) but at
    /// least 8 (a browser opens 6), or all of it with TRUST_PROXY=true (every connection then comes from the
    /// proxy, which must limit its own clients).
    #[arg(long = "http-max-connections-per-client", env = "HTTP_MAX_CONNECTIONS_PER_CLIENT", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections_per_client: Option<u32>,

    /// Seconds a shutdown waits for open connections to finish their requests.
    #[arg(id = "http_shutdown_grace", long = "http-shutdown-grace", value_name = "SECONDS", env = "HTTP_SHUTDOWN_GRACE", default_value = "10", value_parser = ranges::SHUTDOWN_GRACE.parser())]
    pub shutdown_grace: Duration,
}

/// File descriptors kept for everything but client connections (the
/// database pools, the listeners, the OTLP exporter, stdio) when checking
/// `HTTP_MAX_CONNECTIONS`. A floor, not an estimate: the check refuses caps
/// that can never be reached; near the limit, a failing accept is logged
/// once and retried with backoff (see [`AcceptErrors`]).
const RESERVED_FDS: u64 = 8;

impl HttpConfig {
    /// Raises the open-file limit to its hard maximum (as Go's runtime does)
    /// and refuses `HTTP_MAX_CONNECTIONS` above what it then leaves for
    /// connections: past it, accepts fail with `EMFILE` instead of the cap's
    /// clean 503.
    pub fn check_file_descriptors(&self) -> Result<(), crate::Error> {
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
            return Ok(()); // no limit we can read: nothing to check against
        };
        let limit = if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
            hard
        } else {
            soft
        };
        let room = limit.saturating_sub(RESERVED_FDS);
        if u64::from(self.max_connections) > room {
            return Err(crate::Error::Config(format!(
                "invalid HTTP_MAX_CONNECTIONS={}: the open-file limit (`ulimit -n`) is {limit} \
                 and at least {RESERVED_FDS} of it are kept for the database and the process, so it must be \
                 from 1 to {room} (lower it, or raise the limit)",
                self.max_connections
            )));
        }
        Ok(())
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(15),
            max_connections: 512,
            max_connections_per_client: None,
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// The ranges of the HTTP server's duration settings.
pub(crate) mod ranges {
    use durable_jobs::SecondsRange;

    /// A header timeout of 0 closes every connection before its request.
    pub(crate) const HEADER_TIMEOUT: SecondsRange = SecondsRange::new(0.1, 3600.0);
    /// A request timeout of 0 answered every page 503 in 2 ms.
    pub(crate) const REQUEST_TIMEOUT: SecondsRange = SecondsRange::new(0.1, 3600.0);
    pub(crate) const SHUTDOWN_GRACE: SecondsRange = SecondsRange::new(0.0, 3600.0);
    /// How often `/metrics` recounts the queue (0: at every scrape).
    pub(crate) const METRICS_REFRESH: SecondsRange = SecondsRange::new(0.0, 3600.0);
}

impl HttpConfig {
    /// The per-client cap in force: the setting (at most the global cap), else
    /// an eighth of the global cap but at least 8 (a browser opens 6
    /// connections to a site), or the global cap `behind_proxy`.
    pub fn per_client_limit(&self, behind_proxy: bool) -> u32 {
        match self.max_connections_per_client {
            Some(limit) => limit.min(self.max_connections),
            None if behind_proxy => self.max_connections,
            None => (self.max_connections / 8).max(8.min(self.max_connections)),
        }
    }
}

/// What an over-the-cap connection is told before it is closed.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: text/plain; charset=utf-8\r\nretry-after: 1\r\n\
content-length: 43\r\nconnection: close\r\n\r\n\
Too many connections; try again in a moment";

/// Serves `app` (with `ConnectInfo<SocketAddr>`) on `listener` until
/// `shutdown` completes, within the limits of `config` and at most
/// `per_client` connections per client address.
pub async fn run(
    listener: TcpListener,
    app: Router,
    config: &HttpConfig,
    per_client: u32,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let mut http = hyper::server::conn::http1::Builder::new();
    // Without a timer hyper silently ignores header_read_timeout.
    http.timer(TokioTimer::new())
        .header_read_timeout(config.header_timeout)
        .keep_alive(true);
    let mut make_service = app.into_make_service_with_connect_info::<SocketAddr>();
    let permits = Arc::new(Semaphore::new(config.max_connections as usize));
    let refused = Arc::new(AtomicU64::new(0));
    // No bookkeeping when a client may take every slot anyway.
    let clients = (per_client < config.max_connections).then(|| ClientSlots::new(per_client));
    let refused_per_client = AtomicU64::new(0);
    let graceful = GracefulShutdown::new();
    let mut accept_errors = AcceptErrors::default();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(connection) => {
                    accept_errors.recovered();
                    connection
                }
                // The client gave up before we took it: nothing to do.
                Err(err) if matches!(err.kind(), ErrorKind::ConnectionAborted
                    | ErrorKind::ConnectionReset | ErrorKind::ConnectionRefused) => continue,
                Err(err) => {
                    tokio::time::sleep(accept_errors.failed(&err)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let client_slot = match &clients {
            None => None,
            Some(clients) => match clients.take(peer.ip()) {
                Some(slot) => Some(slot),
                None => {
                    if refused_per_client
                        .fetch_add(1, Ordering::Relaxed)
                        .is_multiple_of(1000)
                    {
                        tracing::warn!(
                            client.address = %client_key(peer.ip()),
                            http.max_connections_per_client = per_client,
                            connections.refused = refused_per_client.load(Ordering::Relaxed),
                            "per-client connection limit reached: answering 503 \
                             (logged once per 1,000 refusals)"
                        );
                    }
                    tokio::spawn(refuse(stream));
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            // Counted, and logged at most once per 1,000, so a flood cannot flood the log.
            if refused.fetch_add(1, Ordering::Relaxed).is_multiple_of(1000) {
                tracing::warn!(
                    http.max_connections = config.max_connections,
                    connections.refused = refused.load(Ordering::Relaxed),
                    "connection limit reached: answering 503"
                );
            }
            tokio::spawn(refuse(stream));
            continue;
        };
        let service = make_service
            .call(peer)
            .await
            .unwrap_or_else(|never: Infallible| match never {});
        let connection = graceful
            .watch(http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service)));
        tokio::spawn(async move {
            // Errors here are the client's (reset, timeout, bad request): not ours to log.
            let _ = connection.await;
            drop(permit);
            drop(client_slot);
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(config.shutdown_grace) => {
            tracing::warn!(
                grace = ?config.shutdown_grace,
                "connections still open after the shutdown grace: closing them"
            );
        }
    }
    Ok(())
}

/// The client a connection counts against: its address, an IPv6 one by its
/// /64 (one subscriber usually gets a whole /64, so per-address counting
/// would give them 2^64 shares). An IPv4-mapped IPv6 address is the IPv4 one.
pub(crate) fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
    }
}

/// Open connections per client, each at most `limit`. Its map holds only
/// clients with an open connection, so it is bounded by the connections.
#[derive(Debug)]
struct ClientSlots {
    limit: u32,
    open: Arc<Mutex<HashMap<IpAddr, u32>>>,
}

impl ClientSlots {
    fn new(limit: u32) -> Self {
        Self {
            limit,
            open: Arc::default(),
        }
    }

    /// A slot for a connection of `ip`, or `None` if it has `limit` open.
    fn take(&self, ip: IpAddr) -> Option<ClientSlot> {
        let key = client_key(ip);
        let mut open = self.open.lock().expect("client slots lock poisoned");
        let count = open.entry(key).or_insert(0);
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(ClientSlot {
            key,
            open: Arc::clone(&self.open),
        })
    }
}

/// One connection's place in [`ClientSlots`], given back when dropped.
#[derive(Debug)]
struct ClientSlot {
    key: IpAddr,
    open: Arc<Mutex<HashMap<IpAddr, u32>>>,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().expect("client slots lock poisoned");
        if let Some(count) = open.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// Answers 503 on a connection over the cap and closes it. It reads (briefly)
/// what the client sent first: closing a socket with unread input sends a
/// reset, which can destroy the 503 before the client reads it.
async fn refuse(mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    if stream.write_all(BUSY).await.is_err() {
        return;
    }
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 4096];
    let drain = async { while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {} };
    let _ = tokio::time::timeout(Duration::from_millis(500), drain).await;
}

/// Accept failures (file descriptors exhausted, usually): one error line per
/// burst, one info line when accepting works again, and a pause that doubles.
#[derive(Debug)]
struct AcceptErrors {
    in_a_row: u64,
    pause: Duration,
}

impl Default for AcceptErrors {
    fn default() -> Self {
        Self {
            in_a_row: 0,
            pause: Duration::from_millis(10),
        }
    }
}

impl AcceptErrors {
    /// Notes a failure; returns how long to pause before the next accept.
    fn failed(&mut self, err: &std::io::Error) -> Duration {
        if self.in_a_row == 0 {
            tracing::error!(
                error = %err,
                "cannot accept connections (out of file descriptors?): backing off \
                 until it works again; lower HTTP_MAX_CONNECTIONS or raise `ulimit -n`"
            );
        }
        self.in_a_row += 1;
        let pause = self.pause;
        self.pause = (self.pause * 2).min(Duration::from_secs(1));
        pause
    }

    /// Notes a success, ending a burst of failures.
    fn recovered(&mut self) {
        if self.in_a_row > 0 {
            tracing::info!(
                accept.failures = self.in_a_row,
                "accepting connections again"
            );
            *self = Self::default();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_slots_cap_each_client_and_free_on_drop() {
        let slots = ClientSlots::new(2);
        let a: IpAddr = "2001:db8::1".parse().expect("ip");
        let neighbour: IpAddr = "2001:db8::2".parse().expect("ip");
        let other: IpAddr = "192.0.2.1".parse().expect("ip");
        let first = slots.take(a).expect("a first slot");
        let _second = slots.take(neighbour).expect("the same /64, second slot");
        assert!(slots.take(a).is_none(), "the /64 holds its two");
        assert!(slots.take(other).is_some(), "another client is served");
        drop(first);
        assert!(slots.take(a).is_some(), "a slot freed by the drop");
    }

    #[test]
    fn the_per_client_cap_defaults_to_an_eighth_or_the_whole_behind_a_proxy() {
        let mut config = HttpConfig::default();
        assert_eq!(config.per_client_limit(false), 64);
        assert_eq!(config.per_client_limit(true), 512);
        config.max_connections_per_client = Some(1000);
        assert_eq!(config.per_client_limit(false), 512);
        config.max_connections_per_client = None;
        config.max_connections = 16;
        assert_eq!(config.per_client_limit(false), 8);
        config.max_connections = 4;
        assert_eq!(config.per_client_limit(false), 4);
    }
}
