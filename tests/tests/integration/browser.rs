//! The pages in a real browser: headless Chromium through chromedriver.

use std::time::Duration;

use anyhow::Context as _;
use fantoccini::Locator;
use jobs::probe::{Behaviour, Probe};
use tests::{
    TestApp, TestDb,
    browser::{Browser, Window},
    fast_worker_config,
};

/// Fails the test, saying how to get one, where no browser is here: a
/// browser test that did not run must not report `ok`. To leave these tests
/// out on such a machine: `cargo test --workspace -- --skip browser::`.
fn require_browser() -> anyhow::Result<()> {
    match tests::browser::unavailable() {
        None => Ok(()),
        Some(reason) => anyhow::bail!(
            "this browser test cannot run: {reason} (apt-get install chromium chromium-driver, \
             or leave the browser tests out with `cargo test --workspace -- --skip browser::`)"
        ),
    }
}

#[tokio::test]
async fn a_person_sees_visits_trimmed_and_retries_a_dead_job_on_the_dashboard() -> anyhow::Result<()>
{
    require_browser()?;
    let db = TestDb::migrated().await?;
    let state = web::AppState::new(db.pool.clone()).with_admin_token("browser-token");
    let mut app = TestApp::spawn_with(db, state).await?;
    app.start_worker_with(fast_worker_config());
    let browser = Browser::start().await?;
    let client = &browser.client;

    // Reload until there are more visits than shown, and the worker has trimmed.
    client.goto(&app.url("/")).await?;
    for _ in 0..13 {
        client.refresh().await?;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while app.db.visit_ids().await?.len() > 10 {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "visits were not trimmed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    client.refresh().await?;
    assert_eq!(client.title().await?, "VisitMe example");
    let rows = client
        .find_all(Locator::Css("ol.visits li[data-visit-id]"))
        .await?;
    assert_eq!(rows.len(), 10, "ten visits shown");
    // The visitor: address and a short browser name, the whole stored
    // visitor (with the full user agent) on hover.
    let first = rows[0].text().await?;
    assert!(
        first.contains("from") && first.contains("127.0.0.1") && first.contains("Headless Chrome"),
        "{first}"
    );
    let full = rows[0]
        .find(Locator::Css(".visitor"))
        .await?
        .attr("title")
        .await?
        .unwrap_or_default();
    assert!(
        full.starts_with("127.0.0.1: Mozilla/") && full.contains("HeadlessChrome/"),
        "{full}"
    );
    let note = client
        .find(Locator::Id("trim-threshold"))
        .await?
        .text()
        .await?;
    assert!(note.starts_with("Deleting visits older than: "), "{note}");
    let oldest_shown = rows[9]
        .find(Locator::Css("time"))
        .await?
        .attr("datetime")
        .await?;
    let threshold = client
        .find(Locator::Css("#trim-threshold time"))
        .await?
        .attr("datetime")
        .await?;
    assert_eq!(threshold, oldest_shown);
    let mut shown = Vec::new();
    for row in &rows {
        shown.push(
            row.attr("data-visit-id")
                .await?
                .unwrap_or_default()
                .parse::<i64>()?,
        );
    }
    // This last view's own trim deletes the one visit it pushed off the page.
    app.db.drain_queue(Duration::from_secs(30)).await?;
    let mut remaining = app.db.visit_ids().await?;
    remaining.reverse();
    assert_eq!(
        shown, remaining,
        "the table keeps exactly what the page shows"
    );
    browser.screenshot("visits").await?;

    // A dead job to retry, dead from its commit on: the running worker must not
    // get to run it before it is marked.
    let mut tx = app.db.pool.begin().await?;
    let id = jobs::enqueue(
        &mut tx,
        &Probe {
            key: "revived".to_owned(),
            behaviour: Behaviour::Succeed,
        },
    )
    .await?
    .to_string();
    sqlx::query(r#"update apalis.jobs set status = 'Killed', attempts = 3, done_at = now(), last_result = '{"Err": "the mail server was down"}' where id = $1"#)
        .bind(&id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    let ids = [id];

    sign_in(&app, client).await?;
    let dead_row = Locator::Css(r#"tr[data-state="dead"]"#);
    let row = client.find(dead_row).await?;
    assert!(row.text().await?.contains("the mail server was down"));
    browser.screenshot("admin").await?;
    row.find(Locator::Css("button[value=retry]"))
        .await?
        .click()
        .await?;
    let notice = client
        .wait()
        .for_element(Locator::Id("notice"))
        .await?
        .text()
        .await?;
    assert!(
        notice.contains("retry") && notice.contains(&ids[0]),
        "{notice}"
    );

    // The worker runs it again, and it succeeds.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let status: String = sqlx::query_scalar("select status from apalis.jobs where id = $1")
            .bind(&ids[0])
            .fetch_one(&app.db.pool)
            .await?;
        if status == "Done" {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "retried job ended {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    client.refresh().await?;
    let state = client
        .find(Locator::Css(&format!(r#"tr[data-job-id="{}"]"#, ids[0])))
        .await?
        .attr("data-state")
        .await?;
    assert_eq!(state.as_deref(), Some("done"));
    browser.screenshot("admin-after-retry").await?;
    browser.close().await?;
    app.stop().await
}

/// Where the README's screenshots are saved.
fn screenshot_path(name: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../docs/screenshots")
        .join(format!("{name}.png"))
}

/// Signs in to the dashboard with the login form.
async fn sign_in(app: &TestApp, client: &fantoccini::Client) -> anyhow::Result<()> {
    client.goto(&app.url("/admin")).await?;
    client
        .find(Locator::Id("token"))
        .await?
        .send_keys("browser-token")
        .await?;
    client
        .find(Locator::Css("form.login button"))
        .await?
        .click()
        .await?;
    client
        .wait()
        .for_element(Locator::Id("latest-jobs"))
        .await?;
    Ok(())
}

/// Clicks the job page's `action` button and checks the notice it leads to.
async fn act(client: &fantoccini::Client, action: &str, id: &str) -> anyhow::Result<()> {
    client
        .find(Locator::Css(&format!("button[value={action}]")))
        .await?
        .click()
        .await?;
    let notice = wait_for(client, "#notice").await?.text().await?;
    anyhow::ensure!(
        notice.contains(action) && notice.contains(id),
        "{action} of {id}: {notice}"
    );
    Ok(())
}

/// Waits (without reloading) until `css` matches, or fails after 30 s.
async fn wait_for(
    client: &fantoccini::Client,
    css: &str,
) -> anyhow::Result<fantoccini::elements::Element> {
    client
        .wait()
        .at_most(Duration::from_secs(30))
        .for_element(Locator::Css(css))
        .await
        .with_context(|| format!("waiting for {css}"))
}

#[tokio::test]
async fn the_panel_follows_the_trim_in_place_and_the_dashboard_filters_pages_and_shows_a_job()
-> anyhow::Result<()> {
    require_browser()?;
    let db = TestDb::migrated().await?;
    let state = web::AppState::new(db.pool.clone()).with_admin_token("browser-token");
    let mut app = TestApp::spawn_with(db, state).await?;
    // Old visits, and no worker yet: the browser's view finds its trim waiting.
    for n in 0..12 {
        app.visit(&format!("earlier-{n}")).await?;
    }
    let browser = Browser::start_with(Window {
        width: 1280,
        height: 900,
        dark: false,
    })
    .await?;
    let client = &browser.client;
    client.goto(&app.url("/")).await?;
    let yours = client
        .find(Locator::Css("ol.visits li.yours"))
        .await?
        .text()
        .await?;
    assert!(
        yours.contains("yours") && yours.contains("Headless Chrome"),
        "{yours}"
    );
    let panel = client.find(Locator::Id("last-trim")).await?;
    let waiting = panel.attr("data-state").await?.unwrap_or_default();
    assert!(
        ["pending", "scheduled"].contains(&waiting.as_str()),
        "{waiting}"
    );
    assert!(panel.text().await?.contains("this view's"));
    client
        .execute("window.visitmeNotReloaded = true; return null;", vec![])
        .await?;

    // The worker runs the trim; the panel shows it without a reload.
    app.start_worker_with(fast_worker_config());
    let deleted = wait_for(
        client,
        r#"#last-trim[data-state="done"] #last-trim-deleted span[data-ids]"#,
    )
    .await?;
    let ids: Vec<i64> = deleted
        .attr("data-ids")
        .await?
        .unwrap_or_default()
        .split(',')
        .filter(|id| !id.is_empty())
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let remaining = app.db.visit_ids().await?;
    assert!(
        !ids.is_empty() && ids.iter().all(|id| !remaining.contains(id)),
        "{ids:?}"
    );
    assert!(
        deleted
            .text()
            .await?
            .contains(&format!("{} visit", ids.len()))
    );
    let still = client
        .execute("return window.visitmeNotReloaded === true;", vec![])
        .await?;
    assert_eq!(still, serde_json::json!(true), "the page was reloaded");
    let when = client.find(Locator::Css("#last-trim time.ago")).await?;
    assert!(when.attr("title").await?.is_some_and(|t| !t.is_empty()));
    assert!(when.text().await?.contains("ago") || when.text().await?.contains("now"));
    browser
        .screenshot_to(&screenshot_path("page-1280-light"))
        .await?;

    // Jobs for the dashboard: a dead one to retry, one waiting an hour to
    // cancel (and later enough done ones for a second page).
    let dead = Probe {
        key: "revived".to_owned(),
        behaviour: Behaviour::Succeed,
    };
    let later = Probe {
        key: "later".to_owned(),
        behaviour: Behaviour::Succeed,
    };
    let mut tx = app.db.pool.begin().await?;
    let dead_id = jobs::enqueue(&mut tx, &dead).await?.to_string();
    let later_id = jobs::enqueue(&mut tx, &later).await?.to_string();
    sqlx::query(r#"update apalis.jobs set status = 'Killed', attempts = 3, done_at = now(), last_result = '{"Err": "the mail server was down"}' where id = $1"#)
        .bind(&dead_id)
        .execute(&mut *tx)
        .await?;
    sqlx::query("update apalis.jobs set run_at = now() + interval '1 hour' where id = $1")
        .bind(&later_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    sign_in(&app, client).await?;
    browser
        .screenshot_to(&screenshot_path("dashboard-1280-light"))
        .await?;
    // Filters: the probe queue's dead jobs are the one dead probe.
    client.goto(&app.url("/admin")).await?;
    client
        .find(Locator::Css(r#"select[name="queue"]"#))
        .await?
        .select_by_value("probe")
        .await?;
    client
        .find(Locator::Css(r#"select[name="state"]"#))
        .await?
        .select_by_value("dead")
        .await?;
    client
        .find(Locator::Css("#job-filters button"))
        .await?
        .click()
        .await?;
    wait_for(
        client,
        r#"select[name="state"] option[value="dead"][selected]"#,
    )
    .await?;
    let rows = client
        .find_all(Locator::Css("#latest-jobs tr[data-job-id]"))
        .await?;
    let mut shown = Vec::new();
    for row in &rows {
        shown.push(row.attr("data-job-id").await?.unwrap_or_default());
    }
    assert_eq!(
        shown,
        std::slice::from_ref(&dead_id),
        "filtered by queue and state"
    );

    // The job's page: payload, error, and Retry.
    client
        .find(Locator::Css(&format!(r#"tr[data-job-id="{dead_id}"] a"#)))
        .await?
        .click()
        .await?;
    wait_for(client, &format!(r#"#job-facts[data-job-id="{dead_id}"]"#)).await?;
    let payload = client
        .find(Locator::Id("job-payload"))
        .await?
        .text()
        .await?;
    assert!(payload.contains(r#""key": "revived""#), "{payload}");
    let error = client.find(Locator::Id("job-error")).await?.text().await?;
    assert!(error.contains("the mail server was down"), "{error}");
    act(client, "retry", &dead_id).await?;
    // It runs again and succeeds; the overview shows it without a reload.
    wait_for(
        client,
        &format!(r#"tr[data-job-id="{dead_id}"][data-state="done"]"#),
    )
    .await?;
    assert_eq!(app.db.job_outcome(&dead_id).await?.0, "Done");

    // Cancel from the waiting job's page.
    client
        .goto(&app.url(&format!("/admin/jobs/{later_id}")))
        .await?;
    act(client, "cancel", &later_id).await?;
    assert_eq!(app.db.job_outcome(&later_id).await?.0, "Killed");
    let bulk = tests::enqueue_probes(
        &app.db.pool,
        (0..60).map(|n| Probe {
            key: format!("bulk-{n}"),
            behaviour: Behaviour::Succeed,
        }),
    )
    .await?;
    for id in &bulk {
        app.db
            .wait_for_status(id, "Done", Duration::from_secs(30))
            .await?;
    }

    client.goto(&app.url("/admin")).await?;
    // Pages beyond the newest 50.
    let first_page = client
        .find_all(Locator::Css("#latest-jobs tr[data-job-id]"))
        .await?;
    assert_eq!(first_page.len(), 50);
    let last_on_first = first_page[49]
        .attr("data-job-id")
        .await?
        .unwrap_or_default();
    client
        .find(Locator::Id("older-page"))
        .await?
        .click()
        .await?;
    let second_first = wait_for(client, "#latest-jobs tr[data-job-id]")
        .await?
        .attr("data-job-id")
        .await?
        .unwrap_or_default();
    assert!(
        second_first < last_on_first,
        "{second_first} after {last_on_first}"
    );
    browser.close().await?;

    // Phone width and dark: nothing overflows; screenshots for the README.
    for (width, height, dark) in [(390, 844, false), (1280, 900, true), (390, 844, true)] {
        let browser = Browser::start_with(Window {
            width,
            height,
            dark,
        })
        .await?;
        let client = &browser.client;
        let scheme = if dark { "dark" } else { "light" };
        client.goto(&app.url("/")).await?;
        wait_for(client, "#last-trim").await?;
        let (page, viewport) = browser.horizontal_overflow().await?;
        assert_eq!(viewport, u64::from(width));
        assert!(
            page <= viewport,
            "the page is {page} px wide at {viewport} px"
        );
        let background = client
            .execute(
                "return getComputedStyle(document.body).backgroundColor;",
                vec![],
            )
            .await?;
        let expected = if dark {
            "rgb(16, 20, 25)"
        } else {
            "rgb(246, 247, 249)"
        };
        assert_eq!(background, serde_json::json!(expected), "{scheme}");
        browser
            .screenshot_to(&screenshot_path(&format!("page-{width}-{scheme}")))
            .await?;
        sign_in(&app, client).await?;
        let (page, viewport) = browser.horizontal_overflow().await?;
        assert!(
            page <= viewport,
            "the dashboard is {page} px wide at {viewport} px"
        );
        browser
            .screenshot_to(&screenshot_path(&format!("dashboard-{width}-{scheme}")))
            .await?;
        client
            .goto(&app.url(&format!("/admin/jobs/{dead_id}")))
            .await?;
        wait_for(client, "#job-facts").await?;
        let (page, viewport) = browser.horizontal_overflow().await?;
        assert!(
            page <= viewport,
            "a job's page is {page} px wide at {viewport} px"
        );
        browser.close().await?;
    }
    app.stop().await
}

/// Runs a find-and-act `step` again when the page's refresh replaced the
/// element between the find and the act (a stale element reference).
async fn retry_stale<T, F, Fut>(mut step: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, fantoccini::error::CmdError>>,
{
    let mut tries = 0;
    loop {
        match step().await {
            Err(err) if tries < 5 && err.to_string().contains("stale element") => tries += 1,
            result => return Ok(result?),
        }
    }
}

/// The text of `css`, found afresh (see [`retry_stale`]).
async fn fresh_text(client: &fantoccini::Client, css: &str) -> anyhow::Result<String> {
    retry_stale(|| async { client.find(Locator::Css(css)).await?.text().await }).await
}

/// Clicks `css`, found afresh (see [`retry_stale`]).
async fn fresh_click(client: &fantoccini::Client, css: &str) -> anyhow::Result<()> {
    retry_stale(|| async { client.find(Locator::Css(css)).await?.click().await }).await
}

#[tokio::test]
async fn a_person_reads_a_queues_last_hour_pauses_it_and_overrides_its_limits() -> anyhow::Result<()>
{
    require_browser()?;
    let db = TestDb::migrated().await?;
    let state = web::AppState::new(db.pool.clone()).with_admin_token("browser-token");
    let mut app = TestApp::spawn_with(db, state).await?;
    app.start_worker_with(fast_worker_config());
    let ran = tests::enqueue_probes(
        &app.db.pool,
        (0..30).map(|n| Probe {
            key: format!("charted-{n}"),
            behaviour: Behaviour::Succeed,
        }),
    )
    .await?;
    for id in &ran {
        app.db
            .wait_for_status(id, "Done", Duration::from_secs(30))
            .await?;
    }
    let browser = Browser::start_with(Window {
        width: 1280,
        height: 900,
        dark: false,
    })
    .await?;
    let client = &browser.client;
    sign_in(&app, client).await?;
    // From the overview's queue table to the queue's page.
    client
        .find(Locator::Css(r#"#queue-counts tr[data-queue="probe"] a"#))
        .await?
        .click()
        .await?;
    wait_for(client, r#"#queue-page[data-queue="probe"]"#).await?;
    assert_eq!(fresh_text(client, "#queue-state").await?, "running");
    assert_eq!(
        fresh_text(client, "#limits-in-force").await?,
        "no limits (as declared)"
    );
    // The chart: the 30 runs, drawn as bars the browser lays out.
    let started: i64 = retry_stale(|| async {
        client
            .find(Locator::Css("#throughput-chart svg"))
            .await?
            .attr("data-started")
            .await
    })
    .await?
    .unwrap_or_default()
    .parse()?;
    assert!(started >= 30, "{started} started in the last hour");
    let drawn = client
        .execute(
            "const bars = [...document.querySelectorAll('#throughput-chart rect.started')];
             return bars.reduce((sum, bar) => sum + bar.getBoundingClientRect().height, 0);",
            vec![],
        )
        .await?;
    assert!(
        drawn.as_f64().is_some_and(|height| height > 50.0),
        "the bars have a height on screen: {drawn}"
    );
    let wait_line = retry_stale(|| async {
        client
            .find(Locator::Css("#wait-chart path.p95"))
            .await?
            .attr("d")
            .await
    })
    .await?
    .unwrap_or_default();
    assert!(wait_line.starts_with('M'), "a p95 line: {wait_line:?}");
    browser
        .screenshot_to(&screenshot_path("queue-1280-light"))
        .await?;

    // Pause, override the limits, go back to the declared ones, resume.
    let click = |css: &'static str| fresh_click(client, css);
    click(r#"form[action$="/pause"] button"#).await?;
    assert!(
        wait_for(client, "#notice")
            .await?
            .text()
            .await?
            .starts_with("Paused")
    );
    assert_eq!(fresh_text(client, "#queue-state").await?, "paused");
    // Typing puts the focus in the form: the page's refresh leaves it be.
    retry_stale(|| async {
        client
            .find(Locator::Css(r#"#limits-form input[name="concurrency"]"#))
            .await?
            .send_keys("2")
            .await
    })
    .await?;
    click("#limits-form button").await?;
    wait_for(client, "#notice").await?;
    assert_eq!(
        fresh_text(client, "#limits-in-force").await?,
        "concurrency 2 (set by an operator)"
    );
    assert_eq!(
        durable_jobs::admin::queue_controls_of(&app.db.pool, "probe")
            .await?
            .in_force,
        durable_jobs::Limits::none().concurrency(2)
    );
    click(r#"form[action$="/reset-limits"] button"#).await?;
    wait_for(client, "#notice").await?;
    click(r#"form[action$="/resume"] button"#).await?;
    assert!(
        wait_for(client, "#notice")
            .await?
            .text()
            .await?
            .starts_with("Resumed")
    );
    let controls = durable_jobs::admin::queue_controls_of(&app.db.pool, "probe").await?;
    assert!(!controls.paused && !controls.overridden, "{controls:?}");
    browser.close().await?;

    // A phone's width: nothing overflows.
    let browser = Browser::start_with(Window {
        width: 390,
        height: 844,
        dark: true,
    })
    .await?;
    sign_in(&app, &browser.client).await?;
    browser.client.goto(&app.url("/admin/queues/probe")).await?;
    wait_for(&browser.client, "#queue-page").await?;
    let (page, viewport) = browser.horizontal_overflow().await?;
    assert!(
        page <= viewport,
        "the queue page is {page} px wide at {viewport} px"
    );
    browser
        .screenshot_to(&screenshot_path("queue-390-dark"))
        .await?;
    browser.close().await?;
    app.stop().await
}

#[tokio::test]
async fn a_person_approves_a_large_trim_on_its_job_page_and_reads_its_workflows_graph()
-> anyhow::Result<()> {
    require_browser()?;
    let db = TestDb::migrated().await?;
    // 40 old visits: the page view's trim would delete 31, over the 20
    // allowed; approved, it runs as a workflow of 7 chunks of 5 and a summary.
    sqlx::query(
        "insert into visits (visitor, created_at)
         select 'old-' || n, now() - interval '1 day' + n * interval '1 ms'
         from generate_series(1, 40) as n",
    )
    .execute(&db.pool)
    .await?;
    let state = web::AppState::new(db.pool.clone()).with_admin_token("browser-token");
    let mut app = TestApp::spawn_with(db, state).await?;
    app.start_worker_with_settings(
        fast_worker_config(),
        jobs::JobSettings {
            trim_chunk: std::num::NonZeroU32::new(5).expect("not zero"),
            trim_approval_above: Some(20),
            ..jobs::JobSettings::default()
        },
    );
    let browser = Browser::start_with(Window {
        width: 1280,
        height: 900,
        dark: false,
    })
    .await?;
    let client = &browser.client;
    sign_in(&app, client).await?;
    client.goto(&app.url("/")).await?;
    // The panel refreshes in place until it says a trim waits.
    let waiting = wait_for(client, "#trim-approval").await?;
    let trim = waiting
        .attr("data-job-id")
        .await?
        .context("the notice names its job")?;
    assert!(
        fresh_text(client, "#trim-approval")
            .await?
            .contains("waiting for an operator's approval")
    );
    fresh_click(client, "#trim-approval a").await?;
    let suspension = wait_for(client, "#job-suspension").await?.text().await?;
    assert!(suspension.contains("signal approval"), "{suspension}");
    wait_for(client, r#"#job-checkpoints tr[data-checkpoint="count"]"#).await?;
    browser
        .screenshot_to(&screenshot_path("approval-1280-light"))
        .await?;
    fresh_click(client, r#"form.answer button[value="Approve"]"#).await?;
    let notice = wait_for(client, "#notice").await?.text().await?;
    assert!(
        notice.contains("answer") && notice.contains(&trim) && notice.contains("sent"),
        "{notice}"
    );
    app.db
        .wait_for_status(&trim, "Done", Duration::from_secs(30))
        .await?;
    let workflow: String = sqlx::query_scalar(
        "select last_result -> 'Ok' -> 'planned' ->> 'workflow' from apalis.jobs where id = $1",
    )
    .bind(&trim)
    .fetch_one(&app.db.pool)
    .await?;
    app.db.drain_queue(Duration::from_secs(30)).await?;
    client
        .goto(&app.url(&format!("/admin/workflows/{workflow}")))
        .await?;
    wait_for(client, "#workflow-graph svg").await?;
    // Laid out by the browser: 8 boxes side by side in 2 columns, 7 arrows.
    let drawn = client
        .execute(
            "const boxes = [...document.querySelectorAll('#workflow-graph g.step rect')]
                 .map(r => r.getBoundingClientRect());
             const arrows = document.querySelectorAll('#workflow-graph path.dependency').length;
             const columns = new Set(boxes.map(b => Math.round(b.left))).size;
             return [boxes.length, columns, arrows, Math.min(...boxes.map(b => b.width))];",
            vec![],
        )
        .await?;
    assert_eq!(drawn[0], 8, "a box per step: {drawn}");
    assert_eq!(drawn[1], 2, "chunks, then the summary: {drawn}");
    assert_eq!(drawn[2], 7, "an arrow per dependency: {drawn}");
    assert!(
        drawn[3].as_f64().is_some_and(|width| width > 100.0),
        "{drawn}"
    );
    let states: Vec<String> = client
        .execute(
            "return [...document.querySelectorAll('#workflow-graph g.step')].map(g => g.dataset.state);",
            vec![],
        )
        .await?
        .as_array()
        .map(|states| {
            states
                .iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        states.len() == 8 && states.iter().all(|s| s == "done"),
        "{states:?}"
    );
    browser
        .screenshot_to(&screenshot_path("workflow-graph-1280-light"))
        .await?;
    browser.close().await?;

    // A phone's width, dark: the job page (its checkpoints, its children)
    // and the workflow page (the graph scrolls in its own box) do not
    // overflow.
    let browser = Browser::start_with(Window {
        width: 390,
        height: 844,
        dark: true,
    })
    .await?;
    sign_in(&app, &browser.client).await?;
    for (path, ready, name) in [
        (
            format!("/admin/jobs/{trim}"),
            "#job-checkpoints",
            "job-390-dark",
        ),
        (
            format!("/admin/workflows/{workflow}"),
            "#workflow-graph svg",
            "workflow-graph-390-dark",
        ),
    ] {
        browser.client.goto(&app.url(&path)).await?;
        wait_for(&browser.client, ready).await?;
        let (page, viewport) = browser.horizontal_overflow().await?;
        assert!(
            page <= viewport,
            "{path} is {page} px wide at {viewport} px"
        );
        // The picture shows the durable parts, not the page's head.
        browser
            .client
            .execute(
                "document.querySelector(arguments[0]).scrollIntoView();",
                vec![serde_json::json!(ready)],
            )
            .await?;
        browser.screenshot_to(&screenshot_path(name)).await?;
    }
    browser.close().await?;
    app.stop().await
}
