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
//! the newest jobs (filtered by queue and state, 50 a page, older pages
//! after them), with **Retry** on dead jobs and **Cancel** on waiting
//! ones (`POST <prefix>/jobs/<id>/retry|cancel`, then back to the overview
//! with a notice). `GET <prefix>/jobs/<id>` is one job's page: its payload,
//! metadata, attempts, last error, timings, worker, and a link to its trace
//! ([`Dashboard::with_trace_links`]). `GET <prefix>/queues/<queue>` is one
//! queue's page: running or paused, its limits (in force and declared), its
//! waiting, scheduled and running jobs, a chart of its last hour, and the
//! operator's pause, resume, purge and limits. The pages carry
//! `data-refresh-from` on their content, for a script of the app's layout
//! to refresh them in place (an app's own script, served beside its pages). It has no authentication of its own. Against cross-site
//! posts: where the app's auth layer inserts a [`Csrf`] extension (cookie
//! sessions), the forms carry that token and a post must bring it back;
//! without one (e.g. a bearer token, which browsers never send by
//! themselves) no token is asked for.

mod durable;
mod graph;
mod queue;

use std::sync::Arc;

use axum::{
    Extension, Form, Router,
    extract::{NestedPath, Path, Query, RawQuery, State},
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
    admin::{
        self, AttemptError, HourStats, JobDetail, JobFilter, JobState, JobSummary, ScheduleStatus,
        StateCount, WorkflowSummary, WorkflowView,
    },
    durable::signals::Signalled,
    error::Error,
};

/// Wraps a page's `body` in the app's page shell, with `title`.
pub type Layout = fn(title: &str, body: Markup) -> Markup;

/// What the dashboard needs: the pool, and how its pages look.
#[derive(Clone)]
pub struct Dashboard {
    pool: PgPool,
    layout: Layout,
    trace_ui: Option<String>,
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
            trace_ui: None,
        }
    }

    /// Renders pages in the app's own shell (its stylesheet, header, footer).
    pub fn with_layout(mut self, layout: Layout) -> Self {
        self.layout = layout;
        self
    }

    /// Links each job's page to its trace at `<url>/trace/<trace id>`
    /// (Jaeger's UI, e.g. `http://localhost:16686`).
    pub fn with_trace_links(mut self, url: &str) -> Self {
        self.trace_ui = Some(url.trim_end_matches('/').to_owned());
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
        .route("/jobs", get(to_overview))
        .route("/jobs/", get(to_overview))
        .route("/jobs/{id}", get(job_page))
        .route("/jobs/{id}/{action}", post(act))
        .route("/workflows/{id}", get(workflow_page))
        .route("/workflows/{id}/cancel", post(cancel_workflow))
        .route("/queues/{queue}", get(queue::queue_page))
        .route("/queues/{queue}/{action}", post(queue::act_on_queue))
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
    Answered,
    NotWaiting,
}

