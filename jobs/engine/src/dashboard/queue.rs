//! The dashboard's queue page, `GET <prefix>/queues/<queue>`: the queue's
//! state (running or paused), the limits in force beside the declared ones,
//! its waiting, scheduled and running jobs, and its last hour minute by
//! minute (jobs started and finished, and the wait from due to start, p50
//! and p95) as two server-drawn SVG charts, with the operator's actions:
//! pause or resume, purge the waiting jobs, override the limits or go back
//! to the declared ones (`POST <prefix>/queues/<queue>/<action>`).

use std::{fmt::Write as _, sync::Arc};

use axum::{
    Extension, Form,
    extract::{NestedPath, Path, Query, State},
    http::StatusCode,
    response::{IntoResponse, Redirect, Response},
};
use maud::{Markup, html};
use percent_encoding::utf8_percent_encode;
use serde::Deserialize;

use super::{
    Csrf, Dashboard, PATH_SEGMENT, bad_request, holds_nul, overview_path, refuse_without_csrf,
    unavailable,
};
use crate::{
    admin::{self, QueueMinute, QueueView},
    limits::{Limits, Rate},
};

/// The path of `queue`'s page under `prefix`, the name percent-encoded.
pub(super) fn queue_page_path(prefix: &str, queue: &str) -> String {
    format!(
        "{prefix}/queues/{}",
        utf8_percent_encode(queue, PATH_SEGMENT)
    )
}

/// What an action on the queue page did, carried back to it as a code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QueueNotice {
    Paused,
    Resumed,
    Purged,
    LimitsSet,
    LimitsReset,
}

impl QueueNotice {
    const ALL: [QueueNotice; 5] = [
        QueueNotice::Paused,
        QueueNotice::Resumed,
        QueueNotice::Purged,
        QueueNotice::LimitsSet,
        QueueNotice::LimitsReset,
    ];

    fn code(self) -> &'static str {
        match self {
            QueueNotice::Paused => "paused",
            QueueNotice::Resumed => "resumed",
            QueueNotice::Purged => "purged",
            QueueNotice::LimitsSet => "limits-set",
            QueueNotice::LimitsReset => "limits-reset",
        }
    }

    fn text(self) -> &'static str {
        match self {
            QueueNotice::Paused => "Paused: its claims start nothing until it is resumed.",
            QueueNotice::Resumed => "Resumed.",
            QueueNotice::Purged => {
                "Purged: its waiting jobs are dead (reason: purged by an operator)."
            }
            QueueNotice::LimitsSet => "Limits set: they replace the declared ones until reset.",
            QueueNotice::LimitsReset => "Limits back to the declared ones.",
        }
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct QueueNoticeQuery {
    notice: Option<String>,
}

pub(super) async fn queue_page(
    State(dashboard): State<Arc<Dashboard>>,
    prefix: NestedPath,
    csrf: Option<Extension<Csrf>>,
    Path(queue): Path<String>,
    Query(query): Query<QueueNoticeQuery>,
) -> Response {
    if holds_nul([Some(queue.as_str())]) {
        return bad_request(&dashboard);
    }
    let view = match admin::queue_view(&dashboard.pool, &queue).await {
        Ok(view) => view,
        Err(err) => return unavailable(&dashboard, &err),
    };
    let notice = query
        .notice
        .as_deref()
        .and_then(|code| QueueNotice::ALL.into_iter().find(|n| n.code() == code));
    let csrf = csrf.map(|Extension(Csrf(token))| token);
    let prefix = prefix.as_str();
    let body = html! {
        @if let Some(notice) = notice { p.note #notice { (notice.text()) } }
        div #queue-page data-queue=(queue) data-refresh-from=(queue_page_path(prefix, &queue)) {
            (render_queue(prefix, &queue, &view, csrf.as_deref()))
        }
    };
    (dashboard.layout)(&format!("Queue {queue}"), body).into_response()
}

fn render_queue(prefix: &str, queue: &str, view: &QueueView, csrf: Option<&str>) -> Markup {
    let controls = &view.controls;
    let state = if controls.paused { "paused" } else { "running" };
    html! {
        p { a href=(overview_path(prefix)) { "All queues" } }
        dl.facts #queue-facts data-state=(state) {
            dt { "State" }
            dd { span class={ "state " (state) } #queue-state { (state) } }
            dt { "Limits in force" }
            dd #limits-in-force {
                (controls.in_force)
                @if controls.overridden { " (set by an operator)" } @else { " (as declared)" }
            }
            dt { "Declared" }
            dd #limits-declared { (controls.declared) }
            dt { "Jobs" }
            dd #queue-jobs {
                span data-count="waiting" { (view.waiting) } " waiting · "
                span data-count="scheduled" { (view.scheduled) } " scheduled · "
                span data-count="running" { (view.running) } " running"
            }
        }
        h2 { "Last hour" }
        (throughput_chart(&view.minutes))
        (wait_chart(&view.minutes))
        h2 { "Actions" }
        (actions(prefix, queue, view, csrf))
    }
}

