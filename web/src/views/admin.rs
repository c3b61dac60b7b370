//! The jobs dashboard (`/admin`) and its login page.

use jobs::admin::{HourStats, JobSummary, STATES, StateCount};
use maud::{Markup, html};

use super::{components::timestamp, layout};

/// What the dashboard shows, loaded by the handler.
#[derive(Debug, Clone)]
pub struct Dashboard {
    /// Jobs per queue and state.
    pub counts: Vec<StateCount>,
    /// Finished in the last hour, per queue.
    pub last_hour: Vec<HourStats>,
    /// The newest jobs.
    pub latest: Vec<JobSummary>,
    /// The CSRF token for the action forms.
    pub csrf: String,
    /// The result of the last action, if any.
    pub notice: Option<String>,
}

/// The page shown when `ADMIN_TOKEN` is not set.
pub fn disabled() -> Markup {
    layout::page(
        "Jobs dashboard disabled",
        html! {
            h1 { "Jobs dashboard disabled" }
            p.note { "The dashboard is off because no " code { "ADMIN_TOKEN" } " is set. Start "
                code { "web" } " with " code { "ADMIN_TOKEN=<a long random secret>" } " to enable it." }
        },
    )
}

/// The login form, with an optional error line.
pub fn login(error: Option<&str>) -> Markup {
    layout::page(
        "Jobs dashboard: sign in",
        html! {
            h1 { "Jobs dashboard" }
            @if let Some(error) = error { p.note.error { (error) } }
            form.login method="post" action="/admin/login" {
                label for="token" { "Admin token" }
                input #token type="password" name="token" autocomplete="current-password" required autofocus;
                button type="submit" { "Sign in" }
            }
        },
    )
}

/// The dashboard itself.
pub fn dashboard(data: &Dashboard) -> Markup {
    let mut queues: Vec<&str> = data.counts.iter().map(|c| c.queue.as_str()).collect();
    queues.dedup();
    let count = |queue: &str, state: &str| {
        data.counts
            .iter()
            .find(|c| c.queue == queue && c.state == state)
            .map_or(0, |c| c.count)
    };
    layout::page(
        "Jobs dashboard",
        html! {
            div.titlebar {
                h1 { "Jobs dashboard" }
                form method="post" action="/admin/logout" { button.link type="submit" { "Sign out" } }
            }
            @if let Some(notice) = &data.notice { p.note #notice { (notice) } }
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
                    @for stats in &data.last_hour {
                        tr { td { code { (stats.queue) } } td.num { (stats.done) } td.num { (stats.dead) } td.num { (stats.retrying) } }
                    }
                    @if data.last_hour.is_empty() { tr { td colspan="4" { "Nothing finished in the last hour." } } }
                }
            }
            h2 { "Latest jobs" }
            table.grid #latest-jobs {
                thead { tr { th { "job" } th { "queue" } th { "state" } th { "attempts" } th { "run at" } th { "last error" } th {} } }
                tbody {
                    @for job in &data.latest {
                        tr data-job-id=(job.id) data-state=(job.state) {
                            td { code { (job.id) } }
                            td { (job.queue) }
                            td { span class={ "state " (job.state) } { (job.state) } }
                            td.num { (job.attempts) " / " (job.max_attempts) }
                            td { @if let Some(at) = job.run_at { (timestamp(at)) } }
                            td.error { (job.last_error.as_deref().unwrap_or("")) }
                            td.actions {
                                @if job.state == "dead" { (action(&job.id, "retry", "Retry", &data.csrf)) }
                                @if job.state == "pending" || job.state == "scheduled" { (action(&job.id, "cancel", "Cancel", &data.csrf)) }
                            }
                        }
                    }
                }
            }
        },
    )
}

fn action(id: &str, action: &str, label: &str, csrf: &str) -> Markup {
    html! {
        // The id percent-encoded: a path segment, whatever a job row holds.
        form.inline method="post" action=(crate::routes::admin::job_path(id, action)) {
            input type="hidden" name="csrf" value=(csrf);
            button type="submit" name="action" value=(action) { (label) }
        }
    }
}
