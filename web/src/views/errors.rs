//! Error pages: say what happened in plain words, never internal details.

use axum::http::StatusCode;
use maud::{Markup, html};

use super::layout;

/// The page shown for an error `status`.
pub fn page(status: StatusCode) -> Markup {
    let (title, explanation) = match status {
        StatusCode::NOT_FOUND => ("Page not found", "There is nothing at this address."),
        StatusCode::FORBIDDEN => (
            "Not allowed",
            "This request was refused. Reload the page and try again.",
        ),
        StatusCode::METHOD_NOT_ALLOWED => (
            "Method not allowed",
            "This address does not accept that kind of request.",
        ),
        StatusCode::SERVICE_UNAVAILABLE => (
            "Temporarily unavailable",
            "The database is not answering right now. Please try again in a few seconds.",
        ),
        _ => (
            "Something went wrong",
            "The error has been logged. Please try again.",
        ),
    };
    layout::page(
        title,
        html! {
            h1 { (title) }
            p.note { (explanation) }
            p { a href="/" { "Back to the visits" } }
        },
    )
}
