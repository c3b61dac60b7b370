//! VisitMe's one integration-test binary: everything against real Postgres.

mod browser;
mod durability;
mod jobs;
mod migrations;
mod operations;
mod processes;
mod telemetry;
mod web;