impl Notice {
    const ALL: [Notice; 6] = [
        Notice::Retried,
        Notice::Cancelled,
        Notice::NotDead,
        Notice::NotPending,
        Notice::Answered,
        Notice::NotWaiting,
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
            Notice::Answered => "answered",
            Notice::NotWaiting => "not-waiting",
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
            Notice::Answered => format!("answer:{job} sent"),
            Notice::NotWaiting => format!(
                "answer:{job} not sent, the job no longer waits for it (answered, timed out or finished)"
            ),
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
fn job_action_path(prefix: &str, id: &str, action: &str) -> String {
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
    Query(list): Query<ListQuery>,
) -> Response {
    if holds_nul([
        list.queue.as_deref(),
        list.state.as_deref(),
        list.before.as_deref(),
    ]) {
        return bad_request(&dashboard);
    }
    let pool = &dashboard.pool;
    let filter = list.filter();
    let loaded = async {
        Ok::<_, Error>((
            admin::queue_status(pool).await?,
            admin::last_hour(pool).await?,
            admin::jobs_page(
                pool,
                &filter,
                i64::try_from(PAGE_SIZE + 1).unwrap_or(i64::MAX),
            )
            .await?,
            admin::schedules(pool).await?,
            admin::latest_workflows(pool, WORKFLOWS_SHOWN).await?,
        ))
    }
    .await;
    let (counts, last_hour, mut latest, schedules, workflows) = match loaded {
        Ok(loaded) => loaded,
        Err(err) => return unavailable(&dashboard, &err),
    };
    // One row more than shown says whether there is an older page.
    let more = latest.len() > PAGE_SIZE;
    latest.truncate(PAGE_SIZE);
    let page = Page {
        prefix: prefix.as_str(),
        counts,
        last_hour,
        latest,
        filter,
        more,
        schedules,
        workflows,
        csrf: csrf.map(|Extension(Csrf(token))| token),
        notice: query.text(),
    };
    (dashboard.layout)("Jobs dashboard", page.render()).into_response()
}

/// `<prefix>/jobs` and `<prefix>/jobs/`: the jobs are listed on the
/// overview, so a permanent redirect there, with the query (its filters).
async fn to_overview(prefix: NestedPath, RawQuery(query): RawQuery) -> Redirect {
    let path = overview_path(prefix.as_str());
    match query.filter(|q| !q.is_empty()) {
        Some(query) => Redirect::permanent(&format!("{path}?{query}")),
        None => Redirect::permanent(path),
    }
}

#[derive(Deserialize)]
struct ActionForm {
    #[serde(default)]
    csrf: String,
    /// For `answer`: the wait answered, and the choice's label.
    wait: Option<String>,
    choice: Option<String>,
}

/// A 403 when the session has a CSRF token and the form does not bring it back.
fn refuse_without_csrf(
    dashboard: &Dashboard,
    csrf: Option<Extension<Csrf>>,
    given: &str,
    id: &str,
) -> Option<Response> {
    let Extension(Csrf(expected)) = csrf?;
    if bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
        return None;
    }
    tracing::warn!(id, "dashboard action refused: missing or wrong CSRF token");
    Some(
        (
            StatusCode::FORBIDDEN,
            (dashboard.layout)("Forbidden", html! { h1 { "Forbidden" } }),
        )
            .into_response(),
    )
}

async fn act(
    State(dashboard): State<Arc<Dashboard>>,
    prefix: NestedPath,
    csrf: Option<Extension<Csrf>>,
    Path((id, action)): Path<(String, String)>,
    Form(form): Form<ActionForm>,
) -> Response {
    if holds_nul([
        Some(id.as_str()),
        form.wait.as_deref(),
        form.choice.as_deref(),
    ]) {
        return bad_request(&dashboard);
    }
    if let Some(refused) = refuse_without_csrf(&dashboard, csrf, &form.csrf, &id) {
        return refused;
    }
    let pool = &dashboard.pool;
    let (result, done, refused) = match action.as_str() {
        "answer" => {
            let (Some(wait), Some(choice)) = (&form.wait, &form.choice) else {
                return bad_request(&dashboard);
            };
            let answered = admin::answer(pool, &id, wait, choice).await.and_then(|sent| {
                tracing::info!(job.id = %id, wait = %wait, choice = %choice, outcome = ?sent, "dashboard answer");
                match sent {
                    Signalled::Delivered => Ok(()),
                    _ => Err(Error::NoSuchJob { id: id.clone(), expected: "waiting" }),
                }
            });
            (answered, Notice::Answered, Notice::NotWaiting)
        }
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

/// Whether any of `values` holds a NUL byte. Postgres refuses NUL in text, so
/// such an id or filter can match nothing; checked before any query, so that
/// it is answered 400 as the bad input it is, not 503 with an error logged.
fn holds_nul<'a>(values: impl IntoIterator<Item = Option<&'a str>>) -> bool {
    values
        .into_iter()
        .flatten()
        .any(|value| value.contains('\0'))
}

/// A 400 page for input no job or workflow can match; nothing is logged
/// (anyone can send it).
fn bad_request(dashboard: &Dashboard) -> Response {
    (
        StatusCode::BAD_REQUEST,
        (dashboard.layout)(
            "Bad request",
            html! { h1 { "Bad request" } p { "That id or filter cannot name a job (it holds a NUL byte)." } },
        ),
    )
        .into_response()
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
    filter: JobFilter,
    /// Whether older jobs match the filter than those shown.
    more: bool,
    schedules: Vec<ScheduleStatus>,
    workflows: Vec<WorkflowSummary>,
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
            div #dashboard data-refresh-from=(self.list_path(self.filter.before.as_deref())) { (self.render_content(&queues, count)) }
        }
    }

