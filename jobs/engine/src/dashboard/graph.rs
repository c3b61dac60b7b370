//! The workflow page's graph, drawn on the server as SVG: steps as boxes
//! coloured by state, in columns by depth (a step stands right of every step
//! it depends on), dependencies as arrows, durable waits marked with a dashed
//! border and what they wait for.
//!
//! Hand-written: a layered layout of a DAG is short, where a graph-layout
//! crate would bring a general layout engine (or a Graphviz binary) for
//! this one picture.

use std::collections::HashMap;

use maud::{Markup, html};

use super::job_page_path;
use crate::admin::{StepView, WorkflowView};

const BOX_WIDTH: u32 = 168;
const BOX_HEIGHT: u32 = 46;
const COLUMN_GAP: u32 = 56;
const ROW_GAP: u32 = 12;
const MARGIN: u32 = 8;
/// Boxes drawn per column; the rest of a wide fan-out share one box.
const ROWS_SHOWN: usize = 12;
/// Characters of a step name that fit in a box.
const NAME_CHARS: usize = 20;

/// Fill and border of a box in `state` (presentation attributes: an app's
/// stylesheet may override them through the classes).
fn colours(state: &str) -> (&'static str, &'static str) {
    match state {
        "done" => ("#dcf5e3", "#2f8f4e"),
        "dead" | "cancelled" => ("#fbe0e0", "#b3261e"),
        "running" | "claimed" => ("#dbe9ff", "#1f5fbf"),
        "sleeping" | "scheduled" => ("#fff4d6", "#a66a00"),
        _ => ("#eef0f3", "#5b6673"),
    }
}

/// What a box says under its name: the state, or what a suspended step waits for.
fn caption(step: &StepView) -> String {
    match step
        .suspended_for
        .as_deref()
        .and_then(|s| s.split_once(':'))
    {
        Some(("sleep", name)) => format!("sleeping ({name})"),
        Some(("signal", name)) => format!("waits for signal {name}"),
        Some(("child", _)) => "waits for its child".to_owned(),
        _ if step.state == "waiting" => "waits for its dependencies".to_owned(),
        _ => step.state.clone(),
    }
}

/// Where each drawn box is, and the boxes that stand for many steps.
struct Layout<'a> {
    /// Step name -> (column, row) of its box (a hidden step: its column's
    /// "more" box).
    place: HashMap<&'a str, (usize, usize)>,
    /// Per column: the steps drawn, and how many more share the last box.
    columns: Vec<(Vec<&'a StepView>, usize)>,
}

