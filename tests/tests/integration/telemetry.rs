//! OpenTelemetry export from the real binaries to a real OTLP receiver.

use std::time::Duration;

use tests::{Process, TestDb, fast_worker_env, otlp::OtlpReceiver};

const SERVER: i32 = 2;
const CLIENT: i32 = 3;
const PRODUCER: i32 = 4;
const CONSUMER: i32 = 5;

#[tokio::test]
async fn one_trace_links_the_request_the_enqueue_and_the_job_with_every_deleted_id()
-> anyhow::Result<()> {
    tests::budget::runs_processes(2);
    let receiver = OtlpReceiver::start().await?;
    let endpoint = receiver.endpoint();
    let db = TestDb::migrated().await?;
    let otel = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("DATABASE_URL", db.url.as_str()),
    ];
    let mut web = Process::spawn(
        "web",
        &[
            &otel[..],
            &[("BIND", "127.0.0.1:0"), ("EMBEDDED_WORKER", "false")],
        ]
        .concat(),
    )?;
    let mut worker = Process::spawn("worker", &[&otel[..], &fast_worker_env()[..]].concat())?;
    let address = web.web_address().await?;
    worker
        .wait_for_line("worker started", Duration::from_secs(60))
        .await?;

    // Twelve visits, one at a time: the job(s) delete the two oldest.
    tests::visit_times(&address, 12, "traced").await?;
    db.drain_queue(Duration::from_secs(30)).await?;
    assert_eq!(db.visit_ids().await?.len(), 10);

    // The batch exporters wait 5 s between exports; everything asserted below
    // arrives because shutdown flushes it.
    for process in [web, worker] {
        assert!(process.terminate(Duration::from_secs(30)).await?.success());
    }
    let spans = receiver.spans();
    let logs = receiver.logs();

    // Every deleted id appears exactly once as a span event with visit.id.
    let mut deleted_events: Vec<(String, String, String)> = spans
        .iter()
        .filter(|s| s.kind == CONSUMER)
        .flat_map(|s| {
            s.events.iter().filter_map(move |(_, attrs)| {
                Some((
                    attrs.get("visit.id")?.clone(),
                    s.trace_id.clone(),
                    s.span_id.clone(),
                ))
            })
        })
        .collect();
    deleted_events.sort();
    let deleted_ids: Vec<&str> = deleted_events
        .iter()
        .map(|(id, _, _)| id.as_str())
        .collect();
    assert_eq!(
        deleted_ids,
        ["1", "2"],
        "one event per deleted visit: {deleted_events:?}"
    );

    for (visit_id, trace_id, consumer_id) in &deleted_events {
        let in_trace: Vec<_> = spans.iter().filter(|s| &s.trace_id == trace_id).collect();
        let consumer = in_trace
            .iter()
            .find(|s| &s.span_id == consumer_id)
            .expect("consumer span");
        assert_eq!(consumer.name, "process trim_visits");
        assert_eq!(consumer.service, "visitme-worker");
        assert!(
            consumer.attributes.contains_key("job.id")
                && consumer.attributes.contains_key("job.attempt")
        );
        let producer = in_trace
            .iter()
            .find(|s| s.span_id == consumer.parent_span_id)
            .expect("the job's parent span is exported");
        assert_eq!(
            (producer.kind, producer.name.as_str()),
            (PRODUCER, "send trim_visits")
        );
        assert_eq!(producer.service, "visitme-web");
        assert!(
            consumer
                .links
                .contains(&(trace_id.clone(), producer.span_id.clone())),
            "consumer links to producer"
        );
        let server = in_trace
            .iter()
            .find(|s| s.span_id == producer.parent_span_id)
            .expect("the enqueue's parent is the request");
        assert_eq!((server.kind, server.name.as_str()), (SERVER, "GET /"));
        assert_eq!(
            server
                .attributes
                .get("http.response.status_code")
                .map(String::as_str),
            Some("200")
        );
        // Database spans: insert and select under the request, delete under the job.
        let db_spans: Vec<(&str, &str)> = in_trace
            .iter()
            .filter(|s| s.kind == CLIENT)
            .map(|s| {
                (
                    s.name.as_str(),
                    s.attributes
                        .get("db.system.name")
                        .map_or("", String::as_str),
                )
            })
            .collect();
        for name in ["INSERT visits", "SELECT visits", "DELETE visits"] {
            assert!(
                db_spans.contains(&(name, "postgresql")),
                "{name} in {db_spans:?}"
            );
        }
        // The same id as an OTLP log record, correlated to the trace, with job.id.
        let records: Vec<_> = logs
            .iter()
            .filter(|l| l.attributes.get("visit.id") == Some(visit_id))
            .collect();
        assert_eq!(records.len(), 1, "one log record for visit {visit_id}");
        assert_eq!(&records[0].trace_id, trace_id);
        assert_eq!(records[0].service, "visitme-worker");
        assert_eq!(
            records[0].attributes.get("job.id"),
            consumer.attributes.get("job.id")
        );
    }
    // The summary record, with the count.
    let summaries: Vec<_> = logs
        .iter()
        .filter(|l| l.body.starts_with("Deleting "))
        .collect();
    let counted: u64 = summaries
        .iter()
        .map(|l| {
            l.attributes
                .get("visits.deleted")
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum();
    assert_eq!(counted, 2, "{summaries:?}");
    // The web's threshold log line is a log record inside its request's trace.
    let threshold_logs: Vec<_> = logs
        .iter()
        .filter(|l| l.body.starts_with("Delete entities older than"))
        .collect();
    assert_eq!(threshold_logs.len(), 12);
    assert!(
        threshold_logs
            .iter()
            .all(|l| !l.trace_id.is_empty() && l.service == "visitme-web")
    );
    Ok(())
}

#[tokio::test]
async fn a_large_trims_workflow_is_one_trace_and_its_fan_in_links_every_chunk() -> anyhow::Result<()>
{
    tests::budget::runs_processes(2);
    let receiver = OtlpReceiver::start().await?;
    let endpoint = receiver.endpoint();
    let db = TestDb::migrated().await?;
    // 20 old visits: one page view shows the newest 9 of them and trims 11,
    // which at 3 per chunk is a workflow of 4 chunks and a summary.
    sqlx::query(
        "insert into visits (visitor, created_at)
         select 'old-' || n, now() - interval '1 hour' + n * interval '1 ms'
         from generate_series(1, 20) as n",
    )
    .execute(&db.pool)
    .await?;
    let otel = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("DATABASE_URL", db.url.as_str()),
        ("TRIM_CHUNK", "3"),
    ];
    let mut web = Process::spawn(
        "web",
        &[
            &otel[..],
            &[("BIND", "127.0.0.1:0"), ("EMBEDDED_WORKER", "false")],
        ]
        .concat(),
    )?;
    let mut worker = Process::spawn("worker", &[&otel[..], &fast_worker_env()[..]].concat())?;
    let address = web.web_address().await?;
    worker
        .wait_for_line("worker started", Duration::from_secs(60))
        .await?;
    tests::visit_times(&address, 1, "traced").await?;
    db.drain_queue(Duration::from_secs(30)).await?;
    assert_eq!(db.visit_ids().await?.len(), 10);
    for process in [web, worker] {
        assert!(process.terminate(Duration::from_secs(30)).await?.success());
    }
    let spans = receiver.spans();
    let named = |name: &str| -> Vec<_> { spans.iter().filter(|s| s.name == name).collect() };
    let server = named("GET /");
    assert_eq!(server.len(), 1, "one page view");
    let trace = &server[0].trace_id;
    let chunks = named("process trim_visits_chunk");
    let summary = named("process trim_visits_summary");
    assert_eq!((chunks.len(), summary.len()), (4, 1), "4 chunks, 1 summary");
    for span in chunks
        .iter()
        .chain(&summary)
        .chain(&named("process trim_visits"))
        .chain(&named("send workflow trim_visits"))
    {
        assert_eq!(
            &span.trace_id, trace,
            "{} is in the page view's trace",
            span.name
        );
        assert_eq!(
            span.kind,
            if span.name.starts_with("send") {
                PRODUCER
            } else {
                CONSUMER
            }
        );
    }
    let mut linked: Vec<&String> = summary[0]
        .links
        .iter()
        .filter(|(_, span_id)| chunks.iter().any(|chunk| &chunk.span_id == span_id))
        .map(|(_, span_id)| span_id)
        .collect();
    linked.sort();
    linked.dedup();
    assert_eq!(
        linked.len(),
        4,
        "the fan-in links to each chunk: {:?}",
        summary[0].links
    );
    assert_eq!(
        summary[0]
            .attributes
            .get("workflow.step")
            .map(String::as_str),
        Some("summary")
    );
    Ok(())
}

