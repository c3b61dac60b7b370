//! `/admin`: the engine's jobs dashboard, behind `ADMIN_TOKEN`.
//!
//! Authentication: a login form that opens a session (a random value per
//! login, kept in an HttpOnly, SameSite=Strict cookie, revoked on sign-out,
//! expiring after 8 hours; never the token itself), or an
//! `Authorization: Bearer <token>` header for scripts. Secrets are compared in
//! constant time (`subtle`). Wrong tokens, by form or header, are limited per
//! client address ([`FailedLogins`]): the 11th in a minute gets 429 without
//! the token being checked. Every POST (login, sign-out, actions) from a
//! browser must come from our own origin; actions with the cookie must also
//! carry their session's CSRF token (one per session, random, gone with the
//! session; compared in constant time by the dashboard). Without `ADMIN_TOKEN` the dashboard is
//! disabled, never open.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Mutex,
    time::{Duration, Instant},
};

use axum::{
    Form, Router,
    extract::{ConnectInfo, Request, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Redirect, Response},
    routing::post,
};
use cookie::{Cookie, SameSite};
use durable_jobs::dashboard::{self, Csrf, Dashboard};
use serde::Deserialize;
use subtle::ConstantTimeEq as _;

use crate::{AppState, routes::visits::client_ip, views};

/// Cookie holding the session value.
const SESSION_COOKIE: &str = "visitme_admin";

/// Shortest `ADMIN_TOKEN` `web` accepts: shorter ones can be guessed.
pub const MIN_TOKEN_CHARS: usize = 16;

/// How long a session lasts after its login.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(8 * 60 * 60);

/// Most open sessions; a login beyond it ends the oldest. Bounds memory (and
/// the constant-time scan over them) whatever logins an operator leaves open.
const MAX_SESSIONS: usize = 64;

/// Wrong tokens allowed per client address and window before 429.
const MAX_FAILURES: u32 = 10;

/// The failure-counting window.
const FAILURE_WINDOW: Duration = Duration::from_secs(60);

/// Most client addresses tracked by [`FailedLogins`].
const MAX_TRACKED_CLIENTS: usize = 10_000;

/// The dashboard's secrets: the operator's token, open sessions (each with
/// its own CSRF token), and the failed-login counts.
pub struct AdminAuth {
    token: String,
    session_lifetime: Duration,
    /// Open sessions, oldest first.
    sessions: Mutex<Vec<Session>>,
    failed: FailedLogins,
}

/// One login: its cookie value, the CSRF token its forms carry (random, so
/// it cannot be derived from anything else, and gone when the session is
/// revoked or expires), and when it was opened.
struct Session {
    value: String,
    csrf: String,
    opened: Instant,
}

impl std::fmt::Debug for AdminAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminAuth { .. }") // never print secrets
    }
}

impl AdminAuth {
    /// Credentials for `token`, with no session.
    pub fn new(token: &str) -> Self {
        Self {
            token: token.to_owned(),
            session_lifetime: SESSION_LIFETIME,
            sessions: Mutex::default(),
            failed: FailedLogins::new(MAX_FAILURES, FAILURE_WINDOW),
        }
    }

    /// The same with sessions lasting `lifetime` (tests use seconds).
    pub fn with_session_lifetime(mut self, lifetime: Duration) -> Self {
        self.session_lifetime = lifetime;
        self
    }

    fn open_session(&self) -> String {
        let value = random_hex();
        let mut sessions = self.sessions.lock().expect("sessions lock poisoned");
        sessions.retain(|session| session.opened.elapsed() < self.session_lifetime);
        if sessions.len() >= MAX_SESSIONS {
            sessions.remove(0);
        }
        sessions.push(Session {
            value: value.clone(),
            csrf: random_hex(),
            opened: Instant::now(),
        });
        value
    }

