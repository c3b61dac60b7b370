//! HTTP routes, one module per resource.

pub mod assets;
pub mod health;
pub mod visits;
