//! The page: what `GET /` records, shows and enqueues.

use std::time::Duration;

use tests::{Process, TestApp, TestDb, cluster::PrivateCluster};

#[tokio::test]
async fn visiting_25_times_records_25_rows_and_shows_the_10_newest() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let mut page = None;
    for n in 1..=25 {
        page = Some(app.visit(&format!("browser-{n}")).await?);
    }
    let page = page.expect("25 visits were made");

    let all_ids = app.db.visit_ids().await?;
    assert_eq!(
        all_ids.len(),
        25,
        "no worker runs, so nothing is trimmed yet"
    );
    let newest_ten: Vec<i64> = all_ids.iter().rev().take(10).copied().collect();
    assert_eq!(
        page.ids(),
        newest_ten,
        "the page lists the 10 newest, newest first"
    );
    let oldest_shown = page.rows.last().expect("rows").1;
    assert_eq!(
        page.threshold, oldest_shown,
        "threshold is the oldest visit shown"
    );
    assert!(
        page.rows.windows(2).all(|w| w[0].1 >= w[1].1),
        "newest first"
    );
    assert_eq!(
        page.rows[0].2, "127.0.0.1: browser-25",
        "visitor is address and user agent"
    );
    assert!(page.html.contains("<title>VisitMe example</title>"));
    assert!(page.html.contains("Last 10 visits"));

    // No worker claims them, so the 25 trims coalesced: one pending job per
    // coalescing window the visits spanned, the newest carrying the latest
    // (largest) threshold.
    // (The enqueue reads the clock a moment after the visit's timestamp.)
    let (first_window, last_window): (i64, i64) = sqlx::query_as(
        "select floor(extract(epoch from min(created_at)) / 0.5)::bigint,
                floor(extract(epoch from max(created_at) + interval '100 ms') / 0.5)::bigint
         from visits",
    )
    .fetch_one(&app.db.pool)
    .await?;
    let pending: Vec<serde_json::Value> = sqlx::query_scalar(
        "select convert_from(job, 'UTF8')::jsonb from apalis.jobs
         where job_type = 'trim_visits' order by run_at",
    )
    .fetch_all(&app.db.pool)
    .await?;
    let spanned = usize::try_from(last_window - first_window + 1)?;
    assert!(
        !pending.is_empty() && pending.len() <= spanned,
        "one pending trim per window, not one per visit: {} for {spanned} windows",
        pending.len()
    );
    let newest = pending.last().expect("a pending trim").clone();
    let job: jobs::TrimVisits = serde_json::from_value(newest)?;
    assert_eq!(job.older_than, page.threshold);
    app.stop().await
}

#[tokio::test]
async fn visit_and_its_trim_job_commit_or_roll_back_together() -> anyhow::Result<()> {
    let db = TestDb::migrated().await?;
    let counts = |pool: sqlx::PgPool| async move {
        let visits: i64 = sqlx::query_scalar("select count(*) from visits")
            .fetch_one(&pool)
            .await?;
        let jobs: i64 = sqlx::query_scalar("select count(*) from apalis.jobs")
            .fetch_one(&pool)
            .await?;
        anyhow::Ok((visits, jobs))
    };

    let mut tx = db.pool.begin().await?;
    web::visits::record_visit(&mut tx, "127.0.0.1: rolled back").await?;
    tx.rollback().await?;
    assert_eq!(
        counts(db.pool.clone()).await?,
        (0, 0),
        "rollback leaves neither visit nor job"
    );

    let mut tx = db.pool.begin().await?;
    let recorded = web::visits::record_visit(&mut tx, "127.0.0.1: committed").await?;
    tx.commit().await?;
    assert_eq!(counts(db.pool.clone()).await?, (1, 1), "commit keeps both");
    let (id, job_type): (String, String) = sqlx::query_as("select id, job_type from apalis.jobs")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!((id, job_type.as_str()), (recorded.job_id, "trim_visits"));
    Ok(())
}

#[tokio::test]
async fn script_in_user_agent_is_shown_escaped() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let page = app.visit("<script>alert(1)</script>").await?;
    assert!(
        page.html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{}",
        page.html
    );
    assert!(
        !page.html.contains("<script>alert(1)"),
        "user agent must not become markup"
    );
    assert_eq!(
        page.rows[0].2, "127.0.0.1: <script>alert(1)</script>",
        "text is kept intact"
    );
    app.stop().await
}

