//! VisitMe's one integration-test binary: everything against real Postgres.

mod approval;
mod browser;
mod durability;
mod faults;
mod hardening;
mod jobs;
mod migrations;
mod operations;
mod processes;
mod readability;
mod recovery;
mod schedules;
mod security;
mod settings;
mod telemetry;
mod trim_rule;
mod web;