    fn render_content(&self, queues: &[&str], count: impl Fn(&str, &str) -> i64) -> Markup {
        html! {
            h2 { "Queues" }
            div.scroll tabindex="0" { table.grid #queue-counts {
                thead { tr { th { "queue" } @for state in JobState::ALL.map(JobState::as_str) { th { (state) } } } }
                tbody {
                    @for queue in queues {
                        tr data-queue=(queue) {
                            td { a href=(queue::queue_page_path(self.prefix, queue)) { code { (queue) } } }
                            @for state in JobState::ALL.map(JobState::as_str) { td.num data-state=(state) { (count(queue, state)) } }
                        }
                    }
                    @if queues.is_empty() { tr { td colspan="9" { "The queue is empty." } } }
                }
            } }
            h2 { "Last hour" }
            div.scroll tabindex="0" { table.grid #last-hour {
                thead { tr { th { "queue" } th { "done" } th { "dead" } th { "failed, retrying" } } }
                tbody {
                    @for stats in &self.last_hour {
                        tr { td { code { (stats.queue) } } td.num { (stats.done) } td.num { (stats.dead) } td.num { (stats.retrying) } }
                    }
                    @if self.last_hour.is_empty() { tr { td colspan="4" { "Nothing finished in the last hour." } } }
                }
            } }
            (schedules_section(&self.schedules))
            (workflows_section(self.prefix, &self.workflows))
            h2 { "Latest jobs" }
            (self.filters(queues))
            div.scroll tabindex="0" { table.grid #latest-jobs {
                thead { tr { th { "job" } th { "queue" } th { "state" } th { "attempts" } th { "run at" } th { "last error" } th {} } }
                tbody {
                    @for job in &self.latest {
                        tr data-job-id=(job.id) data-state=(job.state) {
                            td { a href=(job_page_path(self.prefix, &job.id)) { code { (job.id) } } }
                            td { (job.queue) }
                            td { span class={ "state " (job.state) } { (job.state) } }
                            td.num { (job.attempts) " / " (job.max_attempts) }
                            td { @if let Some(at) = job.run_at { (timestamp(at)) } }
                            td.error { (shown_error(job.last_error.as_deref().unwrap_or(""))) }
                            td.actions { (actions(self.prefix, &job.id, job.state.as_str(), self.csrf.as_deref())) }
                        }
                    }
                    @if self.latest.is_empty() { tr { td colspan="7" { "No job matches." } } }
                }
            } }
            nav.pages aria-label="pages" {
                @if self.filter.before.is_some() { a #newest-page href=(self.list_path(None)) { "Newest" } }
                @if self.more && let Some(last) = self.latest.last() {
                    a #older-page href=(self.list_path(Some(&last.id))) { "Older jobs →" }
                }
            }
        }
    }
}

/// The periodic jobs: each schedule with its newest tick that got a job (and
/// that job's state) and its next tick.
fn schedules_section(schedules: &[ScheduleStatus]) -> Markup {
    html! {
        h2 { "Schedules" }
        div.scroll tabindex="0" { table.grid #schedules {
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
        } }
    }
}

/// A `<time>` element: RFC 3339 in `datetime`, the exact instant as its
/// text and title (class `ago`: a script may show it relative, "12 s ago").
fn timestamp(at: DateTime<Utc>) -> Markup {
    let exact = at.format("%Y-%m-%d %H:%M:%S%.6f UTC").to_string();
    html! {
        time.ago datetime=(at.to_rfc3339_opts(SecondsFormat::Micros, true)) title=(exact) {
            (exact)
        }
    }
}

/// Jobs listed per page of the overview.
const PAGE_SIZE: usize = 50;

/// The overview's list filter and page, from its query. Unknown states and
/// empty values are ignored.
#[derive(Debug, Default, Deserialize)]
struct ListQuery {
    queue: Option<String>,
    state: Option<String>,
    before: Option<String>,
}

