//! The visits page (`GET /`) and its background-work panel.

use chrono::{DateTime, Utc};
use maud::{Markup, html};

use super::{
    components::{short_browser, timestamp, visitor_parts},
    layout,
};
use jobs::NotApproved;

use crate::visits::{BackgroundWork, RecordedVisit};

/// Where the page's script fetches a fresh panel (see [`background_panel`]).
pub const PANEL_PATH: &str = "/background-work";

/// Renders the newest visits, the trim note, the background-work panel and,
/// with `trace_url`, the link to this page view's trace.
pub fn page(
    recorded: &RecordedVisit,
    work: &BackgroundWork,
    now: DateTime<Utc>,
    trace_url: Option<&str>,
) -> Markup {
    layout::page(
        "VisitMe example",
        html! {
            h1 { "Last 10 visits" }
            ol.visits {
                @for visit in &recorded.visits {
                    @let yours = visit.id == recorded.visit_id;
                    @let (address, agent) = visitor_parts(&visit.visitor);
                    li.yours[yours] data-visit-id=(visit.id) {
                        (timestamp(visit.created_at, now))
                        span.who {
                            span.from { "from " }
                            span.visitor title=(visit.visitor) {
                                span.address { (address) }
                                span.browser { (short_browser(agent)) }
                            }
                        }
                        @if yours { span.badge title="the visit this page view recorded" { "yours" } }
                    }
                }
            }
            p.note #trim-threshold {
                "Deleting visits older than: " (timestamp(recorded.threshold, now))
            }
            (background_panel(work, Some(&recorded.job_id), now))
            p.hint {
                "Each page view records a visit and enqueues a " code { "TrimVisits" }
                " job in the same transaction; a worker runs it moments later. This panel follows it."
            }
            @if let Some(url) = trace_url {
                p.trace { a #trace-link href=(url) rel="noopener" { "view this request's trace" } }
            }
        },
    )
}

/// The panel: the newest trim (when, what it deleted, its state and
/// attempts) and the trim queue. `this_job` is the page view's own trim,
/// marked when it is the one shown. The page's script replaces it in place
/// every few seconds with a fresh copy from [`PANEL_PATH`].
pub fn background_panel(
    work: &BackgroundWork,
    this_job: Option<&str>,
    now: DateTime<Utc>,
) -> Markup {
    let refresh = match this_job {
        Some(job) => format!("{PANEL_PATH}?job={job}"),
        None => PANEL_PATH.to_owned(),
    };
    html! {
        section #background-work .panel aria-labelledby="background-work-title" data-refresh-from=(refresh) {
            h2 #background-work-title { "Background work" }
            @match &work.last_trim {
                None => p { "No trim has been enqueued yet." }
                Some(job) => {
                    dl.facts #last-trim data-job-id=(job.id) data-state=(job.state) {
                        dt { "Last trim" }
                        dd {
                            code.job-id { (job.id) }
                            @if this_job == Some(job.id.as_str()) { " " span.badge { "this view's" } }
                        }
                        dt { "State" }
                        dd {
                            span class={ "state " (job.state) } { (job.state) }
                            " attempt " (job.attempts) " of " (job.max_attempts)
                        }
                        dt { "When" }
                        dd {
                            @if let Some(done) = job.done_at.filter(|_| job.state != "pending") {
                                "ran " (timestamp(done, now))
                            } @else {
                                "due " (timestamp(job.run_at, now))
                            }
                        }
                        dt { "Deleted" }
                        dd #last-trim-deleted {
                            @if let Some(plan) = work.last_outcome().and_then(|o| o.planned) {
                                span.planned {
                                    (plan.visits) " visits, in a workflow of " (plan.chunks) " chunk steps ("
                                    code { (plan.workflow) } ")"
                                }
                            } @else if let Some(why) = work.last_outcome().and_then(|o| o.not_approved) {
                                span.not-approved data-deleted="0" {
                                    "nothing: "
                                    @match why {
                                        NotApproved::Rejected => "an operator rejected the trim",
                                        NotApproved::TimedOut => "no operator approved the trim in time",
                                        NotApproved::LeftTo(other) => { "left to trim " code { (other) } ", which waits for an approval" }
                                    }
                                }
                            } @else if let Some(outcome) = work.last_outcome() {
                                @let ids: Vec<String> = outcome.ids.iter().map(i64::to_string).collect();
                                span data-deleted=(outcome.deleted) data-ids=(ids.join(",")) {
                                    (outcome.deleted) @if outcome.deleted == 1 { " visit" } @else { " visits" }
                                    @if !ids.is_empty() { ": " (ids.join(", ")) }
                                    @if outcome.deleted > ids.len() { " (and " (outcome.deleted - ids.len()) " more)" }
                                }
                            } @else if let Some(error) = job.last_error() {
                                span.error { "nothing yet: " (error) }
                            } @else {
                                "not run yet"
                            }
                        }
                    }
                }
            }
            @if let Some(waiting) = &work.awaiting_approval {
                p.approval #trim-approval data-job-id=(waiting.id) {
                    "Trim " code { (waiting.id) } " is waiting for an operator's approval: it would delete more visits than "
                    code { "TRIM_APPROVAL_ABOVE" } " allows. Approve or reject it on its "
                    a href=(format!("/admin/jobs/{}", waiting.id)) { "dashboard page" } "."
                }
            }
            p.queue #trim-queue {
                "Queue: "
                span data-count="waiting" { (work.queue.waiting) } " waiting · "
                span data-count="running" { (work.queue.running) } " running · "
                span data-count="retrying" { (work.queue.retrying) } " retrying"
            }
        }
    }
}