    /// The CSRF token of the open session `value`, if it is one.
    fn session_csrf(&self, value: &str) -> Option<String> {
        let sessions = self.sessions.lock().expect("sessions lock poisoned");
        // Every open session is compared, in constant time each.
        sessions.iter().fold(None, |found, session| {
            let open = constant_time_eq(&session.value, value)
                && session.opened.elapsed() < self.session_lifetime;
            if open {
                Some(session.csrf.clone())
            } else {
                found
            }
        })
    }

    fn close_session(&self, value: &str) {
        let mut sessions = self.sessions.lock().expect("sessions lock poisoned");
        sessions.retain(|session| !constant_time_eq(&session.value, value));
    }
}

fn random_hex() -> String {
    let mut bytes = [0u8; 32];
    // The OS random source failing is not something a web server can run without.
    getrandom::fill(&mut bytes).expect("the OS random source is available");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Equal, in a time that does not depend on where the inputs differ (only
/// on their lengths).
pub fn constant_time_eq(a: &str, b: &str) -> bool {
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

/// Wrong tokens per client address in a sliding-start window: checked before
/// a token is compared, so a guesser gets 429 without a verdict. Only
/// failures count, and a success clears its address. IPv6 clients are
/// counted per /64, the block one subscriber usually gets. Memory is bounded:
/// at most [`MAX_TRACKED_CLIENTS`] addresses, expired ones dropped first, then
/// the oldest.
///
/// Refusals are logged at most once per address and window, with how many
/// there were since its previous line: a flood of guesses (20,000 wrote
/// 2.3 MB of WARN lines, one each) cannot flood the log.
#[derive(Debug)]
pub struct FailedLogins {
    max: u32,
    window: Duration,
    seen: Mutex<HashMap<IpAddr, Tracked>>,
}

/// What [`FailedLogins`] knows of one address.
#[derive(Debug)]
struct Tracked {
    /// Failures in the window that started at `since`.
    failures: u32,
    since: Instant,
    /// Refusals not yet in a log line.
    unlogged: u64,
    /// When its last log line was written.
    logged_at: Option<Instant>,
}

impl Tracked {
    fn new() -> Self {
        Self {
            failures: 0,
            since: Instant::now(),
            unlogged: 0,
            logged_at: None,
        }
    }

    /// Counts a refusal of `key`; logs it with the ones before it unless
    /// this address had a line less than `window` ago.
    fn refused(&mut self, key: IpAddr, window: Duration, reason: &'static str) {
        self.unlogged += 1;
        if self.logged_at.is_some_and(|at| at.elapsed() < window) {
            return;
        }
        tracing::warn!(
            client.address = %key,
            refused = self.unlogged,
            reason,
            "admin login refused (count since this address's previous line; at most one line a minute each)"
        );
        self.unlogged = 0;
        self.logged_at = Some(Instant::now());
    }
}

impl FailedLogins {
    fn new(max: u32, window: Duration) -> Self {
        Self {
            max,
            window,
            seen: Mutex::default(),
        }
    }

    fn key(ip: IpAddr) -> IpAddr {
        crate::serve::client_key(ip)
    }

    /// Counts an attempt from `ip` as a failure until [`Self::succeeded`]
    /// says otherwise, or `Err(wait)` if `ip` used up its failures. Checking and
    /// counting under one lock means concurrent guesses cannot slip past the
    /// limit between the check and the count.
    fn attempt(&self, ip: IpAddr) -> Result<(), Duration> {
        let key = Self::key(ip);
        let mut seen = self.seen.lock().expect("limiter lock poisoned");
        if let Some(tracked) = seen.get_mut(&key)
            && tracked.failures >= self.max
            && tracked.since.elapsed() < self.window
        {
            tracked.refused(key, self.window, "too many wrong tokens from this address");
            return Err(self.window.saturating_sub(tracked.since.elapsed()));
        }
        if seen.len() >= MAX_TRACKED_CLIENTS && !seen.contains_key(&key) {
            seen.retain(|_, tracked| tracked.since.elapsed() < self.window);
            if seen.len() >= MAX_TRACKED_CLIENTS {
                let oldest = seen.iter().min_by_key(|(_, tracked)| tracked.since);
                if let Some(oldest) = oldest.map(|(ip, _)| *ip) {
                    seen.remove(&oldest);
                }
            }
        }
        let tracked = seen.entry(key).or_insert_with(Tracked::new);
        if tracked.since.elapsed() >= self.window {
            tracked.failures = 0;
            tracked.since = Instant::now();
        }
        tracked.failures += 1;
        Ok(())
    }

    /// Notes that the attempt from `ip` brought a wrong token.
    fn wrong(&self, ip: IpAddr) {
        let key = Self::key(ip);
        let mut seen = self.seen.lock().expect("limiter lock poisoned");
        if let Some(tracked) = seen.get_mut(&key) {
            tracked.refused(key, self.window, "wrong token");
        }
    }

    fn succeeded(&self, ip: IpAddr) {
        self.seen
            .lock()
            .expect("limiter lock poisoned")
            .remove(&Self::key(ip));
    }
}

/// How a request proved it may use the dashboard.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Credential {
    Bearer,
    /// A session cookie, with that session's CSRF token.
    Cookie {
        csrf: String,
    },
}

/// The session cookie's value, parsed by the `cookie` crate.
fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|cookie| cookie.name() == SESSION_COOKIE)
        .map(|cookie| cookie.value().to_owned())
}