/// The charts' drawing area: 60 columns of 10 units, plus margins.
const CHART_WIDTH: f64 = 640.0;
const CHART_HEIGHT: f64 = 160.0;
const LEFT: f64 = 40.0;
const TOP: f64 = 12.0;
const BOTTOM: f64 = 20.0;
const COLUMN: f64 = 10.0;

/// The y of `value` on a scale from 0 to `max`.
fn scale(value: f64, max: f64) -> f64 {
    let plot = CHART_HEIGHT - TOP - BOTTOM;
    TOP + plot - if max > 0.0 { value / max * plot } else { 0.0 }
}

/// The frame both charts share: baseline, the scale's top value, and the
/// time axis (an hour ago .. now).
fn frame(max_label: &str) -> Markup {
    let base = CHART_HEIGHT - BOTTOM;
    html! {
        line.axis x1=(LEFT) y1=(base) x2=(LEFT + 60.0 * COLUMN) y2=(base) stroke="#888" {}
        line.axis x1=(LEFT) y1=(TOP) x2=(LEFT) y2=(base) stroke="#888" {}
        text.tick x=(LEFT - 4.0) y=(TOP + 4.0) text-anchor="end" font-size="10" fill="#888" { (max_label) }
        text.tick x=(LEFT - 4.0) y=(base) text-anchor="end" font-size="10" fill="#888" { "0" }
        text.tick x=(LEFT) y=(CHART_HEIGHT - 4.0) font-size="10" fill="#888" { "60 min ago" }
        text.tick x=(LEFT + 60.0 * COLUMN) y=(CHART_HEIGHT - 4.0) text-anchor="end" font-size="10" fill="#888" { "now" }
    }
}

/// Jobs started and finished per minute: two bars a minute.
fn throughput_chart(minutes: &[QueueMinute]) -> Markup {
    let most = minutes
        .iter()
        .map(|m| m.started.max(m.finished))
        .max()
        .unwrap_or(0);
    let (started, finished): (i64, i64) = minutes
        .iter()
        .fold((0, 0), |(s, f), m| (s + m.started, f + m.finished));
    let max = most as f64;
    let base = CHART_HEIGHT - BOTTOM;
    let summary = format!(
        "Jobs per minute over the last hour: {started} started, {finished} finished; at most {most} in a minute."
    );
    html! {
        figure.chart #throughput-chart {
            svg viewBox={ "0 0 " (CHART_WIDTH) " " (CHART_HEIGHT) } role="img" aria-labelledby="throughput-title"
                data-started=(started) data-finished=(finished) {
                title #throughput-title { (summary) }
                (frame(&format!("{most}/min")))
                @for (i, minute) in minutes.iter().enumerate() {
                    @let x = LEFT + i as f64 * COLUMN + 1.0;
                    g.minute data-minute=(minute.minute.format("%H:%M")) {
                        title { (minute.minute.format("%H:%M")) ": " (minute.started) " started, " (minute.finished) " finished" }
                        @if minute.started > 0 {
                            rect.started x=(x) y=(scale(minute.started as f64, max)) width="4"
                                height=(base - scale(minute.started as f64, max)) fill="#2563eb" data-count=(minute.started) {}
                        }
                        @if minute.finished > 0 {
                            rect.finished x=(x + 4.0) y=(scale(minute.finished as f64, max)) width="4"
                                height=(base - scale(minute.finished as f64, max)) fill="#16a34a" data-count=(minute.finished) {}
                        }
                    }
                }
            }
            figcaption {
                span.key.started { "■" } " started · " span.key.finished { "■" } " finished, per minute"
            }
        }
    }
}

/// "12 ms", "3.4 s": a wait, readable.
fn wait_text(seconds: f64) -> String {
    if seconds < 1.0 {
        format!("{:.0} ms", seconds * 1000.0)
    } else {
        format!("{seconds:.1} s")
    }
}

