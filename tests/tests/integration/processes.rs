//! The `web` and `worker` binaries as a user runs them.

use std::time::Duration;

use tests::{Process, TestDb};

#[tokio::test]
async fn web_and_worker_binaries_serve_and_stop_on_sigterm_with_exit_0() -> anyhow::Result<()> {
    let db = TestDb::migrated().await?;
    let mut web = Process::spawn(
        "web",
        &[
            ("DATABASE_URL", db.url.as_str()),
            ("BIND", "127.0.0.1:0"),
            ("EMBEDDED_WORKER", "false"),
        ],
    )?;
    let mut worker = Process::spawn("worker", &[("DATABASE_URL", db.url.as_str())])?;
    let address = web.web_address().await?;
    worker
        .wait_for_line("worker started", Duration::from_secs(60))
        .await?;

    tests::visit_times(&address, 12, "process").await?;
    let client = reqwest::Client::new();
    assert_eq!(
        client
            .get(format!("http://{address}/readyz"))
            .send()
            .await?
            .status(),
        200
    );
    db.drain_queue(Duration::from_secs(30)).await?;
    assert_eq!(
        db.visit_ids().await?.len(),
        10,
        "the separate worker trimmed to 10"
    );

    for process in [web, worker] {
        let status = process.terminate(Duration::from_secs(30)).await?;
        assert!(status.success(), "exit {status}");
    }
    Ok(())
}

#[tokio::test]
async fn web_with_embedded_worker_is_the_whole_app() -> anyhow::Result<()> {
    let db = TestDb::empty().await?;
    let mut web = Process::spawn(
        "web",
        &[("DATABASE_URL", db.url.as_str()), ("BIND", "127.0.0.1:0")],
    )?;
    let address = web.web_address().await?;
    tests::visit_times(&address, 15, "embedded").await?;
    db.drain_queue(Duration::from_secs(30)).await?;
    assert_eq!(db.visit_ids().await?.len(), 10);
    let status = web.terminate(Duration::from_secs(30)).await?;
    assert!(status.success(), "exit {status}");
    Ok(())
}

#[tokio::test]
async fn web_reports_a_port_in_use_in_one_clear_line() -> anyhow::Result<()> {
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let bind = taken.local_addr()?.to_string();
    let mut web = Process::spawn("web", &[("BIND", bind.as_str())])?;
    let line = web
        .wait_for_line("cannot listen on", Duration::from_secs(30))
        .await?;
    assert!(line.contains(&bind), "{line}");
    Ok(())
}

#[tokio::test]
async fn the_output_reader_keeps_reading_past_a_line_that_is_not_utf8() -> anyhow::Result<()> {
    // Absence checks ("no ERROR line") would pass vacuously if reading stopped there.
    let mut command = tokio::process::Command::new("printf");
    command.arg(r"before\n\377 not utf-8\nafter\n");
    let mut printer = Process::start("printf", command)?;
    assert!(printer.wait(Duration::from_secs(10)).await?.success());
    printer
        .wait_for_line("after", Duration::from_secs(10))
        .await?;
    assert_eq!(
        printer.output(),
        ["before", "\u{fffd} not utf-8", "after"],
        "every line, the bad byte replaced"
    );
    Ok(())
}
