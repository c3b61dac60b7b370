//! Bad input and hostile requests: each gets a clear answer, nothing is lost,
//! nothing leaks.

use std::time::Duration;

use tests::{Process, TestApp, TestDb};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use web::routes::visits::VisitorIp;

#[tokio::test]
async fn every_response_carries_the_security_headers() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    for path in [
        "/",
        "/healthz",
        "/no-such-page",
        "/admin",
        "/assets/style.css",
        "/assets/page.js",
        "/background-work",
        "/metrics",
    ] {
        let response = app.client.get(app.url(path)).send().await?;
        let headers = response.headers();
        let csp = headers["content-security-policy"].to_str()?;
        assert!(
            csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"),
            "{path}: {csp}"
        );
        assert!(
            !csp.contains("unsafe-") && csp.contains("script-src 'self';"),
            "{path}: only our own script files, no inline code: {csp}"
        );
        assert_eq!(headers["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(headers["referrer-policy"], "same-origin", "{path}");
        assert_eq!(headers["x-frame-options"], "DENY", "{path}");
    }
    // The page's scripts are files from /assets, none inline.
    let page = app.client.get(app.url("/")).send().await?.text().await?;
    let document = scraper::Html::parse_document(&page);
    let scripts = scraper::Selector::parse("script").expect("selector");
    let sources: Vec<Option<&str>> = document
        .select(&scripts)
        .map(|s| s.value().attr("src"))
        .collect();
    assert!(
        !sources.is_empty()
            && sources
                .iter()
                .all(|src| src.is_some_and(|src| src.starts_with("/assets/"))),
        "{sources:?}"
    );
    let post = app.client.post(app.url("/")).send().await?;
    assert_eq!(post.status(), 405);
    assert!(
        post.text().await?.contains("Method not allowed"),
        "a friendly 405 page"
    );
    app.stop().await
}

#[tokio::test]
async fn a_100_kb_user_agent_is_stored_truncated() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let huge = "x".repeat(100 * 1024);
    let page = app.visit(&huge).await?;
    let stored: String = sqlx::query_scalar("select visitor from visits")
        .fetch_one(&app.db.pool)
        .await?;
    let limit = web::routes::visits::MAX_USER_AGENT_CHARS;
    assert_eq!(stored, format!("127.0.0.1: {}", "x".repeat(limit)));
    assert_eq!(page.rows[0].2, stored);
    app.stop().await
}

#[tokio::test]
async fn invalid_utf8_in_headers_is_stored_lossily_not_refused() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let mut stream = tokio::net::TcpStream::connect(app.address).await?;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nUser-Agent: caf\xe9 \xff\xfe\r\nConnection: close\r\n\r\n")
        .await?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let stored: String = sqlx::query_scalar("select visitor from visits")
        .fetch_one(&app.db.pool)
        .await?;
    assert_eq!(stored, "127.0.0.1: caf\u{fffd} \u{fffd}\u{fffd}");
    app.stop().await
}

#[tokio::test]
async fn visitor_addresses_are_masked_by_default_policy() -> anyhow::Result<()> {
    tests::budget::runs_processes(1);
    let v4 = "203.0.113.77".parse().expect("ipv4");
    let v6 = "2001:db8:1234:5678:9abc:def0:1234:5678"
        .parse()
        .expect("ipv6");
    assert_eq!(VisitorIp::Masked.apply(v4).as_deref(), Some("203.0.113.0"));
    assert_eq!(
        VisitorIp::Masked.apply(v6).as_deref(),
        Some("2001:db8:1234::")
    );
    assert_eq!(VisitorIp::Full.apply(v4).as_deref(), Some("203.0.113.77"));
    assert_eq!(VisitorIp::None.apply(v6), None);
    let headers = axum::http::HeaderMap::new();
    assert_eq!(
        web::routes::visits::visitor_label(None, &headers),
        "hidden: unknown"
    );

    // The binary's own default: `web` started without VISITOR_IP stores masked addresses.
    let db = TestDb::migrated().await?;
    let mut command = tokio::process::Command::new(tests::binary("web")?);
    command
        .env_remove("VISITOR_IP")
        .env("DATABASE_URL", &db.url)
        .env("BIND", "127.0.0.1:0")
        .env("EMBEDDED_WORKER", "false")
        .env("NO_COLOR", "1");
    let mut web = Process::start("web", command)?;
    let address = web.web_address().await?;
    let page = reqwest::Client::new()
        .get(format!("http://{address}/"))
        .header("user-agent", "default-settings")
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    let stored: String = sqlx::query_scalar("select visitor from visits")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(stored, "127.0.0.0: default-settings");
    assert_eq!(tests::VisitsPage::parse(&page)?.rows[0].2, stored);
    assert!(web.terminate(Duration::from_secs(30)).await?.success());
    Ok(())
}