impl ListQuery {
    fn filter(self) -> JobFilter {
        let given = |value: Option<String>| value.filter(|v| !v.is_empty());
        JobFilter {
            queue: given(self.queue),
            state: given(self.state).and_then(|state| state.parse().ok()),
            before: given(self.before),
        }
    }
}

/// The 404 page of a `what` (job, workflow) that is not there. The id is
/// not echoed: a link must not make the page say anything.
fn not_found(dashboard: &Dashboard, prefix: &str, what: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        (dashboard.layout)(
            &format!("No such {what}"),
            html! { h1 { "No such " (what) } p { "There is no " (what) " with this id (finished " (what) "s are pruned after a while)." } p { a href=(overview_path(prefix)) { "All jobs" } } },
        ),
    )
        .into_response()
}

/// The path of job `id`'s page under `prefix`, the id percent-encoded.
fn job_page_path(prefix: &str, id: &str) -> String {
    format!("{prefix}/jobs/{}", utf8_percent_encode(id, PATH_SEGMENT))
}

/// The actions a job in `state` offers: Retry when dead, Cancel while it waits.
fn actions(prefix: &str, id: &str, state: &str, csrf: Option<&str>) -> Markup {
    let form = |action: &str, label: &str| {
        html! {
            form.inline method="post" action=(job_action_path(prefix, id, action)) {
                @if let Some(csrf) = csrf { input type="hidden" name="csrf" value=(csrf); }
                button type="submit" name="action" value=(action) { (label) }
            }
        }
    };
    html! {
        @if state == "dead" { (form("retry", "Retry")) }
        @if matches!(state, "pending" | "scheduled" | "sleeping" | "waiting") { (form("cancel", "Cancel")) }
    }
}

impl Page<'_> {
    /// The filter form: queue and state, newest first.
    fn filters(&self, queues: &[&str]) -> Markup {
        let queue = self.filter.queue.as_deref().unwrap_or("");
        let state = self.filter.state.map_or("", JobState::as_str);
        html! {
            form.filters #job-filters method="get" action=(overview_path(self.prefix)) {
                label { "queue"
                    select name="queue" {
                        option value="" selected[queue.is_empty()] { "any" }
                        @for q in queues { option value=(q) selected[*q == queue] { (q) } }
                        @if !queue.is_empty() && !queues.contains(&queue) { option value=(queue) selected { (queue) } }
                    }
                }
                label { "state"
                    select name="state" {
                        option value="" selected[state.is_empty()] { "any" }
                        @for s in JobState::ALL.map(JobState::as_str) { option value=(s) selected[s == state] { (s) } }
                    }
                }
                button type="submit" { "Filter" }
            }
        }
    }

    /// The overview with this page's filter, from job `before` on.
    fn list_path(&self, before: Option<&str>) -> String {
        let mut query = Vec::new();
        let mut add = |key: &str, value: Option<&str>| {
            if let Some(value) = value {
                query.push(format!(
                    "{key}={}",
                    utf8_percent_encode(value, PATH_SEGMENT)
                ));
            }
        };
        add("queue", self.filter.queue.as_deref());
        add("state", self.filter.state.map(JobState::as_str));
        add("before", before);
        let path = overview_path(self.prefix);
        match query.is_empty() {
            true => path.to_owned(),
            false => format!("{path}?{}", query.join("&")),
        }
    }
}

async fn job_page(
    State(dashboard): State<Arc<Dashboard>>,
    prefix: NestedPath,
    csrf: Option<Extension<Csrf>>,
    Path(id): Path<String>,
) -> Response {
    if holds_nul([Some(id.as_str())]) {
        return bad_request(&dashboard);
    }
    let loaded = async {
        let pool = &dashboard.pool;
        let Some(job) = admin::job(pool, &id).await? else {
            return Ok::<_, Error>(None);
        };
        let errors = admin::job_errors(pool, &id).await?;
        let durable = Durable {
            checkpoints: admin::checkpoints(pool, &id).await?,
            children: admin::children(pool, &id).await?,
            child_workflows: admin::child_workflows(pool, &id).await?,
        };
        Ok(Some((job, errors, durable)))
    };
    let (job, errors, durable) = match loaded.await {
        Ok(Some(loaded)) => loaded,
        Ok(None) => {
            return not_found(&dashboard, prefix.as_str(), "job");
        }
        Err(err) => return unavailable(&dashboard, &err),
    };
    let csrf = csrf.map(|Extension(Csrf(token))| token);
    let body = html! {
        div #job-page data-refresh-from=(job_page_path(prefix.as_str(), &job.id)) {
            (render_job(prefix.as_str(), &job, &errors, &durable, csrf.as_deref(), dashboard.trace_ui.as_deref()))
        }
    };
    (dashboard.layout)(&format!("Job {}", job.id), body).into_response()
}