#[tokio::test]
async fn forwarded_for_is_ignored_unless_the_proxy_is_trusted() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let body = app
        .client
        .get(app.url("/"))
        .header("x-forwarded-for", "203.0.113.9")
        .header("user-agent", "ua")
        .send()
        .await?
        .text()
        .await?;
    let page = tests::VisitsPage::parse(&body)?;
    assert_eq!(page.rows[0].2, "127.0.0.1: ua");
    app.stop().await?;

    let db = TestDb::migrated().await?;
    let mut state = web::AppState::new(db.pool.clone());
    state.trust_proxy = true;
    let app = TestApp::spawn_with(db, state).await?;
    let body = app
        .client
        .get(app.url("/"))
        .header("x-forwarded-for", "198.51.100.7, 203.0.113.9")
        .header("user-agent", "ua")
        .send()
        .await?
        .text()
        .await?;
    let page = tests::VisitsPage::parse(&body)?;
    assert_eq!(
        page.rows[0].2, "203.0.113.9: ua",
        "the last hop is the one our proxy saw"
    );
    app.stop().await
}

#[tokio::test]
async fn unreachable_database_gives_a_fast_503_page() -> anyhow::Result<()> {
    tests::budget::runs_processes(1);
    // The real binary, with its own pool settings and timeouts, on a private
    // cluster that is stopped under it and replaced by a listener that never
    // answers (a hung server or a firewall that drops): only the binary's own
    // timeouts can end the wait.
    let cluster = PrivateCluster::start()?;
    let url = cluster.url("visitme");
    let mut web = Process::spawn(
        "web",
        &[
            ("DATABASE_URL", url.as_str()),
            ("BIND", "127.0.0.1:0"),
            ("EMBEDDED_WORKER", "false"),
        ],
    )?;
    let address = web.web_address().await?;
    cluster.stop()?;
    let _black_hole = tokio::net::TcpListener::bind(("127.0.0.1", cluster.port)).await?;
    // No client timeout of our own: only the binary bounds the wait.
    let client = reqwest::Client::new();

    let started = std::time::Instant::now();
    let response = client.get(format!("http://{address}/")).send().await?;
    let took = started.elapsed();
    assert_eq!(response.status(), 503);
    // README: "a 503 page within about 3 s" (the request pool's acquire
    // timeout), plus slack for a loaded machine.
    let bound = Duration::from_secs(5);
    println!("503 after {took:?}");
    assert!(took < bound, "503 after {took:?}, not within {bound:?}");
    let body = response.text().await?;
    assert!(body.contains("Temporarily unavailable"), "{body}");
    assert!(
        !body.contains("refused") && !body.contains(&cluster.port.to_string()),
        "no internals leak: {body}"
    );

    let ready = client
        .get(format!("http://{address}/readyz"))
        .send()
        .await?;
    assert_eq!(ready.status(), 503);
    let health = client
        .get(format!("http://{address}/healthz"))
        .send()
        .await?;
    assert_eq!(health.status(), 200);
    assert!(web.terminate(Duration::from_secs(30)).await?.success());
    Ok(())
}

#[tokio::test]
async fn probes_unknown_routes_and_wrong_methods_answer_sensibly() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let get = |path: &'static str| app.client.get(app.url(path)).send();
    assert_eq!(get("/healthz").await?.text().await?, "ok");
    let ready = get("/readyz").await?;
    assert_eq!(ready.status(), 200);
    let missing = get("/no-such-page").await?;
    assert_eq!(missing.status(), 404);
    assert!(missing.text().await?.contains("Page not found"));
    assert_eq!(app.client.post(app.url("/")).send().await?.status(), 405);
    let css = get("/assets/style.css").await?;
    assert_eq!(css.headers()["content-type"], "text/css; charset=utf-8");
    app.stop().await
}

#[tokio::test]
async fn the_panel_shows_a_delayed_trim_as_scheduled_and_due_in_3_s() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let mut tx = app.db.pool.begin().await?;
    let id = durable_jobs::enqueue_with(
        &mut tx,
        &jobs::TrimVisits {
            older_than: chrono::Utc::now(),
        },
        durable_jobs::Enqueue::new().delay(Duration::from_secs(3)),
    )
    .await?
    .to_string();
    tx.commit().await?;
    let panel = app
        .client
        .get(app.url("/background-work"))
        .send()
        .await?
        .text()
        .await?;
    assert!(panel.contains(&id), "the newest trim is shown: {panel}");
    assert!(
        panel.contains(r#"data-state="scheduled""#),
        "scheduled until due: {panel}"
    );
    assert!(panel.contains(">in 3 s<"), "due in 3 s: {panel}");
    app.stop().await
}