fn layout(workflow: &WorkflowView) -> Layout<'_> {
    // Steps are stored in the order they were added, and a step can only
    // depend on steps added before it; a few passes settle any other order.
    let mut depth: HashMap<&str, usize> = HashMap::new();
    for _ in 0..workflow.steps.len().min(64) {
        let mut changed = false;
        for step in &workflow.steps {
            let d = step
                .depends_on
                .iter()
                .filter_map(|dependency| depth.get(dependency.as_str()))
                .map(|d| d + 1)
                .max()
                .unwrap_or(0);
            if depth.insert(&step.name, d) != Some(d) {
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    let mut columns: Vec<(Vec<&StepView>, usize)> = Vec::new();
    let mut place = HashMap::new();
    for step in &workflow.steps {
        let column = depth.get(step.name.as_str()).copied().unwrap_or(0);
        if columns.len() <= column {
            columns.resize_with(column + 1, || (Vec::new(), 0));
        }
        let (shown, more) = &mut columns[column];
        if shown.len() < ROWS_SHOWN {
            place.insert(step.name.as_str(), (column, shown.len()));
            shown.push(step);
        } else {
            place.insert(step.name.as_str(), (column, ROWS_SHOWN));
            *more += 1;
        }
    }
    Layout { place, columns }
}

fn x_of(column: usize) -> u32 {
    MARGIN + u32::try_from(column).unwrap_or(u32::MAX / 2) * (BOX_WIDTH + COLUMN_GAP)
}

fn y_of(row: usize) -> u32 {
    MARGIN + u32::try_from(row).unwrap_or(u32::MAX / 2) * (BOX_HEIGHT + ROW_GAP)
}

fn short_name(name: &str) -> String {
    match name.char_indices().nth(NAME_CHARS) {
        Some((cut, _)) => format!("{}…", &name[..cut]),
        None => name.to_owned(),
    }
}

/// The graph of `workflow`'s steps; links to step jobs under `prefix`.
pub(super) fn workflow_graph(prefix: &str, workflow: &WorkflowView) -> Markup {
    let Layout { place, columns } = layout(workflow);
    let rows = columns
        .iter()
        .map(|(shown, more)| shown.len() + usize::from(*more > 0))
        .max()
        .unwrap_or(0);
    let width = x_of(columns.len()) - COLUMN_GAP + MARGIN;
    let height = y_of(rows) - ROW_GAP + MARGIN;
    // One arrow per (dependency box, step box): the steps a "more" box
    // stands for share arrows.
    let mut arrows: Vec<((usize, usize), (usize, usize))> = Vec::new();
    for step in &workflow.steps {
        let Some(&to) = place.get(step.name.as_str()) else {
            continue;
        };
        for dependency in &step.depends_on {
            if let Some(&from) = place.get(dependency.as_str())
                && !arrows.contains(&(from, to))
            {
                arrows.push((from, to));
            }
        }
    }
    html! {
        figure.workflow-graph #workflow-graph {
            svg xmlns="http://www.w3.org/2000/svg" role="img" width=(width) height=(height)
                viewBox=(format!("0 0 {width} {height}"))
                aria-label=(format!("the workflow's {} steps and their dependencies", workflow.steps.len())) {
                defs {
                    marker #workflow-arrow viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse" {
                        path d="M 0 0 L 10 5 L 0 10 z" fill="#5b6673" {}
                    }
                }
                @for ((from_column, from_row), (to_column, to_row)) in &arrows {
                    @let (x1, y1) = (x_of(*from_column) + BOX_WIDTH, y_of(*from_row) + BOX_HEIGHT / 2);
                    @let (x2, y2) = (x_of(*to_column), y_of(*to_row) + BOX_HEIGHT / 2);
                    @let bend = COLUMN_GAP / 2;
                    path.dependency d=(format!("M {x1} {y1} C {} {y1}, {} {y2}, {x2} {y2}", x1 + bend, x2.saturating_sub(bend)))
                        fill="none" stroke="#5b6673" stroke-width="1.2" marker-end="url(#workflow-arrow)" {}
                }
                @for (column, (shown, more)) in columns.iter().enumerate() {
                    @for (row, step) in shown.iter().enumerate() {
                        @let (fill, stroke) = colours(&step.state);
                        @let suspended = step.suspended_for.is_some();
                        @let (x, y) = (x_of(column), y_of(row));
                        g.step data-step=(step.name) data-state=(step.state) data-suspended=[step.suspended_for.as_deref()] {
                            title { (step.name) ": " (caption(step)) }
                            @let shape = html! {
                                rect x=(x) y=(y) width=(BOX_WIDTH) height=(BOX_HEIGHT) rx="6"
                                    fill=(fill) stroke=(stroke) stroke-width=(if suspended { "2" } else { "1.2" })
                                    stroke-dasharray=[suspended.then_some("5 3")] {}
                                text x=(x + 10) y=(y + 19) font-size="13" font-weight="600" fill="#1d232b" { (short_name(&step.name)) }
                                text x=(x + 10) y=(y + 36) font-size="11" fill="#3b4450" { (caption(step)) }
                            };
                            @if step.released_at.is_some() {
                                a href=(job_page_path(prefix, &step.job_id)) { (shape) }
                            } @else { (shape) }
                        }
                    }
                    @if *more > 0 {
                        @let (x, y) = (x_of(column), y_of(shown.len()));
                        g.step.more data-more=(more) {
                            rect x=(x) y=(y) width=(BOX_WIDTH) height=(BOX_HEIGHT) rx="6" fill="#f6f7f9" stroke="#5b6673" stroke-dasharray="2 2" {}
                            text x=(x + 10) y=(y + 28) font-size="12" fill="#3b4450" { "… and " (more) " more steps" }
                        }
                    }
                }
            }
            figcaption { "Steps left to right in dependency order; dashed: a step's job is suspended (sleeping, or waiting for a signal or a child)." }
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;

    fn step(name: &str, depends_on: &[&str], state: &str) -> StepView {
        StepView {
            name: name.to_owned(),
            job_id: format!("job-{name}"),
            job_type: "q".to_owned(),
            depends_on: depends_on.iter().map(|d| (*d).to_owned()).collect(),
            on_dependency_failure: "cancel".to_owned(),
            state: state.to_owned(),
            attempts: 0,
            max_attempts: 1,
            added_at: Utc::now(),
            released_at: None,
            started_at: None,
            finished_at: None,
            result: None,
            error: None,
            suspended_for: None,
        }
    }

    fn workflow(steps: Vec<StepView>) -> WorkflowView {
        WorkflowView {
            id: "w".to_owned(),
            name: "w".to_owned(),
            key: None,
            created_at: Utc::now(),
            cancel_requested_at: None,
            parent_id: None,
            steps,
        }
    }

    #[test]
    fn steps_stand_right_of_what_they_depend_on_and_wide_columns_fold() {
        let mut steps = vec![step("plan", &[], "done")];
        let chunks: Vec<String> = (0..20).map(|n| format!("chunk-{n}")).collect();
        for chunk in &chunks {
            steps.push(step(chunk, &["plan"], "running"));
        }
        let names: Vec<&str> = chunks.iter().map(String::as_str).collect();
        steps.push(step("summary", &names, "waiting"));
        let workflow = workflow(steps);
        let Layout { place, columns } = layout(&workflow);
        assert_eq!(place["plan"], (0, 0));
        assert_eq!(place["chunk-0"], (1, 0));
        assert_eq!(place["chunk-19"], (1, ROWS_SHOWN));
        assert_eq!(place["summary"], (2, 0));
        assert_eq!(columns[1].1, 20 - ROWS_SHOWN, "the rest share a box");
        let svg = workflow_graph("/admin", &workflow).into_string();
        assert_eq!(
            svg.matches("class=\"dependency\"").count(),
            ROWS_SHOWN + 1 + ROWS_SHOWN + 1
        );
        assert!(svg.contains("… and 8 more steps"), "{svg}");
        assert!(svg.contains("waits for its dependencies"), "{svg}");
    }

    #[test]
    fn a_suspended_step_is_dashed_and_says_what_it_waits_for() {
        let mut waiting = step("approve", &[], "waiting");
        waiting.suspended_for = Some("signal:approval".to_owned());
        let svg = workflow_graph("/admin", &workflow(vec![waiting])).into_string();
        assert!(svg.contains("stroke-dasharray=\"5 3\""), "{svg}");
        assert!(svg.contains("waits for signal approval"), "{svg}");
    }
}