/// A job's durable-execution records, for its page.
struct Durable {
    checkpoints: Vec<admin::CheckpointView>,
    children: Vec<JobSummary>,
    child_workflows: Vec<admin::WorkflowSummary>,
}

/// One job's page body: state and actions, timings, worker, attempts and
/// each failed attempt's error (`errors`, from [`admin::job_errors`]), payload (pretty JSON), metadata, and with `trace_ui` a link to
/// its trace. Links and forms are under `prefix` (where the dashboard is
/// nested); `csrf` as for the overview's forms.
fn render_job(
    prefix: &str,
    job: &JobDetail,
    errors: &[AttemptError],
    durable: &Durable,
    csrf: Option<&str>,
    trace_ui: Option<&str>,
) -> Markup {
    let started = job.lock_at.filter(|_| job.status != "Pending");
    let took = started.zip(job.done_at).and_then(|(start, end)| {
        let ms = (end - start).num_milliseconds();
        (ms >= 0).then(|| format!("{:.3} s", ms as f64 / 1000.0))
    });
    html! {
        p { a href=(overview_path(prefix)) { "← All jobs" } }
        dl.facts #job-facts data-job-id=(job.id) data-state=(job.state) {
            dt { "Queue" } dd { code { (job.queue) } }
            dt { "State" } dd {
                span class={ "state " (job.state) } { (job.state) }
                " (" code { (job.status) } ") "
                (actions(prefix, &job.id, job.state.as_str(), csrf))
            }
            dt { "Attempts" } dd { (job.attempts) " of " (job.max_attempts) }
            dt { "Enqueued" } dd { @if let Some(at) = job.created_at() { (timestamp(at)) } }
            dt { "Due" } dd { (timestamp(job.run_at)) }
            dt { "Last started" } dd { @if let Some(at) = started { (timestamp(at)) } @else { "not yet" } }
            dt { "Last ended" } dd { @if let Some(at) = job.done_at { (timestamp(at)) } @else { "not yet" } }
            @if let Some(took) = &took { dt { "Took" } dd { (took) } }
            dt { "Worker" } dd { @if let Some(worker) = &job.lock_by { code { (worker) } } @else { "none" } }
            (durable::facts(prefix, job, &durable.checkpoints, &durable.child_workflows, csrf))
            @if let Some(step) = job.workflow_step() {
                dt { "Workflow" } dd {
                    "step " code { (step.step) } " of "
                    a #job-workflow-link href=(workflow_page_path(prefix, &step.workflow)) { code { (step.workflow) } }
                }
            }
            @if let Some(key) = &job.unique_key { dt { "Unique key" } dd { code { (key) } } }
            @if let (Some(url), Some(trace)) = (trace_ui, job.trace_id()) {
                dt { "Trace" } dd { a #job-trace-link href=(format!("{url}/trace/{trace}")) rel="noopener" { "view this job's trace" } }
            }
        }
        h2 { "Errors" }
        @let last_error = job.last_error();
        @if let Some(error) = &last_error {
            p.error #job-error { "Last attempt (" (job.attempts) "): " (shown_error(error)) }
        }
        @if !errors.is_empty() {
            ol.errors #job-errors aria-label="every failed attempt" {
                @for failed in errors {
                    li data-attempt=(failed.attempt) { "Attempt " (failed.attempt) ", " (timestamp(failed.failed_at)) ": " span.error { (shown_error(&failed.error)) } }
                }
            }
        } @else if last_error.is_none() {
            p { "No attempt failed." }
        }
        @if job.result_is_cut() {
            h2 { "Result" }
            p.note #job-result-cut { (cut_note(job.last_result.as_deref().map_or(0, str::len), job.last_result_bytes.unwrap_or_default())) }
            pre.payload #job-result { (job.last_result.as_deref().unwrap_or_default()) "…" }
        } @else if let Some(output) = job.output().filter(|o| !o.is_null()) {
            h2 { "Result" }
            pre.payload #job-result { (serde_json::to_string_pretty(&output).unwrap_or_default()) }
        }
        (durable::sections(prefix, &durable.checkpoints, &durable.children, &durable.child_workflows))
        h2 { "Payload" }
        @if job.payload_is_cut() {
            p.note #job-payload-cut { (cut_note(job.payload.len(), job.payload_bytes)) }
            pre.payload #job-payload { (String::from_utf8_lossy(&job.payload)) "…" }
        } @else {
            pre.payload #job-payload { (job.payload_pretty()) }
        }
        h2 { "Metadata" }
        @let metadata = job.metadata_entries();
        @if metadata.is_empty() { p { "None." } } @else {
            div.scroll tabindex="0" { table.grid #job-metadata {
                tbody { @for (key, value) in &metadata { tr { th { code { (key) } } td { code { (value) } } } } }
            } }
        }
    }
}

