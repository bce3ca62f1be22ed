#!/usr/bin/env bash
# Load benchmark: sdgate against HAProxy (and a direct connection) on loopback.
#
#   (a) tiny responses, container_concurrency 0: wrk against GET /sdapi/v1/options
#       on one `sdgate sim` worker, directly, through HAProxy and through sdgate;
#       also through a second HAProxy that does sdgate's per-request work (Host
#       routing, X-Forwarded-*, X-Request-Id), unless SAME_WORK=0.
#   (b) one generation at a time per worker (container_concurrency 1): hey sends
#       192 POST txt2img (4 steps of 50ms) from 16 clients to 4 sim workers,
#       through HAProxy (`maxconn 1` per server + queue) and through sdgate.
#
# Usage: bash benches/load.sh            (see benches/README.md for the knobs)
# It installs hey, wrk, haproxy, curl and jq with apt-get when they are missing
# (needs root), builds sdgate in release mode and only listens on 127.0.0.1.
# Every process it starts is stopped on exit.

set -euo pipefail

# ---------------------------------------------------------------- settings
DURATION=${DURATION:-10s}          # wrk run length in (a)
WRK_THREADS=${WRK_THREADS:-2}
WRK_CONNS=${WRK_CONNS:-64}
REQUESTS=${REQUESTS:-192}          # hey -n in (b)
CLIENTS=${CLIENTS:-16}             # hey -c in (b)
WORKERS=${WORKERS:-4}              # sim workers in (b)
STEPS=${STEPS:-4}                  # "steps" in each txt2img body
STEP_TIME=${STEP_TIME:-50ms}       # sim --step-time
IMAGE_BYTES=${IMAGE_BYTES:-65536}  # sim --image-bytes
HOST_HEADER=${HOST_HEADER:-sd.bench.local}
SIM_BASE_PORT=${SIM_BASE_PORT:-17860}  # workers on SIM_BASE_PORT .. +WORKERS-1
GATE_PORT=${GATE_PORT:-18080}
HAPROXY_PORT=${HAPROXY_PORT:-18081}
HAPROXY_SAME_PORT=${HAPROXY_SAME_PORT:-18082}  # (a): the same-work HAProxy
ADMIN_PORT=${ADMIN_PORT:-19090}
WAIT_SECS=${WAIT_SECS:-10}         # how long to wait for a port or readiness
SKIP_BUILD=${SKIP_BUILD:-0}        # 1: use the existing target/release/sdgate
KEEP_TMP=${KEEP_TMP:-0}            # 1: keep configs and logs after the run
PARTS=${PARTS:-ab}                 # which parts to run: a, b or ab
ROUNDS=${ROUNDS:-3}                # (a): wrk runs per proxy, alternating; medians reported
SAME_WORK=${SAME_WORK:-1}          # (a): 1 also runs the same-work HAProxy
BASELINE=${BASELINE:-}             # (a): another sdgate binary (an older build) run alternately
BASELINE_LOG=${BASELINE_LOG:-warn} # (a): the baseline's RUST_LOG (info: the default level's cost)
SDGATE_LOG=${SDGATE_LOG:-warn}     # (a): this build's RUST_LOG
BASELINE_PORT=${BASELINE_PORT:-18083}
BASELINE_ADMIN_PORT=${BASELINE_ADMIN_PORT:-19091}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SDGATE=${SDGATE:-$ROOT/target/release/sdgate}  # another binary: not built here
BODY=$(printf '{"prompt":"x","steps":%d}' "$STEPS")

NAME=load.sh
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"

# ---------------------------------------------------------------- processes
bench_init load

# wait_200 URL WHAT: until a GET of URL (with the Host header) answers 200.
wait_200() {
    local url=$1 what=$2 i code
    for i in $(seq 1 $((WAIT_SECS * 10))); do
        code=$(curl -s -o /dev/null -w '%{http_code}' -m 2 -H "Host: $HOST_HEADER" "$url" || true)
        [[ $code == 200 ]] && return 0
        sleep 0.1
    done
    die "$what did not answer 200 at $url within ${WAIT_SECS}s (last status: ${code:-none})"
}

# wait_gate_ready N [ADMIN_PORT]: until sdgate's admin metrics report N ready endpoints.
wait_gate_ready() {
    local want=$1 admin=${2:-$ADMIN_PORT} i ready=
    for i in $(seq 1 $((WAIT_SECS * 10))); do
        ready=$(curl -s -m 2 "http://127.0.0.1:$admin/metrics" \
            | awk '/^sdgate_endpoints\{/ && /state="ready"/ { print $NF; exit }' || true)
        [[ -n $ready && ${ready%.*} -ge $want ]] && return 0
        sleep 0.1
    done
    die "sdgate did not report $want ready endpoints within ${WAIT_SECS}s (last: ${ready:-no sdgate_endpoints metric})"
}

