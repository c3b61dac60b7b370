//! The job page's durable-execution parts: what a suspended job waits for
//! (with a person's answers to a `wait_for_choice` as buttons), its
//! checkpoints with their results, its parent and its children.

use maud::{Markup, html};

use super::{job_action_path, job_page_path, short_json, timestamp, workflow_page_path};
use crate::admin::{CheckpointView, JobDetail, JobSummary, Suspension, WorkflowSummary};

/// Rows of the job's facts: what it waits for and until when, its parent.
pub(super) fn facts(
    prefix: &str,
    job: &JobDetail,
    checkpoints: &[CheckpointView],
    child_workflows: &[WorkflowSummary],
    csrf: Option<&str>,
) -> Markup {
    html! {
        @if let Some(suspension) = job.suspension() {
            dt { "Waiting for" }
            dd #job-suspension data-suspended-for=(job.suspended_for.as_deref().unwrap_or_default()) {
                @match suspension {
                    Suspension::Sleep(name) => { "its sleep " code { (name) } " to end, " (timestamp(job.run_at)) }
                    Suspension::Signal(name) => {
                        "signal " code { (name) } ", until " (timestamp(job.run_at))
                        @if let Some(wait) = checkpoints.iter().find(|c| c.kind == "wait" && c.name == name) {
                            (answers(prefix, &job.id, wait, csrf))
                        }
                    }
                    Suspension::Child(child) if child_workflows.iter().any(|workflow| workflow.id == child) => {
                        "its child workflow " a href=(workflow_page_path(prefix, child)) { code { (child) } } " to end"
                    }
                    Suspension::Child(child) => {
                        "its child " a href=(job_page_path(prefix, child)) { code { (child) } } " to end"
                    }
                }
            }
        }
        @if let Some(parent) = &job.parent_id {
            dt { "Parent" } dd { a #job-parent-link href=(job_page_path(prefix, parent)) { code { (parent) } } }
        }
    }
}

/// One button per choice of a wait a person answers.
fn answers(prefix: &str, id: &str, wait: &CheckpointView, csrf: Option<&str>) -> Markup {
    html! {
        @for label in wait.choices() {
            form.inline.answer method="post" action=(job_action_path(prefix, id, "answer")) {
                @if let Some(csrf) = csrf { input type="hidden" name="csrf" value=(csrf); }
                input type="hidden" name="wait" value=(wait.name);
                button type="submit" name="choice" value=(label) { (label) }
            }
        }
    }
}

/// The checkpoints and children sections (nothing for a job without).
pub(super) fn sections(
    prefix: &str,
    checkpoints: &[CheckpointView],
    children: &[JobSummary],
    child_workflows: &[WorkflowSummary],
) -> Markup {
    html! {
        @if !checkpoints.is_empty() {
            h2 { "Checkpoints" }
            div.scroll tabindex="0" { table.grid #job-checkpoints {
                thead { tr { th { "name" } th { "kind" } th { "recorded" } th { "value" } } }
                tbody {
                    @for checkpoint in checkpoints {
                        tr data-checkpoint=(checkpoint.name) data-kind=(checkpoint.kind) {
                            td { code { (checkpoint.name) } }
                            td title=(checkpoint.value_type) { (checkpoint.kind) }
                            td { (timestamp(checkpoint.created_at)) }
                            td { code { (short_json(&checkpoint.value)) } }
                        }
                    }
                }
            } }
        }
        @if !children.is_empty() || !child_workflows.is_empty() {
            h2 { "Children" }
            ul #job-children {
                @for workflow in child_workflows {
                    li data-workflow-id=(workflow.id) {
                        "workflow " a href=(workflow_page_path(prefix, &workflow.id)) { code { (workflow.id) } }
                        " " (workflow.name) ": " (workflow.done) " of " (workflow.steps) " steps done"
                        @if workflow.failed > 0 { ", " (workflow.failed) " failed" }
                    }
                }
                @for child in children {
                    li data-job-id=(child.id) data-state=(child.state.as_str()) {
                        a href=(job_page_path(prefix, &child.id)) { code { (child.id) } }
                        " " code { (child.queue) } " "
                        span class={ "state " (child.state.as_str()) } { (child.state.as_str()) }
                    }
                }
            }
        }
    }
}