/// An error as operators read it: without the `AbortError: ` that apalis
/// puts before a fatal error's message (the job's state already says it
/// will not be retried).
fn shown_error(error: &str) -> &str {
    error.trim_start_matches("AbortError: ")
}

/// The note above a cut payload or result: what is shown of how much.
fn cut_note(shown: usize, full: i64) -> String {
    format!("{full} bytes in all; only the first {shown} are read and shown here.")
}

/// How many workflows the overview lists.
const WORKFLOWS_SHOWN: i64 = 10;

/// A workflow's page, under the dashboard's `prefix`.
fn workflow_page_path(prefix: &str, id: &str) -> String {
    format!(
        "{prefix}/workflows/{}",
        utf8_percent_encode(id, PATH_SEGMENT)
    )
}

/// The newest workflows, each with its steps counted.
fn workflows_section(prefix: &str, workflows: &[WorkflowSummary]) -> Markup {
    html! {
        h2 { "Workflows" }
        div.scroll tabindex="0" { table.grid #workflows {
            thead { tr { th { "workflow" } th { "name" } th { "steps" } th { "done" } th { "failed" } th { "open" } th { "created" } } }
            tbody {
                @for workflow in workflows {
                    tr data-workflow-id=(workflow.id) {
                        td { a href=(workflow_page_path(prefix, &workflow.id)) { code { (workflow.id) } } }
                        td { (workflow.name) @if workflow.cancel_requested_at.is_some() { " (cancelled)" } }
                        td.num { (workflow.steps) }
                        td.num { (workflow.done) }
                        td.num { (workflow.failed) }
                        td.num { (workflow.open) }
                        td { (timestamp(workflow.created_at)) }
                    }
                }
                @if workflows.is_empty() { tr { td colspan="7" { "No workflows." } } }
            }
        } }
    }
}

async fn workflow_page(
    State(dashboard): State<Arc<Dashboard>>,
    prefix: NestedPath,
    csrf: Option<Extension<Csrf>>,
    Path(id): Path<String>,
) -> Response {
    if holds_nul([Some(id.as_str())]) {
        return bad_request(&dashboard);
    }
    let workflow = match admin::workflow(&dashboard.pool, &id).await {
        Ok(Some(workflow)) => workflow,
        Ok(None) => {
            return not_found(&dashboard, prefix.as_str(), "workflow");
        }
        Err(err) => return unavailable(&dashboard, &err),
    };
    let csrf = csrf.map(|Extension(Csrf(token))| token);
    let body = html! {
        div #workflow-page data-refresh-from=(workflow_page_path(prefix.as_str(), &workflow.id)) {
            (render_workflow(prefix.as_str(), &workflow, csrf.as_deref()))
        }
    };
    (dashboard.layout)(&format!("Workflow {}", workflow.id), body).into_response()
}