# ---------------------------------------------------------------- setup
# ---------------------------------------------------------------- helpers
# start_workers N: N sims on SIM_BASE_PORT.., waits for each; sets WORKER_PIDS.
WORKER_PIDS=()
start_workers() {
    local n=$1 i port
    WORKER_PIDS=()
    for ((i = 0; i < n; i++)); do
        port=$((SIM_BASE_PORT + i))
        start "sim-$port" env RUST_LOG=warn "$SDGATE" sim --port "$port" \
            --step-time "$STEP_TIME" --image-bytes "$IMAGE_BYTES"
        WORKER_PIDS+=("$LAST_PID")
    done
    for ((i = 0; i < n; i++)); do
        wait_port $((SIM_BASE_PORT + i)) "${WORKER_PIDS[$i]}"
    done
}

stop_workers() {
    local pid
    for pid in "${WORKER_PIDS[@]}"; do stop "$pid"; done
    WORKER_PIDS=()
}

# worker_stats N: prints "SUM_OVERLAPS MAX_INFLIGHT SUM_SERVED" over N workers.
worker_stats() {
    local n=$1 i overlaps=0 inflight=0 served=0 json
    for ((i = 0; i < n; i++)); do
        json=$(curl -s -m 5 "http://127.0.0.1:$((SIM_BASE_PORT + i))/sim/stats") \
            || die "cannot read /sim/stats from worker $((SIM_BASE_PORT + i))"
        overlaps=$((overlaps + $(jq -r '.overlaps' <<<"$json")))
        served=$((served + $(jq -r '.served' <<<"$json")))
        local m
        m=$(jq -r '.max_inflight' <<<"$json")
        if ((m > inflight)); then inflight=$m; fi
    done
    echo "$overlaps $inflight $served"
}

backend_list() { # backend_list N -> "127.0.0.1:P1", "127.0.0.1:P2", ...
    local n=$1 i out=
    for ((i = 0; i < n; i++)); do
        out+="${out:+, }\"127.0.0.1:$((SIM_BASE_PORT + i))\""
    done
    echo "$out"
}

write_gate_config() { # write_gate_config FILE CC N [PORT ADMIN_PORT]
    local file=$1 cc=$2 n=$3 port=${4:-$GATE_PORT} admin=${5:-$ADMIN_PORT}
    cat >"$file" <<EOF
listen: 127.0.0.1:$port
admin: 127.0.0.1:$admin
services:
  - name: sd
    hosts: ["*"]
    container_concurrency: $cc
    queue: { max_depth: 10000, timeout: 60s }
    request_timeout: 120s
    readiness: { tcp: true, period: 50ms }
    backend: { fixed: [$(backend_list "$n")] }
EOF
}

HAPROXY_PID=
start_haproxy() { # start_haproxy CONFIG [PORT LABEL]: sets HAPROXY_PID
    local port=${2:-$HAPROXY_PORT} label=${3:-haproxy}
    haproxy -c -q -f "$1" || die "haproxy rejected $1"
    start "$label" haproxy -db -f "$1"
    HAPROXY_PID=$LAST_PID
    wait_port "$port" "$HAPROXY_PID"
}

GATE_PID=
# start_gate CONFIG N_READY [BINARY LABEL PORT ADMIN_PORT RUST_LOG]: sets GATE_PID
start_gate() {
    local bin=${3:-$SDGATE} label=${4:-sdgate} port=${5:-$GATE_PORT} admin=${6:-$ADMIN_PORT} level=${7:-warn}
    "$bin" --config "$1" check >/dev/null || die "$label rejected $1"
    start "$label" env RUST_LOG="$level" "$bin" --config "$1"
    GATE_PID=$LAST_PID
    wait_port "$port" "$GATE_PID"
    wait_gate_ready "$2" "$admin"
}

duration_secs() { # 10s, 1m, 500ms -> seconds (integer, rounded up)
    local d=$1
    case $d in
        *ms) echo $(((${d%ms} + 999) / 1000)) ;;
        *s) echo "${d%s}" ;;
        *m) echo $((${d%m} * 60)) ;;
        *h) echo $((${d%h} * 3600)) ;;
        *) echo "$d" ;;
    esac
}

# cpu_ticks PID: user and system CPU ticks the process has used so far.
cpu_ticks() { awk '{ print $14, $15 }' "/proc/$1/stat"; }

