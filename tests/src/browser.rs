//! Headless Chromium through chromedriver (WebDriver), for page tests.

use std::{path::PathBuf, process::Stdio, time::Duration};

use anyhow::Context as _;
use fantoccini::{Client, ClientBuilder};
use tokio::process::{Child, Command};

/// A chromedriver process and a WebDriver session on it; both end on drop
/// (call [`Browser::close`] to end the session cleanly).
#[derive(Debug)]
pub struct Browser {
    /// The WebDriver client.
    pub client: Client,
    _driver: Child,
    _profile: PathBuf,
}

/// Why there is no browser: the binaries are missing.
pub fn unavailable() -> Option<String> {
    let missing: Vec<&str> = ["/usr/bin/chromium", "/usr/bin/chromedriver"]
        .into_iter()
        .filter(|path| !std::path::Path::new(path).exists())
        .collect();
    (!missing.is_empty()).then(|| {
        format!(
            "missing {} (apt-get install chromium chromium-driver)",
            missing.join(", ")
        )
    })
}

impl Browser {
    /// Starts chromedriver on a free port and opens a headless session.
    pub async fn start() -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let driver = Command::new("/usr/bin/chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("start chromedriver")?;
        let profile =
            std::env::temp_dir().join(format!("visitme-chromium-{}", ulid::Ulid::generate()));
        // The closed network here refuses Chromium's background connections:
        // switch them off, as well as everything a test does not need.
        let args = serde_json::json!([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-quic",
            "--no-first-run",
            "--window-size=1200,1000",
            format!("--user-data-dir={}", profile.display()),
        ]);
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".to_owned(),
            serde_json::json!({ "binary": "/usr/bin/chromium", "args": args }),
        );
        let url = format!("http://127.0.0.1:{port}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let client = loop {
            let mut builder =
                ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new());
            builder.capabilities(capabilities.clone());
            match builder.connect(&url).await {
                Ok(client) => break client,
                Err(err) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(error = %err, "chromedriver not ready yet");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(err) => return Err(err).context("open a WebDriver session"),
            }
        };
        Ok(Self {
            client,
            _driver: driver,
            _profile: profile,
        })
    }

    /// Saves a PNG of the window under `target/screenshots/<name>.png` and returns its path.
    pub async fn screenshot(&self, name: &str) -> anyhow::Result<PathBuf> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/screenshots");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, self.client.screenshot().await?)?;
        Ok(path)
    }

    /// Ends the session and the driver.
    pub async fn close(self) -> anyhow::Result<()> {
        self.client.close().await?;
        let _ = std::fs::remove_dir_all(&self._profile);
        Ok(())
    }
}
