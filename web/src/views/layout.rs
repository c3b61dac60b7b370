//! The page shell every page shares.

use maud::{DOCTYPE, Markup, html};

/// Wraps `body` in the common HTML document with `title`.
pub fn page(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) }
                meta name="color-scheme" content="light dark";
                link rel="stylesheet" href="/assets/style.css";
                script src="/assets/page.js" defer {}
            }
            body {
                a.skip href="#main" { "Skip to content" }
                header.site {
                    a.brand href="/" { "VisitMe" }
                    span.tagline { "durable background jobs in Rust" }
                }
                main #main { (body) }
                footer.site {
                    "A Rust take on App Engine's push-queue sample: each page view enqueues a job; workers pull and run it."
                }
            }
        }
    }
}
