//! `/admin`: the jobs dashboard, behind `ADMIN_TOKEN`.
//!
//! Authentication: a login form that sets an HttpOnly, SameSite=Strict session
//! cookie (a random per-process value, never the token itself), or an
//! `Authorization: Bearer <token>` header for scripts. Comparisons are
//! constant-time. Actions are POSTs; with the cookie they must carry the
//! page's CSRF token and, when the browser sends one, a same-origin `Origin`.
//! Without `ADMIN_TOKEN` the dashboard is disabled, never open.

use axum::{
    Form, Router,
    extract::{Path, Query, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Redirect, Response},
    routing::{get, post},
};
use serde::Deserialize;

use crate::{AppState, Error, views};

/// Cookie holding the session value.
const SESSION_COOKIE: &str = "visitme_admin";

/// The dashboard's secrets: the operator's token and per-process random values.
#[derive(Clone)]
pub struct AdminAuth {
    token: String,
    session: String,
    csrf: String,
}

impl std::fmt::Debug for AdminAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminAuth { .. }") // never print secrets
    }
}

impl AdminAuth {
    /// Credentials for `token`, with a fresh session value and CSRF token.
    pub fn new(token: &str) -> Self {
        Self {
            token: token.to_owned(),
            session: random_hex(),
            csrf: random_hex(),
        }
    }

    /// The CSRF token forms must carry.
    pub fn csrf(&self) -> &str {
        &self.csrf
    }
}

fn random_hex() -> String {
    let mut bytes = [0u8; 32];
    // The OS random source failing is not something a web server can run without.
    getrandom::fill(&mut bytes).expect("the OS random source is available");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Equal in time independent of where the inputs differ.
pub fn constant_time_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut difference = u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        difference |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0xff);
    }
    difference == 0
}

/// How a request proved it may use the dashboard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Credential {
    Bearer,
    Cookie,
}

fn credential(headers: &HeaderMap, auth: &AdminAuth) -> Option<Credential> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if bearer.is_some_and(|token| constant_time_eq(token.trim(), &auth.token)) {
        return Some(Credential::Bearer);
    }
    let session = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, value)| value);
    session
        .is_some_and(|value| constant_time_eq(value, &auth.session))
        .then_some(Credential::Cookie)
}

/// A cross-site POST: an `Origin` that is not this host.
fn cross_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return false; // older browsers and non-browser clients; the CSRF token still applies
    };
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let origin_host = origin.split_once("://").map_or(origin, |(_, rest)| rest);
    origin_host != host
}

/// `/admin…`.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/admin", get(dashboard))
        .route("/admin/login", post(login))
        .route("/admin/logout", post(logout))
        .route("/admin/jobs/{id}/{action}", post(act))
}

fn disabled() -> Response {
    (StatusCode::FORBIDDEN, views::admin::disabled()).into_response()
}

/// Query of `/admin` after an action: what happened, for the notice line.
#[derive(Debug, Deserialize)]
struct Notice {
    notice: Option<String>,
}

async fn dashboard(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(notice): Query<Notice>,
) -> Result<Response, Error> {
    let Some(auth) = state.admin.as_deref() else {
        return Ok(disabled());
    };
    if credential(&headers, auth).is_none() {
        return Ok((StatusCode::UNAUTHORIZED, views::admin::login(None)).into_response());
    }
    let pool = &state.pool;
    let data = views::admin::Dashboard {
        counts: jobs::admin::queue_status(pool).await?,
        last_hour: jobs::admin::last_hour(pool).await?,
        latest: jobs::admin::latest_jobs(pool, 50).await?,
        csrf: auth.csrf().to_owned(),
        notice: notice.notice,
    };
    Ok(views::admin::dashboard(&data).into_response())
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(State(state): State<AppState>, Form(form): Form<LoginForm>) -> Response {
    let Some(auth) = state.admin.as_deref() else {
        return disabled();
    };
    if !constant_time_eq(form.token.trim(), &auth.token) {
        tracing::warn!("admin login refused: wrong token");
        return (
            StatusCode::UNAUTHORIZED,
            views::admin::login(Some("That token is not right.")),
        )
            .into_response();
    }
    let cookie = format!(
        "{SESSION_COOKIE}={}; Path=/admin; HttpOnly; SameSite=Strict; Max-Age=28800",
        auth.session
    );
    with_cookie(Redirect::to("/admin").into_response(), &cookie)
}

async fn logout() -> Response {
    let cookie = format!("{SESSION_COOKIE}=; Path=/admin; HttpOnly; SameSite=Strict; Max-Age=0");
    with_cookie(Redirect::to("/admin").into_response(), &cookie)
}

fn with_cookie(mut response: Response, cookie: &str) -> Response {
    if let Ok(value) = HeaderValue::from_str(cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

#[derive(Deserialize)]
struct ActionForm {
    #[serde(default)]
    csrf: String,
}

async fn act(
    State(state): State<AppState>,
    Path((id, action)): Path<(String, String)>,
    headers: HeaderMap,
    Form(form): Form<ActionForm>,
) -> Result<Response, Error> {
    let Some(auth) = state.admin.as_deref() else {
        return Ok(disabled());
    };
    match credential(&headers, auth) {
        None => return Ok((StatusCode::UNAUTHORIZED, views::admin::login(None)).into_response()),
        Some(Credential::Cookie)
            if cross_origin(&headers) || !constant_time_eq(&form.csrf, auth.csrf()) =>
        {
            tracing::warn!(job.id = %id, "admin action refused: missing or wrong CSRF token");
            return Ok((
                StatusCode::FORBIDDEN,
                views::errors::page(StatusCode::FORBIDDEN),
            )
                .into_response());
        }
        Some(_) => {}
    }
    let result = match action.as_str() {
        "retry" => jobs::admin::retry(&state.pool, &id).await,
        "cancel" => jobs::admin::cancel(&state.pool, &id).await,
        _ => {
            return Ok((
                StatusCode::NOT_FOUND,
                views::errors::page(StatusCode::NOT_FOUND),
            )
                .into_response());
        }
    };
    let notice = match result {
        Ok(()) => {
            tracing::info!(job.id = %id, action = %action, "admin action");
            format!("{action}: job {id} done")
        }
        Err(jobs::Error::NoSuchJob { expected, .. }) => {
            format!("{action}: job {id} is not {expected}")
        }
        Err(other) => return Err(other.into()),
    };
    let query = format!("/admin?notice={}", urlencode(&notice));
    Ok(Redirect::to(&query).into_response())
}

/// Percent-encodes everything but unreserved characters.
fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn constant_time_eq_compares_whole_strings() {
        assert!(constant_time_eq("secret", "secret"));
        assert!(!constant_time_eq("secret", "secreT"));
        assert!(!constant_time_eq("secret", "secret2"));
        assert!(!constant_time_eq("", "x"));
        assert!(constant_time_eq("", ""));
    }
}