/// The session cookie with `value` and `max_age` (0 removes it): HttpOnly,
/// SameSite=Strict, only under `/admin`, `Secure` when `https`.
fn session_cookie_header(value: String, max_age: Duration, https: bool) -> String {
    let max_age =
        cookie::time::Duration::seconds(i64::try_from(max_age.as_secs()).unwrap_or(i64::MAX));
    Cookie::build((SESSION_COOKIE, value))
        .path("/admin")
        .http_only(true)
        .same_site(SameSite::Strict)
        .max_age(max_age)
        .secure(https)
        .build()
        .to_string()
}

/// The request's credential, or why it has none: no valid one (401, the
/// login form), or its address used up its failures (429).
fn authenticate(
    auth: &AdminAuth,
    client: IpAddr,
    headers: &HeaderMap,
) -> Result<Credential, Refusal> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if let Some(token) = bearer {
        return check_token(auth, client, token.trim()).map(|()| Credential::Bearer);
    }
    session_cookie(headers)
        .and_then(|value| auth.session_csrf(&value))
        .map(|csrf| Credential::Cookie { csrf })
        .ok_or(Refusal::Wrong)
}

/// Why a token was refused.
enum Refusal {
    TooMany(Duration),
    Wrong,
}

impl Refusal {
    fn into_response(self, message: Option<&str>) -> Response {
        match self {
            Refusal::TooMany(wait) => too_many_failures(wait),
            Refusal::Wrong => unauthorized(message),
        }
    }
}

/// Checks `token` against the limiter first, then in constant time.
fn check_token(auth: &AdminAuth, client: IpAddr, token: &str) -> Result<(), Refusal> {
    auth.failed.attempt(client).map_err(Refusal::TooMany)?;
    if constant_time_eq(token, &auth.token) {
        auth.failed.succeeded(client);
        Ok(())
    } else {
        auth.failed.wrong(client);
        Err(Refusal::Wrong)
    }
}

fn unauthorized(message: Option<&str>) -> Response {
    (StatusCode::UNAUTHORIZED, views::admin::login(message)).into_response()
}

fn too_many_failures(wait: Duration) -> Response {
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let mut response = (
        StatusCode::TOO_MANY_REQUESTS,
        views::admin::login(Some(
            "Too many wrong tokens from your address. Wait a minute, then try again.",
        )),
    )
        .into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
    response
}

