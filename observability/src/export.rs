//! Reading the standard `OTEL_*` variables into exporters.

use std::env;

use opentelemetry_otlp::{LogExporter, SpanExporter};
use opentelemetry_sdk::{Resource, logs::SdkLoggerProvider, trace::SdkTracerProvider};

use crate::Error;

/// Which signals are exported, and where, as the environment asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    /// `service.name` on every span and log record.
    pub service_name: String,
    /// Export spans over OTLP.
    pub traces: bool,
    /// Export log records over OTLP.
    pub logs: bool,
    /// `grpc`, `http/protobuf` (the default) or `http/json`.
    pub protocol: String,
    /// Where to, for the startup line (the exporters read the variables themselves).
    pub endpoint: String,
}

fn var(name: &str) -> Option<String> {
    env::var(name)
        .ok()
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// `OTEL_TRACES_EXPORTER` / `OTEL_LOGS_EXPORTER`: `otlp` (default) or `none`.
fn exporter_enabled(variable: &'static str) -> Result<bool, Error> {
    match var(variable)
        .as_deref()
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        None | Some("otlp") => Ok(true),
        Some("none") => Ok(false),
        Some(other) => Err(Error::Unsupported {
            variable,
            value: other.to_owned(),
            supported: "otlp or none",
        }),
    }
}

impl Export {
    /// Reads the environment. Export is on only when an OTLP endpoint is set
    /// (`OTEL_EXPORTER_OTLP_ENDPOINT`, or the per-signal `…_TRACES_ENDPOINT` /
    /// `…_LOGS_ENDPOINT`) and `OTEL_SDK_DISABLED` is not `true`.
    pub fn from_env(default_service_name: &str) -> Result<Self, Error> {
        let service_name = var("OTEL_SERVICE_NAME")
            .or_else(|| {
                var("OTEL_RESOURCE_ATTRIBUTES")?
                    .split(',')
                    .filter_map(|pair| pair.split_once('='))
                    .find(|(key, _)| key.trim() == "service.name")
                    .map(|(_, value)| value.trim().to_owned())
            })
            .unwrap_or_else(|| default_service_name.to_owned());
        let disabled = var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let base = var("OTEL_EXPORTER_OTLP_ENDPOINT");
        let traces_endpoint = var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| base.clone());
        let logs_endpoint = var("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT").or_else(|| base.clone());
        let protocol =
            var("OTEL_EXPORTER_OTLP_PROTOCOL").unwrap_or_else(|| "http/protobuf".to_owned());
        if !matches!(protocol.as_str(), "http/protobuf" | "grpc") {
            return Err(Error::Unsupported {
                variable: "OTEL_EXPORTER_OTLP_PROTOCOL",
                value: protocol,
                supported: "http/protobuf or grpc",
            });
        }
        let traces =
            !disabled && traces_endpoint.is_some() && exporter_enabled("OTEL_TRACES_EXPORTER")?;
        let logs = !disabled && logs_endpoint.is_some() && exporter_enabled("OTEL_LOGS_EXPORTER")?;
        let endpoint = base
            .or(traces_endpoint)
            .or(logs_endpoint)
            .unwrap_or_default();
        Ok(Self {
            service_name,
            traces,
            logs,
            protocol,
            endpoint,
        })
    }

    /// The providers for the enabled signals (batching, on their own threads).
    pub fn providers(
        &self,
    ) -> Result<(Option<SdkTracerProvider>, Option<SdkLoggerProvider>), Error> {
        let resource = Resource::builder()
            .with_service_name(self.service_name.clone())
            .with_attribute(opentelemetry::KeyValue::new(
                "service.version",
                env!("CARGO_PKG_VERSION"),
            ))
            .build();
        let tracer = if self.traces {
            // The builders read OTEL_EXPORTER_OTLP_* (protocol, endpoint,
            // headers, timeout) themselves, as the specification says.
            let exporter = SpanExporter::builder().build()?;
            Some(
                SdkTracerProvider::builder()
                    .with_resource(resource.clone())
                    .with_batch_exporter(exporter)
                    .build(),
            )
        } else {
            None
        };
        let logger = if self.logs {
            let exporter = LogExporter::builder().build()?;
            Some(
                SdkLoggerProvider::builder()
                    .with_resource(resource)
                    .with_batch_exporter(exporter)
                    .build(),
            )
        } else {
            None
        };
        Ok((tracer, logger))
    }

    /// One line for the startup log: where telemetry goes.
    pub fn describe(&self) -> String {
        let signals = match (self.traces, self.logs) {
            (true, true) => "traces and logs",
            (true, false) => "traces (OTLP logs off)",
            (false, true) => "logs (OTLP traces off)",
            (false, false) => {
                return "logs to stdout; OTLP export off (set OTEL_EXPORTER_OTLP_ENDPOINT to export)".to_owned();
            }
        };
        format!(
            "logs to stdout; OTLP {signals} to {} over {}",
            self.endpoint, self.protocol
        )
    }
}
