# Sourced by the scripts of tests/browser: the sdgate binary, sim workers and a
# gateway on free loopback ports (port 0, read back from their logs), a
# headless Chromium, and cleanup of every process started, on any exit.
# shellcheck shell=bash

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/sdgate-browser.XXXXXX")
HOST_HEADER="stable-diffusion.default.example.com"
PIDS=()

die() {
  echo "FAIL: $*" >&2
  exit 1
}

cleanup() {
  local status=$?
  trap - EXIT INT TERM
  # SIGINT: sdgate drains at once (SIGTERM alone would serve on for
  # shutdown_delay); SIGTERM for the sims, which as background jobs ignore SIGINT.
  for pid in "${PIDS[@]}"; do kill -INT "$pid" 2>/dev/null || true; kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  if [ "$status" -ne 0 ]; then
    for log in "$WORK"/*.log; do
      [ -f "$log" ] && { echo "--- last lines of $(basename "$log")"; tail -n 15 "$log"; }
    done
  fi
  rm -rf "$WORK"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'echo "FAIL: out of time" >&2; exit 124' TERM

# Runs the calling script again under `timeout` so that it is bounded in time.
bounded() {
  local limit=$1
  shift
  if [ -z "${SDGATE_BROWSER_BOUNDED:-}" ]; then
    trap - EXIT
    rm -rf "$WORK" # the run under `timeout` makes its own
    SDGATE_BROWSER_BOUNDED=1 exec timeout --kill-after=15 "$limit" bash "$0" "$@"
  fi
}

# The sdgate binary: $SDGATE, or target/debug/sdgate (built if needed).
find_sdgate() {
  if [ -n "${SDGATE:-}" ]; then
    [ -x "$SDGATE" ] || die "SDGATE=$SDGATE is not an executable"
    return
  fi
  if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
  fi
  (cd "$ROOT" && cargo build --quiet --bin sdgate) || die "cargo build failed"
  SDGATE="$ROOT/target/debug/sdgate"
}

# Waits until the log file $1 has a line matching $2, and prints the value of
# field $3 (`key=value`) of that line. At most 30 s.
log_field() {
  local file=$1 pattern=$2 key=$3
  for _ in $(seq 300); do
    local line
    line=$(grep -m1 "$pattern" "$file" 2>/dev/null || true)
    if [ -n "$line" ]; then
      sed -n "s/.*${key}=\"\{0,1\}\([^\" ]*\).*/\1/p" <<<"$line"
      return
    fi
    sleep 0.1
  done
  die "no line matching '$pattern' in $(basename "$file") after 30 s"
}

# Starts a sim worker on a free port (extra args: sim flags); appends its
# ip:port to SIMS.
SIMS=()
start_sim() {
  local n=${#SIMS[@]}
  "$SDGATE" sim --port 0 --name "sim-$n" "$@" >"$WORK/sim$n.log" 2>&1 &
  PIDS+=($!)
  SIMS+=("$(log_field "$WORK/sim$n.log" "sim worker listening" addr)")
}

# Starts `sdgate --config $1`; sets GATEWAY (ip:port) and ADMIN (ip:port).
start_gateway() {
  RUST_LOG=${RUST_LOG:-info} "$SDGATE" --config "$1" >"$WORK/gateway.log" 2>&1 &
  PIDS+=($!)
  GATEWAY=$(log_field "$WORK/gateway.log" "sdgate listening" listen)
  ADMIN=$(log_field "$WORK/gateway.log" "sdgate listening" admin)
  [ -n "$GATEWAY" ] && [ -n "$ADMIN" ] || die "cannot read the gateway's addresses from its log"
}

# Prints /status.
status_json() {
  curl -fsS --max-time 5 "http://$ADMIN/status"
}

# Prints /status/history.
history_json() {
  curl -fsS --max-time 5 "http://$ADMIN/status/history"
}

# Waits until the jq expression $1 holds for /status (at most $2 s, default 30).
wait_status() {
  local expr=$1 limit=${2:-30}
  local tries=$((limit * 10))
  for _ in $(seq "$tries"); do
    if status_json 2>/dev/null | jq -e "$expr" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  die "timed out after ${limit}s waiting for /status to satisfy: $expr (last: $(status_json 2>/dev/null | head -c 600))"
}

# One txt2img through the gateway; prints the status code.
txt2img() {
  local host=${1:-$HOST_HEADER} steps=${2:-5}
  curl -sS -o /dev/null -w '%{http_code}' --max-time 60 -X POST -H "Host: $host" \
    -H 'Content-Type: application/json' -d "{\"prompt\": \"pretty dog\", \"steps\": $steps}" \
    "http://$GATEWAY/sdapi/v1/txt2img"
}

CHROMIUM_FLAGS=(--headless --no-sandbox --disable-gpu --disable-quic --no-first-run
  --disable-background-networking --disable-component-update --disable-sync
  --disable-dev-shm-usage --hide-scrollbars)

# Runs headless Chromium (extra args, then the URL), bounded to 90 s.
chromium_run() {
  command -v chromium >/dev/null 2>&1 || die "chromium is not installed (apt-get install -y chromium)"
  timeout --kill-after=5 90 chromium "${CHROMIUM_FLAGS[@]}" "$@" 2>>"$WORK/chromium.log"
}
