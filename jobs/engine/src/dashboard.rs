//! The jobs dashboard as an axum [`Router`] (cargo feature `dashboard`).
//!
//! Mount it under any prefix, behind your own authentication:
//!
//! ```no_run
//! # fn app(pool: sqlx::PgPool) -> axum::Router {
//! let jobs = durable_jobs::dashboard::router(durable_jobs::dashboard::Dashboard::new(pool));
//! axum::Router::new().nest("/jobs", jobs /* .layer(your auth) */)
//! # }
//! ```
//!
//! It shows the jobs per queue and state, what finished in the last hour and
//! the newest jobs, with **Retry** on dead jobs and **Cancel** on waiting
//! ones (`POST <prefix>/jobs/<id>/retry|cancel`, then back to the overview
//! with a notice). It has no authentication of its own. Against cross-site
//! posts: where the app's auth layer inserts a [`Csrf`] extension (cookie
//! sessions), the forms carry that token and a post must bring it back;
//! without one (e.g. a bearer token, which browsers never send by
//! themselves) no token is asked for.

use std::sync::Arc;

use axum::{
    Extension, Form, Router,
    extract::{NestedPath, Path, Query, State},
    http::StatusCode,
    response::{IntoResponse, Redirect, Response},
    routing::{get, post},
};
use chrono::{DateTime, SecondsFormat, Utc};
use maud::{DOCTYPE, Markup, html};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::Deserialize;
use sqlx::PgPool;
use subtle::ConstantTimeEq as _;
use ulid::Ulid;

use crate::{
    Error,
    admin::{self, HourStats, JobSummary, STATES, ScheduleStatus, StateCount},
};

/// Wraps a page's `body` in the app's page shell, with `title`.
pub type Layout = fn(title: &str, body: Markup) -> Markup;

/// What the dashboard needs: the pool, and how its pages look.
#[derive(Clone)]
pub struct Dashboard {
    pool: PgPool,
    layout: Layout,
}

impl std::fmt::Debug for Dashboard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dashboard").finish_non_exhaustive()
    }
}

impl Dashboard {
    /// A dashboard over the queue in `pool`, in a plain page of its own.
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            layout: plain_page,
        }
    }

    /// Renders pages in the app's own shell (its stylesheet, header, footer).
    pub fn with_layout(mut self, layout: Layout) -> Self {
        self.layout = layout;
        self
    }
}

/// The CSRF token of the request's session, inserted by the app's auth layer
/// (see the module doc).
#[derive(Debug, Clone)]
pub struct Csrf(pub String);

/// The dashboard's routes, relative to where it is nested.
pub fn router<S: Clone + Send + Sync + 'static>(dashboard: Dashboard) -> Router<S> {
    Router::new()
        .route("/", get(overview))
        .route("/jobs/{id}/{action}", post(act))
        .with_state(Arc::new(dashboard))
}

/// The outcome of an action, carried to the overview in its query: a code,
/// never free text, so a link cannot make the page say anything else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Notice {
    Retried,
    Cancelled,
    NotDead,
    NotPending,
}

impl Notice {
    const ALL: [Notice; 4] = [
        Notice::Retried,
        Notice::Cancelled,
        Notice::NotDead,
        Notice::NotPending,
    ];

    fn from_code(code: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|notice| notice.code() == code)
    }

    fn code(self) -> &'static str {
        match self {
            Notice::Retried => "retried",
            Notice::Cancelled => "cancelled",
            Notice::NotDead => "not-dead",
            Notice::NotPending => "not-pending",
        }
    }

    /// The sentence shown, naming the job when `job` is a valid job id.
    fn text(self, job: Option<Ulid>) -> String {
        let job = job.map(|id| format!(" job {id}")).unwrap_or_default();
        match self {
            Notice::Retried => format!("retry:{job} done"),
            Notice::Cancelled => format!("cancel:{job} done"),
            Notice::NotDead => format!("retry:{job} not done, the job is not dead"),
            Notice::NotPending => format!("cancel:{job} not done, the job is not pending"),
        }
    }
}

/// Query of the overview after an action. Anything unknown is ignored.
#[derive(Debug, Deserialize)]
struct NoticeQuery {
    notice: Option<String>,
    job: Option<String>,
}

impl NoticeQuery {
    fn text(&self) -> Option<String> {
        let notice = Notice::from_code(self.notice.as_deref()?)?;
        let job = self
            .job
            .as_deref()
            .and_then(|id| Ulid::from_string(id).ok());
        Some(notice.text(job))
    }
}

