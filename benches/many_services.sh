#!/usr/bin/env bash
# Many services (issue 12, item 3): one sdgate with 500 services in its config.
#
#   - FIXED services are `fixed` backends, spread over SIMS `sdgate sim` workers
#     (service i -> worker i % SIMS); they sit at both ends of the list (the
#     first FIXED/2 and the last FIXED - FIXED/2), so the first and the last
#     service route to a worker.
#   - The others, in the middle, are `process` backends at zero (scale min 0):
#     no worker runs until a request wakes one.
#
# Measures: exec -> /readyz 200, exec -> the last service's first 200, exec ->
# every fixed endpoint ready, RSS, CPU and wake-ups (context switches) while
# idle for IDLE_SECS, the cost of /metrics and /status, then checks routing
# (first and last service answer from the right worker, an unknown host is
# 404) and wakes one process service from zero.
#
# Usage: bash benches/many_services.sh       (see benches/README.md for the knobs)
# It installs curl with apt-get when missing (needs root), builds sdgate in
# release mode and only listens on 127.0.0.1. Every wait is bounded and every
# process it starts is stopped on exit.

set -euo pipefail

# ---------------------------------------------------------------- settings
SERVICES=${SERVICES:-500}
FIXED=${FIXED:-250}                    # fixed services; the other SERVICES - FIXED are process services at zero
SIMS=${SIMS:-4}                        # sim workers behind the fixed services
READINESS=${READINESS:-http}           # fixed services' probe: http (/internal/ping) or tcp
IDLE_SECS=${IDLE_SECS:-30}             # idle window for CPU and wake-ups
SETTLE_SECS=${SETTLE_SECS:-3}          # after start, before the idle window
SIM_BASE_PORT=${SIM_BASE_PORT:-17960}  # sims on SIM_BASE_PORT .. +SIMS-1
POOL_BASE_PORT=${POOL_BASE_PORT:-30000} # process service j: workers on POOL_BASE_PORT + 4j ..
GATE_PORT=${GATE_PORT:-18180}
ADMIN_PORT=${ADMIN_PORT:-19190}
WAIT_SECS=${WAIT_SECS:-20}             # how long to wait for a port, readiness or an answer
WAKE=${WAKE:-1}                        # 1: at the end, wake the first process service from zero
SKIP_BUILD=${SKIP_BUILD:-0}            # 1: use the existing target/release/sdgate
KEEP_TMP=${KEEP_TMP:-0}                # 1: keep the config and logs

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SDGATE=${SDGATE:-$ROOT/target/release/sdgate}
PROCESS=$((SERVICES - FIXED))
HEAD_FIXED=$((FIXED / 2))              # services 0 .. HEAD_FIXED-1 are fixed
TAIL_START=$((HEAD_FIXED + PROCESS))   # services TAIL_START .. SERVICES-1 are fixed

NAME=many_services.sh
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"

((SERVICES >= 2 && FIXED >= 2 && FIXED <= SERVICES && SIMS >= 1)) || die "need SERVICES >= FIXED >= 2 and SIMS >= 1"
((POOL_BASE_PORT + 4 * PROCESS <= 65535)) || die "POOL_BASE_PORT + 4 x process services exceeds 65535"
[[ $READINESS == http || $READINESS == tcp ]] || die "READINESS must be http or tcp"

# ---------------------------------------------------------------- processes
bench_init many

# A sleep that forks nothing (a read with a timeout on a FIFO no one writes
# to), so polling does not take CPU from the process being timed.
mkfifo "$TMP/nap"
exec {NAP_FD}<>"$TMP/nap"
nap() { read -r -t "$1" -u "$NAP_FD" _ || true; }

