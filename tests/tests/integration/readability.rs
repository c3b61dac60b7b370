//! What a person reads: log files, the page's trace link, and the errors a
//! newcomer meets, from the real binaries.

use std::{path::PathBuf, process::Stdio, time::Duration};

use anyhow::Context as _;
use nix::{sys::signal::Signal, unistd::Pid};
use tests::{Process, TestDb, fast_worker_env, otlp::OtlpReceiver};
use tokio::process::{Child, Command};

/// A binary whose stdout and stderr go to a file, as `web > web.log` does,
/// with `NO_COLOR` unset (so only the file decides there is no colour).
struct LoggingToFile {
    child: Child,
    log: PathBuf,
    /// Its part of the test's connection budget.
    _share: Option<std::sync::Arc<tests::budget::Reservation>>,
}

impl LoggingToFile {
    fn spawn(name: &str, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let log =
            std::env::temp_dir().join(format!("visitme-{name}-{}.log", ulid::Ulid::generate()));
        let file = std::fs::File::create(&log)?;
        let child = Command::new(tests::binary(name)?)
            .envs(env.iter().copied())
            .env(
                "RUST_LOG",
                "info,sqlx::postgres::notice=warn,opentelemetry=warn",
            )
            .env_remove("NO_COLOR")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawn {name}"))?;
        let share = child
            .id()
            .and_then(|pid| tests::budget::process_started(name, pid));
        Ok(Self {
            child,
            log,
            _share: share,
        })
    }

    fn text(&self) -> anyhow::Result<String> {
        Ok(String::from_utf8_lossy(&std::fs::read(&self.log)?).into_owned())
    }

    /// Waits for a line containing `needle`, returns it.
    async fn wait_for_line(&self, needle: &str) -> anyhow::Result<String> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let text = self.text()?;
            if let Some(line) = text.lines().find(|l| l.contains(needle)) {
                return Ok(line.to_owned());
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "no {needle:?} in:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The web's address, from its "VisitMe is up" line.
    async fn web_address(&self) -> anyhow::Result<String> {
        let line = self.wait_for_line("VisitMe is up: open http://").await?;
        let rest = &line[line.find("http://").context("url")? + "http://".len()..];
        Ok(rest[..rest.find('/').context("url end")?].to_owned())
    }

    /// SIGTERM, wait for the exit, and return everything it wrote.
    async fn terminate(mut self) -> anyhow::Result<String> {
        let pid = i32::try_from(self.child.id().context("reaped")?)?;
        nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGTERM)?;
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await??;
        anyhow::ensure!(status.success(), "exit {status}:\n{}", self.text()?);
        let text = self.text()?;
        let _ = std::fs::remove_file(&self.log);
        Ok(text)
    }
}

/// A web (without embedded worker) and a worker on `db`, both logging to files.
async fn web_and_worker(
    db: &TestDb,
    extra: &[(&str, &str)],
) -> anyhow::Result<(LoggingToFile, LoggingToFile, String)> {
    let common = [&[("DATABASE_URL", db.url.as_str())][..], extra].concat();
    let web = LoggingToFile::spawn(
        "web",
        &[
            &common[..],
            &[("BIND", "127.0.0.1:0"), ("EMBEDDED_WORKER", "false")],
        ]
        .concat(),
    )?;
    let worker = LoggingToFile::spawn("worker", &[&common[..], &fast_worker_env()[..]].concat())?;
    let address = web.web_address().await?;
    worker.wait_for_line("worker started").await?;
    Ok((web, worker, address))
}

