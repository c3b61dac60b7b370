//! The attacks of issue 16 on the web tier, each against the real `web`
//! binary (or the real router) on loopback: slow and idle connections, too
//! many connections, file-descriptor exhaustion, slow requests, metrics
//! cardinality and scrapers, and the dashboard's login and session. Every
//! loop is bounded in count and time.
//!
//! `VISITME_BIN_DIR=<dir with older web/worker>` runs the process tests
//! against another build, e.g. the release the red team attacked.

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use tests::{
    Process, TestApp, TestDb,
    admin::{TOKEN, csrf_of, login, plain_client},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    task::JoinSet,
};

/// A `web` process on a free port over `db` (no embedded worker), with `extra` settings.
async fn spawn_web(db: &TestDb, extra: &[(&str, &str)]) -> anyhow::Result<(Process, String)> {
    let mut env = vec![
        ("DATABASE_URL", db.url.as_str()),
        ("BIND", "127.0.0.1:0"),
        ("EMBEDDED_WORKER", "false"),
    ];
    env.extend_from_slice(extra);
    let mut web = Process::spawn("web", &env)?;
    let address = web.web_address().await?;
    Ok((web, address))
}

/// Sends `request` on a new connection and reads until the server closes it
/// (or `deadline`); returns what it answered.
async fn raw_exchange(address: &str, request: &[u8], deadline: Duration) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect(address).await?;
    stream.write_all(request).await?;
    let mut answer = Vec::new();
    tokio::time::timeout(deadline, stream.read_to_end(&mut answer))
        .await
        .map_err(|_| anyhow::anyhow!("no answer (or no close) within {deadline:?}"))??;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

/// The value of the sample `series` (name and labels as rendered), 0 if absent.
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn scrape(address: &str) -> anyhow::Result<String> {
    Ok(reqwest::get(format!("http://{address}/metrics"))
        .await?
        .error_for_status()?
        .text()
        .await?)
}