/// Characters left as they are in a path segment; everything else is encoded.
const PATH_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// The form action of `action` on job `id` under `prefix`, the id
/// percent-encoded: a path segment, whatever a job row holds.
pub fn job_action_path(prefix: &str, id: &str, action: &str) -> String {
    format!(
        "{prefix}/jobs/{}/{action}",
        utf8_percent_encode(id, PATH_SEGMENT)
    )
}

async fn overview(
    State(dashboard): State<Arc<Dashboard>>,
    prefix: NestedPath,
    csrf: Option<Extension<Csrf>>,
    Query(query): Query<NoticeQuery>,
) -> Response {
    let pool = &dashboard.pool;
    let loaded = async {
        Ok::<_, Error>((
            admin::queue_status(pool).await?,
            admin::last_hour(pool).await?,
            admin::latest_jobs(pool, 50).await?,
            admin::schedules(pool).await?,
        ))
    }
    .await;
    let (counts, last_hour, latest, schedules) = match loaded {
        Ok(loaded) => loaded,
        Err(err) => return unavailable(&dashboard, &err),
    };
    let page = Page {
        prefix: prefix.as_str(),
        counts,
        last_hour,
        latest,
        schedules,
        csrf: csrf.map(|Extension(Csrf(token))| token),
        notice: query.text(),
    };
    (dashboard.layout)("Jobs dashboard", page.render()).into_response()
}

#[derive(Deserialize)]
struct ActionForm {
    #[serde(default)]
    csrf: String,
}

async fn act(
    State(dashboard): State<Arc<Dashboard>>,
    prefix: NestedPath,
    csrf: Option<Extension<Csrf>>,
    Path((id, action)): Path<(String, String)>,
    Form(form): Form<ActionForm>,
) -> Response {
    if let Some(Extension(Csrf(expected))) = csrf
        && !bool::from(form.csrf.as_bytes().ct_eq(expected.as_bytes()))
    {
        tracing::warn!(job.id = %id, "dashboard action refused: missing or wrong CSRF token");
        return (
            StatusCode::FORBIDDEN,
            (dashboard.layout)("Forbidden", html! { h1 { "Forbidden" } }),
        )
            .into_response();
    }
    let pool = &dashboard.pool;
    let (result, done, refused) = match action.as_str() {
        "retry" => (
            admin::retry(pool, &id).await,
            Notice::Retried,
            Notice::NotDead,
        ),
        "cancel" => (
            admin::cancel(pool, &id).await,
            Notice::Cancelled,
            Notice::NotPending,
        ),
        _ => {
            return (
                StatusCode::NOT_FOUND,
                (dashboard.layout)("Not found", html! { h1 { "Not found" } }),
            )
                .into_response();
        }
    };
    let notice = match result {
        Ok(()) => {
            tracing::info!(job.id = %id, action = %action, "dashboard action");
            done
        }
        Err(Error::NoSuchJob { .. }) => refused,
        Err(err) => return unavailable(&dashboard, &err),
    };
    let location = format!(
        "{}?notice={}&job={}",
        overview_path(prefix.as_str()),
        notice.code(),
        utf8_percent_encode(&id, PATH_SEGMENT)
    );
    Redirect::to(&location).into_response()
}

/// The overview's path: the prefix itself (`/` when mounted at the root).
fn overview_path(prefix: &str) -> &str {
    if prefix.is_empty() { "/" } else { prefix }
}

/// A 503 page; the error is logged here, never shown.
fn unavailable(dashboard: &Dashboard, err: &Error) -> Response {
    tracing::error!(error = %err, "jobs dashboard: the queue is unavailable");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        (dashboard.layout)(
            "Jobs dashboard unavailable",
            html! {
                h1 { "Jobs dashboard unavailable" }
                p { "The job queue cannot be read right now. Try again in a moment." }
            },
        ),
    )
        .into_response()
}

/// The page shell when the app gives none.
fn plain_page(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) }
            }
            body { main { h1 { (title) } (body) } }
        }
    }
}

/// What the overview shows, loaded by its handler.
struct Page<'a> {
    prefix: &'a str,
    counts: Vec<StateCount>,
    last_hour: Vec<HourStats>,
    latest: Vec<JobSummary>,
    schedules: Vec<ScheduleStatus>,
    csrf: Option<String>,
    notice: Option<String>,
}