/// The wait from due to start, p50 and p95 per minute: two lines, broken
/// where a minute started nothing.
fn wait_chart(minutes: &[QueueMinute]) -> Markup {
    let max = minutes
        .iter()
        .filter_map(|m| m.wait_p95)
        .fold(0.0_f64, f64::max);
    let line = |pick: fn(&QueueMinute) -> Option<f64>| {
        let mut path = String::new();
        let mut drawing = false;
        for (i, minute) in minutes.iter().enumerate() {
            match pick(minute) {
                Some(wait) => {
                    let x = LEFT + i as f64 * COLUMN + COLUMN / 2.0;
                    let command = if drawing { 'L' } else { 'M' };
                    let _ = write!(path, "{command}{x:.1},{:.1} ", scale(wait, max));
                    drawing = true;
                }
                None => drawing = false,
            }
        }
        path
    };
    let worst = minutes
        .iter()
        .filter_map(|m| m.wait_p95)
        .fold(None, |worst: Option<f64>, w| {
            Some(worst.map_or(w, |worst| worst.max(w)))
        });
    let summary = match worst {
        Some(worst) => format!(
            "Wait from due to start over the last hour, p50 and p95 per minute; the worst p95: {}.",
            wait_text(worst)
        ),
        None => "Wait from due to start over the last hour: no job started.".to_owned(),
    };
    html! {
        figure.chart #wait-chart {
            svg viewBox={ "0 0 " (CHART_WIDTH) " " (CHART_HEIGHT) } role="img" aria-labelledby="wait-title" {
                title #wait-title { (summary) }
                (frame(&wait_text(max)))
                path.p95 d=(line(|m| m.wait_p95)) fill="none" stroke="#dc2626" stroke-width="2" {}
                path.p50 d=(line(|m| m.wait_p50)) fill="none" stroke="#2563eb" stroke-width="2" {}
                @for (i, minute) in minutes.iter().enumerate() {
                    @if let (Some(p50), Some(p95)) = (minute.wait_p50, minute.wait_p95) {
                        @let x = LEFT + i as f64 * COLUMN;
                        @let middle = x + COLUMN / 2.0;
                        circle.p95 cx=(middle) cy=(scale(p95, max)) r="2.5" fill="#dc2626" {}
                        circle.p50 cx=(middle) cy=(scale(p50, max)) r="2.5" fill="#2563eb" {}
                        rect.hover x=(x) y=(TOP) width=(COLUMN) height=(CHART_HEIGHT - TOP - BOTTOM) fill="transparent" {
                            title { (minute.minute.format("%H:%M")) ": waited p50 " (wait_text(p50)) ", p95 " (wait_text(p95)) }
                        }
                    }
                }
            }
            figcaption {
                span.key.p50 { "━" } " p50 · " span.key.p95 { "━" } " p95 of the wait from due to start"
            }
        }
    }
}

fn action_form(
    prefix: &str,
    queue: &str,
    action: &str,
    csrf: Option<&str>,
    inner: Markup,
) -> Markup {
    html! {
        form.inline method="post" action={ (queue_page_path(prefix, queue)) "/" (action) } {
            @if let Some(csrf) = csrf { input type="hidden" name="csrf" value=(csrf); }
            (inner)
        }
    }
}

fn actions(prefix: &str, queue: &str, view: &QueueView, csrf: Option<&str>) -> Markup {
    let in_force = &view.controls.in_force;
    let value = |n: Option<u32>| n.map(|n| n.to_string()).unwrap_or_default();
    let rate = in_force.rate;
    html! {
        div.actions #queue-actions {
            @if view.controls.paused {
                (action_form(prefix, queue, "resume", csrf, html! { button type="submit" { "Resume" } }))
            } @else {
                (action_form(prefix, queue, "pause", csrf, html! { button type="submit" { "Pause" } }))
            }
            (action_form(prefix, queue, "purge", csrf, html! {
                button type="submit" { "Purge " (view.waiting + view.scheduled) " waiting jobs" }
            }))
        }
        form.limits #limits-form method="post" action={ (queue_page_path(prefix, queue)) "/limits" } {
            @if let Some(csrf) = csrf { input type="hidden" name="csrf" value=(csrf); }
            label { "concurrency " input type="number" name="concurrency" min="1" value=(value(in_force.concurrency)); }
            label { "rate per second " input type="number" name="rate" min="0.0003" step="any" value=(rate.map(|r| r.per_second.to_string()).unwrap_or_default()); }
            label { "burst " input type="number" name="burst" min="1" value=(value(rate.and_then(|r| r.burst))); }
            label { "key concurrency " input type="number" name="key_concurrency" min="1" value=(value(in_force.key_concurrency)); }
            button type="submit" { "Set limits" }
            " (empty: no limit of that kind)"
        }
        @if view.controls.overridden {
            (action_form(prefix, queue, "reset-limits", csrf, html! { button type="submit" { "Back to the declared limits" } }))
        }
    }
}

/// The limits form: each field empty (no limit of that kind) or a number.
#[derive(Debug, Deserialize)]
pub(super) struct LimitsForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    concurrency: String,
    #[serde(default)]
    rate: String,
    #[serde(default)]
    burst: String,
    #[serde(default)]
    key_concurrency: String,
}

