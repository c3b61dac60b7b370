//! Small pieces of markup used by several pages.

use chrono::{DateTime, SecondsFormat, Utc};
use maud::{Markup, html};

/// A `<time>` element read at a glance: "12 s ago" as its text (the page's
/// script keeps it current, in the visitor's language), the exact instant in
/// `datetime` (RFC 3339, microseconds, as stored) and on hover (`title`).
pub fn timestamp(at: DateTime<Utc>, now: DateTime<Utc>) -> Markup {
    html! {
        time.ago datetime=(at.to_rfc3339_opts(SecondsFormat::Micros, true))
            title=(at.format("%Y-%m-%d %H:%M:%S%.6f UTC")) {
            (ago(at, now))
        }
    }
}

/// "12 s ago", "3 min ago", "in 2 s": the distance from `now`, in its largest unit.
pub fn ago(at: DateTime<Utc>, now: DateTime<Utc>) -> String {
    // To the nearest second, as the page's script does: a trim due in
    // 2.98 s reads "in 3 s".
    let seconds = ((now - at).num_milliseconds() as f64 / 1000.0).round() as i64;
    let distance = seconds.unsigned_abs();
    let (amount, unit) = match distance {
        0..60 => (distance, "s"),
        60..3_600 => (distance / 60, "min"),
        3_600..86_400 => (distance / 3_600, "h"),
        _ => (distance / 86_400, "d"),
    };
    match (distance, seconds < 0) {
        (0, _) => "just now".to_owned(),
        (_, false) => format!("{amount} {unit} ago"),
        (_, true) => format!("in {amount} {unit}"),
    }
}

/// A stored visitor `"<address>: <user agent>"` split in its two parts.
pub fn visitor_parts(visitor: &str) -> (&str, &str) {
    visitor.split_once(": ").unwrap_or((visitor, ""))
}

/// A short name for the browser a user agent names: "Firefox 133",
/// "Chrome 131", "Safari 17.6", "curl 8.5.0"; else the agent's first word.
pub fn short_browser(user_agent: &str) -> String {
    // Order matters: Edge and Opera also say Chrome; Chrome also says Safari.
    const PRODUCTS: [(&str, &str); 8] = [
        ("Edg/", "Edge"),
        ("OPR/", "Opera"),
        ("Firefox/", "Firefox"),
        ("HeadlessChrome/", "Headless Chrome"),
        ("Chrome/", "Chrome"),
        ("CriOS/", "Chrome"),
        ("Version/", "Safari"),
        ("curl/", "curl"),
    ];
    for (token, name) in PRODUCTS {
        if let Some(start) = user_agent.find(token) {
            let version: String = user_agent[start + token.len()..]
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.')
                .collect();
            // Major version only for browsers (their minor parts are noise).
            let version = match name {
                "curl" => version.as_str(),
                _ => version.split('.').next().unwrap_or(""),
            };
            return format!("{name} {version}").trim_end().to_owned();
        }
    }
    let first = user_agent.split_whitespace().next().unwrap_or("unknown");
    let first: String = first.chars().take(40).collect();
    first.replace('/', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn browsers_get_short_names() {
        let cases = [
            (
                "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
                "Firefox 133",
            ),
            (
                "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/131.0.6778.85 Safari/537.36",
                "Headless Chrome 131",
            ),
            (
                "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36 Edg/131.0.0.0",
                "Edge 131",
            ),
            (
                "Mozilla/5.0 (iPhone; CPU iPhone OS 17_6 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.6 Mobile/15E148 Safari/604.1",
                "Safari 17",
            ),
            ("curl/8.5.0", "curl 8.5.0"),
            ("browser-25", "browser-25"),
            ("", "unknown"),
        ];
        for (agent, expected) in cases {
            assert_eq!(short_browser(agent), expected, "{agent}");
        }
    }

    #[test]
    fn distances_read_at_a_glance() {
        let now = Utc::now();
        let before = |s: i64| now - chrono::TimeDelta::seconds(s);
        assert_eq!(ago(now, now), "just now");
        assert_eq!(ago(before(12), now), "12 s ago");
        assert_eq!(ago(before(185), now), "3 min ago");
        assert_eq!(ago(before(75), now), "1 min ago");
        assert_eq!(ago(before(7_300), now), "2 h ago");
        assert_eq!(ago(before(-2), now), "in 2 s");
        let soon = now + chrono::TimeDelta::milliseconds(2_980);
        assert_eq!(ago(soon, now), "in 3 s", "to the nearest second");
    }
}
