//! Static assets compiled into the binary.

use axum::{Router, http::header, response::IntoResponse, routing::get};

use crate::AppState;

const STYLE_CSS: &str = include_str!("../../assets/style.css");
const PAGE_JS: &str = include_str!("../../assets/page.js");

/// `/assets/*`.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/assets/style.css", get(style))
        .route("/assets/page.js", get(script))
}

/// The pages' one script: relative times, and panels refreshed in place.
async fn script() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        PAGE_JS,
    )
}

async fn style() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        STYLE_CSS,
    )
}