# get_status PORT PATH HOST: sets STATUS to the status code of a GET (empty
# if nothing answered within 2 s), without forking.
STATUS=
get_status() {
    local port=$1 path=$2 host=$3 fd line=
    STATUS=
    { exec {fd}<>"/dev/tcp/127.0.0.1/$port"; } 2>/dev/null || return 0
    printf 'GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n' "$path" "$host" >&"$fd" 2>/dev/null || true
    read -r -t 2 -u "$fd" line 2>/dev/null || true
    exec {fd}>&-
    line=${line#* }
    STATUS=${line%% *}
}

now_ms() { local t=${EPOCHREALTIME/./}; echo $((t / 1000)); }

# ---------------------------------------------------------------- setup
service_name() { printf 'svc-%03d' "$1"; }
is_fixed() { (($1 < HEAD_FIXED || $1 >= TAIL_START)); }
sim_port() { echo $((SIM_BASE_PORT + $1 % SIMS)); }

write_config() { # write_config FILE
    local file=$1 i j=0 name readiness
    if [[ $READINESS == http ]]; then readiness='{ http: /internal/ping }'; else readiness='{ tcp: true }'; fi
    {
        # Many services share each sim: allowed, each counting its slots apart.
        printf 'listen: 127.0.0.1:%d\nadmin: 127.0.0.1:%d\ndrain_timeout: 5s\nallow_shared_pods: true\nservices:\n' "$GATE_PORT" "$ADMIN_PORT"
        for ((i = 0; i < SERVICES; i++)); do
            name=$(service_name "$i")
            printf '  - name: %s\n    hosts: ["%s.bench.local"]\n' "$name" "$name"
            if is_fixed "$i"; then
                printf '    readiness: %s\n    backend: { fixed: ["127.0.0.1:%d"] }\n' "$readiness" "$(sim_port "$i")"
            else
                printf '    readiness: { http: /internal/ping }\n    scale: { min: 0, max: 4 }\n'
                printf '    backend:\n      process:\n'
                printf '        command: ["{sdgate}", "sim", "--port", "{port}", "--step-time", "1ms", "--name", "%s-{index}"]\n' "$name"
                printf '        port_base: %d\n        stop_grace: 2s\n' $((POOL_BASE_PORT + 4 * j))
                j=$((j + 1))
            fi
        done
    } >"$file"
}

cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
# Context switches of all threads: each is a thread going to sleep or being
# preempted, so while idle it counts wake-ups.
ctx_switches() { cat /proc/"$1"/task/*/status 2>/dev/null | awk '/ctxt_switches/ { n += $2 } END { print n + 0 }'; }
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
hwm_kib() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status"; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

# ---------------------------------------------------------------- main
install_tools curl getconf
build
require_free $(seq "$SIM_BASE_PORT" $((SIM_BASE_PORT + SIMS - 1))) "$GATE_PORT" "$ADMIN_PORT" \
    $(seq "$POOL_BASE_PORT" $((POOL_BASE_PORT + 3)))
log "workdir $TMP; $SERVICES services ($FIXED fixed over $SIMS sims, $PROCESS process at zero); $(nproc) CPUs"

SIM_PIDS=()
for ((i = 0; i < SIMS; i++)); do
    start "sim-$((SIM_BASE_PORT + i))" env RUST_LOG=warn "$SDGATE" sim --port $((SIM_BASE_PORT + i)) --step-time 1ms
    SIM_PIDS+=("$LAST_PID")
done
for ((i = 0; i < SIMS; i++)); do wait_port $((SIM_BASE_PORT + i)) "${SIM_PIDS[$i]}"; done

CONFIG="$TMP/many.yaml"
write_config "$CONFIG"
CHECK_START=$(now_ms)
"$SDGATE" --config "$CONFIG" check >/dev/null || die "sdgate rejected $CONFIG"
CHECK_MS=$(($(now_ms) - CHECK_START))

LAST=$((SERVICES - 1))
LAST_HOST="$(service_name "$LAST").bench.local"
T0=$(now_ms)
start sdgate "$SDGATE" --config "$CONFIG"
GATE_PID=$LAST_PID
DEADLINE=$((T0 + WAIT_SECS * 1000))
READYZ_MS= ROUTED_MS= ALL_READY_MS=
while [[ -z $READYZ_MS ]]; do
    get_status "$ADMIN_PORT" /readyz localhost
    [[ $STATUS == 200 ]] && READYZ_MS=$(($(now_ms) - T0)) && break
    kill -0 "$GATE_PID" 2>/dev/null || die "sdgate exited at start (see $TMP/sdgate.log)"
    (($(now_ms) < DEADLINE)) || die "/readyz did not answer 200 within ${WAIT_SECS}s"
    nap 0.002
done
while [[ -z $ROUTED_MS ]]; do
    get_status "$GATE_PORT" /sdapi/v1/options "$LAST_HOST"
    [[ $STATUS == 200 ]] && ROUTED_MS=$(($(now_ms) - T0)) && break
    (($(now_ms) < DEADLINE)) || die "$LAST_HOST did not answer 200 within ${WAIT_SECS}s (last: ${STATUS:-none})"
    nap 0.002
done
while [[ -z $ALL_READY_MS ]]; do
    READY=$(grep -c 'endpoint ready' "$TMP/sdgate.log" || true)
    ((READY >= FIXED)) && ALL_READY_MS=$(($(now_ms) - T0)) && break
    (($(now_ms) < DEADLINE)) || die "only $READY of $FIXED fixed endpoints ready after ${WAIT_SECS}s"
    nap 0.01
done
RSS_START=$(rss_kib "$GATE_PID")
THREADS=$(awk '/^Threads:/ { print $2 }' "/proc/$GATE_PID/status")
log "ready: /readyz ${READYZ_MS} ms, last service ${ROUTED_MS} ms, all $FIXED endpoints ${ALL_READY_MS} ms; RSS $(mib "$RSS_START") MiB"

nap "$SETTLE_SECS"
TICKS0=$(cpu_ticks "$GATE_PID")
CTX0=$(ctx_switches "$GATE_PID")
SIM_TICKS0=0
for pid in "${SIM_PIDS[@]}"; do SIM_TICKS0=$((SIM_TICKS0 + $(cpu_ticks "$pid"))); done
W0=$(now_ms)
log "idle for ${IDLE_SECS}s"
nap "$IDLE_SECS"
W1=$(now_ms)
TICKS1=$(cpu_ticks "$GATE_PID")
CTX1=$(ctx_switches "$GATE_PID")
SIM_TICKS1=0
for pid in "${SIM_PIDS[@]}"; do SIM_TICKS1=$((SIM_TICKS1 + $(cpu_ticks "$pid"))); done
HZ=$(getconf CLK_TCK)
IDLE_CPU=$(awk -v t=$((TICKS1 - TICKS0)) -v hz="$HZ" -v ms=$((W1 - W0)) 'BEGIN { printf "%.2f", t / hz / (ms / 1000) * 100 }')
SIM_CPU=$(awk -v t=$((SIM_TICKS1 - SIM_TICKS0)) -v hz="$HZ" -v ms=$((W1 - W0)) 'BEGIN { printf "%.2f", t / hz / (ms / 1000) * 100 }')
WAKEUPS=$(awk -v c=$((CTX1 - CTX0)) -v ms=$((W1 - W0)) 'BEGIN { printf "%.0f", c / (ms / 1000) }')
RSS_IDLE=$(rss_kib "$GATE_PID")
FDS=$(ls "/proc/$GATE_PID/fd" | wc -l)

# Admin pages: each fetched 3 times, the median time kept.
page() { # page PATH -> "BYTES MEDIAN_MS"
    local path=$1 i out sizes=() times=()
    for i in 1 2 3; do
        out=$(curl -s -o /dev/null -m "$WAIT_SECS" -w '%{size_download} %{time_total}' "http://127.0.0.1:$ADMIN_PORT$path") \
            || die "GET $path failed"
        sizes+=("${out% *}")
        times+=("${out#* }")
    done
    printf '%s %s\n' "${sizes[0]}" "$(printf '%s\n' "${times[@]}" | sort -n | awk 'NR == 2 { printf "%.1f", $1 * 1000 }')"
}
read -r METRICS_BYTES METRICS_MS < <(page /metrics)
read -r STATUS_BYTES STATUS_MS < <(page /status)

# Routing: the first and the last service answer from their own worker.
worker_of() { # worker_of HOST -> the X-Worker header of GET /sdapi/v1/options
    curl -s -D - -o /dev/null -m "$WAIT_SECS" -H "Host: $1" "http://127.0.0.1:$GATE_PORT/sdapi/v1/options" \
        | tr -d '\r' | awk -F': ' 'tolower($1) == "x-worker" { print $2 }'
}
for i in 0 "$LAST"; do
    got=$(worker_of "$(service_name "$i").bench.local")
    want="sim-$(sim_port "$i")"
    [[ $got == "$want" ]] || die "$(service_name "$i") answered from '${got:-nothing}', expected $want"
done
UNKNOWN=$(curl -s -o /dev/null -m 5 -w '%{http_code}' -H "Host: nowhere.bench.local" "http://127.0.0.1:$GATE_PORT/sdapi/v1/options")
[[ $UNKNOWN == 404 ]] || die "an unknown host got $UNKNOWN, expected 404"
SPAWNED=$(grep -c 'started worker' "$TMP/sdgate.log" || true)
((SPAWNED == 0)) || die "$SPAWNED workers were started while every process service was at zero"
log "routing ok: $(service_name 0) -> sim-$(sim_port 0), $(service_name "$LAST") -> sim-$(sim_port "$LAST"), unknown host 404, no worker started"

WAKE_MS=-
if [[ $WAKE == 1 && $PROCESS -gt 0 ]]; then
    WOKEN=$(service_name "$HEAD_FIXED")
    log "waking $WOKEN from zero"
    out=$(curl -s -D - -o /dev/null -m "$WAIT_SECS" -w 'time=%{time_total}\n' -H "Host: $WOKEN.bench.local" \
        "http://127.0.0.1:$GATE_PORT/sdapi/v1/options" | tr -d '\r') || die "the request to $WOKEN failed"
    got=$(awk -F': ' 'tolower($1) == "x-worker" { print $2 }' <<<"$out")
    [[ $got == "$WOKEN-0" ]] || die "$WOKEN answered from '${got:-nothing}', expected its own worker $WOKEN-0"
    WAKE_MS=$(awk -F= '/^time=/ { printf "%.0f", $2 * 1000 }' <<<"$out")
    SPAWNED=$(grep -c 'started worker' "$TMP/sdgate.log" || true)
    ((SPAWNED == 1)) || die "waking one service started $SPAWNED workers"
fi

# ---------------------------------------------------------------- report
cat <<EOF

## $SERVICES services: $FIXED fixed (over $SIMS sims, readiness $READINESS), $PROCESS process at zero

| measure | value |
| --- | ---: |
| \`sdgate check\` (parse + validate + print) | $CHECK_MS ms |
| exec -> /readyz 200 | $READYZ_MS ms |
| exec -> first 200 from the last service | $ROUTED_MS ms |
| exec -> all $FIXED fixed endpoints ready | $ALL_READY_MS ms |
| RSS after start | $(mib "$RSS_START") MiB |
| RSS after ${IDLE_SECS}s idle (peak) | $(mib "$RSS_IDLE") MiB ($(mib "$(hwm_kib "$GATE_PID")") MiB) |
| idle CPU (sdgate, of one core) | $IDLE_CPU % |
| idle wake-ups (context switches/s, all threads) | $WAKEUPS |
| idle CPU of the $SIMS sims (answering probes) | $SIM_CPU % |
| threads / open descriptors | $THREADS / $FDS |
| GET /metrics | $METRICS_MS ms, $METRICS_BYTES bytes |
| GET /status | $STATUS_MS ms, $STATUS_BYTES bytes |
| wake one process service from zero -> 200 | $WAKE_MS ms |

($(nproc) CPUs; sdgate and the sims share them. Routing checked: first and last service answer from their worker, unknown host 404, no worker started before the wake.)
EOF
