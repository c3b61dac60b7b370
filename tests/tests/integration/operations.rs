//! Operating VisitMe: /metrics, the jobs dashboard, `just up`, Docker files.

use std::time::Duration;

use jobs::probe::{Behaviour, Probe};
use tests::{Process, TestApp, TestDb, enqueue_probes, fast_worker_env};

/// The value of the sample `name{labels}` (labels as rendered), 0 if absent.
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn metrics_count_requests_visits_and_jobs() -> anyhow::Result<()> {
    tests::budget::runs_processes(1);
    // A `web` process of its own (embedded worker on), so every count is ours
    // alone and can be exact; the queue depth is counted afresh on each scrape.
    let db = TestDb::migrated().await?;
    let mut env = fast_worker_env();
    env.extend([
        ("DATABASE_URL", db.url.as_str()),
        ("BIND", "127.0.0.1:0"),
        ("METRICS_QUEUE_REFRESH", "0"),
    ]);
    let mut web = Process::spawn("web", &env)?;
    let address = web.web_address().await?;
    let client = reqwest::Client::new();
    let scrape = || async {
        let response = client
            .get(format!("http://{address}/metrics"))
            .send()
            .await?;
        assert_eq!(
            response.headers()["content-type"],
            "text/plain; version=0.0.4; charset=utf-8"
        );
        anyhow::Ok(response.text().await?)
    };
    // Three probes due in an hour: the queue depth must show exactly them.
    let later = enqueue_probes(
        &db.pool,
        (0..3).map(|n| Probe {
            key: format!("later-{n}"),
            behaviour: Behaviour::Succeed,
        }),
    )
    .await?;
    sqlx::query("update apalis.jobs set run_at = now() + interval '1 hour' where id = any($1)")
        .bind(&later)
        .execute(&db.pool)
        .await?;
    let before = scrape().await?;
    for n in 0..12 {
        let page = client
            .get(format!("http://{address}/"))
            .header("user-agent", format!("metered-{n}"))
            .send()
            .await?;
        assert_eq!(page.status(), 200);
    }
    let trims_done = || async {
        anyhow::Ok(
            sqlx::query_scalar::<_, i64>(
                "select count(*) from apalis.jobs where job_type = 'trim_visits' and status = 'Done'",
            )
            .fetch_one(&db.pool)
            .await?,
        )
    };
    // Wait for the trims (the three probes stay scheduled), then scrape.
    let give_up = std::time::Instant::now() + Duration::from_secs(30);
    while sqlx::query_scalar::<_, i64>(
        "select count(*) from apalis.jobs where job_type = 'trim_visits' and status <> 'Done'",
    )
    .fetch_one(&db.pool)
    .await?
        > 0
    {
        anyhow::ensure!(std::time::Instant::now() < give_up, "trims did not finish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = scrape().await?;

    let moved = |series: &str| sample(&after, series) - sample(&before, series);
    assert_eq!(moved("visitme_visits_recorded_total"), 12.0, "{after}");
    assert_eq!(
        moved(r#"visitme_http_requests_total{method="GET",route="/",status="200"}"#),
        12.0,
        "{after}"
    );
    assert_eq!(
        moved(r#"visitme_http_requests_total{method="GET",route="/metrics",status="200"}"#),
        1.0,
        "the scrape before is counted once it answered: {after}"
    );
    assert_eq!(
        moved(r#"durable_jobs_enqueued_total{queue="trim_visits"}"#),
        12.0,
        "{after}"
    );
    let done = trims_done().await?;
    assert!(done >= 1);
    assert_eq!(
        moved(r#"durable_jobs_succeeded_total{queue="trim_visits"}"#),
        done as f64,
        "one success per trim that ran: {after}"
    );
    assert!(
        after.contains("durable_jobs_duration_seconds_bucket"),
        "job duration is a histogram"
    );
    assert!(after.contains("visitme_http_request_duration_seconds_bucket"));
    // Queue depth by state, as the database has it.
    for metrics in [&before, &after] {
        assert_eq!(
            sample(
                metrics,
                r#"durable_jobs_queue_depth{queue="probe",state="scheduled"}"#
            ),
            3.0,
            "{metrics}"
        );
        assert_eq!(
            sample(
                metrics,
                r#"durable_jobs_queue_depth{queue="probe",state="pending"}"#
            ),
            0.0,
            "{metrics}"
        );
    }
    // The trims ran: none open (absent, or 0 if a scrape saw one open).
    for state in ["pending", "scheduled", "claimed", "running"] {
        let series = format!(r#"durable_jobs_queue_depth{{queue="trim_visits",state="{state}"}}"#);
        assert_eq!(sample(&after, &series), 0.0, "{after}");
    }
    assert!(web.terminate(Duration::from_secs(30)).await?.success());
    Ok(())
}

#[tokio::test]
async fn dashboard_is_disabled_without_a_token_and_refuses_requests_without_it()
-> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let response = app.client.get(app.url("/admin")).send().await?;
    assert_eq!(response.status(), 403);
    assert!(response.text().await?.contains("ADMIN_TOKEN"));
    app.stop().await?;

    let db = TestDb::migrated().await?;
    let state = web::AppState::new(db.pool.clone()).with_admin_token("s3cret-token");
    let app = TestApp::spawn_with(db, state).await?;
    let get = |bearer: Option<&'static str>| {
        let mut request = app.client.get(app.url("/admin"));
        if let Some(token) = bearer {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    let anonymous = get(None).await?;
    assert_eq!(anonymous.status(), 401);
    assert!(
        anonymous.text().await?.contains("Admin token"),
        "a login form"
    );
    assert_eq!(get(Some("wrong")).await?.status(), 401);
    assert_eq!(get(Some("s3cret-token")).await?.status(), 200);
    let wrong_login = app
        .client
        .post(app.url("/admin/login"))
        .form(&[("token", "nope")])
        .send()
        .await?;
    assert_eq!(wrong_login.status(), 401);
    let forged = app
        .client
        .post(app.url("/admin/jobs/01JX/retry"))
        .form(&[("csrf", "x")])
        .send()
        .await?;
    assert_eq!(forged.status(), 401, "actions need credentials");
    app.stop().await
}

#[tokio::test]
async fn dashboard_lists_jobs_and_its_actions_change_their_state() -> anyhow::Result<()> {
    let db = TestDb::migrated().await?;
    let state = web::AppState::new(db.pool.clone()).with_admin_token("s3cret-token");
    let app = TestApp::spawn_with(db, state).await?;
    let probe = |key: &str| Probe {
        key: key.to_owned(),
        behaviour: Behaviour::Succeed,
    };
    let ids = enqueue_probes(&app.db.pool, [probe("to-retry"), probe("to-cancel")]).await?;
    sqlx::query(r#"update apalis.jobs set status = 'Killed', attempts = 3, done_at = now(), last_result = '{"Err": "it broke"}' where id = $1"#)
        .bind(&ids[0])
        .execute(&app.db.pool)
        .await?;

    // Log in with the form: a session cookie, HttpOnly and SameSite=Strict.
    let login = app
        .client
        .post(app.url("/admin/login"))
        .form(&[("token", "s3cret-token")])
        .send()
        .await?;
    assert_eq!(login.status(), 303);
    let cookie = login.headers()["set-cookie"].to_str()?.to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    assert!(
        !cookie.contains("s3cret-token"),
        "the token itself is never the cookie"
    );
    let session = cookie.split(';').next().expect("name=value").to_owned();

    let page = app
        .client
        .get(app.url("/admin"))
        .header("cookie", &session)
        .send()
        .await?
        .text()
        .await?;
    assert!(
        page.contains(&ids[0]) && page.contains("it broke") && page.contains(&ids[1]),
        "{page}"
    );
    assert!(page.contains(&format!(r#"action="/admin/jobs/{}/retry""#, ids[0])));
    assert!(page.contains(&format!(r#"action="/admin/jobs/{}/cancel""#, ids[1])));
    // The session's own CSRF token, as its forms carry it.
    let csrf = page
        .split_once(r#"name="csrf" value=""#)
        .and_then(|(_, rest)| rest.split('"').next())
        .expect("a CSRF token in the forms")
        .to_owned();

    let status = |id: &str| {
        let pool = app.db.pool.clone();
        let id = id.to_owned();
        async move {
            anyhow::Ok(
                sqlx::query_scalar::<_, String>("select status from apalis.jobs where id = $1")
                    .bind(id)
                    .fetch_one(&pool)
                    .await?,
            )
        }
    };
    let post = |path: String, csrf: &str, origin: Option<&str>| {
        let mut request = app
            .client
            .post(app.url(&path))
            .header("cookie", &session)
            .form(&[("csrf", csrf)]);
        if let Some(origin) = origin {
            request = request.header("origin", origin);
        }
        request.send()
    };
    // Without the page's CSRF token, or from another origin: refused, nothing changes.
    assert_eq!(
        post(format!("/admin/jobs/{}/retry", ids[0]), "forged", None)
            .await?
            .status(),
        403
    );
    assert_eq!(
        post(
            format!("/admin/jobs/{}/retry", ids[0]),
            &csrf,
            Some("http://evil.example")
        )
        .await?
        .status(),
        403
    );
    assert_eq!(status(&ids[0]).await?, "Killed");

    let retried = post(
        format!("/admin/jobs/{}/retry", ids[0]),
        &csrf,
        Some(&format!("http://{}", app.address)),
    )
    .await?;
    assert_eq!(retried.status(), 303);
    assert_eq!(status(&ids[0]).await?, "Pending");
    let cancelled = post(format!("/admin/jobs/{}/cancel", ids[1]), &csrf, None).await?;
    assert_eq!(cancelled.status(), 303);
    assert!(
        cancelled.headers()["location"]
            .to_str()?
            .starts_with("/admin?notice=")
    );
    assert_eq!(status(&ids[1]).await?, "Killed");

    // Scripts use the bearer token (no cookie, so no CSRF token needed).
    let by_script = app
        .client
        .post(app.url(&format!("/admin/jobs/{}/cancel", ids[0])))
        .bearer_auth("s3cret-token")
        .form(&[("csrf", "")])
        .send()
        .await?;
    assert_eq!(by_script.status(), 303);
    assert_eq!(status(&ids[0]).await?, "Killed");
    app.stop().await
}

#[tokio::test]
async fn docker_files_name_binaries_that_exist_read_without_docker() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let read = |path: &str| std::fs::read_to_string(format!("{root}/{path}"));
    let dockerfile = read("Dockerfile")?;
    let compose = read("docker-compose.yml")?;
    let bins = [read("web/Cargo.toml")?, read("jobs/Cargo.toml")?].concat();
    for binary in ["web", "worker"] {
        assert!(
            bins.contains(&format!("name = \"{binary}\"")),
            "{binary} is a [[bin]] of the workspace"
        );
        assert!(
            dockerfile.contains(&format!("target/release/{binary}")),
            "the build stage copies {binary}"
        );
        assert!(
            dockerfile.contains(&format!("/usr/local/bin/{binary}")),
            "the runtime stage has {binary}"
        );
        assert!(
            compose.contains(&format!("command: [\"{binary}\"]")),
            "compose runs {binary}"
        );
    }
    assert!(
        dockerfile.contains("AS build") && dockerfile.contains("AS runtime"),
        "multi-stage"
    );
    for service in ["postgres:", "jaeger:", "web:", "worker:"] {
        assert!(
            compose.contains(&format!("\n  {service}")),
            "service {service}"
        );
    }
    assert!(compose.matches("healthcheck:").count() >= 2);
    // The worker service must be scalable: no fixed container name or host port.
    let worker = compose.split("\n  worker:").nth(1).expect("worker service");
    assert!(!worker.contains("container_name") && !worker.contains("ports:"));
    Ok(())
}

#[tokio::test]
async fn just_up_starts_everything_serves_scales_and_stops_every_child_on_ctrl_c()
-> anyhow::Result<()> {
    tests::budget::runs_processes(3);
    let db = TestDb::migrated().await?;
    let data = std::env::temp_dir().join(format!("visitme-up-{}", ulid::Ulid::generate()));
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let bind = format!("127.0.0.1:{port}");
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let mut command = tokio::process::Command::new("bash");
    command
        .arg(format!("{root}/scripts/up.sh"))
        .arg("1")
        .env(
            "UP_PROFILE",
            if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
        )
        .env("UP_DATA_DIR", &data)
        // The features of our binaries (tests::binary), or its build would
        // replace them, under every other running test, with probe-less ones.
        .env("UP_FEATURES", "jobs/probes")
        .env("BIND", &bind)
        .env("DATABASE_URL", &db.url)
        // Heartbeats every second, so that the test sees the workers beat.
        .env("JOB_LEASE", "3")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT");
    // The script builds too: the same environment as ours keeps that quick.
    for key in tests::cargo_crate_env() {
        command.env_remove(key);
    }
    tests::binary("web")?; // built once, so the script's own build is quick
    let mut up = Process::start("up", command)?;
    up.wait_for_line("VisitMe: http://", Duration::from_secs(120))
        .await?;
    let page = reqwest::get(format!("http://{bind}/")).await?;
    assert_eq!(page.status(), 200);
    up.wait_for_line("[web]", Duration::from_secs(10)).await?;
    up.wait_for_line("[worker-1]", Duration::from_secs(10))
        .await?;

    let scale = tokio::process::Command::new("bash")
        .arg(format!("{root}/scripts/scale.sh"))
        .arg("2")
        .env("UP_DATA_DIR", &data)
        .env("JOB_LEASE", "3")
        .output()
        .await?;
    assert!(
        scale.status.success(),
        "{}",
        String::from_utf8_lossy(&scale.stderr)
    );
    let listed: Vec<(i32, String)> = std::fs::read_to_string(data.join("up.pids"))?
        .lines()
        .filter_map(|line| {
            let (pid, name) = line.split_once(' ')?;
            Some((pid.parse().ok()?, name.to_owned()))
        })
        .collect();
    assert_eq!(listed.len(), 3, "web and two workers: {listed:?}");
    let workers: Vec<i32> = listed
        .iter()
        .filter(|(_, name)| name.starts_with("worker-"))
        .map(|(pid, _)| *pid)
        .collect();
    assert_eq!(workers.len(), 2, "{listed:?}");
    // Listed is not running: each worker must be up, registered and beating.
    for pid in workers {
        wait_until_heartbeating(&db, pid).await?;
    }
    let pids: Vec<i32> = listed.iter().map(|(pid, _)| *pid).collect();

    up.signal(nix::sys::signal::Signal::SIGINT)?;
    up.wait_for_line("up: stopped", Duration::from_secs(60))
        .await?;
    for pid in pids {
        let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
        assert!(!alive, "process {pid} is gone after Ctrl-C");
    }
    let _ = std::fs::remove_dir_all(&data);
    Ok(())
}

/// Waits until `worker` process `pid` has registered with the queue and sent
/// a heartbeat since; fails if it exits first or within a minute.
async fn wait_until_heartbeating(db: &TestDb, pid: i32) -> anyhow::Result<()> {
    // Worker names end `-<pid>-<start ms>-<generation>` (jobs::worker).
    let pattern = format!("-{pid}-[0-9]+-[0-9]+$");
    let mut registered = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let seen: Option<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar(
            "select max(last_seen) from apalis.workers where id ~ $1 and worker_type = 'trim_visits'",
        )
        .bind(&pattern)
        .fetch_one(&db.pool)
        .await?;
        match (registered, seen) {
            (None, Some(at)) => registered = Some(at),
            (Some(first), Some(at)) if at > first => return Ok(()),
            _ => {}
        }
        let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
        anyhow::ensure!(alive, "worker {pid} exited (registered: {registered:?})");
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "worker {pid} did not register and beat within a minute (registered: {registered:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn just_lists_its_recipes() -> anyhow::Result<()> {
    let Ok(output) = tokio::process::Command::new("just")
        .arg("--list")
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .await
    else {
        // A test that did not run must not report `ok`.
        anyhow::bail!(
            "just is not installed (pip install rust-just, or cargo install just; or leave this \
             test out with `cargo test --workspace -- --skip just_`)"
        );
    };
    let listing = String::from_utf8_lossy(&output.stdout);
    for recipe in [
        "up",
        "down",
        "scale",
        "logs",
        "psql",
        "test",
        "bench",
        "trace-check",
    ] {
        assert!(
            listing.contains(&format!("    {recipe}")),
            "just {recipe}: {listing}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn the_dashboard_shows_a_workflow_links_its_steps_and_cancels_it() -> anyhow::Result<()> {
    let db = TestDb::migrated().await?;
    let state = web::AppState::new(db.pool.clone()).with_admin_token("s3cret-token");
    // By bearer token: no CSRF token is asked for.
    let csrf = String::new();
    let app = TestApp::spawn_with(db, state).await?;
    let probe = |key: &str| Probe {
        key: key.to_owned(),
        behaviour: Behaviour::Succeed,
    };
    let mut tx = app.db.pool.begin().await?;
    let id = durable_jobs::Workflow::new("shown-on-the-dashboard")
        .add("first", probe("first"))
        .step(
            durable_jobs::Step::new("second", &probe("second"))
                .after(["first"])
                .run_anyway(),
        )
        .enqueue(&mut tx)
        .await?
        .to_string();
    tx.commit().await?;
    let first_job: String = sqlx::query_scalar(
        "select job_id from apalis.workflow_steps where workflow_id = $1 and name = 'first'",
    )
    .bind(&id)
    .fetch_one(&app.db.pool)
    .await?;
    let get = |path: String| {
        let request = app.client.get(app.url(&path)).bearer_auth("s3cret-token");
        async move { anyhow::Ok(request.send().await?.text().await?) }
    };

    let overview = get("/admin".to_owned()).await?;
    assert!(
        overview.contains(&format!(r#"href="/admin/workflows/{id}""#))
            && overview.contains("shown-on-the-dashboard"),
        "the overview lists the workflow: {overview}"
    );
    let page = get(format!("/admin/workflows/{id}")).await?;
    assert!(page.contains(r#"data-state="running""#), "{page}");
    assert!(
        page.contains(r#"data-step="first" data-state="pending""#)
            && page.contains(&format!(r#"href="/admin/jobs/{first_job}""#)),
        "a released step links to its job: {page}"
    );
    assert!(
        page.contains(r#"data-step="second" data-state="waiting""#)
            && page.contains("first (run anyway)"),
        "a waiting step shows what it waits for: {page}"
    );
    let job_page = get(format!("/admin/jobs/{first_job}")).await?;
    assert!(
        job_page.contains(&format!(r#"href="/admin/workflows/{id}""#)),
        "a step's job page links to its workflow: {job_page}"
    );

    let cancel = |token: &str| {
        app.client
            .post(app.url(&format!("/admin/workflows/{id}/cancel")))
            .bearer_auth("s3cret-token")
            .header("cookie", "")
            .form(&[("csrf", token.to_owned())])
            .send()
    };
    let cancelled = cancel(&csrf).await?;
    assert_eq!(cancelled.status(), 303);
    assert_eq!(
        cancelled.headers()["location"].to_str()?,
        format!("/admin/workflows/{id}")
    );
    let page = get(format!("/admin/workflows/{id}")).await?;
    assert!(page.contains(r#"data-state="cancelled""#), "{page}");
    assert!(
        !page.contains("Cancel workflow"),
        "no Cancel once cancelled: {page}"
    );
    let missing = app
        .client
        .get(app.url("/admin/workflows/01JNOSUCHWORKFLOW000000000"))
        .bearer_auth("s3cret-token")
        .send()
        .await?;
    assert_eq!(missing.status(), 404);
    app.stop().await
}

#[tokio::test]
async fn a_jobs_page_lists_the_error_of_each_failed_attempt() -> anyhow::Result<()> {
    let db = TestDb::migrated().await?;
    let state = web::AppState::new(db.pool.clone()).with_admin_token("s3cret-token");
    let mut app = TestApp::spawn_with(db, state).await?;
    app.start_worker();
    let ids = enqueue_probes(
        &app.db.pool,
        [Probe {
            key: "fails-twice".to_owned(),
            behaviour: Behaviour::FailFirst { failures: 2 },
        }],
    )
    .await?;
    app.db
        .wait_for_status(&ids[0], "Done", Duration::from_secs(30))
        .await?;
    let page = app
        .client
        .get(app.url(&format!("/admin/jobs/{}", ids[0])))
        .bearer_auth("s3cret-token")
        .send()
        .await?
        .text()
        .await?;
    for attempt in [1, 2] {
        assert!(
            page.contains(&format!(r#"data-attempt="{attempt}""#))
                && page.contains(&format!("failing attempt {attempt} as asked")),
            "attempt {attempt}'s error is on the page: {page}"
        );
    }
    assert!(
        !page.contains(r#"data-attempt="3""#),
        "the third attempt succeeded"
    );
    app.stop().await
}
