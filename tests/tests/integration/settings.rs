//! Settings that parse but would break the app: `web` and `worker` refuse
//! each before anything starts, in one line that names the variable, the
//! value and what it may be, with exit code 2.

use std::time::Duration;

/// One refused setting: the binaries that read it, the variable, its value,
/// and what the line must say it may be.
struct Refused {
    binaries: &'static [&'static str],
    variable: &'static str,
    value: &'static str,
    /// Shown in the line (the value itself, unless it is a secret).
    shown: &'static str,
    rule: &'static str,
}

const BOTH: &[&str] = &["web", "worker"];
const WEB: &[&str] = &["web"];

const REFUSED: &[Refused] = &[
    Refused {
        binaries: BOTH,
        variable: "WORKER_POLL_INTERVAL",
        value: "0",
        shown: "\"0\"",
        rule: "from 0.01 to 3600",
    },
    Refused {
        binaries: BOTH,
        variable: "JOB_LEASE",
        value: "0",
        shown: "\"0\"",
        rule: "from 1 to 86400",
    },
    Refused {
        binaries: BOTH,
        variable: "JOB_LEASE",
        value: "1e15",
        shown: "\"1e15\"",
        rule: "from 1 to 86400",
    },
    Refused {
        binaries: BOTH,
        variable: "JOB_TIMEOUT",
        value: "0",
        shown: "\"0\"",
        rule: "from 0.001 to 604800",
    },
    Refused {
        binaries: BOTH,
        variable: "JOB_RETENTION_DONE",
        value: "-1",
        shown: "\"-1\"",
        rule: "from 0 to",
    },
    Refused {
        binaries: BOTH,
        variable: "JOB_BACKOFF_MAX",
        value: "1e300",
        shown: "\"1e300\"",
        rule: "from 0 to",
    },
    Refused {
        binaries: BOTH,
        variable: "JOB_UNKNOWN_GRACE",
        value: "soon",
        shown: "\"soon\"",
        rule: "a number of seconds",
    },
    Refused {
        binaries: BOTH,
        variable: "WORKER_CONCURRENCY",
        value: "0",
        shown: "\"0\"",
        rule: "1..=65535",
    },
    Refused {
        binaries: BOTH,
        variable: "TRIM_CHUNK",
        value: "0",
        shown: "\"0\"",
        rule: "from 1 to 100000",
    },
    Refused {
        binaries: WEB,
        variable: "HTTP_REQUEST_TIMEOUT",
        value: "0",
        shown: "\"0\"",
        rule: "from 0.1 to 3600",
    },
    Refused {
        binaries: WEB,
        variable: "HTTP_HEADER_TIMEOUT",
        value: "0",
        shown: "\"0\"",
        rule: "from 0.1 to 3600",
    },
    Refused {
        binaries: WEB,
        variable: "METRICS_QUEUE_REFRESH",
        value: "-1",
        shown: "\"-1\"",
        rule: "from 0 to 3600",
    },
    Refused {
        binaries: WEB,
        variable: "HTTP_MAX_CONNECTIONS",
        value: "0",
        shown: "\"0\"",
        rule: "1..=1000000",
    },
    Refused {
        binaries: WEB,
        variable: "HTTP_MAX_CONNECTIONS",
        value: "900000",
        shown: "900000",
        rule: "open-file limit",
    },
    Refused {
        binaries: WEB,
        variable: "ADMIN_TOKEN",
        value: "                ",
        shown: "",
        rule: "without spaces",
    },
    Refused {
        binaries: WEB,
        variable: "JAEGER_UI_URL",
        value: "javascript:alert(1)",
        shown: "\"javascript:alert(1)\"",
        rule: "http:// or https:// URL",
    },
    Refused {
        binaries: WEB,
        variable: "JAEGER_UI_URL",
        value: "/jaeger",
        shown: "\"/jaeger\"",
        rule: "http:// or https:// URL",
    },
];

#[tokio::test]
async fn every_setting_that_would_break_the_app_is_refused_in_one_line_with_exit_2()
-> anyhow::Result<()> {
    let mut failures = Vec::new();
    for case in REFUSED {
        for binary in case.binaries {
            let command = tokio::process::Command::new(tests::binary(binary)?)
                // Unreachable: a binary that went past its settings would
                // wait for the database instead of exiting at once.
                .env("DATABASE_URL", "postgres://root@127.0.0.1:1/refused")
                .env("BIND", "127.0.0.1:0")
                .env("NO_COLOR", "1")
                .env(case.variable, case.value)
                .kill_on_drop(true)
                .output();
            let Ok(output) = tokio::time::timeout(Duration::from_secs(20), command).await else {
                failures.push(format!(
                    "{binary} {}={:?}: still running after 20 s",
                    case.variable, case.value
                ));
                continue;
            };
            let output = output?;
            let stderr = String::from_utf8_lossy(&output.stderr);
            let lines: Vec<&str> = stderr.lines().collect();
            let line = lines.first().copied().unwrap_or_default();
            let ok = output.status.code() == Some(2)
                && lines.len() == 1
                && output.stdout.is_empty()
                && line.starts_with(&format!("{binary}: "))
                && line.contains(case.variable)
                && line.contains(case.shown)
                && line.contains(case.rule)
                && (case.variable != "ADMIN_TOKEN" || !line.contains(case.value));
            if !ok {
                failures.push(format!(
                    "{binary} {}={:?}: exit {:?}, stdout {} bytes, stderr {stderr:?}",
                    case.variable,
                    case.value,
                    output.status.code(),
                    output.stdout.len()
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

#[tokio::test]
async fn help_still_explains_and_exits_0() -> anyhow::Result<()> {
    for binary in ["web", "worker"] {
        let output = tokio::process::Command::new(tests::binary(binary)?)
            .arg("--help")
            .output()
            .await?;
        assert_eq!(output.status.code(), Some(0), "{binary}");
        let help = String::from_utf8_lossy(&output.stdout);
        assert!(
            help.contains("WORKER_POLL_INTERVAL") && help.contains("JOB_KILL_UNHANDLED"),
            "{binary}: {help}"
        );
    }
    Ok(())
}