#[tokio::test]
async fn logs_in_a_file_are_plain_short_lines_with_the_ids_that_matter() -> anyhow::Result<()> {
    tests::budget::runs_processes(2);
    let db = TestDb::migrated().await?;
    let (web, worker, address) = web_and_worker(&db, &[]).await?;
    tests::visit_times(&address, 12, "log-reader").await?;
    db.drain_queue(Duration::from_secs(30)).await?;
    let (web, worker) = (web.terminate().await?, worker.terminate().await?);

    for (name, text) in [("web", &web), ("worker", &worker)] {
        assert!(
            !text.contains('\x1b'),
            "{name} wrote an escape character:\n{text}"
        );
    }
    // `grep 'visit.id=1'` finds the line, with the job and nothing else of its span.
    let deleted = worker
        .lines()
        .find(|line| line.contains("deleted visit 1 ") || line.ends_with("deleted visit 1"))
        .with_context(|| format!("no line for visit 1:\n{worker}"))?;
    assert!(deleted.contains(" visit.id=1"), "{deleted}");
    let job_id = deleted
        .split_once(" job.id=")
        .map(|(_, rest)| rest.split_whitespace().next().unwrap_or(""))
        .unwrap_or("");
    assert!(
        ulid::Ulid::from_string(job_id).is_ok(),
        "job.id in {deleted}"
    );
    assert!(
        deleted.len() < 200,
        "{} characters: {deleted}",
        deleted.len()
    );
    assert!(!deleted.contains("messaging."), "{deleted}");
    // The sample's lines stay recognisable.
    // One trim of both, or (the worker quicker than the visits) one each.
    assert!(
        worker.contains("Deleting 2 entities: 1, 2")
            || (worker.contains("Deleting 1 entities: 1 ")
                && worker.contains("Deleting 1 entities: 2 ")),
        "{worker}"
    );
    let threshold = web
        .lines()
        .find(|line| line.contains("Delete entities older than "))
        .with_context(|| format!("no threshold line:\n{web}"))?;
    assert!(
        threshold.len() < 160,
        "{} characters: {threshold}",
        threshold.len()
    );
    Ok(())
}

