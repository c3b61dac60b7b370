# VisitMe: `just` lists these recipes.

# List the recipes.
default:
    @just --list

# Run the whole app in one process (web + embedded worker).
run:
    cargo run --release

# Run every test (needs Postgres on 127.0.0.1:5432).
test:
    cargo test --workspace

# Run one worker process (against DATABASE_URL or the default database).
worker:
    cargo run --release -p jobs --bin worker

# Format, lint, test: what CI runs.
ci:
    bash .ci/run

# Open psql on the app's database.
psql:
    psql "${DATABASE_URL:-postgres://localhost/visitme}"

# Jobs per queue and state; also `worker dead|retry <id>|cancel <id>|prune`.
status:
    cargo run --release -q -p jobs --bin worker -- status
