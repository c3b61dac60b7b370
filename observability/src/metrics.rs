//! Prometheus metrics: one recorder per process, rendered on `/metrics`.

use std::{net::SocketAddr, sync::OnceLock};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Buckets (seconds) for request and job durations.
const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

fn builder() -> PrometheusBuilder {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), DURATION_BUCKETS)
        .expect("the bucket list is not empty")
}

/// The process's metrics recorder, installed on first use; render it with
/// [`PrometheusHandle::render`]. Later calls return the same handle.
pub fn handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = builder().build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder is installed, which we never do.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Installs the recorder with its own HTTP listener serving `/metrics` on
/// `address` (for processes without a web server, like `worker`).
pub fn serve(address: SocketAddr) -> Result<(), crate::Error> {
    builder()
        .with_http_listener(address)
        .install()
        .map_err(|err| crate::Error::Metrics(err.to_string()))
}