impl LimitsForm {
    /// The limits the form says, or what is wrong with it.
    fn limits(&self) -> Result<Limits, String> {
        let count = |name: &str, value: &str| -> Result<Option<u32>, String> {
            match value.trim() {
                "" => Ok(None),
                value => match value.parse::<u32>() {
                    Ok(n) if n >= 1 => Ok(Some(n)),
                    _ => Err(format!("{name} must be a whole number from 1, or empty")),
                },
            }
        };
        let mut limits = Limits::none();
        if let Some(n) = count("concurrency", &self.concurrency)? {
            limits = limits.concurrency(n);
        }
        if let Some(n) = count("key concurrency", &self.key_concurrency)? {
            limits = limits.key_concurrency(n);
        }
        let burst = count("burst", &self.burst)?;
        match self.rate.trim() {
            "" if burst.is_some() => return Err("a burst needs a rate".to_owned()),
            "" => {}
            rate => match rate.parse::<f64>() {
                Ok(rate) if rate.is_finite() && rate >= 1.0 / 3600.0 => {
                    let mut rate = Rate::per_second(rate);
                    if let Some(burst) = burst {
                        rate = rate.burst(burst);
                    }
                    limits = limits.rate(rate);
                }
                _ => {
                    return Err(
                        "rate must be a number of jobs per second, at least 1 an hour".to_owned(),
                    );
                }
            },
        }
        Ok(limits)
    }
}

/// `POST <prefix>/queues/<queue>/<action>`: pause, resume, purge,
/// reset-limits (a plain form) or limits (the limits form); then back to
/// the queue page with a notice.
pub(super) async fn act_on_queue(
    State(dashboard): State<Arc<Dashboard>>,
    prefix: NestedPath,
    csrf: Option<Extension<Csrf>>,
    Path((queue, action)): Path<(String, String)>,
    Form(form): Form<LimitsForm>,
) -> Response {
    if holds_nul([Some(queue.as_str())]) {
        return bad_request(&dashboard);
    }
    if let Some(refused) = refuse_without_csrf(&dashboard, csrf, &form.csrf, &queue) {
        return refused;
    }
    let pool = &dashboard.pool;
    let done = match action.as_str() {
        "pause" => admin::pause(pool, &queue)
            .await
            .map(|()| QueueNotice::Paused),
        "resume" => admin::resume(pool, &queue)
            .await
            .map(|()| QueueNotice::Resumed),
        "purge" => admin::purge(pool, &queue)
            .await
            .map(|_| QueueNotice::Purged),
        "reset-limits" => admin::reset_limits(pool, &queue)
            .await
            .map(|()| QueueNotice::LimitsReset),
        "limits" => match form.limits() {
            Ok(limits) => admin::set_limits(pool, &queue, limits)
                .await
                .map(|()| QueueNotice::LimitsSet),
            Err(problem) => {
                return (
                    StatusCode::BAD_REQUEST,
                    (dashboard.layout)(
                        "Bad request",
                        html! { h1 { "Bad request" } p #form-problem { (problem) "." } p { a href=(queue_page_path(prefix.as_str(), &queue)) { "Back to the queue" } } },
                    ),
                )
                    .into_response();
            }
        },
        _ => {
            return (
                StatusCode::NOT_FOUND,
                (dashboard.layout)("Not found", html! { h1 { "Not found" } }),
            )
                .into_response();
        }
    };
    match done {
        Ok(notice) => {
            tracing::info!(queue = %queue, action = %action, "dashboard queue action");
            let location = format!(
                "{}?notice={}",
                queue_page_path(prefix.as_str(), &queue),
                notice.code()
            );
            Redirect::to(&location).into_response()
        }
        Err(err) => unavailable(&dashboard, &err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(concurrency: &str, rate: &str, burst: &str, key: &str) -> LimitsForm {
        LimitsForm {
            csrf: String::new(),
            concurrency: concurrency.to_owned(),
            rate: rate.to_owned(),
            burst: burst.to_owned(),
            key_concurrency: key.to_owned(),
        }
    }

    #[test]
    fn the_limits_form_reads_numbers_and_refuses_the_rest() {
        assert_eq!(form("", "", "", "").limits(), Ok(Limits::none()));
        assert_eq!(
            form("4", "10", "5", "1").limits(),
            Ok(Limits::none()
                .concurrency(4)
                .rate(Rate::per_second(10.0).burst(5))
                .key_concurrency(1))
        );
        for bad in [
            form("0", "", "", ""),
            form("-1", "", "", ""),
            form("x", "", "", ""),
        ] {
            assert!(bad.limits().is_err(), "{bad:?}");
        }
        assert!(form("", "NaN", "", "").limits().is_err());
        assert!(form("", "inf", "", "").limits().is_err());
        assert!(
            form("", "", "5", "").limits().is_err(),
            "a burst needs a rate"
        );
    }
}