impl Page<'_> {
    fn render(&self) -> Markup {
        let mut queues: Vec<&str> = self.counts.iter().map(|c| c.queue.as_str()).collect();
        queues.dedup();
        let count = |queue: &str, state: &str| {
            self.counts
                .iter()
                .find(|c| c.queue == queue && c.state == state)
                .map_or(0, |c| c.count)
        };
        html! {
            @if let Some(notice) = &self.notice { p.note #notice { (notice) } }
            h2 { "Queues" }
            table.grid #queue-counts {
                thead { tr { th { "queue" } @for state in STATES { th { (state) } } } }
                tbody {
                    @for queue in &queues {
                        tr data-queue=(queue) {
                            td { code { (queue) } }
                            @for state in STATES { td.num data-state=(state) { (count(queue, state)) } }
                        }
                    }
                    @if queues.is_empty() { tr { td colspan="7" { "The queue is empty." } } }
                }
            }
            h2 { "Last hour" }
            table.grid #last-hour {
                thead { tr { th { "queue" } th { "done" } th { "dead" } th { "failed, retrying" } } }
                tbody {
                    @for stats in &self.last_hour {
                        tr { td { code { (stats.queue) } } td.num { (stats.done) } td.num { (stats.dead) } td.num { (stats.retrying) } }
                    }
                    @if self.last_hour.is_empty() { tr { td colspan="4" { "Nothing finished in the last hour." } } }
                }
            }
            (schedules_section(&self.schedules))
            h2 { "Latest jobs" }
            table.grid #latest-jobs {
                thead { tr { th { "job" } th { "queue" } th { "state" } th { "attempts" } th { "run at" } th { "last error" } th {} } }
                tbody {
                    @for job in &self.latest {
                        tr data-job-id=(job.id) data-state=(job.state) {
                            td { code { (job.id) } }
                            td { (job.queue) }
                            td { span class={ "state " (job.state) } { (job.state) } }
                            td.num { (job.attempts) " / " (job.max_attempts) }
                            td { @if let Some(at) = job.run_at { (timestamp(at)) } }
                            td.error { (job.last_error.as_deref().unwrap_or("")) }
                            td.actions {
                                @if job.state == "dead" { (self.action(&job.id, "retry", "Retry")) }
                                @if job.state == "pending" || job.state == "scheduled" { (self.action(&job.id, "cancel", "Cancel")) }
                            }
                        }
                    }
                }
            }
        }
    }

    fn action(&self, id: &str, action: &str, label: &str) -> Markup {
        html! {
            form.inline method="post" action=(job_action_path(self.prefix, id, action)) {
                @if let Some(csrf) = &self.csrf { input type="hidden" name="csrf" value=(csrf); }
                button type="submit" name="action" value=(action) { (label) }
            }
        }
    }
}

/// The periodic jobs: each schedule with its newest tick that got a job (and
/// that job's state) and its next tick.
fn schedules_section(schedules: &[ScheduleStatus]) -> Markup {
    html! {
        h2 { "Schedules" }
        table.grid #schedules {
            thead { tr { th { "queue" } th { "cron (UTC)" } th { "catch-up" } th { "last run" } th { "state" } th { "next run" } } }
            tbody {
                @for schedule in schedules {
                    tr data-schedule=(schedule.queue) {
                        td { code { (schedule.queue) } }
                        td { code { (schedule.expression) } }
                        td { (schedule.catch_up) }
                        td.last-run { @if let Some(at) = schedule.last_tick { (timestamp(at)) } @else { "never" } }
                        td {
                            @match (&schedule.last_job_id, &schedule.last_job_state) {
                                (Some(_), Some(state)) => span class={ "state " (state) } { (state) },
                                (Some(_), None) => "pruned",
                                (None, _) => "",
                            }
                        }
                        td.next-run { @if let Some(at) = schedule.next_tick { (timestamp(at)) } }
                    }
                }
                @if schedules.is_empty() { tr { td colspan="6" { "No schedules yet: a worker records them when it starts." } } }
            }
        }
    }
}

/// A `<time>` element: RFC 3339 in `datetime`, a readable form as its text.
fn timestamp(at: DateTime<Utc>) -> Markup {
    html! {
        time datetime=(at.to_rfc3339_opts(SecondsFormat::Micros, true)) {
            (at.format("%Y-%m-%d %H:%M:%S%.6f UTC"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_are_percent_encoded_in_paths() {
        assert_eq!(
            job_action_path("/admin", "a/../b?c=1#x", "retry"),
            "/admin/jobs/a%2F..%2Fb%3Fc%3D1%23x/retry"
        );
    }

    #[test]
    fn only_known_notices_are_shown() {
        let query = |notice: &str, job: &str| NoticeQuery {
            notice: Some(notice.to_owned()),
            job: Some(job.to_owned()),
        };
        assert_eq!(query("Your session expired, call 555", "").text(), None);
        assert_eq!(
            query("retried", "call 555").text().as_deref(),
            Some("retry: done")
        );
    }
}