# run_wrk LABEL PORT [PROXY_PID]: wrk against GET /sdapi/v1/options; appends a
# row to RESULTS_A, with the proxy's CPU time per request when PROXY_PID is given.
# RPS, P99 and CPU collect each label's runs (space-separated) for medians.
RESULTS_A=()
declare -A RPS=() P99=() CPU=()
run_wrk() {
    local label=$1 port=$2 pid=${3:-} out="$TMP/wrk-$1.txt" limit u0=0 s0=0 u1=0 s1=0
    limit=$(($(duration_secs "$DURATION") + 30))
    log "(a) wrk -t$WRK_THREADS -c$WRK_CONNS -d$DURATION -> $label (127.0.0.1:$port)"
    [[ -n $pid ]] && read -r u0 s0 < <(cpu_ticks "$pid")
    timeout --signal=INT --kill-after=5 "$limit" \
        wrk -t"$WRK_THREADS" -c"$WRK_CONNS" -d"$DURATION" --timeout 5s --latency \
        -H "Host: $HOST_HEADER" "http://127.0.0.1:$port/sdapi/v1/options" >"$out" 2>&1 \
        || die "wrk against $label failed: $(tail -n 5 "$out")"
    [[ -n $pid ]] && read -r u1 s1 < <(cpu_ticks "$pid")
    local rps p99 p99ms total errors non2xx
    rps=$(awk '/^Requests\/sec:/ { print $2 }' "$out")
    p99=$(awk '$1 == "99%" { print $2 }' "$out")
    total=$(awk '/requests in/ { print $1 }' "$out")
    non2xx=$(awk '/Non-2xx or 3xx responses:/ { print $NF }' "$out")
    errors=$(awk -F'[ ,]+' '/Socket errors:/ { print $5 + $7 + $9 + $11 }' "$out")
    [[ -n $rps && -n $p99 ]] || die "cannot parse wrk output for $label: $(cat "$out")"
    p99ms=$(awk -v v="$p99" 'BEGIN {
        n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
        if (u == "us") n /= 1000; else if (u == "s") n *= 1000; else if (u == "m") n *= 60000
        printf "%.2f", n }')
    RPS[$label]+="$rps "
    P99[$label]+="$p99ms "
    local cpu="-"
    if [[ -n $pid && ${total:-0} -gt 0 ]]; then
        cpu=$(awk -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v t="$(getconf CLK_TCK)" -v n="$total" \
            'BEGIN { printf "%.1f + %.1f", u / t / n * 1e6, s / t / n * 1e6 }')
        CPU[$label]+="$(awk -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v t="$(getconf CLK_TCK)" -v n="$total" \
            'BEGIN { printf "%.2f", (u + s) / t / n * 1e6 }') "
    fi
    RESULTS_A+=("| $label | $(printf '%.0f' "$rps") | $p99ms | ${total:-?} | $((${non2xx:-0} + ${errors:-0})) | $cpu |")
}

# run_hey LABEL PORT: 192 POST txt2img; appends a row to RESULTS_B.
RESULTS_B=()
run_hey() {
    local label=$1 port=$2 out="$TMP/hey-$1.txt"
    log "(b) hey -n $REQUESTS -c $CLIENTS POST txt2img -> $label (127.0.0.1:$port)"
    timeout --kill-after=5 600 \
        hey -n "$REQUESTS" -c "$CLIENTS" -t 60 -m POST -T application/json -d "$BODY" \
        -host "$HOST_HEADER" "http://127.0.0.1:$port/sdapi/v1/txt2img" >"$out" 2>&1 \
        || die "hey against $label failed: $(tail -n 5 "$out")"
    local total ok stats overlaps inflight served ratio
    total=$(awk '/^ *Total:/ { print $2; exit }' "$out")
    ok=$(awk '/\[200\]/ { print $2; exit }' "$out")
    [[ -n $total ]] || die "cannot parse hey output for $label: $(cat "$out")"
    stats=$(worker_stats "$WORKERS")
    read -r overlaps inflight served <<<"$stats"
    ratio=$(awk -v t="$total" -v i="$IDEAL" 'BEGIN { printf "%.3f", t / i }')
    RESULTS_B+=("| $label | $(printf '%.2f' "$total") | $(printf '%.2f' "$IDEAL") | $ratio | ${ok:-0}/$REQUESTS | $served | $overlaps | $inflight |")
}

# ---------------------------------------------------------------- main
install_tools hey wrk haproxy curl jq
build
require_free $(seq "$SIM_BASE_PORT" $((SIM_BASE_PORT + WORKERS - 1))) "$GATE_PORT" "$HAPROXY_PORT" "$HAPROXY_SAME_PORT" "$ADMIN_PORT" \
    ${BASELINE:+"$BASELINE_PORT" "$BASELINE_ADMIN_PORT"}
