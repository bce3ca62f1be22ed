#!/usr/bin/env bash
# User-space instructions per proxied request, sdgate against HAProxy, counted
# by valgrind's callgrind: the same measure as load.sh (a)'s CPU per request
# (GET /sdapi/v1/options, one sim worker, container_concurrency 0), without
# its noise. A count does not move with the machine's load, so one run is
# enough to compare two builds; it leaves out the kernel's share (the system
# calls, the same for both proxies: see README, "Proxy overhead").
#
# Each proxy runs under callgrind (about 50x slower); wrk -t1 -c16 warms it
# up, the counters are zeroed, wrk runs DURATION, the counters are dumped and
# divided by the requests wrk saw answered.
#
# Usage: bash benches/instructions.sh   (installs valgrind, wrk, haproxy and
# curl with apt-get when missing; builds sdgate in release mode; loopback only)

set -euo pipefail

DURATION=${DURATION:-8s}
WRK_CONNS=${WRK_CONNS:-16}
HOST_HEADER=${HOST_HEADER:-sd.bench.local}
SIM_PORT=${SIM_PORT:-37860}
GATE_PORT=${GATE_PORT:-38080}
ADMIN_PORT=${ADMIN_PORT:-39090}
HAPROXY_PORT=${HAPROXY_PORT:-38081}
WAIT_SECS=${WAIT_SECS:-60}         # startup under valgrind is slow
SKIP_BUILD=${SKIP_BUILD:-0}
KEEP_TMP=${KEEP_TMP:-0}
SAME_WORK=${SAME_WORK:-1}          # 1: also an HAProxy doing sdgate's per-request work

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SDGATE=${SDGATE:-$ROOT/target/release/sdgate}  # another binary: not built here
NAME=instructions.sh
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"
bench_init instructions

# get_200 PORT: until a GET through PORT answers 200, at most WAIT_SECS.
get_200() {
    local i code
    for i in $(seq 1 $((WAIT_SECS * 5))); do
        code=$(curl -s -o /dev/null -w '%{http_code}' -m 5 -H "Host: $HOST_HEADER" \
            "http://127.0.0.1:$1/sdapi/v1/options" || true)
        [[ $code == 200 ]] && return 0
        sleep 0.2
    done
    die "no 200 through 127.0.0.1:$1 within ${WAIT_SECS}s (last status: ${code:-none})"
}

# count LABEL PORT PID: zero PID's counters, run wrk, dump; prints
# "INSTRUCTIONS REQUESTS".
count() {
    local label=$1 port=$2 pid=$3 out="$TMP/wrk-$1.txt" dump requests total
    wrk -t1 -c"$WRK_CONNS" -d3s -H "Host: $HOST_HEADER" "http://127.0.0.1:$port/sdapi/v1/options" >/dev/null 2>&1 ||
        die "warm-up wrk against $label failed"
    callgrind_control -z "$pid" >/dev/null 2>&1
    wrk -t1 -c"$WRK_CONNS" -d"$DURATION" -H "Host: $HOST_HEADER" "http://127.0.0.1:$port/sdapi/v1/options" >"$out" 2>&1 ||
        die "wrk against $label failed: $(tail -n 5 "$out")"
    callgrind_control -d "$pid" >/dev/null 2>&1
    requests=$(awk '/requests in/ { print $1 }' "$out")
    [[ ${requests:-0} -gt 0 ]] || die "wrk against $label answered nothing: $(cat "$out")"
    if grep -q 'Non-2xx' "$out"; then die "errors through $label: $(cat "$out")"; fi
    # The dump just written: the newest file of this proxy's.
    sleep 1
    dump=$(ls -t "$TMP/callgrind.$label".* | head -n 1)
    total=$(awk '/^summary:/ { print $2 }' "$dump")
    [[ -n $total ]] || die "no summary in $dump"
    echo "$total $requests"
}

install_tools valgrind wrk haproxy curl
build
require_free "$SIM_PORT" "$GATE_PORT" "$HAPROXY_PORT" "$ADMIN_PORT"

start sim env RUST_LOG=warn "$SDGATE" sim --port "$SIM_PORT"
wait_port "$SIM_PORT" "$LAST_PID"

write_haproxy_config "$TMP/haproxy.cfg" "$HAPROXY_PORT" "$SIM_PORT" 1 ""
write_haproxy_config "$TMP/haproxy-same-work.cfg" "$HAPROXY_PORT" "$SIM_PORT" 1 "" same-work
PROXIES=(haproxy sdgate)
[[ $SAME_WORK == 1 ]] && PROXIES+=(haproxy-same-work)
write_sdgate_config "$TMP/sdgate.yaml" "$GATE_PORT" "$ADMIN_PORT" "$SIM_PORT"
haproxy -c -q -f "$TMP/haproxy.cfg" || die "haproxy rejected its config"
haproxy -c -q -f "$TMP/haproxy-same-work.cfg" || die "haproxy rejected its same-work config"
"$SDGATE" --config "$TMP/sdgate.yaml" check >/dev/null || die "sdgate rejected its config"

declare -A IR=() REQ=()
for proxy in "${PROXIES[@]}"; do
    log "$proxy under callgrind: wrk -t1 -c$WRK_CONNS -d$DURATION"
    if [[ $proxy == haproxy* ]]; then
        start "$proxy" valgrind --tool=callgrind --callgrind-out-file="$TMP/callgrind.$proxy.%p" \
            haproxy -db -f "$TMP/$proxy.cfg"
        port=$HAPROXY_PORT
    else
        start sdgate env RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$TMP/callgrind.sdgate.%p" \
            "$SDGATE" --config "$TMP/sdgate.yaml"
        port=$GATE_PORT
    fi
    pid=$LAST_PID
    get_200 "$port"
    counted=$(count "$proxy" "$port" "$pid")
    read -r IR[$proxy] REQ[$proxy] <<<"$counted"
    stop "$pid"
done

cat <<EOF

## User-space instructions per request (callgrind), GET /sdapi/v1/options, wrk -t1 -c$WRK_CONNS -d$DURATION

| proxy | requests | instructions | per request |
| --- | ---: | ---: | ---: |
$(for proxy in "${PROXIES[@]}"; do
    awk -v p="$proxy" -v i="${IR[$proxy]}" -v n="${REQ[$proxy]}" 'BEGIN { printf "| %s | %d | %d | %.0f |\n", p, n, i, i / n }'
done)

sdgate/HAProxy: $(awk -v a="${IR[sdgate]}" -v na="${REQ[sdgate]}" -v b="${IR[haproxy]}" -v nb="${REQ[haproxy]}" \
    'BEGIN { printf "%.2f", (a / na) / (b / nb) }')x the instructions per request
EOF
if [[ $SAME_WORK == 1 ]]; then
    echo "sdgate/HAProxy doing sdgate's per-request work (Host routing, X-Forwarded-*, X-Request-Id):" \
        "$(awk -v a="${IR[sdgate]}" -v na="${REQ[sdgate]}" -v b="${IR[haproxy-same-work]}" -v nb="${REQ[haproxy-same-work]}" \
            'BEGIN { printf "%.2f", (a / na) / (b / nb) }')x"
fi
