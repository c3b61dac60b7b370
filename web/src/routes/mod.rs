//! HTTP routes, one module per resource.

pub mod admin;
pub mod assets;
pub mod health;
pub mod metrics;
pub mod visits;
