//! Static assets compiled into the binary.

use axum::{Router, http::header, response::IntoResponse, routing::get};

use crate::AppState;

const STYLE_CSS: &str = include_str!("../../assets/style.css");

/// `/assets/*`.
pub fn router() -> Router<AppState> {
    Router::new().route("/assets/style.css", get(style))
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
