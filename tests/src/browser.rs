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

/// The window a session opens with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Viewport width in CSS pixels.
    pub width: u32,
    /// Viewport height in CSS pixels.
    pub height: u32,
    /// Whether pages see `prefers-color-scheme: dark`.
    pub dark: bool,
}

impl Default for Window {
    fn default() -> Self {
        Self {
            width: 1200,
            height: 1000,
            dark: false,
        }
    }
}

impl Browser {
    /// Starts chromedriver on a free port and opens a headless session.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(Window::default()).await
    }

    /// The same with `window`'s size and colour scheme. The viewport is set
    /// by device emulation: headless Chromium keeps windows at least 500 px
    /// wide, too wide for phone-sized checks.
    pub async fn start_with(window: Window) -> anyhow::Result<Self> {
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
        let mut args = serde_json::json!([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-quic",
            "--no-first-run",
            format!(
                "--window-size={},{}",
                window.width.max(500),
                window.height + 200
            ),
            format!("--user-data-dir={}", profile.display()),
        ]);
        if window.dark
            && let Some(args) = args.as_array_mut()
        {
            args.push("--force-dark-mode".into());
        }
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".to_owned(),
            serde_json::json!({
                "binary": "/usr/bin/chromium",
                "args": args,
                "mobileEmulation": { "deviceMetrics": {
                    "width": window.width, "height": window.height, "pixelRatio": 1, "mobile": false,
                } },
            }),
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

    /// Saves a PNG of the window at `path` (e.g. under `docs/`).
    pub async fn screenshot_to(&self, path: &std::path::Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, self.client.screenshot().await?)?;
        Ok(())
    }

    /// Whether the page is wider than the viewport (something overflows),
    /// with the widths: `(document width, viewport width)`.
    pub async fn horizontal_overflow(&self) -> anyhow::Result<(u64, u64)> {
        let widths = self
            .client
            .execute(
                "return [document.documentElement.scrollWidth, window.innerWidth];",
                vec![],
            )
            .await?;
        let widths: Vec<u64> = serde_json::from_value(widths)?;
        Ok((widths[0], widths[1]))
    }

    /// Ends the session and the driver.
    pub async fn close(self) -> anyhow::Result<()> {
        self.client.close().await?;
        let _ = std::fs::remove_dir_all(&self._profile);
        Ok(())
    }
}