[[ -z $BASELINE || -x $BASELINE ]] || die "BASELINE=$BASELINE is not an executable"
log "workdir $TMP; DURATION=$DURATION; $(nproc) CPUs"

# (a) tiny responses, cc = 0, one worker.
if [[ $PARTS == *a* ]]; then
start_workers 1
wait_200 "http://127.0.0.1:$SIM_BASE_PORT/sdapi/v1/options" "sim worker"
run_wrk direct "$SIM_BASE_PORT"

write_haproxy_config "$TMP/haproxy-a.cfg" "$HAPROXY_PORT" "$SIM_BASE_PORT" 1 ""
start_haproxy "$TMP/haproxy-a.cfg"
wait_200 "http://127.0.0.1:$HAPROXY_PORT/sdapi/v1/options" "haproxy"
CONTESTANTS=(haproxy sdgate)
declare -A CONTESTANT_PORT=([haproxy]=$HAPROXY_PORT [sdgate]=$GATE_PORT) CONTESTANT_PID=([haproxy]=$HAPROXY_PID)
if [[ $SAME_WORK == 1 ]]; then
    write_haproxy_config "$TMP/haproxy-same.cfg" "$HAPROXY_SAME_PORT" "$SIM_BASE_PORT" 1 "" same-work
    start_haproxy "$TMP/haproxy-same.cfg" "$HAPROXY_SAME_PORT" haproxy-same-work
    wait_200 "http://127.0.0.1:$HAPROXY_SAME_PORT/sdapi/v1/options" "haproxy-same-work"
    CONTESTANTS+=(haproxy-same-work)
    CONTESTANT_PORT[haproxy-same-work]=$HAPROXY_SAME_PORT
    CONTESTANT_PID[haproxy-same-work]=$HAPROXY_PID
fi
write_gate_config "$TMP/sdgate-a.yaml" 0 1
start_gate "$TMP/sdgate-a.yaml" 1 "$SDGATE" sdgate "$GATE_PORT" "$ADMIN_PORT" "$SDGATE_LOG"
wait_200 "http://127.0.0.1:$GATE_PORT/sdapi/v1/options" "sdgate"
CONTESTANT_PID[sdgate]=$GATE_PID
if [[ -n $BASELINE ]]; then
    write_gate_config "$TMP/baseline-a.yaml" 0 1 "$BASELINE_PORT" "$BASELINE_ADMIN_PORT"
    start_gate "$TMP/baseline-a.yaml" 1 "$BASELINE" sdgate-baseline "$BASELINE_PORT" "$BASELINE_ADMIN_PORT" "$BASELINE_LOG"
    wait_200 "http://127.0.0.1:$BASELINE_PORT/sdapi/v1/options" "sdgate-baseline"
    CONTESTANTS+=(sdgate-baseline)
    CONTESTANT_PORT[sdgate-baseline]=$BASELINE_PORT
    CONTESTANT_PID[sdgate-baseline]=$GATE_PID
