//! Signing in to the web tier's dashboard (`/admin`) as the tests do.

/// The `ADMIN_TOKEN` the tests give the `web` processes they start.
pub const TOKEN: &str = "a-long-enough-admin-token";

/// A client that keeps no cookies and follows no redirects.
pub fn plain_client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?)
}

/// Logs in with the form; returns the `name=value` of the session cookie and the whole header.
pub async fn login(client: &reqwest::Client, address: &str) -> anyhow::Result<(String, String)> {
    let response = client
        .post(format!("http://{address}/admin/login"))
        .form(&[("token", TOKEN)])
        .send()
        .await?;
    anyhow::ensure!(response.status() == 303, "login: {}", response.status());
    let cookie = response.headers()["set-cookie"].to_str()?.to_owned();
    let session = cookie.split(';').next().unwrap_or_default().to_owned();
    Ok((session, cookie))
}

/// The dashboard's `name="csrf"` value on `page`, if it has a form.
pub fn csrf_of(page: &str) -> Option<String> {
    let (_, rest) = page.split_once(r#"name="csrf" value=""#)?;
    Some(rest.split('"').next()?.to_owned())
}
