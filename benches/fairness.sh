#!/usr/bin/env bash
# Fair share between clients: one greedy client sends 40 txt2img requests at
# once, 50 ms later 4 light clients send 5 each, one after another, to 4 sim
# workers at 0.2 s per generation (4 steps of 50 ms), container_concurrency 1.
# Side by side in one run:
#   sdgate-fair      fairness.key: header (X-Api-Key), so the clients are told apart
#   sdgate-fifo      fairness.key: address (every client is 127.0.0.1: one FIFO)
#   haproxy          maxconn 1 per server and its queue (FIFO)
#   sdgate-priority  the greedy client's 40 go through a `priority: batch` route,
#                    and all clients send without X-Api-Key (address key: one
#                    client), so only the class tells them apart
# Reports the light clients' p50/p95, when the greedy burst was done, Jain's
# index over the five clients' throughputs, and failures.
#
# Usage: bash benches/fairness.sh   (ROUNDS=1 by default; SKIP_BUILD=1 to use the
# existing target/release/sdgate). Installs haproxy, curl, jq, python3 with
# apt-get when missing. Loopback only; every process it starts is stopped on exit.

set -euo pipefail

ROUNDS=${ROUNDS:-1}
WORKERS=4
STEP_TIME=${STEP_TIME:-50ms}
STEPS=${STEPS:-4}
GREEDY=${GREEDY:-40}
LIGHT=${LIGHT:-4}
EACH=${EACH:-5}
HOST_HEADER=sd.bench.local
SIM_BASE_PORT=${SIM_BASE_PORT:-17960}
GATE_PORT=${GATE_PORT:-18180}
ADMIN_PORT=${ADMIN_PORT:-19190}
HAPROXY_PORT=${HAPROXY_PORT:-18181}
WAIT_SECS=${WAIT_SECS:-20}
SKIP_BUILD=${SKIP_BUILD:-0}
KEEP_TMP=${KEEP_TMP:-0}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SDGATE=${SDGATE:-$ROOT/target/release/sdgate}
NAME=fairness.sh
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"
bench_init fairness

install_tools haproxy curl jq python3
build
require_free $(seq "$SIM_BASE_PORT" $((SIM_BASE_PORT + WORKERS - 1))) "$GATE_PORT" "$ADMIN_PORT" "$HAPROXY_PORT"

WORKER_PIDS=()
for ((i = 0; i < WORKERS; i++)); do
    start "sim-$i" env RUST_LOG=warn "$SDGATE" sim --port $((SIM_BASE_PORT + i)) --step-time "$STEP_TIME" --image-bytes 4096
    WORKER_PIDS+=("$LAST_PID")
done
for ((i = 0; i < WORKERS; i++)); do wait_port $((SIM_BASE_PORT + i)) "${WORKER_PIDS[$i]}"; done
BACKENDS=$(for ((i = 0; i < WORKERS; i++)); do printf '"127.0.0.1:%d"%s' $((SIM_BASE_PORT + i)) $([[ $i -lt $((WORKERS - 1)) ]] && echo ", "); done)

gate_config() { # gate_config FILE KEY [ROUTE]
    cat >"$1" <<EOF
listen: 127.0.0.1:$GATE_PORT
admin: 127.0.0.1:$ADMIN_PORT
services:
  - name: sd
    hosts: ["$HOST_HEADER"]
    container_concurrency: 1
    queue: { max_depth: 1000, timeout: 120s }
    readiness: { tcp: true, period: 50ms }
    fairness: { key: $2, header: X-Api-Key }
    backend: { fixed: [$BACKENDS] }
EOF
    if [[ ${3:-} == batch ]]; then
        cat >>"$1" <<EOF
routes:
  - name: batch
    hosts: ["batch.bench.local"]
    priority: batch
    split: [{ service: sd, weight: 1 }]
EOF
    fi
}

run_load() { # run_load LABEL PORT [--batch-host H] [--no-keys]
    local label=$1 port=$2
    shift 2
    log "$label: $GREEDY at once + $LIGHT x $EACH sequential"
    python3 "$ROOT/benches/fairness_load.py" "http://127.0.0.1:$port/sdapi/v1/txt2img" "$HOST_HEADER" \
        --greedy "$GREEDY" --light "$LIGHT" --each "$EACH" --steps "$STEPS" "$@" >"$TMP/$label.json"
    ROWS+=("$(jq -r --arg l "$label" '"| \($l) | \(.light_p50*1000|round) | \(.light_p95*1000|round) | \((.greedy_done_s // 0)*100|round/100) | \(.jain*1000|round/1000) | \(.failures)/\(.requests) |"' "$TMP/$label.json")")
}

start_sdgate() { # start_sdgate CONFIG
    "$SDGATE" --config "$1" check >/dev/null
    start sdgate env RUST_LOG=warn "$SDGATE" --config "$1"
    GATE_PID=$LAST_PID
    wait_port "$GATE_PORT" "$GATE_PID"
    for _ in $(seq 1 $((WAIT_SECS * 10))); do
        [[ $(curl -s "http://127.0.0.1:$ADMIN_PORT/metrics" | awk '/^sdgate_endpoints\{/ && /state="ready"/ { print $NF }') == "$WORKERS" ]] && return
        sleep 0.1
    done
    die "sdgate did not see $WORKERS ready workers"
}

ROWS=()
for ((round = 1; round <= ROUNDS; round++)); do
    gate_config "$TMP/fair.yaml" header
    start_sdgate "$TMP/fair.yaml"
    run_load sdgate-fair "$GATE_PORT"
    run_load sdgate-light-alone "$GATE_PORT" --greedy 0
    stop "$GATE_PID"

    gate_config "$TMP/fifo.yaml" address
    start_sdgate "$TMP/fifo.yaml"
    run_load sdgate-fifo "$GATE_PORT"
    stop "$GATE_PID"

    write_haproxy_config "$TMP/haproxy.cfg" "$HAPROXY_PORT" "$SIM_BASE_PORT" "$WORKERS" "maxconn 1"
    haproxy -c -q -f "$TMP/haproxy.cfg"
    start haproxy haproxy -db -f "$TMP/haproxy.cfg"
    HAPROXY_PID=$LAST_PID
    wait_port "$HAPROXY_PORT" "$HAPROXY_PID"
    run_load haproxy "$HAPROXY_PORT"
    stop "$HAPROXY_PID"

    gate_config "$TMP/priority.yaml" address batch
    start_sdgate "$TMP/priority.yaml"
    run_load sdgate-priority "$GATE_PORT" --batch-host batch.bench.local
    stop "$GATE_PID"
done

GEN=$(awk -v s="${STEP_TIME%ms}" -v n="$STEPS" 'BEGIN { printf "%.2f", s * n / 1000 }')
cat <<EOF

## Fair share — $GREEDY requests at once from one client, then $LIGHT clients x $EACH sequential; $WORKERS sim workers, ${GEN} s per generation, cc 1

Target: the light clients' p95 <= 3 generations + 0.3 s = $(awk -v g="$GEN" 'BEGIN { printf "%.2f", 3 * g + 0.3 }') s.

| path | light p50 (ms) | light p95 (ms) | greedy burst done (s) | Jain's index (5 clients) | failures |
| --- | ---: | ---: | ---: | ---: | ---: |
$(printf '%s\n' "${ROWS[@]}")

sdgate-light-alone: the light clients with no burst (the baseline for priority: a batch flood
should move their p95 by at most one generation). sdgate-priority: the burst through a
\`priority: batch\` route and no client keys (one client by address), so only the class tells
the requests apart.

($(nproc) CPUs, all on 127.0.0.1.)
EOF
