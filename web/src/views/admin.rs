//! The shell of the jobs dashboard (`/admin`), and its login page.

use maud::{Markup, html};

use super::layout;

/// The page shown when `ADMIN_TOKEN` is not set.
pub fn disabled() -> Markup {
    layout::page(
        "Jobs dashboard disabled",
        html! {
            h1 { "Jobs dashboard disabled" }
            p.note { "The dashboard is off because no " code { "ADMIN_TOKEN" } " is set. Start "
                code { "web" } " with " code { "ADMIN_TOKEN=<a long random secret>" } " to enable it." }
        },
    )
}

/// The login form, with an optional error line.
pub fn login(error: Option<&str>) -> Markup {
    layout::page(
        "Jobs dashboard: sign in",
        html! {
            h1 { "Jobs dashboard" }
            @if let Some(error) = error { p.note.error { (error) } }
            form.login method="post" action="/admin/login" {
                label for="token" { "Admin token" }
                input #token type="password" name="token" autocomplete="current-password" required autofocus;
                button type="submit" { "Sign in" }
            }
        },
    )
}

/// The shell of the dashboard's pages (`durable_jobs::dashboard` renders
/// their body): the site's page with the title and a sign-out button.
pub fn page(title: &str, body: Markup) -> Markup {
    layout::page(
        title,
        html! {
            div.titlebar {
                h1 { (title) }
                form method="post" action="/admin/logout" { button.link type="submit" { "Sign out" } }
            }
            (body)
        },
    )
}