#[tokio::test]
async fn slow_header_senders_and_idle_keep_alive_connections_are_closed_after_the_header_timeout()
-> anyhow::Result<()> {
    tests::budget::runs_processes(1);
    let db = TestDb::migrated().await?;
    let (web, address) = spawn_web(&db, &[("HTTP_HEADER_TIMEOUT", "1")]).await?;
    let started = Instant::now();
    let mut connections = JoinSet::new();
    for n in 0..50 {
        let address = address.clone();
        connections.spawn(async move {
            let stream = TcpStream::connect(&address).await?;
            let (mut read, mut write) = stream.into_split();
            let idle = n % 5 == 0;
            if idle {
                // One whole request on a keep-alive connection, then silence.
                write
                    .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                    .await?;
            } else {
                // Slowloris: a request line, then a header byte every 200 ms, never done.
                write.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await?;
                tokio::spawn(async move {
                    for _ in 0..50 {
                        if write.write_all(b"X").await.is_err() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                });
            }
            let mut answer = Vec::new();
            // Closed by the server: end of stream, or a reset. Either way, done.
            let closed =
                tokio::time::timeout(Duration::from_secs(8), read.read_to_end(&mut answer)).await;
            anyhow::ensure!(closed.is_ok(), "connection {n} still open after 8 s");
            if idle {
                anyhow::ensure!(
                    String::from_utf8_lossy(&answer).contains("200 OK"),
                    "the idle connection's request was answered first"
                );
            }
            anyhow::Ok(started.elapsed())
        });
    }
    // Meanwhile the site answers.
    let health = reqwest::get(format!("http://{address}/healthz")).await?;
    assert_eq!(health.status(), 200);
    let mut slowest = Duration::ZERO;
    while let Some(closed) = connections.join_next().await {
        slowest = slowest.max(closed??);
    }
    println!("50 slow or idle connections: all closed after {slowest:?}");
    assert!(
        slowest < Duration::from_secs(4),
        "closed about 1 s after their last request, not {slowest:?}"
    );
    assert!(web.terminate(Duration::from_secs(30)).await?.success());
    Ok(())
}

#[tokio::test]
async fn connections_beyond_the_cap_get_an_immediate_503_and_the_site_recovers()
-> anyhow::Result<()> {
    tests::budget::runs_processes(1);
    let db = TestDb::migrated().await?;
    let (web, address) = spawn_web(
        &db,
        &[("HTTP_MAX_CONNECTIONS", "5"), ("HTTP_HEADER_TIMEOUT", "30")],
    )
    .await?;
    // Five connections that say nothing hold every slot.
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(TcpStream::connect(&address).await?);
    }
    // The server accepts them in its own time: let it take all five.
    let give_up = Instant::now() + Duration::from_secs(10);
    let busy = loop {
        let started = Instant::now();
        let answer = raw_exchange(
            &address,
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            Duration::from_secs(5),
        )
        .await?;
        if answer.starts_with("HTTP/1.1 503") {
            break (answer, started.elapsed());
        }
        anyhow::ensure!(
            Instant::now() < give_up,
            "a sixth connection was served: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!("over the cap: 503 in {:?}", busy.1);
    assert!(busy.0.contains("Too many connections"), "{}", busy.0);
    assert!(
        busy.0.to_lowercase().contains("retry-after: 1"),
        "{}",
        busy.0
    );
    assert!(busy.1 < Duration::from_secs(1), "at once, not {:?}", busy.1);

    drop(held);
    let give_up = Instant::now() + Duration::from_secs(10);
    loop {
        let response = reqwest::get(format!("http://{address}/healthz")).await?;
        if response.status() == 200 {
            break;
        }
        anyhow::ensure!(Instant::now() < give_up, "slots never freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(web.terminate(Duration::from_secs(30)).await?.success());
    Ok(())
}

#[tokio::test]
async fn running_out_of_file_descriptors_is_logged_once_and_survived() -> anyhow::Result<()> {
    tests::budget::runs_processes(1);
    let db = TestDb::migrated().await?;
    let mut command = tokio::process::Command::new("prlimit");
    command
        .arg("--nofile=64:64")
        .arg(tests::binary("web")?)
        .env("DATABASE_URL", &db.url)
        .env("BIND", "127.0.0.1:0")
        .env("EMBEDDED_WORKER", "false")
        // As high as `web` allows under 64 descriptors (64 - 8): with the
        // pools' and the process's own descriptors, accept() itself fails
        // before the cap is reached.
        .env("HTTP_MAX_CONNECTIONS", "56")
        // All from one client (the test), which must not be stopped first.
        .env("HTTP_MAX_CONNECTIONS_PER_CLIENT", "56")
        .env("HTTP_HEADER_TIMEOUT", "30")
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1");
    let mut web = Process::start("web", command)?;
    let address = web.web_address().await?;
    let mut held = Vec::new();
    for _ in 0..100 {
        held.push(TcpStream::connect(&address).await?);
    }
    web.wait_for_line("cannot accept connections", Duration::from_secs(10))
        .await?;
    // Let it fail for a while: still one line.
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(held);
    let give_up = Instant::now() + Duration::from_secs(15);
    loop {
        let answer = raw_exchange(
            &address,
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            Duration::from_secs(5),
        )
        .await
        .unwrap_or_default();
        if answer.starts_with("HTTP/1.1 200") {
            break;
        }
        anyhow::ensure!(Instant::now() < give_up, "never recovered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    web.wait_for_line("accepting connections again", Duration::from_secs(5))
        .await?;
    let (status, output) = web.terminate_with_output(Duration::from_secs(30)).await?;
    assert!(status.success(), "{}", output.join("\n"));
    let errors = output
        .iter()
        .filter(|l| l.contains("cannot accept connections"))
        .count();
    assert_eq!(errors, 1, "one line per burst:\n{}", output.join("\n"));
    Ok(())
}

#[tokio::test]
async fn a_request_stuck_longer_than_the_request_timeout_is_answered_503() -> anyhow::Result<()> {
    tests::budget::runs_processes(1);
    let db = TestDb::migrated().await?;
    let (web, address) = spawn_web(&db, &[("HTTP_REQUEST_TIMEOUT", "1")]).await?;
    // Hold a lock that GET /'s insert waits for.
    let mut lock = db.pool.begin().await?;
    sqlx::query("lock table visits in access exclusive mode")
        .execute(&mut *lock)
        .await?;
    let started = Instant::now();
    let response = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?
        .get(format!("http://{address}/"))
        .send()
        .await?;
    let took = started.elapsed();
    println!(
        "stuck request answered {} after {took:?}",
        response.status()
    );
    assert_eq!(response.status(), 503);
    assert!(took < Duration::from_secs(3), "{took:?}");
    lock.rollback().await?;
    // The cancelled request's transaction was rolled back: no visit, no job.
    let visits: i64 = sqlx::query_scalar("select count(*) from visits")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(visits, 0);
    assert_eq!(
        reqwest::get(format!("http://{address}/")).await?.status(),
        200
    );
    assert!(web.terminate(Duration::from_secs(30)).await?.success());
    Ok(())
}

#[tokio::test]
async fn random_methods_and_paths_add_no_metrics_series() -> anyhow::Result<()> {
    tests::budget::runs_processes(1);
    let db = TestDb::migrated().await?;
    let (web, address) = spawn_web(&db, &[]).await?;
    let before = scrape(&address).await?;
    let client = reqwest::Client::new();
    let mut methods = HashSet::new();
    for n in 0..200 {
        let method = format!("M{n}X{}", ulid::Ulid::generate());
        let path = format!("/p{n}/{}", ulid::Ulid::generate());
        let response = client
            .request(
                reqwest::Method::from_bytes(method.as_bytes())?,
                format!("http://{address}{path}"),
            )
            .send()
            .await?;
        assert_eq!(response.status(), 404, "{method} {path}");
        methods.insert(method);
    }
    for n in 0..50 {
        let response = client
            .get(format!("http://{address}/nothing-{n}"))
            .send()
            .await?;
        assert_eq!(response.status(), 404);
    }
    let after = scrape(&address).await?;
    let series = |text: &str| text.lines().filter(|l| !l.starts_with('#')).count();
    assert!(
        !methods.iter().any(|m| after.contains(m.as_str())) && !after.contains("/p1/"),
        "no request-chosen label values:\n{after}"
    );
    let moved = |s: &str| sample(&after, s) - sample(&before, s);
    assert_eq!(
        moved(r#"visitme_http_requests_total{method="OTHER",route="unmatched",status="404"}"#),
        200.0,
        "{after}"
    );
    assert_eq!(
        moved(r#"visitme_http_requests_total{method="GET",route="unmatched",status="404"}"#),
        50.0,
        "{after}"
    );
    // Exactly three request series: the junk's two and the first scrape's.
    let mut request_series: Vec<&str> = after
        .lines()
        .filter_map(|l| {
            l.strip_prefix("visitme_http_requests_total{")?
                .split('}')
                .next()
        })
        .collect();
    request_series.sort_unstable();
    assert_eq!(
        request_series,
        [
            r#"method="GET",route="/metrics",status="200""#,
            r#"method="GET",route="unmatched",status="404""#,
            r#"method="OTHER",route="unmatched",status="404""#,
        ],
        "{after}"
    );
    println!(
        "/metrics: {} lines before, {} after 250 junk requests",
        series(&before),
        series(&after)
    );
    assert!(web.terminate(Duration::from_secs(30)).await?.success());
    Ok(())
}

#[tokio::test]
async fn thirty_concurrent_scrapes_count_the_queue_once_on_its_own_connection() -> anyhow::Result<()>
{
    tests::budget::runs_processes(1);
    let db = TestDb::migrated().await?;
    tests::enqueue_probes(
        &db.pool,
        (0..3).map(|n| jobs::probe::Probe {
            key: format!("depth-{n}"),
            behaviour: jobs::probe::Behaviour::Succeed,
        }),
    )
    .await?;
    let (web, address) = spawn_web(&db, &[("METRICS_QUEUE_REFRESH", "60")]).await?;
    let mut scrapers = JoinSet::new();
    for _ in 0..30 {
        let address = address.clone();
        scrapers.spawn(async move { scrape(&address).await });
    }
    // Page views are not slowed by the scrapers (they have their own connection).
    let page = reqwest::get(format!("http://{address}/")).await?;
    assert_eq!(page.status(), 200);
    while let Some(scraped) = scrapers.join_next().await {
        scraped??;
    }
    let metrics = scrape(&address).await?;
    assert_eq!(
        sample(&metrics, "visitme_queue_depth_queries_total"),
        1.0,
        "31 scrapes, one count:\n{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            r#"durable_jobs_queue_depth{queue="probe",state="pending"}"#
        ),
        3.0,
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            r#"durable_jobs_queue_depth{queue="probe",state="running"}"#
        ),
        0.0,
        "{metrics}"
    );
    let metrics_connections: i64 = sqlx::query_scalar(
        "select count(*) from pg_stat_activity
         where datname = current_database() and application_name = 'visitme-web metrics'",
    )
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(metrics_connections, 1);
    assert!(web.terminate(Duration::from_secs(30)).await?.success());
    Ok(())
}

#[tokio::test]
async fn metrics_bind_serves_metrics_on_its_own_address_and_not_on_the_site() -> anyhow::Result<()>
{
    tests::budget::runs_processes(1);
    let db = TestDb::migrated().await?;
    let (mut web, address) = spawn_web(&db, &[("METRICS_BIND", "127.0.0.1:0")]).await?;
    let line = web
        .wait_for_line("metrics on http://", Duration::from_secs(10))
        .await?;
    let metrics_address = line
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .ok_or_else(|| anyhow::anyhow!("no address in {line}"))?
        .to_owned();
    assert_eq!(
        reqwest::get(format!("http://{address}/")).await?.status(),
        200
    );
    let on_site = reqwest::get(format!("http://{address}/metrics")).await?;
    assert_eq!(on_site.status(), 404);
    let metrics = scrape(&metrics_address).await?;
    assert!(
        metrics.contains(r#"visitme_http_requests_total{method="GET",route="/",status="200"} 1"#),
        "{metrics}"
    );
    assert!(web.terminate(Duration::from_secs(30)).await?.success());
    Ok(())
}

#[tokio::test]
async fn head_of_the_page_records_no_visit_and_enqueues_no_job() -> anyhow::Result<()> {
    tests::budget::runs_processes(1);
    let db = TestDb::migrated().await?;
    let (web, address) = spawn_web(&db, &[]).await?;
    let client = reqwest::Client::new();
    for _ in 0..3 {
        let head = client.head(format!("http://{address}/")).send().await?;
        assert_eq!(head.status(), 200);
        assert_eq!(head.headers()["content-type"], "text/html; charset=utf-8");
        assert!(head.headers().contains_key("content-security-policy"));
    }
    let counts: (i64, i64) =
        sqlx::query_as("select (select count(*) from visits), (select count(*) from apalis.jobs)")
            .fetch_one(&db.pool)
            .await?;
    assert_eq!(counts, (0, 0), "(visits, jobs) after three HEAD /");
    assert!(web.terminate(Duration::from_secs(30)).await?.success());
    Ok(())
}

#[tokio::test]
async fn web_refuses_to_start_with_an_admin_token_under_16_characters() -> anyhow::Result<()> {
    let db = TestDb::migrated().await?;
    let output = tokio::process::Command::new(tests::binary("web")?)
        .env("DATABASE_URL", &db.url)
        .env("BIND", "127.0.0.1:0")
        .env("EMBEDDED_WORKER", "false")
        .env("ADMIN_TOKEN", "short-secret")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(30), output)
        .await
        .map_err(|_| anyhow::anyhow!("web started (still running after 30 s)"))??;
    assert_eq!(output.status.code(), Some(2), "a configuration error");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains("ADMIN_TOKEN") && lines[0].contains("at least 16"),
        "{stderr}"
    );
    assert!(!stderr.contains("short-secret"), "never the token itself");
    Ok(())
}

async fn dashboard_status(
    client: &reqwest::Client,
    address: &str,
    cookie: &str,
) -> anyhow::Result<u16> {
    Ok(client
        .get(format!("http://{address}/admin"))
        .header("cookie", cookie)
        .send()
        .await?
        .status()
        .as_u16())
}

#[tokio::test]
async fn eleven_wrong_tokens_in_a_minute_get_429_with_retry_after_for_that_address_only()
-> anyhow::Result<()> {
    tests::budget::runs_processes(1);
    let db = TestDb::migrated().await?;
    // Behind a trusted proxy, so the test can be several clients on loopback.
    let (web, address) = spawn_web(&db, &[("ADMIN_TOKEN", TOKEN), ("TRUST_PROXY", "true")]).await?;
    let client = plain_client()?;
    let attempt = |token: &'static str, from: &'static str| {
        client
            .post(format!("http://{address}/admin/login"))
            .header("x-forwarded-for", from)
            .form(&[("token", token)])
            .send()
    };
    for n in 1..=10 {
        assert_eq!(
            attempt("guess", "198.51.100.1").await?.status(),
            401,
            "guess {n}"
        );
    }
    let limited = attempt("guess", "198.51.100.1").await?;
    assert_eq!(limited.status(), 429);
    let wait: u64 = limited.headers()["retry-after"].to_str()?.parse()?;
    assert!((1..=60).contains(&wait), "Retry-After: {wait}");
    // Even the right token is not checked from there until the minute is over,
    assert_eq!(attempt(TOKEN, "198.51.100.1").await?.status(), 429);
    // nor by bearer,
    let bearer = client
        .get(format!("http://{address}/admin"))
        .header("x-forwarded-for", "198.51.100.1")
        .bearer_auth(TOKEN)
        .send()
        .await?;
    assert_eq!(bearer.status(), 429);
    // while another address logs in.
    assert_eq!(attempt(TOKEN, "203.0.113.5").await?.status(), 303);
    // 30 guesses at once from a third address: still exactly 10 get a verdict.
    let burst = futures::future::join_all((0..30).map(|_| attempt("guess", "192.0.2.7"))).await;
    let mut statuses = Vec::new();
    for response in burst {
        statuses.push(response?.status().as_u16());
    }
    let verdicts = statuses.iter().filter(|s| **s == 401).count();
    assert_eq!(verdicts, 10, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 20);
    assert!(web.terminate(Duration::from_secs(30)).await?.success());
    Ok(())
}

#[tokio::test]
async fn each_login_gets_its_own_session_and_sign_out_revokes_it() -> anyhow::Result<()> {
    tests::budget::runs_processes(1);
    let db = TestDb::migrated().await?;
    let (web, address) = spawn_web(&db, &[("ADMIN_TOKEN", TOKEN)]).await?;
    let client = plain_client()?;
    let (first, header) = login(&client, &address).await?;
    let (second, _) = login(&client, &address).await?;
    assert_ne!(first, second, "a fresh random session per login");
    assert!(header.contains("Max-Age=28800"), "{header}");
    assert!(!header.contains("Secure"), "plain HTTP: {header}");
    assert_eq!(dashboard_status(&client, &address, &first).await?, 200);

    let logout = client
        .post(format!("http://{address}/admin/logout"))
        .header("cookie", &first)
        .send()
        .await?;
    assert_eq!(logout.status(), 303);
    // The browser forgets it, and a copy of it no longer works either.
    assert_eq!(dashboard_status(&client, &address, &first).await?, 401);
    assert_eq!(dashboard_status(&client, &address, &second).await?, 200);
    assert!(web.terminate(Duration::from_secs(30)).await?.success());
    Ok(())
}

#[tokio::test]
async fn a_session_expires_after_its_lifetime() -> anyhow::Result<()> {
    let db = TestDb::migrated().await?;
    let auth =
        web::routes::admin::AdminAuth::new(TOKEN).with_session_lifetime(Duration::from_secs(1));
    let state = web::AppState::new(db.pool.clone()).with_admin(auth);
    let app = TestApp::spawn_with(db, state).await?;
    let address = app.address.to_string();
    let (session, header) = login(&app.client, &address).await?;
    assert!(header.contains("Max-Age=1"), "{header}");
    let opened = Instant::now();
    assert_eq!(
        dashboard_status(&app.client, &address, &session).await?,
        200
    );
    loop {
        let status = dashboard_status(&app.client, &address, &session).await?;
        if status == 401 {
            break;
        }
        assert!(opened.elapsed() < Duration::from_secs(5), "still {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(opened.elapsed() >= Duration::from_millis(900));
    app.stop().await
}

#[tokio::test]
async fn the_session_cookie_is_secure_when_a_trusted_proxy_says_https() -> anyhow::Result<()> {
    tests::budget::runs_processes(2);
    let db = TestDb::migrated().await?;
    let (web, address) = spawn_web(&db, &[("ADMIN_TOKEN", TOKEN), ("TRUST_PROXY", "true")]).await?;
    let client = plain_client()?;
    let login_via = |proto: &'static str| {
        client
            .post(format!("http://{address}/admin/login"))
            .header("x-forwarded-proto", proto)
            .form(&[("token", TOKEN)])
            .send()
    };
    let https = login_via("https").await?;
    assert!(
        https.headers()["set-cookie"].to_str()?.contains("; Secure"),
        "{:?}",
        https.headers()
    );
    let http = login_via("http").await?;
    assert!(!http.headers()["set-cookie"].to_str()?.contains("Secure"));
    assert!(web.terminate(Duration::from_secs(30)).await?.success());

    // Without TRUST_PROXY the header is anyone's: ignored.
    let (web, address) = spawn_web(&db, &[("ADMIN_TOKEN", TOKEN)]).await?;
    let untrusted = client
        .post(format!("http://{address}/admin/login"))
        .header("x-forwarded-proto", "https")
        .form(&[("token", TOKEN)])
        .send()
        .await?;
    assert!(
        !untrusted.headers()["set-cookie"]
            .to_str()?
            .contains("Secure")
    );
    assert!(web.terminate(Duration::from_secs(30)).await?.success());
    Ok(())
}

#[tokio::test]
async fn cross_origin_login_and_sign_out_are_refused() -> anyhow::Result<()> {
    tests::budget::runs_processes(1);
    let db = TestDb::migrated().await?;
    let (web, address) = spawn_web(&db, &[("ADMIN_TOKEN", TOKEN)]).await?;
    let client = plain_client()?;
    let forged_login = client
        .post(format!("http://{address}/admin/login"))
        .header("origin", "http://evil.example")
        .form(&[("token", TOKEN)])
        .send()
        .await?;
    assert_eq!(forged_login.status(), 403);
    assert!(!forged_login.headers().contains_key("set-cookie"));

    let (session, _) = login(&client, &address).await?;
    let forged_logout = client
        .post(format!("http://{address}/admin/logout"))
        .header("origin", "http://evil.example")
        .header("cookie", &session)
        .send()
        .await?;
    assert_eq!(forged_logout.status(), 403);
    assert_eq!(dashboard_status(&client, &address, &session).await?, 200);
    // Our own origin works.
    let own = client
        .post(format!("http://{address}/admin/login"))
        .header("origin", format!("http://{address}"))
        .form(&[("token", TOKEN)])
        .send()
        .await?;
    assert_eq!(own.status(), 303);
    assert!(web.terminate(Duration::from_secs(30)).await?.success());
    Ok(())
}

#[tokio::test]
async fn the_dashboard_shows_only_known_notices() -> anyhow::Result<()> {
    tests::budget::runs_processes(1);
    let db = TestDb::migrated().await?;
    let (web, address) = spawn_web(&db, &[("ADMIN_TOKEN", TOKEN)]).await?;
    let client = plain_client()?;
    let page = |query: &'static str| {
        client
            .get(format!("http://{address}/admin?{query}"))
            .bearer_auth(TOKEN)
            .send()
    };
    let forged = page("notice=Your+session+expired%2C+call+%2B1-555-0100")
        .await?
        .text()
        .await?;
    assert!(
        !forged.contains("555-0100") && !forged.contains(r#"id="notice""#),
        "{forged}"
    );
    let forged_job = page("notice=retried&job=call+555-0100")
        .await?
        .text()
        .await?;
    assert!(!forged_job.contains("555-0100"), "{forged_job}");
    assert!(forged_job.contains("retry: done"), "{forged_job}");
    let id = ulid::Ulid::generate().to_string();
    let known = client
        .get(format!("http://{address}/admin?notice=cancelled&job={id}"))
        .bearer_auth(TOKEN)
        .send()
        .await?
        .text()
        .await?;
    assert!(known.contains(&format!("cancel: job {id} done")), "{known}");
    assert!(web.terminate(Duration::from_secs(30)).await?.success());
    Ok(())
}

#[tokio::test]
async fn job_ids_are_percent_encoded_in_the_dashboards_form_actions() -> anyhow::Result<()> {
    let db = tests::TestDb::migrated().await?;
    // Rows with hostile ids, as another tool might have written them before
    // the schema refused them.
    sqlx::raw_sql(
        "drop trigger jobs_refuse_unrunnable_rows on apalis.jobs;
         insert into apalis.jobs (id, job_type, job, status, attempts, max_attempts)
         values ('../logout?x=1#', 'probe', '\\x7b7d', 'Killed', 3, 3),
                ('a b/c', 'probe', '\\x7b7d', 'Pending', 0, 3);",
    )
    .execute(&db.pool)
    .await?;
    let state = web::AppState::new(db.pool.clone()).with_admin_token("a-long-enough-token");
    let app = tests::TestApp::spawn_with(db, state).await?;
    let page = app
        .client
        .get(app.url("/admin"))
        .bearer_auth("a-long-enough-token")
        .send()
        .await?
        .text()
        .await?;
    assert!(
        page.contains(r#"action="/admin/jobs/..%2Flogout%3Fx%3D1%23/retry""#),
        "{page}"
    );
    assert!(
        page.contains(r#"action="/admin/jobs/a%20b%2Fc/cancel""#),
        "{page}"
    );
    app.stop().await
}

// ---- Red team, turn 3 (issue 21, item 5) ----

#[tokio::test]
async fn a_nul_byte_in_a_dashboard_id_or_filter_is_a_400_and_logs_no_error() -> anyhow::Result<()> {
    tests::budget::runs_processes(1);
    let db = TestDb::migrated().await?;
    let (web, address) = spawn_web(&db, &[("ADMIN_TOKEN", TOKEN)]).await?;
    let client = plain_client()?;
    let mut statuses = Vec::new();
    for path in [
        "/admin/jobs/%00",
        "/admin/jobs/01ARZ3NDEKTSV4RRFFQ69G5FA%00",
        "/admin?queue=%00",
        "/admin?before=%00",
        "/admin?queue=trim_visits%00&state=dead",
        "/admin/workflows/%00",
    ] {
        let response = client
            .get(format!("http://{address}{path}"))
            .bearer_auth(TOKEN)
            .send()
            .await?;
        statuses.push((path, response.status().as_u16()));
    }
    for path in [
        "/admin/jobs/%00/retry",
        "/admin/jobs/%00/cancel",
        "/admin/workflows/%00/cancel",
    ] {
        let response = client
            .post(format!("http://{address}{path}"))
            .bearer_auth(TOKEN)
            .form(&[("csrf", "")])
            .send()
            .await?;
        statuses.push((path, response.status().as_u16()));
    }
    // A real query still works after them.
    let fine = client
        .get(format!("http://{address}/admin?queue=trim_visits"))
        .bearer_auth(TOKEN)
        .send()
        .await?;
    assert_eq!(fine.status(), 200);
    let (status, output) = web.terminate_with_output(Duration::from_secs(30)).await?;
    assert!(status.success());
    println!("NUL inputs: {statuses:?}");
    assert!(statuses.iter().all(|(_, s)| *s == 400), "{statuses:?}");
    let errors: Vec<&String> = output.iter().filter(|l| l.contains("ERROR")).collect();
    assert!(errors.is_empty(), "{errors:#?}");
    Ok(())
}

#[tokio::test]
async fn an_https_origin_of_the_same_host_is_cross_origin_for_plain_http() -> anyhow::Result<()> {
    tests::budget::runs_processes(2);
    let db = TestDb::migrated().await?;
    let (web, address) = spawn_web(&db, &[("ADMIN_TOKEN", TOKEN)]).await?;
    let client = plain_client()?;
    let login_from = |origin: String| {
        client
            .post(format!("http://{address}/admin/login"))
            .header("origin", origin)
            .form(&[("token", TOKEN)])
            .send()
    };
    let port = address.rsplit(':').next().unwrap_or_default();
    let mut refused = Vec::new();
    for origin in [
        format!("https://{address}"),
        format!("https://127.0.0.1:{port}"),
        format!("ftp://{address}"),
        "http://127.0.0.1".to_owned(),
        "null".to_owned(),
    ] {
        let status = login_from(origin.clone()).await?.status().as_u16();
        refused.push((origin, status));
    }
    println!("foreign origins: {refused:?}");
    assert!(refused.iter().all(|(_, s)| *s == 403), "{refused:?}");
    // Our own origin, in any letter case, logs in.
    let own = login_from(format!("HTTP://{address}")).await?;
    assert_eq!(own.status(), 303);
    assert!(web.terminate(Duration::from_secs(30)).await?.success());

    // Behind a trusted TLS proxy the browser's origin is https, and that is ours.
    let db = TestDb::migrated().await?;
    let (web, address) = spawn_web(&db, &[("ADMIN_TOKEN", TOKEN), ("TRUST_PROXY", "true")]).await?;
    let via_proxy = |origin: String| {
        client
            .post(format!("http://{address}/admin/login"))
            .header("origin", origin)
            .header("host", "visitme.example")
            .header("x-forwarded-proto", "https")
            .form(&[("token", TOKEN)])
            .send()
    };
    assert_eq!(
        via_proxy("https://visitme.example".to_owned())
            .await?
            .status(),
        303
    );
    assert_eq!(
        via_proxy("https://visitme.example:443".to_owned())
            .await?
            .status(),
        303
    );
    assert_eq!(
        via_proxy("http://visitme.example".to_owned())
            .await?
            .status(),
        403
    );
    assert!(web.terminate(Duration::from_secs(30)).await?.success());
    Ok(())
}

#[tokio::test]
async fn each_session_has_its_own_csrf_token_which_dies_with_it() -> anyhow::Result<()> {
    tests::budget::runs_processes(1);
    let db = TestDb::migrated().await?;
    let (web, address) = spawn_web(&db, &[("ADMIN_TOKEN", TOKEN)]).await?;
    let client = plain_client()?;
    // A page view enqueues a trim; with no worker it waits, so the dashboard offers Cancel.
    reqwest::get(format!("http://{address}/"))
        .await?
        .error_for_status()?;
    let job: String = sqlx::query_scalar("select id from apalis.jobs")
        .fetch_one(&db.pool)
        .await?;
    let csrf_for = |session: String| {
        let client = client.clone();
        let address = address.clone();
        async move {
            let page = client
                .get(format!("http://{address}/admin"))
                .header("cookie", session)
                .send()
                .await?
                .text()
                .await?;
            csrf_of(&page).ok_or_else(|| anyhow::anyhow!("no CSRF token on {page}"))
        }
    };
    let (first, _) = login(&client, &address).await?;
    let (second, _) = login(&client, &address).await?;
    let (first_csrf, second_csrf) = (
        csrf_for(first.clone()).await?,
        csrf_for(second.clone()).await?,
    );
    println!("CSRF tokens: {first_csrf} / {second_csrf}");
    assert_ne!(first_csrf, second_csrf, "one CSRF token per session");
    assert_eq!(
        csrf_for(first.clone()).await?,
        first_csrf,
        "stable within a session"
    );
    let cancel = |session: String, csrf: String| {
        client
            .post(format!("http://{address}/admin/jobs/{job}/cancel"))
            .header("cookie", session)
            .form(&[("csrf", csrf)])
            .send()
    };
    // Another session's token is refused,
    assert_eq!(
        cancel(second.clone(), first_csrf.clone()).await?.status(),
        403
    );
    // and after sign-out the token is nobody's: not the next login's either.
    let logout = client
        .post(format!("http://{address}/admin/logout"))
        .header("cookie", &first)
        .send()
        .await?;
    assert_eq!(logout.status(), 303);
    let (third, _) = login(&client, &address).await?;
    assert_ne!(csrf_for(third.clone()).await?, first_csrf);
    assert_eq!(cancel(third.clone(), first_csrf).await?.status(), 403);
    assert_eq!(cancel(second, second_csrf).await?.status(), 303);
    assert!(web.terminate(Duration::from_secs(30)).await?.success());
    Ok(())
}

#[tokio::test]
async fn the_workflow_cancel_form_needs_its_sessions_csrf_token() -> anyhow::Result<()> {
    tests::budget::runs_processes(1);
    let db = TestDb::migrated().await?;
    let (web, address) = spawn_web(&db, &[("ADMIN_TOKEN", TOKEN)]).await?;
    let client = plain_client()?;
    // No worker: both steps wait, so the workflow's page offers Cancel.
    let workflow = tests::enqueue_two_step_workflow(&db.pool, "cancel-by-form").await?;
    let (session, _) = login(&client, &address).await?;
    let page = client
        .get(format!("http://{address}/admin/workflows/{workflow}"))
        .header("cookie", &session)
        .send()
        .await?
        .text()
        .await?;
    let csrf = csrf_of(&page).ok_or_else(|| anyhow::anyhow!("no cancel form on {page}"))?;
    let cancel = |csrf: &str| {
        client
            .post(format!(
                "http://{address}/admin/workflows/{workflow}/cancel"
            ))
            .header("cookie", &session)
            .form(&[("csrf", csrf.to_owned())])
            .send()
    };
    let open_steps = || async {
        sqlx::query_scalar::<_, i64>(
            "select count(*) from apalis.jobs where status not in ('Killed', 'Done')",
        )
        .fetch_one(&db.pool)
        .await
    };
    let open = open_steps().await?;
    assert!(open > 0, "the workflow waits");
    for wrong in ["", "0000", &format!("{csrf}x")] {
        assert_eq!(cancel(wrong).await?.status(), 403, "token {wrong:?}");
    }
    assert_eq!(open_steps().await?, open, "a refused form cancels nothing");
    // The page's own form, posted as a browser would.
    let posted = cancel(&csrf).await?;
    assert_eq!(posted.status(), 303);
    assert_eq!(open_steps().await?, 0, "the form cancelled the workflow");
    assert!(web.terminate(Duration::from_secs(30)).await?.success());
    Ok(())
}

#[tokio::test]
async fn the_queue_pages_forms_need_the_sessions_csrf_token_and_numbers() -> anyhow::Result<()> {
    tests::budget::runs_processes(1);
    let db = TestDb::migrated().await?;
    let (web, address) = spawn_web(&db, &[("ADMIN_TOKEN", TOKEN)]).await?;
    let client = plain_client()?;
    let (session, _) = login(&client, &address).await?;
    let page = client
        .get(format!("http://{address}/admin/queues/trim_visits"))
        .header("cookie", &session)
        .send()
        .await?;
    assert_eq!(page.status(), 200);
    let page = page.text().await?;
    let csrf = csrf_of(&page).ok_or_else(|| anyhow::anyhow!("no form on {page}"))?;
    let post = |action: &str, form: Vec<(&'static str, String)>| {
        client
            .post(format!(
                "http://{address}/admin/queues/trim_visits/{action}"
            ))
            .header("cookie", &session)
            .form(&form)
            .send()
    };
    let paused = || async {
        anyhow::Ok(
            durable_jobs::admin::queue_controls_of(&db.pool, "trim_visits")
                .await?
                .paused,
        )
    };
    for wrong in ["", "0000", &format!("{csrf}x")] {
        let refused = post("pause", vec![("csrf", wrong.to_owned())]).await?;
        assert_eq!(refused.status(), 403, "token {wrong:?}");
    }
    assert!(!paused().await?, "a refused form pauses nothing");
    assert_eq!(
        post("pause", vec![("csrf", csrf.clone())]).await?.status(),
        303
    );
    assert!(paused().await?, "the page's form paused the queue");
    // Limits must be numbers in range; a refused form changes nothing.
    for (field, value) in [
        ("concurrency", "0"),
        ("rate", "NaN"),
        ("burst", "3"),
        ("key_concurrency", "-2"),
    ] {
        let refused = post(
            "limits",
            vec![("csrf", csrf.clone()), (field, value.to_owned())],
        )
        .await?;
        assert_eq!(refused.status(), 400, "{field}={value}");
    }
    let controls = durable_jobs::admin::queue_controls_of(&db.pool, "trim_visits").await?;
    assert!(!controls.overridden, "{controls:?}");
    let set = post(
        "limits",
        vec![
            ("csrf", csrf.clone()),
            ("rate", "2.5".to_owned()),
            ("burst", "3".to_owned()),
        ],
    )
    .await?;
    assert_eq!(set.status(), 303);
    let controls = durable_jobs::admin::queue_controls_of(&db.pool, "trim_visits").await?;
    assert_eq!(
        controls.in_force,
        durable_jobs::Limits::none().rate(durable_jobs::Rate::per_second(2.5).burst(3))
    );
    assert_eq!(
        post("no-such-action", vec![("csrf", csrf)]).await?.status(),
        404
    );
    assert!(web.terminate(Duration::from_secs(30)).await?.success());
    Ok(())
}

#[tokio::test]
async fn a_flood_of_wrong_tokens_logs_one_line_per_address_and_minute() -> anyhow::Result<()> {
    tests::budget::runs_processes(1);
    let db = TestDb::migrated().await?;
    let (web, address) = spawn_web(&db, &[("ADMIN_TOKEN", TOKEN), ("TRUST_PROXY", "true")]).await?;
    let client = plain_client()?;
    let mut statuses = std::collections::BTreeMap::<u16, u32>::new();
    for from in ["198.51.100.1", "198.51.100.2"] {
        for _ in 0..300 {
            let response = client
                .post(format!("http://{address}/admin/login"))
                .header("x-forwarded-for", from)
                .form(&[("token", "guess")])
                .send()
                .await?;
            *statuses.entry(response.status().as_u16()).or_default() += 1;
        }
    }
    let (status, output) = web.terminate_with_output(Duration::from_secs(30)).await?;
    assert!(status.success());
    let refused: Vec<&String> = output
        .iter()
        .filter(|l| l.contains("WARN") && l.contains("admin login refused"))
        .collect();
    let bytes: usize = refused.iter().map(|l| l.len() + 1).sum();
    println!(
        "600 refused logins: {statuses:?}, {} WARN lines, {bytes} bytes",
        refused.len()
    );
    assert_eq!(statuses.get(&401), Some(&20), "{statuses:?}");
    assert_eq!(refused.len(), 2, "{refused:#?}");
    assert!(
        refused.iter().all(|l| l.contains("refused=")),
        "{refused:#?}"
    );
    Ok(())
}

#[tokio::test]
async fn idle_sockets_of_one_client_leave_other_clients_served() -> anyhow::Result<()> {
    tests::budget::runs_processes(1);
    let db = TestDb::migrated().await?;
    let (web, address) = spawn_web(
        &db,
        &[
            ("HTTP_MAX_CONNECTIONS", "16"),
            ("HTTP_MAX_CONNECTIONS_PER_CLIENT", "4"),
            ("HTTP_HEADER_TIMEOUT", "30"),
        ],
    )
    .await?;
    let port: u16 = address.rsplit(':').next().unwrap_or_default().parse()?;
    // A connection from `local` (loopback has all of 127/8).
    let connect_from = |local: [u8; 4]| async move {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind((std::net::Ipv4Addr::from(local), 0).into())?;
        anyhow::Ok(socket.connect(([127, 0, 0, 1], port).into()).await?)
    };
    let exchange_from = |local: [u8; 4]| async move {
        let mut stream = connect_from(local).await?;
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await?;
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await??;
        anyhow::Ok(String::from_utf8_lossy(&answer).into_owned())
    };
    // Four idle sockets from 127.0.0.9: its share.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(connect_from([127, 0, 0, 9]).await?);
    }
    let give_up = Instant::now() + Duration::from_secs(10);
    let busy = loop {
        let answer = exchange_from([127, 0, 0, 9]).await?;
        if answer.starts_with("HTTP/1.1 503") {
            break answer;
        }
        anyhow::ensure!(
            Instant::now() < give_up,
            "a fifth connection of one client was served: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(busy.contains("Too many connections"), "{busy}");
    // Everyone else is served meanwhile.
    for other in [[127, 0, 0, 1], [127, 0, 0, 2]] {
        let answer = exchange_from(other).await?;
        assert!(answer.starts_with("HTTP/1.1 200"), "{other:?}: {answer}");
    }
    drop(held);
    let give_up = Instant::now() + Duration::from_secs(10);
    while !exchange_from([127, 0, 0, 9])
        .await?
        .starts_with("HTTP/1.1 200")
    {
        anyhow::ensure!(Instant::now() < give_up, "the client's slots never freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, output) = web.terminate_with_output(Duration::from_secs(30)).await?;
    assert!(status.success());
    assert!(
        output
            .iter()
            .any(|l| l.contains("per-client connection limit")),
        "{output:#?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_50_mb_payload_is_read_and_shown_as_a_64_kib_prefix() -> anyhow::Result<()> {
    let db = TestDb::migrated().await?;
    let id = ulid::Ulid::generate().to_string();
    // Random text, so that Postgres cannot compress it away.
    sqlx::query(
        r#"insert into apalis.jobs (id, job_type, job, status, attempts, max_attempts)
           select $1, 'trim_visits',
                  convert_to('{"older_than":"2026-01-01T00:00:00Z","padding":"'
                             || string_agg(md5(n::text), '') || '"}', 'UTF8'),
                  'Pending', 0, 3
           from generate_series(1, 1600000) n"#,
    )
    .bind(&id)
    .execute(&db.pool)
    .await?;
    let stored: i32 = sqlx::query_scalar("select octet_length(job) from apalis.jobs where id = $1")
        .bind(&id)
        .fetch_one(&db.pool)
        .await?;
    let pool = db.pool.clone();
    let state = web::AppState::new(db.pool.clone()).with_admin_token(TOKEN);
    let app = TestApp::spawn_with(db, state).await?;
    let page = app
        .client
        .get(app.url(&format!("/admin/jobs/{id}")))
        .bearer_auth(TOKEN)
        .send()
        .await?;
    assert_eq!(page.status(), 200);
    let page = page.text().await?;
    let panel = app.client.get(app.url("/background-work")).send().await?;
    assert_eq!(panel.status(), 200);
    let panel = panel.text().await?;
    // What the panel reads: the newest trim, through the engine's admin API.
    let latest = durable_jobs::admin::latest_job_of(&pool, "trim_visits")
        .await?
        .ok_or_else(|| anyhow::anyhow!("no trim job"))?;
    println!(
        "payload {stored} bytes: job page {} bytes, panel {} bytes, panel read {} bytes",
        page.len(),
        panel.len(),
        latest.payload.len()
    );
    assert!(page.len() < 256 * 1024, "job page of {} bytes", page.len());
    assert!(
        page.contains(&format!("{stored} bytes")),
        "the full size is noted"
    );
    assert!(
        latest.payload.len() <= 64 * 1024,
        "{}",
        latest.payload.len()
    );
    assert!(panel.len() < 64 * 1024);
    // A huge result is cut the same way.
    sqlx::query(
        "update apalis.jobs set status = 'Done', done_at = now(),
                last_result = jsonb_build_object('Ok', repeat('y', 10000000)) where id = $1",
    )
    .bind(&id)
    .execute(&pool)
    .await?;
    let page = app
        .client
        .get(app.url(&format!("/admin/jobs/{id}")))
        .bearer_auth(TOKEN)
        .send()
        .await?
        .text()
        .await?;
    assert!(page.len() < 256 * 1024, "job page of {} bytes", page.len());
    assert!(
        page.contains(r#"id="job-result-cut""#),
        "the result is noted as cut"
    );
    app.stop().await
}

#[tokio::test]
async fn readyz_says_the_pool_is_exhausted_when_it_is() -> anyhow::Result<()> {
    let db = TestDb::migrated().await?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_millis(300))
        .connect_with((*db.pool.connect_options()).clone())
        .await?;
    let state = web::AppState::new(pool.clone());
    let app = TestApp::spawn_with(db, state).await?;
    assert_eq!(
        app.client.get(app.url("/readyz")).send().await?.status(),
        200
    );
    let held = pool.acquire().await?;
    let response = app.client.get(app.url("/readyz")).send().await?;
    let status = response.status();
    let body = response.text().await?;
    println!("/readyz with the pool exhausted: {status} {body:?}");
    assert_eq!(status, 503);
    assert!(body.contains("database pool exhausted"), "{body}");
    assert!(!body.contains("migration"), "{body}");
    drop(held);
    assert_eq!(
        app.client.get(app.url("/readyz")).send().await?.status(),
        200
    );
    app.stop().await
}

#[tokio::test]
async fn the_jobs_list_with_or_without_a_trailing_slash_leads_to_the_overview() -> anyhow::Result<()>
{
    let db = TestDb::migrated().await?;
    let state = web::AppState::new(db.pool.clone()).with_admin_token(TOKEN);
    let app = TestApp::spawn_with(db, state).await?;
    let mut answers = Vec::new();
    for path in [
        "/admin/jobs/",
        "/admin/jobs",
        "/admin/jobs/?queue=probe&state=dead",
    ] {
        let response = app
            .client
            .get(app.url(path))
            .bearer_auth(TOKEN)
            .send()
            .await?;
        let location = response
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        answers.push((path, response.status().as_u16(), location));
    }
    println!("{answers:?}");
    assert_eq!(answers[0].1, 308, "{answers:?}");
    assert_eq!(answers[0].2, "/admin");
    assert_eq!(answers[1].2, "/admin");
    assert_eq!(answers[2].2, "/admin?queue=probe&state=dead");
    // Only behind the login, like the rest of the dashboard.
    let anonymous = app.client.get(app.url("/admin/jobs/")).send().await?;
    assert_eq!(anonymous.status(), 401);
    app.stop().await
}

#[tokio::test]
async fn a_fatal_error_is_shown_without_the_abort_error_prefix() -> anyhow::Result<()> {
    let db = TestDb::migrated().await?;
    let id = ulid::Ulid::generate().to_string();
    // As the engine stores a payload that does not decode: apalis's AbortError, Display'ed.
    sqlx::query(
        r#"insert into apalis.jobs (id, job_type, job, status, attempts, max_attempts, done_at, last_result)
           values ($1, 'probe', '\x7b7d', 'Killed', 1, 3, now(),
                   '{"Err": "AbortError: cannot decode probe payload: missing field `key`"}')"#,
    )
    .bind(&id)
    .execute(&db.pool)
    .await?;
    let state = web::AppState::new(db.pool.clone()).with_admin_token(TOKEN);
    let app = TestApp::spawn_with(db, state).await?;
    for path in ["/admin".to_owned(), format!("/admin/jobs/{id}")] {
        let page = app
            .client
            .get(app.url(&path))
            .bearer_auth(TOKEN)
            .send()
            .await?
            .text()
            .await?;
        assert!(
            page.contains("cannot decode probe payload"),
            "{path}: {page}"
        );
        assert!(!page.contains("AbortError"), "{path}: {page}");
    }
    app.stop().await
}
