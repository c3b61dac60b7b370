//! VisitMe's one integration-test binary: everything against real Postgres.

mod durability;
mod jobs;
mod migrations;
mod processes;
mod telemetry;
mod web;