#[tokio::test]
async fn ipv6_clients_are_recorded_with_their_masked_address() -> anyhow::Result<()> {
    let Ok(listener) = tokio::net::TcpListener::bind("[::1]:0").await else {
        anyhow::ensure!(
            std::env::var("CI").is_err(),
            "no IPv6 loopback (::1), and CI must run this test"
        );
        println!("skipped: no IPv6 loopback here");
        return Ok(());
    };
    let db = TestDb::migrated().await?;
    let mut state = web::AppState::new(db.pool.clone());
    state.visitor_ip = VisitorIp::Masked;
    let address = listener.local_addr()?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(web::serve(
        listener,
        state,
        shutdown.clone().cancelled_owned(),
    ));
    let body = reqwest::Client::new()
        .get(format!("http://{address}/"))
        .header("user-agent", "v6-browser")
        .send()
        .await?
        .text()
        .await?;
    let page = tests::VisitsPage::parse(&body)?;
    // ::1 without its last 80 bits is "::"; the label is "<address>: <agent>".
    assert_eq!(page.rows[0].2, "::: v6-browser");
    shutdown.cancel();
    server.await??;
    Ok(())
}

#[tokio::test]
async fn secrets_never_appear_in_logs_or_help() -> anyhow::Result<()> {
    tests::budget::runs_processes(1);
    let db = TestDb::migrated().await?;
    let with_password = db
        .url
        .replacen("postgres://root@", "postgres://root:pw-do-not-print@", 1);
    // Debug for everything, sqlx's statements included: the most a log can say.
    let mut web = Process::spawn_logging(
        "web",
        &[
            ("DATABASE_URL", with_password.as_str()),
            ("BIND", "127.0.0.1:0"),
            ("ADMIN_TOKEN", "admin-do-not-print"),
        ],
        "debug",
    )?;
    let address = web.web_address().await?;
    let client = reqwest::Client::new();
    client
        .get(format!("http://{address}/"))
        .send()
        .await?
        .error_for_status()?;
    client
        .post(format!("http://{address}/admin/login"))
        .form(&[("token", "wrong")])
        .send()
        .await?;
    client
        .get(format!("http://{address}/admin"))
        .bearer_auth("admin-do-not-print")
        .send()
        .await?
        .error_for_status()?;
    // Read after the exit: the shutdown's own lines count too.
    let (status, output) = web.terminate_with_output(Duration::from_secs(30)).await?;
    assert!(status.success());
    let output = output.join("\n");
    assert!(
        output.contains("DEBUG") && output.contains("web stopped"),
        "debug logging really on, and the whole output read: {output}"
    );
    assert!(
        !output.contains("pw-do-not-print") && !output.contains("admin-do-not-print"),
        "{output}"
    );

    let help = tokio::process::Command::new(tests::binary("web")?)
        .arg("--help")
        .env("DATABASE_URL", &with_password)
        .env("ADMIN_TOKEN", "admin-do-not-print")
        .output()
        .await?;
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("ADMIN_TOKEN") && !help.contains("do-not-print"),
        "{help}"
    );
    Ok(())
}

