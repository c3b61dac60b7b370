//! `TRIM_APPROVAL_ABOVE`: a large trim waits, holding no worker slot, for an
//! operator's Approve or Reject on its dashboard page, or gives up after
//! `TRIM_APPROVAL_TIMEOUT`.

use std::time::{Duration, Instant};

use durable_jobs::admin;
use tests::{
    Process, TestDb,
    admin::{TOKEN, csrf_of, login, plain_client},
};

/// Visits from yesterday: the first page view's trim would delete 31 of
/// them (all but the 9 it shows beside the new visit), over the 20 allowed.
const OLD_VISITS: i64 = 40;

/// A `web` process with its embedded worker and approval above 20 visits.
async fn web_with_approval(db: &TestDb, timeout: &str) -> anyhow::Result<(Process, String)> {
    let mut env = vec![
        ("DATABASE_URL", db.url.as_str()),
        ("BIND", "127.0.0.1:0"),
        ("ADMIN_TOKEN", TOKEN),
        ("LOG_FORMAT", "json"),
        ("TRIM_APPROVAL_ABOVE", "20"),
        ("TRIM_APPROVAL_TIMEOUT", timeout),
    ];
    env.extend(tests::fast_worker_env());
    let mut web = Process::spawn("web", &env)?;
    let address = web.web_address().await?;
    sqlx::query(
        "insert into visits (visitor, created_at)
         select 'old-' || n, now() - interval '1 day' + n * interval '1 ms'
         from generate_series(1, $1) as n",
    )
    .bind(OLD_VISITS)
    .execute(&db.pool)
    .await?;
    Ok((web, address))
}

/// The trim that waits for an approval, once one does (30 s at most).
async fn waiting_trim(db: &TestDb) -> anyhow::Result<String> {
    let give_up = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(job) = admin::oldest_waiting_for(&db.pool, "trim_visits", "approval").await? {
            return Ok(job.id);
        }
        anyhow::ensure!(
            Instant::now() < give_up,
            "no trim waits for an approval after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn visit_count(db: &TestDb) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar("select count(*) from visits")
        .fetch_one(&db.pool)
        .await?)
}

#[tokio::test]
async fn a_large_trim_waits_for_an_operators_approval_and_deletes_only_once_approved()
-> anyhow::Result<()> {
    tests::budget::runs_processes(1);
    let db = TestDb::migrated().await?;
    let (web, address) = web_with_approval(&db, "86400").await?;
    let client = plain_client()?;
    let get = |path: String| client.get(format!("http://{address}{path}")).send();

    get("/".into()).await?.error_for_status()?;
    let trim = waiting_trim(&db).await?;
    // Waiting holds no slot: a later trim runs meanwhile, and leaves the
    // old visits to the one that waits.
    let page = get("/".into()).await?.text().await?;
    assert!(
        page.contains("waiting for an operator&#39;s approval")
            || page.contains("waiting for an operator's approval"),
        "the page's panel says a trim waits: {page}"
    );
    let give_up = Instant::now() + Duration::from_secs(30);
    loop {
        let left_to: i64 = sqlx::query_scalar(
            "select count(*) from apalis.jobs where job_type = 'trim_visits' and status = 'Done'
             and last_result -> 'Ok' -> 'not_approved' ->> 'left_to' = $1",
        )
        .bind(&trim)
        .fetch_one(&db.pool)
        .await?;
        if left_to >= 1 {
            break;
        }
        anyhow::ensure!(Instant::now() < give_up, "the second trim never ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        visit_count(&db).await?,
        OLD_VISITS + 2,
        "nothing deleted before the approval"
    );

    // The job's page: what it waits for, its checkpoints, Approve and Reject.
    let (session, _) = login(&client, &address).await?;
    let job_page = client
        .get(format!("http://{address}/admin/jobs/{trim}"))
        .header("cookie", &session)
        .send()
        .await?
        .text()
        .await?;
    for expected in [
        r#"data-suspended-for="signal:approval""#,
        r#"data-checkpoint="count""#,
        r#"value="Approve""#,
        r#"value="Reject""#,
    ] {
        assert!(job_page.contains(expected), "{expected} on {job_page}");
    }
    let csrf = csrf_of(&job_page).ok_or_else(|| anyhow::anyhow!("no form on {job_page}"))?;
    let answer = |csrf: String, choice: &'static str| {
        client
            .post(format!("http://{address}/admin/jobs/{trim}/answer"))
            .header("cookie", &session)
            .form(&[
                ("csrf", csrf),
                ("wait", "approval".into()),
                ("choice", choice.into()),
            ])
            .send()
    };
    for wrong in [String::new(), format!("{csrf}x")] {
        assert_eq!(answer(wrong, "Approve").await?.status(), 403);
    }
    assert_eq!(
        admin::oldest_waiting_for(&db.pool, "trim_visits", "approval")
            .await?
            .map(|job| job.id),
        Some(trim.clone()),
        "a refused answer leaves it waiting"
    );
    let approved = answer(csrf.clone(), "Approve").await?;
    assert_eq!(approved.status(), 303);
    assert!(
        approved.headers()["location"]
            .to_str()?
            .contains("notice=answered"),
        "{:?}",
        approved.headers()
    );
    db.wait_for_status(&trim, "Done", Duration::from_secs(30))
        .await?;
    let older_left: i64 =
        sqlx::query_scalar("select count(*) from visits where visitor like 'old-%'")
            .fetch_one(&db.pool)
            .await?;
    assert_eq!(
        older_left, 9,
        "the approved trim deleted the old visits its page did not show"
    );
    // A second answer is refused, and says why.
    let again = answer(csrf, "Reject").await?;
    assert!(
        again.headers()["location"]
            .to_str()?
            .contains("notice=not-waiting"),
        "{:?}",
        again.headers()
    );

    let lines = web.terminate_with_output(Duration::from_secs(30)).await?.1;
    let asked = lines.iter().filter(|l| l.contains("waiting up to")).count();
    let yes = lines
        .iter()
        .filter(|l| l.contains("an operator approved"))
        .count();
    assert_eq!((asked, yes), (1, 1), "asked once, approved once");
    Ok(())
}

#[tokio::test]
async fn a_large_trim_gives_up_after_the_approval_timeout_and_logs_why() -> anyhow::Result<()> {
    tests::budget::runs_processes(1);
    let db = TestDb::migrated().await?;
    let (web, address) = web_with_approval(&db, "2").await?;
    plain_client()?
        .get(format!("http://{address}/"))
        .send()
        .await?
        .error_for_status()?;
    let trim = waiting_trim(&db).await?;
    db.wait_for_status(&trim, "Done", Duration::from_secs(30))
        .await?;
    let result: String =
        sqlx::query_scalar("select last_result::text from apalis.jobs where id = $1")
            .bind(&trim)
            .fetch_one(&db.pool)
            .await?;
    assert!(result.contains("timed_out"), "{result}");
    assert_eq!(visit_count(&db).await?, OLD_VISITS + 1, "nothing deleted");
    let (_, lines) = web.terminate_with_output(Duration::from_secs(30)).await?;
    assert!(
        lines
            .iter()
            .any(|l| l.contains("gave up") && l.contains("TRIM_APPROVAL_TIMEOUT")),
        "{lines:?}"
    );
    Ok(())
}