fn forbidden() -> Response {
    (
        StatusCode::FORBIDDEN,
        views::errors::page(StatusCode::FORBIDDEN),
    )
        .into_response()
}

/// A cross-site POST: an `Origin` whose scheme, host or port is not ours.
/// Our scheme is `http` (what `web` speaks) unless our own TLS proxy says
/// `https` ([`over_https`]): comparing hosts alone let `https://<our host>`,
/// another origin to a browser, pass on plain HTTP.
fn cross_origin(headers: &HeaderMap, trust_proxy: bool) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return false; // older browsers and non-browser clients; CSRF token and SameSite still apply
    };
    let scheme = if over_https(headers, trust_proxy) {
        "https"
    } else {
        "http"
    };
    let ours = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .and_then(|host| origin_parts(scheme, host));
    let theirs = origin
        .to_str()
        .ok()
        .and_then(|origin| origin.split_once("://"))
        .and_then(|(scheme, authority)| origin_parts(scheme, authority));
    // `Origin: null`, an unparsable one, or no Host to compare with: not ours.
    ours.is_none() || ours != theirs
}

/// `(scheme, host, port)` of an origin, lower-cased, the port defaulted by
/// the scheme (`https://a` is `https://a:443`); `None` unless http(s) with
/// a bare `host[:port]` (an origin has no path or user).
fn origin_parts(scheme: &str, authority: &str) -> Option<(String, String, u16)> {
    let scheme = scheme.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "http" => 80,
        "https" => 443,
        _ => return None,
    };
    if authority.is_empty() || authority.contains(['/', '@', '?', '#']) {
        return None;
    }
    // `[v6]:port`, `[v6]`, `name:port` or `name`.
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => (host, Some(port)),
        _ => (authority, None),
    };
    let port = match port {
        Some(port) => port.parse().ok()?,
        None => default_port,
    };
    Some((scheme, host.to_ascii_lowercase(), port))
}

/// Whether the browser reached us over HTTPS. `web` speaks plain HTTP, so
/// that is known only from our own TLS-terminating proxy: with
/// `TRUST_PROXY`, its (last) `X-Forwarded-Proto`.
fn over_https(headers: &HeaderMap, trust_proxy: bool) -> bool {
    trust_proxy
        && headers
            .get_all("x-forwarded-proto")
            .iter()
            .next_back()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .is_some_and(|proto| proto.trim().eq_ignore_ascii_case("https"))
}

/// `/admin…`: the login and sign-out of VisitMe's operators, and the
/// engine's dashboard (`durable_jobs::dashboard`) behind [`guard`].
pub fn router(state: &AppState) -> Router<AppState> {
    let mut dashboard = Dashboard::new(state.pool.clone()).with_layout(views::admin::page);
    if let Some(url) = state.jaeger_ui_url.as_deref() {
        dashboard = dashboard.with_trace_links(url);
    }
    Router::new()
        .route("/admin/login", post(login))
        .route("/admin/logout", post(logout))
        .nest(
            "/admin",
            dashboard::router(dashboard)
                .layer(axum::middleware::from_fn_with_state(state.clone(), guard)),
        )
}

fn disabled() -> Response {
    (StatusCode::FORBIDDEN, views::admin::disabled()).into_response()
}

