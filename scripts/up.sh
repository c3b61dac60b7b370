#!/usr/bin/env bash
# `just up [workers=N]`: Postgres (existing, Docker, or a local cluster under
# .data/), Jaeger where a Docker engine runs, then `web` (EMBEDDED_WORKER=false)
# and N `worker` processes, each output line prefixed by its process name.
# Ctrl-C (or `just down`) stops everything this script started.
set -euo pipefail
cd "$(dirname "$0")/.."
workers="${1:-2}"
[[ "$workers" =~ ^[0-9]+$ && "$workers" -ge 1 ]] || { echo "up: workers must be a number >= 1, got '$workers'" >&2; exit 2; }
# UP_PROFILE=debug runs the debug build (what the tests already built);
# UP_DATA_DIR moves pid and log files (tests use a temporary directory).
profile="${UP_PROFILE:-release}"
data="${UP_DATA_DIR:-.data}"
mkdir -p "$data"
: > "$data/up.log"
pids=()
started_cluster=""
started_compose=""
stopped=""

say() { echo "up: $*" | tee -a "$data/up.log"; }

have_docker_engine() { command -v docker >/dev/null && docker info >/dev/null 2>&1 && docker compose version >/dev/null 2>&1; }

stop_all() {
  trap - INT TERM EXIT
  stopped=yes
  # Every process in the pid file: ours, and workers added by `just scale`.
  local all=("${pids[@]}")
  [[ -f "$data/up.pids" ]] && while read -r pid _; do all+=("$pid"); done < "$data/up.pids"
  say "stopping ${#all[@]} processes"
  for pid in "${all[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  for _ in $(seq 1 300); do
    alive=""
    for pid in "${all[@]}"; do kill -0 "$pid" 2>/dev/null && alive=yes; done
    [[ -z "$alive" ]] && break
    sleep 0.1
  done
  if [[ -n "$started_cluster" ]]; then say "stopping the local Postgres cluster"; pg_as_owner pg_ctl -D "$PWD/.data/pg" -m fast stop >/dev/null || true; fi
  if [[ -n "$started_compose" ]]; then say "stopping docker compose services"; docker compose stop >/dev/null 2>&1 || true; fi
  rm -f "$data/up.pids"
  say "stopped"
}

pg_bin() { command -v "$1" 2>/dev/null || ls /usr/lib/postgresql/*/bin/"$1" 2>/dev/null | sort -V | tail -n1; }
# initdb and pg_ctl refuse to run as root: use the postgres account then.
pg_as_owner() {
  local tool; tool="$(pg_bin "$1")"; shift
  if [[ "$(id -u)" == 0 ]]; then runuser -u postgres -- "$tool" "$@"; else "$tool" "$@"; fi
}

start_local_cluster() {
  local port=55433 data="$PWD/.data/pg"
  [[ -n "$(pg_bin initdb)" ]] || { say "no Postgres reachable, no Docker engine, and no PostgreSQL binaries to start one"; exit 1; }
  if [[ ! -f "$data/PG_VERSION" ]]; then
    say "creating a local Postgres cluster in .data/pg"
    mkdir -p "$data"
    [[ "$(id -u)" == 0 ]] && chown postgres "$data" .data
    pg_as_owner initdb -D "$data" -A trust -U visitme >/dev/null
  fi
  say "starting the local Postgres cluster on 127.0.0.1:$port (.data/pg)"
  pg_as_owner pg_ctl -D "$data" -l "$data/server.log" -w \
    -o "-p $port -c listen_addresses=127.0.0.1 -k $data" start >/dev/null
  started_cluster=yes
  export DATABASE_URL="postgres://visitme@127.0.0.1:$port/visitme"
}

trap stop_all INT TERM EXIT

# 0. Build first, without DATABASE_URL: sqlx's macros track it, and a changed
# value would rebuild half the dependency tree.
say "building $profile binaries"
# UP_FEATURES: extra cargo features (the tests build with jobs/probes and
# must not have this build replace their binaries with others).
features=()
[[ -n "${UP_FEATURES:-}" ]] && features=(--features "$UP_FEATURES")
if [[ "$profile" == release ]]; then
  env -u DATABASE_URL cargo build --release --quiet -p web -p jobs --bins "${features[@]}"
else
  env -u DATABASE_URL cargo build --quiet -p web -p jobs --bins "${features[@]}"
fi
bin="target/$profile"

# 1. Postgres
export DATABASE_URL="${DATABASE_URL:-postgres://localhost/visitme}"
maintenance_url="${DATABASE_URL%/*}/postgres"
if pg_isready -q -t 3 -d "$maintenance_url" 2>/dev/null; then
  say "using the Postgres at $(sed -E 's#//([^:@/]+):[^@]*@#//\1:***@#' <<< "$DATABASE_URL")"
elif have_docker_engine; then
  say "starting Postgres with docker compose"
  docker compose up -d --wait postgres
  started_compose=yes
  export DATABASE_URL="postgres://visitme:visitme@127.0.0.1:55432/visitme"
else
  start_local_cluster
fi

# 2. Jaeger (traces only: OTLP logs stay off; logs are on stdout and in the up.log)
if [[ -z "${OTEL_EXPORTER_OTLP_ENDPOINT:-}" ]] && have_docker_engine; then
  say "starting Jaeger with docker compose"
  docker compose up -d jaeger
  started_compose=yes
  export OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:4318" OTEL_LOGS_EXPORTER=none
  jaeger_ui="http://127.0.0.1:16686"
elif [[ -z "${OTEL_EXPORTER_OTLP_ENDPOINT:-}" ]]; then
  say "no Docker engine: Jaeger not started, traces not exported"
fi

# 3. Migrate, start
say "migrating"
"$bin/worker" status 2>&1 | sed -u 's/^/[migrate] /' | tee -a "$data/up.log"

run() {
  local name="$1"; shift
  "$@" > >(sed -u "s/^/[$name] /" | tee -a "$data/up.log") 2>&1 &
  pids+=("$!")
  echo "$! $name" >> "$data/up.pids"
}
: > "$data/up.pids"
export BIND="${BIND:-127.0.0.1:8080}"
# What `just scale` needs to start more workers like these.
{
  echo "export DATABASE_URL='$DATABASE_URL'"
  [[ -n "${OTEL_EXPORTER_OTLP_ENDPOINT:-}" ]] && echo "export OTEL_EXPORTER_OTLP_ENDPOINT='$OTEL_EXPORTER_OTLP_ENDPOINT' OTEL_LOGS_EXPORTER='${OTEL_LOGS_EXPORTER:-}'"
  echo "bin='$bin'"
} > "$data/up.env"
EMBEDDED_WORKER=false OTEL_SERVICE_NAME=visitme-web run web "$bin/web"
for n in $(seq 1 "$workers"); do
  OTEL_SERVICE_NAME=visitme-worker run "worker-$n" "$bin/worker"
done
# The URL only once the web answers.
for _ in $(seq 1 300); do
  grep -q "VisitMe is up" "$data/up.log" && break
  kill -0 "${pids[0]}" 2>/dev/null || { say "web exited during start-up (see $data/up.log)"; exit 1; }
  sleep 0.1
done
say "VisitMe: http://$BIND/  (web + $workers workers)${jaeger_ui:+   Jaeger: $jaeger_ui}"
say "Ctrl-C stops everything; logs also in $data/up.log"
# Exit when any child exits (then stop the rest), or on Ctrl-C.
wait -n "${pids[@]}" || true
[[ -n "$stopped" ]] || say "a process exited; stopping the others"