#[tokio::test]
async fn retried_attempts_are_separate_spans_in_the_enqueuers_trace() -> anyhow::Result<()> {
    tests::budget::runs_processes(1);
    let receiver = OtlpReceiver::start().await?;
    let endpoint = receiver.endpoint();
    let db = TestDb::migrated().await?;
    let mut env = fast_worker_env();
    env.extend([
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("DATABASE_URL", db.url.as_str()),
    ]);
    let worker = Process::started_worker(&env).await?;

    // A job enqueued from inside a (remote) trace, as the web tier stores it.
    let (trace_id, parent_id) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    sqlx::query(
        "insert into apalis.jobs (id, job_type, job, status, attempts, max_attempts, run_at, metadata)
         values (apalis.generate_ulid(), 'probe', convert_to($1, 'UTF8'), 'Pending', 0, 3, now(),
                 hstore('traceparent', $2))",
    )
    .bind(r#"{"key": "traced", "behaviour": {"kind": "fail_first", "failures": 2}}"#)
    .bind(format!("00-{trace_id}-{parent_id}-01"))
    .execute(&db.pool)
    .await?;
    db.drain_queue(Duration::from_secs(30)).await?;
    assert!(worker.terminate(Duration::from_secs(30)).await?.success());

    let mut attempts: Vec<(String, String)> = receiver
        .spans()
        .into_iter()
        .filter(|s| s.name == "process probe")
        .map(|s| {
            assert_eq!(
                (s.trace_id.as_str(), s.parent_span_id.as_str()),
                (trace_id, parent_id)
            );
            (
                s.attributes["job.attempt"].clone(),
                s.attributes
                    .get("otel.status_code")
                    .cloned()
                    .unwrap_or_default(),
            )
        })
        .collect();
    attempts.sort();
    assert_eq!(attempts.len(), 3, "{attempts:?}");
    assert_eq!(
        attempts.iter().map(|(a, _)| a.as_str()).collect::<Vec<_>>(),
        ["1", "2", "3"]
    );
    Ok(())
}

#[tokio::test]
async fn an_unreachable_collector_only_warns_and_the_app_keeps_working() -> anyhow::Result<()> {
    tests::budget::runs_processes(1);
    let db = TestDb::migrated().await?;
    let mut web = Process::spawn(
        "web",
        &[
            ("DATABASE_URL", db.url.as_str()),
            ("BIND", "127.0.0.1:0"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("OTEL_BLRP_SCHEDULE_DELAY", "100"),
        ],
    )?;
    let address = web.web_address().await?;
    for _ in 0..3 {
        reqwest::get(format!("http://{address}/"))
            .await?
            .error_for_status()?;
    }
    let export_warnings = |web: &Process| {
        web.output()
            .iter()
            .filter(|line| line.contains(" WARN ") && line.contains("export"))
            .count()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while export_warnings(&web) == 0 {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "no WARN about the failed export:\n{}",
            web.output().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // After the failure the app still serves, and exporting that view's
    // telemetry fails again, still with a warning only.
    let before = export_warnings(&web);
    let page = reqwest::get(format!("http://{address}/")).await?;
    assert_eq!(page.status(), 200, "a page view after the failed export");
    tests::VisitsPage::parse(&page.text().await?)?;
    while export_warnings(&web) <= before {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the next export did not warn either"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let output = web.output();
    let errors: Vec<&String> = output.iter().filter(|l| l.contains("ERROR")).collect();
    assert!(errors.is_empty(), "no ERROR line: {errors:#?}");
    assert!(web.terminate(Duration::from_secs(60)).await?.success());
    Ok(())
}

#[tokio::test]
async fn startup_says_where_telemetry_goes() -> anyhow::Result<()> {
    tests::budget::runs_processes(2);
    let db = TestDb::migrated().await?;
    let mut off = Process::spawn("worker", &[("DATABASE_URL", db.url.as_str())])?;
    off.wait_for_line("OTLP export off", Duration::from_secs(60))
        .await?;
    assert!(off.terminate(Duration::from_secs(30)).await?.success());
    let receiver = OtlpReceiver::start().await?;
    let endpoint = receiver.endpoint();
    let mut on = Process::spawn(
        "worker",
        &[
            ("DATABASE_URL", db.url.as_str()),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_LOGS_EXPORTER", "none"),
            ("OTEL_SERVICE_NAME", "custom-worker"),
        ],
    )?;
    let line = on
        .wait_for_line("telemetry: logs to stdout", Duration::from_secs(60))
        .await?;
    let expected = format!("OTLP traces (OTLP logs off) to {endpoint} over http/protobuf");
    assert!(line.contains(&expected), "{line}");
    assert!(line.contains("custom-worker"), "{line}");
    assert!(on.terminate(Duration::from_secs(30)).await?.success());
    Ok(())
}

#[tokio::test]
async fn trace_check_prints_the_chain_from_web_request_to_deleted_ids() -> anyhow::Result<()> {
    let fixture = include_str!("../../fixtures/jaeger_v3_traces.json");
    let jaeger = axum::Router::new().route(
        "/api/v3/traces",
        axum::routing::get(move || async move { fixture }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let server = tokio::spawn(async move { axum::serve(listener, jaeger).await });
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/trace_check.py");
    let output = tokio::process::Command::new("python3")
        .args([script, "--jaeger", &format!("http://{address}")])
        .output()
        .await?;
    server.abort();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("trace 4bf92f3577b34da6a3ce929d0e0e4736"),
        "{stdout}"
    );
    assert!(
        stdout.contains("visitme-web: GET / -> visitme-web: send trim_visits -> visitme-worker: process trim_visits"),
        "{stdout}"
    );
    assert!(stdout.contains("deleted visit ids: 7, 8"), "{stdout}");
    Ok(())
}

/// Spans captured in memory from the in-process router and worker (a
/// current-thread runtime keeps every task on the thread whose subscriber
/// captures them).
#[tokio::test(flavor = "current_thread")]
async fn spans_carry_the_semantic_convention_attributes() -> anyhow::Result<()> {
    use opentelemetry::trace::{SpanKind, Status};
    use opentelemetry_sdk::{
        logs::{InMemoryLogExporter, SdkLoggerProvider},
        trace::{InMemorySpanExporter, SdkTracerProvider},
    };

    let spans = InMemorySpanExporter::default();
    let logs = InMemoryLogExporter::default();
    let tracer = SdkTracerProvider::builder()
        .with_simple_exporter(spans.clone())
        .build();
    let logger = SdkLoggerProvider::builder()
        .with_simple_exporter(logs.clone())
        .build();
    let _capture =
        tracing::subscriber::set_default(observability::subscriber_for_test(&tracer, &logger));

    let mut app = tests::TestApp::spawn().await?;
    app.start_worker();
    let mut page = None;
    for n in 1..=11 {
        page = Some(app.visit(&format!("captured-{n}")).await?);
    }
    app.db.drain_queue(Duration::from_secs(30)).await?;
    app.stop().await?;
    tracer.force_flush()?;
    let page = page.expect("visits were made");

    let finished = spans.get_finished_spans()?;
    let attribute = |span: &opentelemetry_sdk::trace::SpanData, key: &str| {
        span.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| kv.value.to_string())
    };
    let server = finished
        .iter()
        .find(|s| s.name == "GET /")
        .expect("server span");
    assert_eq!(server.span_kind, SpanKind::Server);
    assert_eq!(attribute(server, "http.route").as_deref(), Some("/"));
    assert_eq!(
        attribute(server, "http.request.method").as_deref(),
        Some("GET")
    );
    assert_eq!(
        attribute(server, "http.response.status_code").as_deref(),
        Some("200")
    );

    let producers: Vec<_> = finished
        .iter()
        .filter(|s| s.name == "send trim_visits")
        .collect();
    assert_eq!(producers.len(), 11, "one enqueue span per visit");
    assert!(producers.iter().all(|s| s.span_kind == SpanKind::Producer
        && attribute(s, "messaging.destination.name").as_deref() == Some("trim_visits")));
    assert!(
        producers
            .iter()
            .all(|s| attribute(s, "messaging.message.id").is_some())
    );

    let consumers: Vec<_> = finished
        .iter()
        .filter(|s| s.name == "process trim_visits")
        .collect();
    assert!(!consumers.is_empty());
    for consumer in &consumers {
        assert_eq!(consumer.span_kind, SpanKind::Consumer);
        assert_eq!(consumer.status, Status::Unset);
        let parent = producers
            .iter()
            .find(|p| p.span_context.span_id() == consumer.parent_span_id)
            .expect("every job run is the child of an enqueue span");
        assert_eq!(
            parent.span_context.trace_id(),
            consumer.span_context.trace_id()
        );
        assert_eq!(
            consumer.links.links[0].span_context.span_id(),
            parent.span_context.span_id()
        );
        assert_eq!(attribute(consumer, "job.attempt").as_deref(), Some("1"));
        assert_eq!(
            attribute(consumer, "messaging.message.id"),
            attribute(consumer, "job.id")
        );
    }
    let deleted: Vec<String> = consumers
        .iter()
        .flat_map(|c| c.events.events.iter())
        .filter_map(|e| {
            e.attributes
                .iter()
                .find(|kv| kv.key.as_str() == "visit.id")
                .map(|kv| kv.value.to_string())
        })
        .collect();
    assert_eq!(
        deleted,
        ["1"],
        "the oldest of 11 visits is deleted, one event"
    );
    assert_eq!(page.rows.len(), 10);

    for (name, operation, table) in [
        ("INSERT visits", "INSERT", "visits"),
        ("SELECT visits", "SELECT", "visits"),
        ("DELETE visits", "DELETE", "visits"),
        ("INSERT apalis.jobs", "INSERT", "apalis.jobs"),
    ] {
        let span = finished
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("{name} span"));
        assert_eq!(span.span_kind, SpanKind::Client);
        assert_eq!(
            attribute(span, "db.system.name").as_deref(),
            Some("postgresql")
        );
        assert_eq!(
            attribute(span, "db.operation.name").as_deref(),
            Some(operation)
        );
        assert_eq!(
            attribute(span, "db.collection.name").as_deref(),
            Some(table)
        );
    }
    let records = logs.get_emitted_logs()?;
    let per_id: Vec<_> = records
        .iter()
        .filter(|l| {
            l.record
                .attributes_iter()
                .any(|(k, _)| k.as_str() == "visit.id")
        })
        .collect();
    assert_eq!(per_id.len(), 1);
    assert!(
        per_id[0].record.trace_context().is_some(),
        "the record carries the job's trace"
    );
    Ok(())
}

#[tokio::test]
async fn grpc_export_is_chosen_by_otel_exporter_otlp_protocol() -> anyhow::Result<()> {
    tests::budget::runs_processes(1);
    let receiver = OtlpReceiver::start_grpc().await?;
    let endpoint = receiver.endpoint();
    let db = TestDb::migrated().await?;
    let mut web = Process::spawn(
        "web",
        &[
            ("DATABASE_URL", db.url.as_str()),
            ("BIND", "127.0.0.1:0"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ],
    )?;
    let address = web.web_address().await?;
    reqwest::get(format!("http://{address}/"))
        .await?
        .error_for_status()?;
    assert!(web.terminate(Duration::from_secs(30)).await?.success());
    let spans = receiver.spans();
    assert!(
        spans
            .iter()
            .any(|s| s.name == "GET /" && s.service == "visitme-web"),
        "{spans:?}"
    );
    assert!(
        receiver
            .logs()
            .iter()
            .any(|l| l.body.starts_with("Delete entities older than"))
    );
    Ok(())
}

#[tokio::test]
async fn an_approved_trims_resumed_run_links_its_first_run_and_the_operators_answer()
-> anyhow::Result<()> {
    use tests::admin::{TOKEN, csrf_of, login, plain_client};
    tests::budget::runs_processes(1);
    let receiver = OtlpReceiver::start().await?;
    let endpoint = receiver.endpoint();
    let db = TestDb::migrated().await?;
    // 40 old visits: the page view's trim would delete 31, over the 20 allowed.
    sqlx::query(
        "insert into visits (visitor, created_at)
         select 'old-' || n, now() - interval '1 day' + n * interval '1 ms'
         from generate_series(1, 40) as n",
    )
    .execute(&db.pool)
    .await?;
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("DATABASE_URL", db.url.as_str()),
        ("BIND", "127.0.0.1:0"),
        ("ADMIN_TOKEN", TOKEN),
        ("TRIM_APPROVAL_ABOVE", "20"),
    ];
    let mut web = Process::spawn("web", &[&env[..], &fast_worker_env()[..]].concat())?;
    let address = web.web_address().await?;
    tests::visit_times(&address, 1, "traced").await?;
    let give_up = std::time::Instant::now() + Duration::from_secs(30);
    let trim = loop {
        if let Some(job) =
            durable_jobs::admin::oldest_waiting_for(&db.pool, "trim_visits", "approval").await?
        {
            break job.id;
        }
        anyhow::ensure!(std::time::Instant::now() < give_up, "no trim waits");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let client = plain_client()?;
    let (session, _) = login(&client, &address).await?;
    let page = client
        .get(format!("http://{address}/admin/jobs/{trim}"))
        .header("cookie", &session)
        .send()
        .await?
        .text()
        .await?;
    let csrf = csrf_of(&page).ok_or_else(|| anyhow::anyhow!("no form on {page}"))?;
    let answered = client
        .post(format!("http://{address}/admin/jobs/{trim}/answer"))
        .header("cookie", &session)
        .form(&[
            ("csrf", csrf.as_str()),
            ("wait", "approval"),
            ("choice", "Approve"),
        ])
        .send()
        .await?;
    assert_eq!(answered.status(), 303);
    db.wait_for_status(&trim, "Done", Duration::from_secs(30))
        .await?;
    assert!(web.terminate(Duration::from_secs(30)).await?.success());

    let spans = receiver.spans();
    let view = spans
        .iter()
        .find(|s| s.name == "GET /")
        .ok_or_else(|| anyhow::anyhow!("no page view span"))?;
    let runs: Vec<_> = spans
        .iter()
        .filter(|s| s.name == "process trim_visits" && s.attributes.get("job.id") == Some(&trim))
        .collect();
    assert_eq!(runs.len(), 2, "the run that waited, and the resumed one");
    assert!(
        runs.iter().all(|run| run.trace_id == view.trace_id),
        "both runs are in the page view's trace"
    );
    let (first, resumed) = match runs[0].links.iter().any(|(_, id)| *id == runs[1].span_id) {
        true => (runs[1], runs[0]),
        false => (runs[0], runs[1]),
    };
    assert!(
        resumed.links.iter().any(|(_, id)| *id == first.span_id),
        "the resumed run links to the run before it: {:?}",
        resumed.links
    );
    let answer_traces: Vec<&String> = spans
        .iter()
        .filter(|s| s.kind == SERVER && s.name.starts_with("POST /admin/jobs"))
        .map(|s| &s.trace_id)
        .collect();
    assert_eq!(answer_traces.len(), 1, "one answer request");
    assert!(
        resumed
            .links
            .iter()
            .any(|(trace, _)| trace == answer_traces[0]),
        "the resumed run links to the operator's answer: {:?}",
        resumed.links
    );
    Ok(())
}