/// Lets a request reach the dashboard only with a credential: a session
/// cookie (whose posts must also come from our own origin; the dashboard's
/// forms then carry the CSRF token, [`Csrf`]) or the bearer token.
async fn guard(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    mut request: Request,
    next: Next,
) -> Response {
    let Some(auth) = state.admin.as_deref() else {
        return disabled();
    };
    let headers = request.headers();
    let client = client_ip(peer, headers, state.trust_proxy);
    match authenticate(auth, client, headers) {
        Err(refusal) => return refusal.into_response(None),
        Ok(Credential::Cookie { csrf }) => {
            if request.method() == Method::POST && cross_origin(headers, state.trust_proxy) {
                tracing::warn!("admin action refused: cross-origin post");
                return forbidden();
            }
            request.extensions_mut().insert(Csrf(csrf));
        }
        Ok(Credential::Bearer) => {}
    }
    next.run(request).await
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    let Some(auth) = state.admin.as_deref() else {
        return disabled();
    };
    if cross_origin(&headers, state.trust_proxy) {
        tracing::warn!("admin login refused: cross-origin post");
        return forbidden();
    }
    let client = client_ip(peer, &headers, state.trust_proxy);
    if let Err(refusal) = check_token(auth, client, form.token.trim()) {
        return refusal.into_response(Some("That token is not right."));
    }
    let cookie = session_cookie_header(
        auth.open_session(),
        auth.session_lifetime,
        over_https(&headers, state.trust_proxy),
    );
    with_cookie(Redirect::to("/admin").into_response(), &cookie)
}

async fn logout(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let Some(auth) = state.admin.as_deref() else {
        return disabled();
    };
    if cross_origin(&headers, state.trust_proxy) {
        tracing::warn!("admin sign-out refused: cross-origin post");
        return forbidden();
    }
    // Revoked here, not just forgotten by the browser: a copied cookie stops working too.
    if let Some(value) = session_cookie(&headers) {
        auth.close_session(&value);
    }
    let cookie = session_cookie_header(
        String::new(),
        Duration::ZERO,
        over_https(&headers, state.trust_proxy),
    );
    with_cookie(Redirect::to("/admin").into_response(), &cookie)
}

fn with_cookie(mut response: Response, cookie: &str) -> Response {
    if let Ok(value) = HeaderValue::from_str(cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_compares_whole_strings() {
        assert!(constant_time_eq("secret", "secret"));
        assert!(!constant_time_eq("secret", "secreT"));
        assert!(!constant_time_eq("secret", "secret2"));
        assert!(!constant_time_eq("", "x"));
        assert!(constant_time_eq("", ""));
    }

    #[test]
    fn origins_match_on_scheme_host_and_port() {
        let parts = |scheme, authority| origin_parts(scheme, authority);
        assert_eq!(parts("https", "A.example"), parts("HTTPS", "a.example:443"));
        assert_ne!(parts("https", "a.example"), parts("http", "a.example"));
        assert_ne!(parts("http", "a.example:8080"), parts("http", "a.example"));
        assert_eq!(parts("http", "[::1]:8080"), parts("http", "[::1]:8080"));
        assert_eq!(
            parts("http", "[::1]"),
            Some(("http".into(), "[::1]".into(), 80))
        );
        assert_eq!(parts("http", "a.example/x"), None);
        assert_eq!(parts("ftp", "a.example"), None);
        assert_eq!(parts("http", "a.example:x"), None);
    }

    #[test]
    fn failed_logins_refuse_after_the_maximum_and_clear_on_success() {
        let limiter = FailedLogins::new(2, Duration::from_secs(60));
        let ip: IpAddr = "2001:db8::1".parse().expect("ip");
        let neighbour: IpAddr = "2001:db8::2".parse().expect("ip");
        assert!(limiter.attempt(ip).is_ok());
        assert!(limiter.attempt(neighbour).is_ok()); // the same /64
        assert!(limiter.attempt(ip).is_err());
        limiter.succeeded(ip);
        assert!(limiter.attempt(ip).is_ok());
    }

    #[test]
    fn failed_logins_track_a_bounded_number_of_addresses() {
        let limiter = FailedLogins::new(1, Duration::from_secs(60));
        for n in 0..(MAX_TRACKED_CLIENTS as u32 + 100) {
            let _ = limiter.attempt(IpAddr::V4(n.into()));
        }
        let tracked = limiter.seen.lock().expect("lock").len();
        assert_eq!(tracked, MAX_TRACKED_CLIENTS);
    }
}