fi
# The proxies stay up; their runs take turns, the order rotating by a place
# each round, so a slow minute of this shared machine does not fall on one
# proxy only. The summary compares medians.
n=${#CONTESTANTS[@]}
for ((round = 1; round <= ROUNDS; round++)); do
    for ((i = 0; i < n; i++)); do
        proxy=${CONTESTANTS[$(((i + round - 1) % n))]}
        run_wrk "$proxy" "${CONTESTANT_PORT[$proxy]}" "${CONTESTANT_PID[$proxy]}"
    done
done
for proxy in "${CONTESTANTS[@]}"; do stop "${CONTESTANT_PID[$proxy]}"; done
stop_workers
fi

# (b) cc = 1, WORKERS one-at-a-time workers.
if [[ $PARTS == *b* ]]; then
start_workers "$WORKERS"
SERVICE=$(curl -s -o /dev/null -w '%{time_total}' -m 30 -X POST -H 'Content-Type: application/json' \
    -d "$BODY" "http://127.0.0.1:$SIM_BASE_PORT/sdapi/v1/txt2img") || die "direct txt2img request failed"
IDEAL=$(awk -v n="$REQUESTS" -v w="$WORKERS" -v s="$SERVICE" 'BEGIN { printf "%.4f", int((n + w - 1) / w) * s }')
log "(b) one direct txt2img took ${SERVICE}s; ideal makespan ${IDEAL}s"
stop_workers

start_workers "$WORKERS"
write_haproxy_config "$TMP/haproxy-b.cfg" "$HAPROXY_PORT" "$SIM_BASE_PORT" "$WORKERS" "maxconn 1"
start_haproxy "$TMP/haproxy-b.cfg"
wait_200 "http://127.0.0.1:$HAPROXY_PORT/sdapi/v1/options" "haproxy"
run_hey haproxy "$HAPROXY_PORT"
stop "$HAPROXY_PID"
stop_workers

start_workers "$WORKERS"
write_gate_config "$TMP/sdgate-b.yaml" 1 "$WORKERS"
start_gate "$TMP/sdgate-b.yaml" "$WORKERS"
wait_200 "http://127.0.0.1:$GATE_PORT/sdapi/v1/options" "sdgate"
run_hey sdgate "$GATE_PORT"
stop "$GATE_PID"
stop_workers
fi

# ---------------------------------------------------------------- report
if [[ $PARTS == *a* ]]; then
# median "V1 V2 ...": the middle value (the mean of the two middle ones).
median() { tr ' ' '\n' <<<"$1" | awk 'NF' | sort -g | awk '{ v[NR] = $1 } END { printf "%.2f", (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
RPS_RATIO=$(awk -v a="$(median "${RPS[sdgate]}")" -v b="$(median "${RPS[haproxy]}")" 'BEGIN { printf "%.2f", a / b }')
P99_RATIO=$(awk -v a="$(median "${P99[sdgate]}")" -v b="$(median "${P99[haproxy]}")" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')
CPU_SDGATE=$(median "${CPU[sdgate]}")
CPU_HAPROXY=$(median "${CPU[haproxy]}")
CPU_RATIO=$(awk -v a="$CPU_SDGATE" -v b="$CPU_HAPROXY" 'BEGIN { printf "%.2f", a / b }')
cat <<EOF

## (a) tiny responses, container_concurrency 0 — wrk -t$WRK_THREADS -c$WRK_CONNS -d$DURATION GET /sdapi/v1/options, 1 sim worker

| path | requests/s | p99 (ms) | requests | errors | proxy CPU per request, user + system (us) |
| --- | ---: | ---: | ---: | ---: | ---: |
$(printf '%s\n' "${RESULTS_A[@]}")

Medians over $ROUNDS alternating runs each: proxy CPU per request sdgate $CPU_SDGATE us, HAProxy $CPU_HAPROXY us
sdgate/HAProxy: CPU per request ${CPU_RATIO}x, requests/s ${RPS_RATIO}x, p99 ${P99_RATIO}x
EOF
if [[ $SAME_WORK == 1 ]]; then
CPU_SAME=$(median "${CPU[haproxy-same-work]}")
cat <<EOF
HAProxy doing sdgate's per-request work (Host routing, X-Forwarded-*, X-Request-Id): $CPU_SAME us;
sdgate/that HAProxy: CPU per request $(awk -v a="$CPU_SDGATE" -v b="$CPU_SAME" 'BEGIN { printf "%.2f", a / b }')x, requests/s $(awk -v a="$(median "${RPS[sdgate]}")" -v b="$(median "${RPS[haproxy-same-work]}")" 'BEGIN { printf "%.2f", a / b }')x
EOF
fi
if [[ -n $BASELINE ]]; then
CPU_BASE=$(median "${CPU[sdgate-baseline]}")
cat <<EOF
sdgate-baseline ($BASELINE, RUST_LOG=$BASELINE_LOG): $CPU_BASE us; this build/baseline: CPU per request $(awk -v a="$CPU_SDGATE" -v b="$CPU_BASE" 'BEGIN { printf "%.3f", a / b }')x, requests/s $(awk -v a="$(median "${RPS[sdgate]}")" -v b="$(median "${RPS[sdgate-baseline]}")" 'BEGIN { printf "%.3f", a / b }')x
EOF
fi
fi
if [[ $PARTS == *b* ]]; then
cat <<EOF

## (b) container_concurrency 1 — hey -n $REQUESTS -c $CLIENTS POST txt2img (steps $STEPS, step-time $STEP_TIME), $WORKERS sim workers

Ideal = ceil($REQUESTS/$WORKERS) x ${SERVICE}s (one direct request); served/overlaps/max_inflight from /sim/stats.

| path | makespan (s) | ideal (s) | makespan/ideal | 200s | served | overlaps | max_inflight |
| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |
$(printf '%s\n' "${RESULTS_B[@]}")
EOF
fi
echo
echo "($(nproc) CPUs, all processes on 127.0.0.1; load generator, proxy and workers share the CPUs.)"
