//! The CONSUMER span around each attempt of a job.
//!
//! The span continues the trace stored with the job at enqueue (`traceparent`
//! in the row's metadata): it is the enqueue span's child and also links to
//! it, as the OpenTelemetry messaging conventions ask. So Jaeger shows one
//! trace from the HTTP request through the enqueue to every attempt, each
//! attempt a separate span with its `job.attempt`.

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use apalis::prelude::{BoxDynError, Task};
use tower::{Layer, Service};
use tracing::Instrument as _;

use crate::{
    backend::storage::AttemptTrace,
    durable::PREVIOUS_RUN_KEY,
    workflow::{WORKFLOW_ID_KEY, WORKFLOW_LINKS_KEY, WORKFLOW_STEP_KEY},
};

/// Wraps a worker's service with [`JobSpan`].
#[derive(Debug, Clone, Copy)]
pub struct JobSpanLayer {
    queue: &'static str,
}

impl JobSpanLayer {
    /// Spans are named `process <queue>`.
    pub fn new(queue: &'static str) -> Self {
        Self { queue }
    }
}

impl<S> Layer<S> for JobSpanLayer {
    type Service = JobSpan<S>;
    fn layer(&self, inner: S) -> JobSpan<S> {
        JobSpan {
            inner,
            queue: self.queue,
        }
    }
}

/// The service installed by [`JobSpanLayer`].
#[derive(Debug, Clone)]
pub struct JobSpan<S> {
    inner: S,
    queue: &'static str,
}

impl<S, Args> Service<Task<Args>> for JobSpan<S>
where
    S: Service<Task<Args>>,
    S::Future: Send + 'static,
    S::Error: Into<BoxDynError>,
{
    type Response = S::Response;
    type Error = BoxDynError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxDynError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxDynError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, task: Task<Args>) -> Self::Future {
        let ctx = task.ctx();
        let job_id = ctx.task_id().map(ToString::to_string).unwrap_or_default();
        // apalis counts the attempt when the handler first runs, just inside us.
        let attempt = ctx.attempt() + 1;
        let queue = self.queue;
        let span = tracing::info_span!(
            "process",
            otel.name = format!("process {queue}"),
            otel.kind = "consumer",
            messaging.system = "apalis",
            messaging.operation.type = "process",
            messaging.operation.name = "process",
            messaging.destination.name = queue,
            messaging.message.id = %job_id,
            job.id = %job_id,
            job.attempt = attempt,
            workflow.id = tracing::field::Empty,
            workflow.step = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
            otel.status_description = tracing::field::Empty,
        );
        let carrier: HashMap<String, String> = ["traceparent", "tracestate"]
            .into_iter()
            .filter_map(|key| Some((key.to_owned(), ctx.metadata().get(key)?.to_owned())))
            .collect();
        // Before the span is entered: a started span cannot change its parent.
        observability::extract_into(&span, &carrier);
        // A durable job resumed after a sleep or wait: linked to the run that
        // suspended it (all its runs are children of the enqueue's span).
        if let Some(previous) = ctx.metadata().get(PREVIOUS_RUN_KEY) {
            observability::link_traceparents(&span, [previous]);
        }
        // A workflow step: its dependencies' spans are its links (a fan-in's many).
        if let Some(workflow) = ctx.metadata().get(WORKFLOW_ID_KEY) {
            span.record("workflow.id", workflow);
            if let Some(step) = ctx.metadata().get(WORKFLOW_STEP_KEY) {
                span.record("workflow.step", step);
            }
            if let Some(links) = ctx.metadata().get(WORKFLOW_LINKS_KEY) {
                observability::link_traceparents(&span, links.split(','));
            }
        }
        let run = {
            let _entered = span.enter();
            // A workflow step's attempt: its span's traceparent goes with
            // its result to the settle, for its dependents' links.
            if let Some(trace) = ctx.data().get::<AttemptTrace>()
                && let Some(traceparent) = observability::inject_current().remove("traceparent")
            {
                let _ = trace.0.set(traceparent);
            }
            self.inner.call(task)
        };
        Box::pin(
            async move {
                let result = run.await.map_err(Into::into);
                if let Err(error) = &result {
                    let current = tracing::Span::current();
                    current.record("otel.status_code", "error");
                    current.record("otel.status_description", error.to_string());
                }
                result
            }
            .instrument(span),
        )
    }
}
