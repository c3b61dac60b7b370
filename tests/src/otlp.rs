//! A real OTLP/HTTP receiver (protobuf), in-process, for export tests.
//!
//! It decodes what the binaries' exporters send to `/v1/traces` and
//! `/v1/logs` with the official protobuf definitions and keeps it for
//! assertions. Nothing is mocked: the exporters, batching, encoding and
//! shutdown flush under test are the real ones.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use axum::{
    Router, body::Bytes, extract::State, http::header, response::IntoResponse, routing::post,
};
use opentelemetry_proto::tonic::{
    collector::{
        logs::v1::{ExportLogsServiceRequest, ExportLogsServiceResponse},
        trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse},
    },
    common::v1::{AnyValue, KeyValue, any_value::Value},
};
use prost::Message as _;

/// One received span, flattened.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    /// `service.name` of the exporting process.
    pub service: String,
    /// Hex trace id.
    pub trace_id: String,
    /// Hex span id.
    pub span_id: String,
    /// Hex parent span id ("" for a root).
    pub parent_span_id: String,
    /// Span name.
    pub name: String,
    /// OTLP kind: 2 server, 3 client, 4 producer, 5 consumer.
    pub kind: i32,
    /// Attributes, values as strings.
    pub attributes: HashMap<String, String>,
    /// `(name, attributes)` of each span event.
    pub events: Vec<(String, HashMap<String, String>)>,
    /// `(trace id, span id)` of each link.
    pub links: Vec<(String, String)>,
}

/// One received log record, flattened.
#[derive(Debug, Clone)]
pub struct ReceivedLog {
    /// `service.name` of the exporting process.
    pub service: String,
    /// Hex trace id ("" when logged outside a span).
    pub trace_id: String,
    /// The message.
    pub body: String,
    /// Attributes, values as strings.
    pub attributes: HashMap<String, String>,
}

#[derive(Debug, Default)]
struct Received {
    spans: Vec<ReceivedSpan>,
    logs: Vec<ReceivedLog>,
}

/// The receiver; stops when dropped.
#[derive(Debug)]
pub struct OtlpReceiver {
    /// Where it listens; use `http://{address}` as `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub address: SocketAddr,
    received: Arc<Mutex<Received>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl OtlpReceiver {
    /// Starts listening on `127.0.0.1:0`.
    pub async fn start() -> anyhow::Result<Self> {
        let received = Arc::new(Mutex::new(Received::default()));
        let app = Router::new()
            .route("/v1/traces", post(traces))
            .route("/v1/logs", post(logs))
            .with_state(received.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            address,
            received,
            server,
        })
    }

    /// Starts an OTLP/gRPC receiver on `127.0.0.1:0` (for `OTEL_EXPORTER_OTLP_PROTOCOL=grpc`).
    pub async fn start_grpc() -> anyhow::Result<Self> {
        use opentelemetry_proto::tonic::collector::{
            logs::v1::logs_service_server::LogsServiceServer,
            trace::v1::trace_service_server::TraceServiceServer,
        };
        let received = Arc::new(Mutex::new(Received::default()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let service = GrpcReceiver(received.clone());
        let server = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(service.clone()))
                .add_service(LogsServiceServer::new(service))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                .await;
        });
        Ok(Self {
            address,
            received,
            server,
        })
    }

    /// `http://<address>`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.received.lock().expect("receiver lock").spans.clone()
    }

    /// Every log record received so far.
    pub fn logs(&self) -> Vec<ReceivedLog> {
        self.received.lock().expect("receiver lock").logs.clone()
    }
}

fn value_string(value: Option<&AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attributes(list: &[KeyValue]) -> HashMap<String, String> {
    list.iter()
        .map(|kv| (kv.key.clone(), value_string(kv.value.as_ref())))
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn traces(State(received): State<Arc<Mutex<Received>>>, body: Bytes) -> impl IntoResponse {
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return (axum::http::StatusCode::BAD_REQUEST, Vec::new()).into_response();
    };
    record_traces(&received, request);
    protobuf(ExportTraceServiceResponse::default().encode_to_vec())
}

fn record_traces(received: &Mutex<Received>, request: ExportTraceServiceRequest) {
    let mut received = received.lock().expect("receiver lock");
    for resource_spans in request.resource_spans {
        let resource = resource_spans
            .resource
            .map(|r| attributes(&r.attributes))
            .unwrap_or_default();
        let service = resource.get("service.name").cloned().unwrap_or_default();
        for scope in resource_spans.scope_spans {
            for span in scope.spans {
                received.spans.push(ReceivedSpan {
                    service: service.clone(),
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    name: span.name,
                    kind: span.kind,
                    attributes: attributes(&span.attributes),
                    events: span
                        .events
                        .iter()
                        .map(|e| (e.name.clone(), attributes(&e.attributes)))
                        .collect(),
                    links: span
                        .links
                        .iter()
                        .map(|l| (hex(&l.trace_id), hex(&l.span_id)))
                        .collect(),
                });
            }
        }
    }
}

async fn logs(State(received): State<Arc<Mutex<Received>>>, body: Bytes) -> impl IntoResponse {
    let Ok(request) = ExportLogsServiceRequest::decode(body) else {
        return (axum::http::StatusCode::BAD_REQUEST, Vec::new()).into_response();
    };
    record_logs(&received, request);
    protobuf(ExportLogsServiceResponse::default().encode_to_vec())
}

fn record_logs(received: &Mutex<Received>, request: ExportLogsServiceRequest) {
    let mut received = received.lock().expect("receiver lock");
    for resource_logs in request.resource_logs {
        let resource = resource_logs
            .resource
            .map(|r| attributes(&r.attributes))
            .unwrap_or_default();
        let service = resource.get("service.name").cloned().unwrap_or_default();
        for scope in resource_logs.scope_logs {
            for record in scope.log_records {
                received.logs.push(ReceivedLog {
                    service: service.clone(),
                    trace_id: hex(&record.trace_id),
                    body: value_string(record.body.as_ref()),
                    attributes: attributes(&record.attributes),
                });
            }
        }
    }
}

/// The gRPC flavour of the receiver: same decoding, same store.
#[derive(Debug, Clone)]
struct GrpcReceiver(Arc<Mutex<Received>>);

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService
    for GrpcReceiver
{
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        record_traces(&self.0, request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::LogsService
    for GrpcReceiver
{
    async fn export(
        &self,
        request: tonic::Request<ExportLogsServiceRequest>,
    ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
        record_logs(&self.0, request.into_inner());
        Ok(tonic::Response::new(ExportLogsServiceResponse::default()))
    }
}

fn protobuf(body: Vec<u8>) -> axum::response::Response {
    ([(header::CONTENT_TYPE, "application/x-protobuf")], body).into_response()
}
