//! Small pieces of markup used by several pages.

use chrono::{DateTime, SecondsFormat, Utc};
use maud::{Markup, html};

/// A `<time>` element: machine-readable RFC 3339 (microseconds, as stored) in
/// `datetime`, and a readable form as its text.
pub fn timestamp(at: DateTime<Utc>) -> Markup {
    html! {
        time datetime=(at.to_rfc3339_opts(SecondsFormat::Micros, true)) {
            (at.format("%Y-%m-%d %H:%M:%S%.6f UTC"))
        }
    }
}
