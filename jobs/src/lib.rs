#![doc = include_str!("../README.md")]

mod context;
mod enqueue;
mod error;
pub mod shutdown;
pub mod trim_visits;
pub mod worker;

pub use context::JobContext;
pub use enqueue::{Job, enqueue};
pub use error::Error;
pub use trim_visits::{TrimOutcome, TrimVisits};
pub use worker::{WorkerConfig, run};
