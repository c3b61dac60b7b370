#![doc = include_str!("../README.md")]

pub mod admin;
mod context;
pub mod durability;
mod enqueue;
mod error;
pub mod job_span;
pub mod probe;
pub mod shutdown;
pub mod storage;
pub mod trim_visits;
pub mod worker;

pub use context::JobContext;
pub use enqueue::{Job, decode, enqueue};
pub use error::Error;
pub use trim_visits::{TrimOutcome, TrimVisits};
pub use worker::{Health, WorkerConfig, WorkerState, run, run_reporting};