#[tokio::test]
async fn json_logs_keep_every_field_of_the_line_and_its_spans() -> anyhow::Result<()> {
    tests::budget::runs_processes(2);
    let db = TestDb::migrated().await?;
    let (web, worker, address) = web_and_worker(&db, &[("LOG_FORMAT", "json")]).await?;
    tests::visit_times(&address, 11, "json-reader").await?;
    db.drain_queue(Duration::from_secs(30)).await?;
    let (web, worker) = (web.terminate().await?, worker.terminate().await?);
    assert!(!format!("{web}{worker}").contains('\x1b'));

    let lines: Vec<serde_json::Value> = worker
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect();
    let deleted = lines
        .iter()
        .find(|line| line["fields"]["visit.id"] == 1)
        .with_context(|| format!("no JSON line with visit.id 1:\n{worker}"))?;
    assert!(deleted["fields"]["job.id"].is_string(), "{deleted}");
    let span = &deleted["span"];
    for field in [
        "otel.name",
        "otel.kind",
        "messaging.system",
        "messaging.destination.name",
        "messaging.message.id",
        "job.id",
        "job.attempt",
    ] {
        assert!(!span[field].is_null(), "{field} in {deleted}");
    }
    let web_lines: Vec<serde_json::Value> = web
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect();
    let enqueued = web_lines
        .iter()
        .find(|line| {
            line["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("Delete entities older than "))
        })
        .with_context(|| format!("no threshold line:\n{web}"))?;
    assert!(enqueued["fields"]["job.id"].is_string(), "{enqueued}");
    assert_eq!(enqueued["span"]["http.route"], "/", "{enqueued}");
    Ok(())
}

#[tokio::test]
async fn the_trace_links_carry_the_trace_id_the_collector_receives() -> anyhow::Result<()> {
    tests::budget::runs_processes(1);
    let receiver = OtlpReceiver::start().await?;
    let endpoint = receiver.endpoint();
    let db = TestDb::migrated().await?;
    let token = "a-token-for-the-trace-link-test";
    let mut web = Process::spawn(
        "web",
        &[
            ("DATABASE_URL", db.url.as_str()),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("JAEGER_UI_URL", "http://jaeger.test:16686/"),
            ("ADMIN_TOKEN", token),
            ("BIND", "127.0.0.1:0"),
            ("EMBEDDED_WORKER", "false"),
        ],
    )?;
    let address = web.web_address().await?;
    let client = reqwest::Client::new();
    let page = client
        .get(format!("http://{address}/"))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    let document = scraper::Html::parse_document(&page);
    let select = |css: &str| scraper::Selector::parse(css).expect("selector");
    let link = document
        .select(&select("a#trace-link"))
        .next()
        .and_then(|a| a.value().attr("href"))
        .with_context(|| format!("no trace link in:\n{page}"))?
        .to_owned();
    let trace_id = link
        .strip_prefix("http://jaeger.test:16686/trace/")
        .with_context(|| format!("link {link}"))?
        .to_owned();
    assert!(
        trace_id.len() == 32 && trace_id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{link}"
    );
    // The job's page links to the same trace: the job joins the page view's.
    let job_id = document
        .select(&select("#last-trim"))
        .next()
        .and_then(|dl| dl.value().attr("data-job-id"))
        .context("no last trim on the page")?
        .to_owned();
    let job_page = client
        .get(format!("http://{address}/admin/jobs/{job_id}"))
        .bearer_auth(token)
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    assert!(
        job_page.contains(&format!(
            r#"href="http://jaeger.test:16686/trace/{trace_id}""#
        )),
        "{job_page}"
    );
    assert!(web.terminate(Duration::from_secs(30)).await?.success());

    let spans = receiver.spans();
    let page_view = spans
        .iter()
        .find(|s| s.name == "GET /" && s.kind == 2)
        .context("no GET / span received")?;
    assert_eq!(page_view.trace_id, trace_id);
    Ok(())
}

#[tokio::test]
async fn connection_errors_a_newcomer_meets_say_what_to_do_in_one_line() -> anyhow::Result<()> {
    tests::budget::runs_processes(2);
    // A role that does not exist: one line naming it and how to create it, exit 1.
    let server = migrations::parse_url(&tests::maintenance_url())?;
    let url = format!(
        "postgres://nobody@{}:{}/visitme_nobody",
        server.get_host(),
        server.get_port()
    );
    let mut web = Process::spawn(
        "web",
        &[("DATABASE_URL", url.as_str()), ("BIND", "127.0.0.1:0")],
    )?;
    let status = web.wait(Duration::from_secs(60)).await?;
    assert_eq!(status.code(), Some(1));
    let last = web.wait_for_line("web: ", Duration::from_secs(10)).await?;
    let output = web.output();
    assert!(
        last.starts_with("web: ")
            && last.contains(r#"no user "nobody""#)
            && last.contains("createuser"),
        "{output:?}"
    );
    assert!(!last.contains(" at line "), "{last}");

    // Nothing listening: says to start Postgres or set DATABASE_URL, and keeps retrying.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let url = format!("postgres://root@127.0.0.1:{port}/visitme");
    let mut web = Process::spawn(
        "web",
        &[("DATABASE_URL", url.as_str()), ("BIND", "127.0.0.1:0")],
    )?;
    let hint = format!("is PostgreSQL running on 127.0.0.1:{port}?");
    web.wait_for_line(&hint, Duration::from_secs(30)).await?;
    web.wait_for_line("retrying in 500ms", Duration::from_secs(30))
        .await?;
    let line = web.wait_for_line(&hint, Duration::from_secs(1)).await?;
    assert!(
        line.contains("DATABASE_URL") && line.contains("WARN"),
        "{line}"
    );
    assert!(web.terminate(Duration::from_secs(30)).await?.success());
    Ok(())
}

#[tokio::test]
async fn links_cannot_make_the_panel_or_a_job_page_say_anything() -> anyhow::Result<()> {
    let db = TestDb::migrated().await?;
    let state = web::AppState::new(db.pool.clone()).with_admin_token("a-token-for-the-echo-test");
    let app = tests::TestApp::spawn_with(db, state).await?;
    let panel = app
        .client
        .get(app.url("/background-work?job=call+%2B1-555-0100"))
        .send()
        .await?;
    assert_eq!(panel.status(), 200);
    let panel = panel.text().await?;
    assert!(
        panel.contains(r#"id="background-work""#) && !panel.contains("555-0100"),
        "{panel}"
    );
    let job = app
        .client
        .get(app.url("/admin/jobs/call-555-0100"))
        .bearer_auth("a-token-for-the-echo-test")
        .send()
        .await?;
    assert_eq!(job.status(), 404);
    let job = job.text().await?;
    assert!(
        job.contains("No such job") && !job.contains("555-0100"),
        "{job}"
    );
    app.stop().await
}
