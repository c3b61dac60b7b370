//! The pages in a real browser: headless Chromium through chromedriver.

use std::time::Duration;

use fantoccini::Locator;
use jobs::probe::{Behaviour, Probe};
use tests::{TestApp, TestDb, browser::Browser, fast_worker_config};

/// `Some(reason)` when the test must be skipped: no browser here, outside CI.
fn skip() -> anyhow::Result<Option<String>> {
    match tests::browser::unavailable() {
        None => Ok(None),
        Some(reason) if std::env::var("CI").is_ok() => {
            anyhow::bail!("browser tests must run in CI: {reason}")
        }
        Some(reason) => Ok(Some(reason)),
    }
}

#[tokio::test]
async fn a_person_sees_visits_trimmed_and_retries_a_dead_job_on_the_dashboard() -> anyhow::Result<()>
{
    if let Some(reason) = skip()? {
        println!("skipped: {reason}");
        return Ok(());
    }
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
    let first = rows[0].text().await?;
    assert!(
        first.contains("from") && first.contains("127.0.0.1: ") && first.contains("HeadlessChrome"),
        "{first}"
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
