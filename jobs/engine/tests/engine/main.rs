//! The engine's own tests, against real Postgres, each in a fresh database
//! (see `support`): `cargo test -p durable-jobs`.

mod durable;
mod flow;
mod jobs;
mod runtime;
mod schedules;
mod storage;
mod support;
mod testing;
mod workflows;
