#!/usr/bin/env bash
# `just scale workers=N`: while `just up` runs, start or stop worker processes
# until N are running. New workers log into the same up.log, prefixed.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${1:?usage: scale.sh <workers>}"
[[ "$target" =~ ^[0-9]+$ ]] || { echo "scale: workers must be a number, got '$target'" >&2; exit 2; }
data="${UP_DATA_DIR:-.data}"
[[ -f "$data/up.env" && -f "$data/up.pids" ]] || { echo "scale: nothing is up (run 'just up' first)" >&2; exit 1; }
# shellcheck disable=SC1091
source "$data/up.env"

running=()
while read -r pid name; do
  [[ "$name" == worker-* ]] && kill -0 "$pid" 2>/dev/null && running+=("$pid:$name")
done < "$data/up.pids"
count=${#running[@]}
echo "scale: $count workers running, want $target"

next=$(( $(grep -c ' worker-' "$data/up.pids" || true) + 1 ))
while (( count < target )); do
  name="worker-$next"
  # Detached from our own output (the caller may be waiting for it to close).
  OTEL_SERVICE_NAME=visitme-worker nohup "$bin/worker" \
    > >(sed -u "s/^/[$name] /" >> "$data/up.log" 2>/dev/null) 2>&1 < /dev/null &
  echo "$! $name" >> "$data/up.pids"
  echo "scale: started $name (pid $!)"
  count=$((count + 1)); next=$((next + 1))
done
while (( count > target )); do
  last="${running[$((count - 1))]}"
  kill -TERM "${last%%:*}" 2>/dev/null || true
  echo "scale: stopping ${last#*:} (pid ${last%%:*}); it finishes its running jobs first"
  count=$((count - 1))
done