#[tokio::test]
async fn an_invalid_database_url_is_one_clear_line_and_exit_1() -> anyhow::Result<()> {
    for binary in ["web", "worker"] {
        let output = tokio::process::Command::new(tests::binary(binary)?)
            .env("DATABASE_URL", "mysql://nope")
            .env("BIND", "127.0.0.1:0")
            .env("RUST_BACKTRACE", "1")
            .output()
            .await?;
        assert_eq!(output.status.code(), Some(1), "{binary}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("invalid database URL"),
            "{binary}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{binary}: no panic: {stderr}");
    }
    Ok(())
}

#[tokio::test]
async fn a_job_of_a_type_no_worker_handles_dies_with_the_reason_after_its_grace()
-> anyhow::Result<()> {
    let mut app = TestApp::spawn().await?;
    sqlx::query(
        "insert into apalis.jobs (id, job_type, job, status, attempts, max_attempts, run_at)
         values (apalis.generate_ulid(), 'mystery', convert_to('{}', 'UTF8'), 'Pending', 0, 3, now() - interval '1 second')",
    )
    .execute(&app.db.pool)
    .await?;
    app.start_worker_with(jobs::WorkerConfig {
        unknown_grace: Duration::ZERO,
        ..tests::fast_worker_config()
    });
    app.visit("a good job still runs").await?;
    app.db.wait_until_idle(Duration::from_secs(30)).await?;
    let (status, result): (String, String) = sqlx::query_as(
        "select status, last_result::text from apalis.jobs where job_type = 'mystery'",
    )
    .fetch_one(&app.db.pool)
    .await?;
    assert_eq!(status, "Killed");
    assert!(
        result.contains("no worker handles job type mystery"),
        "{result}"
    );
    let done: i64 = sqlx::query_scalar("select count(*) from apalis.jobs where status = 'Done'")
        .fetch_one(&app.db.pool)
        .await?;
    assert_eq!(done, 1);
    app.stop().await
}

#[tokio::test]
async fn visitmes_worker_keeps_another_services_backlog_while_its_workers_are_seen()
-> anyhow::Result<()> {
    tests::budget::runs_processes(1);
    let db = TestDb::migrated().await?;
    // A mailer on the same database: its worker was seen ten minutes ago
    // (within the hour's grace); its five invoices have waited two hours.
    sqlx::query(
        "insert into apalis.workers (id, worker_type, storage_name, layers, last_seen)
         values ('send_invoice@mailer-1-1-0', 'send_invoice', 'PgStorage', '', now() - interval '10 minutes')",
    )
    .execute(&db.pool)
    .await?;
    let long_due = |job_type: &'static str, count: i64| {
        sqlx::query_scalar::<_, String>(
            "insert into apalis.jobs (id, job_type, job, status, attempts, max_attempts, run_at)
             select apalis.generate_ulid(), $1, convert_to('{}', 'UTF8'), 'Pending', 0, 3, now() - interval '2 hours'
             from generate_series(1, $2) returning id",
        )
        .bind(job_type)
        .bind(count)
        .fetch_all(&db.pool)
    };
    let invoices = long_due("send_invoice", 5).await?;
    // A type nobody has registered: it dies, which shows the reaper ran.
    let mystery = long_due("mystery", 1).await?;
    let mut env = vec![("DATABASE_URL", db.url.as_str())];
    env.extend(tests::fast_worker_env());
    let worker = Process::started_worker(&env).await?;
    db.wait_for_status(&mystery[0], "Killed", Duration::from_secs(30))
        .await?;
    for id in &invoices {
        assert_eq!(
            db.job_outcome(id).await?,
            ("Pending".to_owned(), None),
            "{id}"
        );
    }
    let reason = db.job_outcome(&mystery[0]).await?.1.unwrap_or_default();
    assert!(
        reason.contains("no worker handles job type mystery")
            && reason.contains("send_invoice")
            && reason.contains("trim_visits"),
        "{reason}"
    );
    assert!(worker.terminate(Duration::from_secs(30)).await?.success());
    Ok(())
}
