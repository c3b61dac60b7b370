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

# Bring it all up: Postgres, Jaeger (with Docker), web and N workers; Ctrl-C stops all.
up workers="2":
    bash scripts/up.sh {{workers}}

# Stop what `just up` started (from another terminal).
down:
    -kill -TERM $(cut -d' ' -f1 .data/up.pids 2>/dev/null) 2>/dev/null

# While `just up` runs: start or stop workers until N are running.
scale workers:
    bash scripts/scale.sh {{workers}}

# Follow the logs of `just up`.
logs:
    tail -n 100 -f .data/up.log

# Print the newest VisitMe trace from Jaeger: web span -> job span -> deleted ids.
trace-check jaeger="http://127.0.0.1:16686":
    python3 scripts/trace_check.py --jaeger {{jaeger}}

# Benchmarks: prints a table and writes target/bench/results.json.
bench *args:
    cargo run --release -q -p tests --bin bench -- {{args}}

# Soak: steady visits with random worker restarts (default 60 s), then checks every promise.
soak seconds="60":
    SOAK_SECONDS={{seconds}} cargo test -q -p tests --test integration soak -- --nocapture
