//! `GET /`: record the visit, show the newest ten, enqueue the trim.

use std::net::{IpAddr, SocketAddr};

use axum::{
    Router,
    extract::{ConnectInfo, Query, State},
    http::{HeaderMap, header},
    response::IntoResponse,
    routing::get,
};
use maud::Markup;
use serde::Deserialize;

use crate::{AppState, Error, views, visits};

/// Longest user agent stored; longer ones are cut (on a character boundary).
pub const MAX_USER_AGENT_CHARS: usize = 512;

/// `/`, and the page's background-work panel on its own.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(index).head(head))
        .route(views::visits::PANEL_PATH, get(background_work))
}

/// `HEAD /` (monitors, link checkers): the page's headers and nothing
/// recorded. Without this axum runs the GET handler for HEAD, so every
/// uptime check inserted a visit and enqueued a trim.
async fn head() -> impl IntoResponse {
    [(header::CONTENT_TYPE, "text/html; charset=utf-8")]
}

async fn index(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Result<Markup, Error> {
    let ip = client_ip(peer, &headers, state.trust_proxy);
    let visitor = visitor_label(state.visitor_ip.apply(ip).as_deref(), &headers);
    let mut tx = state.pool.begin().await?;
    let recorded = visits::record_visit(&mut tx, &visitor).await?;
    tx.commit().await?;
    metrics::counter!("visitme_visits_recorded_total").increment(1);
    let threshold = recorded.threshold.to_rfc3339();
    // The threshold is in the message (the sample's line), so not repeated as a field.
    tracing::info!(job.id = %recorded.job_id, "Delete entities older than {threshold}");
    let work = visits::background_work(&state.pool, &state.trim_queue).await?;
    let trace_url = state.jaeger_ui_url.as_deref().and_then(|jaeger| {
        let trace_id = observability::current_trace_id()?;
        Some(format!("{jaeger}/trace/{trace_id}"))
    });
    Ok(views::visits::page(
        &recorded,
        &work,
        chrono::Utc::now(),
        trace_url.as_deref(),
    ))
}

#[derive(Deserialize)]
struct PanelQuery {
    /// The page view's own trim job, marked when it is the one shown.
    job: Option<String>,
}

/// `GET /background-work`: the panel alone (an HTML fragment), for the
/// page's script to swap in; never cached.
async fn background_work(
    State(state): State<AppState>,
    Query(query): Query<PanelQuery>,
) -> Result<impl IntoResponse, Error> {
    let work = visits::background_work(&state.pool, &state.trim_queue).await?;
    // Only a job id is taken from the link (the panel echoes it into its own address).
    let job = query.job.filter(|id| ulid::Ulid::from_string(id).is_ok());
    let panel = views::visits::background_panel(&work, job.as_deref(), chrono::Utc::now());
    Ok(([(header::CACHE_CONTROL, "no-store")], panel))
}

/// The client's address: the TCP peer, or with `trust_proxy` the last
/// `X-Forwarded-For` entry (the one our own proxy appended; entries before it
/// are whatever the client claimed).
pub fn client_ip(peer: SocketAddr, headers: &HeaderMap, trust_proxy: bool) -> IpAddr {
    let forwarded = trust_proxy
        .then(|| headers.get_all("x-forwarded-for").iter().next_back())
        .flatten()
        .and_then(|value| value.to_str().ok())
        .and_then(|list| list.rsplit(',').next())
        .and_then(|last| last.trim().parse::<IpAddr>().ok());
    forwarded.unwrap_or(peer.ip()).to_canonical()
}

/// How much of a visitor's address is kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum VisitorIp {
    /// The whole address.
    Full,
    /// IPv4 without its last octet, IPv6 without its last 80 bits.
    #[default]
    Masked,
    /// No address at all.
    None,
}

impl VisitorIp {
    /// The address as it may be stored, or `None` to store none.
    pub fn apply(self, ip: IpAddr) -> Option<String> {
        match (self, ip) {
            (VisitorIp::Full, ip) => Some(ip.to_string()),
            (VisitorIp::None, _) => None,
            (VisitorIp::Masked, IpAddr::V4(v4)) => {
                let [a, b, c, _] = v4.octets();
                Some(std::net::Ipv4Addr::new(a, b, c, 0).to_string())
            }
            (VisitorIp::Masked, IpAddr::V6(v6)) => {
                let kept = u128::from(v6) & !((1u128 << 80) - 1);
                Some(std::net::Ipv6Addr::from(kept).to_string())
            }
        }
    }
}

/// `"<address>: <user agent>"`, as the original sample stored it (the
/// address as `VISITOR_IP` allows; "hidden" without one).
pub fn visitor_label(ip: Option<&str>, headers: &HeaderMap) -> String {
    let ip = ip.unwrap_or("hidden");
    let user_agent = headers
        .get(header::USER_AGENT)
        .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
        .unwrap_or_else(|| "unknown".to_owned());
    let user_agent: String = user_agent.chars().take(MAX_USER_AGENT_CHARS).collect();
    format!("{ip}: {user_agent}")
}
