//! HTML rendering with maud: pure functions from loaded data to markup.

pub mod admin;
pub mod components;
pub mod errors;
pub mod layout;
pub mod visits;