/// One workflow's page body: its state, a Cancel button while it runs, and
/// each step with its dependencies, state, attempts, timings and result or
/// error, linked to the step's job page once it has a job.
fn render_workflow(prefix: &str, workflow: &WorkflowView, csrf: Option<&str>) -> Markup {
    let state = workflow.state();
    html! {
        p { a href=(overview_path(prefix)) { "← All jobs" } }
        dl.facts #workflow-facts data-workflow-id=(workflow.id) data-state=(state) {
            dt { "Name" } dd { (workflow.name) }
            dt { "State" } dd {
                span class={ "state " (state) } { (state) }
                @if state == "running" {
                    " "
                    form.inline method="post" action=(format!("{}/cancel", workflow_page_path(prefix, &workflow.id))) {
                        @if let Some(csrf) = csrf { input type="hidden" name="csrf" value=(csrf); }
                        button type="submit" { "Cancel workflow" }
                    }
                }
            }
            dt { "Steps" } dd { (workflow.steps.len()) }
            dt { "Created" } dd { (timestamp(workflow.created_at)) }
            @if let Some(at) = workflow.cancel_requested_at { dt { "Cancel requested" } dd { (timestamp(at)) } }
            @if let Some(parent) = &workflow.parent_id {
                dt { "Parent" } dd { a #workflow-parent-link href=(job_page_path(prefix, parent)) { code { (parent) } } }
            }
            @if let Some(key) = &workflow.key { dt { "Key" } dd { code { (key) } } }
        }
        h2 { "Graph" }
        div.scroll tabindex="0" { (graph::workflow_graph(prefix, workflow)) }
        h2 { "Steps" }
        div.scroll tabindex="0" { table.grid #workflow-steps {
            thead { tr { th { "step" } th { "queue" } th { "after" } th { "state" } th { "attempts" } th { "released" } th { "finished" } th { "result or error" } } }
            tbody {
                @for step in &workflow.steps {
                    tr data-step=(step.name) data-state=(step.state) {
                        td { @if step.released_at.is_some() {
                            a href=(job_page_path(prefix, &step.job_id)) { code { (step.name) } }
                        } @else { code { (step.name) } } }
                        td { code { (step.job_type) } }
                        td { (step.depends_on.join(", ")) @if step.on_dependency_failure == "run" { " (run anyway)" } }
                        td { span class={ "state " (step.state) } { (step.state) } }
                        td.num { (step.attempts) " / " (step.max_attempts) }
                        td { @if let Some(at) = step.released_at { (timestamp(at)) } }
                        td { @if let Some(at) = step.finished_at { (timestamp(at)) } }
                        td.error {
                            @if let Some(error) = &step.error { (shown_error(error)) }
                            @else if let Some(result) = &step.result { code { (short_json(result)) } }
                        }
                    }
                }
            }
        } }
    }
}

/// A result as one line of at most 200 characters.
fn short_json(value: &serde_json::Value) -> String {
    let text = value.to_string();
    match text.char_indices().nth(200) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

async fn cancel_workflow(
    State(dashboard): State<Arc<Dashboard>>,
    prefix: NestedPath,
    csrf: Option<Extension<Csrf>>,
    Path(id): Path<String>,
    Form(form): Form<ActionForm>,
) -> Response {
    if holds_nul([Some(id.as_str())]) {
        return bad_request(&dashboard);
    }
    if let Some(refused) = refuse_without_csrf(&dashboard, csrf, &form.csrf, &id) {
        return refused;
    }
    match admin::cancel_workflow(&dashboard.pool, &id).await {
        Ok(cancelled) => {
            tracing::info!(
                workflow.id = %id,
                steps.cancelled = cancelled.cancelled,
                steps.running = cancelled.running,
                "dashboard cancelled a workflow"
            );
        }
        Err(Error::NoSuchJob { .. }) => {}
        Err(err) => return unavailable(&dashboard, &err),
    }
    Redirect::to(&workflow_page_path(prefix.as_str(), &id)).into_response()
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
    fn fatal_errors_are_shown_without_apalis_prefix() {
        assert_eq!(shown_error("AbortError: cannot decode"), "cannot decode");
        assert_eq!(shown_error("timed out"), "timed out");
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
