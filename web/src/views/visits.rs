//! The visits page (`GET /`).

use maud::{Markup, html};

use super::{components::timestamp, layout};
use crate::visits::RecordedVisit;

/// Renders the newest visits and the trim note.
pub fn page(recorded: &RecordedVisit) -> Markup {
    layout::page(
        "VisitMe example",
        html! {
            h1 { "Last 10 visits" }
            ol.visits {
                @for visit in &recorded.visits {
                    li data-visit-id=(visit.id) {
                        (timestamp(visit.created_at))
                        span.from { " from " }
                        span.visitor { (visit.visitor) }
                    }
                }
            }
            p.note #trim-threshold {
                "Deleting visits older than: " (timestamp(recorded.threshold))
            }
            p.hint {
                "Visits older than the oldest one shown are being deleted by a background job ("
                code { "TrimVisits" } ", job " code { (recorded.job_id) } "). Reload to watch them go."
            }
        },
    )
}
