#!/usr/bin/env bash
# TLS on the public listener, sdgate against HAProxy, side by side in one run,
# with the same certificate (ECDSA P-256, made here with openssl) in front of
# one sim worker (container_concurrency 0, GET /sdapi/v1/options: tiny
# answers, so the proxy's own work shows):
#
#   handshakes  wrk -t1 -c16 with "Connection: close": every request is a new
#               TCP connection and a full TLS handshake (requests/s is
#               handshakes/s), and the proxy's CPU per handshake;
#   keep-alive  wrk -t1 -c16 on kept-alive TLS connections: requests/s and
#               the proxy's CPU per request (user + system, /proc ticks).
#
# The client sends SNI sd.bench.local (sdgate refuses a handshake without
# SNI): the script adds "127.0.0.1 sd.bench.local" to /etc/hosts if missing.
#
# Usage: bash benches/tls.sh   (as root: installs wrk, haproxy, openssl and
# curl with apt-get when missing; builds sdgate in release mode; loopback only)
# DURATION (10s), SKIP_BUILD=1, KEEP_TMP=1, *_PORT to move it.

set -euo pipefail

DURATION=${DURATION:-10s}
WRK_CONNS=${WRK_CONNS:-16}
HOST_NAME=sd.bench.local
SIM_PORT=${SIM_PORT:-37870}
GATE_PORT=${GATE_PORT:-38443}
ADMIN_PORT=${ADMIN_PORT:-39091}
HAPROXY_PORT=${HAPROXY_PORT:-38444}
WAIT_SECS=${WAIT_SECS:-30}
SKIP_BUILD=${SKIP_BUILD:-0}
KEEP_TMP=${KEEP_TMP:-0}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SDGATE=${SDGATE:-$ROOT/target/release/sdgate}
NAME=tls.sh
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"
bench_init tls

install_tools wrk haproxy openssl curl getconf
build
require_free "$SIM_PORT" "$GATE_PORT" "$HAPROXY_PORT" "$ADMIN_PORT"
grep -q "[[:space:]]$HOST_NAME\$" /etc/hosts || echo "127.0.0.1 $HOST_NAME" >>/etc/hosts

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj "/CN=$HOST_NAME" \
    -addext "subjectAltName=DNS:$HOST_NAME" -keyout "$TMP/key.pem" -out "$TMP/cert.pem" 2>"$TMP/openssl.log" ||
    die "openssl could not make the certificate: $(cat "$TMP/openssl.log")"
cat "$TMP/cert.pem" "$TMP/key.pem" >"$TMP/haproxy.pem"

start sim env RUST_LOG=warn "$SDGATE" sim --port "$SIM_PORT"
wait_port "$SIM_PORT" "$LAST_PID"

write_sdgate_config "$TMP/sdgate.yaml" "$GATE_PORT" "$ADMIN_PORT" "$SIM_PORT" "tls:
  certificates:
    - { hosts: [$HOST_NAME], cert: \"$TMP/cert.pem\", key: \"$TMP/key.pem\" }
"
BIND_OPTS="ssl crt $TMP/haproxy.pem alpn h2,http/1.1 ssl-min-ver TLSv1.2" \
    write_haproxy_config "$TMP/haproxy.cfg" "$HAPROXY_PORT" "$SIM_PORT" 1 ""
haproxy -c -q -f "$TMP/haproxy.cfg" || die "haproxy rejected its config"
"$SDGATE" --config "$TMP/sdgate.yaml" check >/dev/null || die "sdgate rejected its config"

TICKS=$(getconf CLK_TCK)
# cpu_ticks PID: user and system CPU ticks the process has used so far.
cpu_ticks() { awk '{ print $14, $15 }' "/proc/$1/stat"; }

# run LABEL PORT PID MODE: wrk against the proxy; prints "requests/s cpu_us_per_request".
run() {
    local label=$1 port=$2 pid=$3 mode=$4 out="$TMP/wrk-$1-$4.txt" u0 s0 u1 s1 requests rate extra=()
    [[ $mode == handshakes ]] && extra=(-H "Connection: close")
    wrk -t1 -c"$WRK_CONNS" -d2s "${extra[@]}" -H "Host: $HOST_NAME" \
        "https://$HOST_NAME:$port/sdapi/v1/options" >/dev/null 2>&1 || die "warm-up wrk against $label failed"
    read -r u0 s0 < <(cpu_ticks "$pid")
    wrk -t1 -c"$WRK_CONNS" -d"$DURATION" "${extra[@]}" -H "Host: $HOST_NAME" \
        "https://$HOST_NAME:$port/sdapi/v1/options" >"$out" 2>&1 || die "wrk against $label failed: $(tail -n 5 "$out")"
    read -r u1 s1 < <(cpu_ticks "$pid")
    if grep -q 'Non-2xx\|Socket errors' "$out"; then
        log "$label $mode: $(grep -E 'Non-2xx|Socket errors' "$out")"
    fi
    requests=$(awk '/requests in/ { print $1 }' "$out")
    rate=$(awk '/Requests\/sec/ { print $2 }' "$out")
    [[ ${requests:-0} -gt 0 ]] || die "wrk against $label answered nothing: $(cat "$out")"
    echo "$rate $(awk -v t=$((u1 + s1 - u0 - s0)) -v hz="$TICKS" -v n="$requests" 'BEGIN { printf "%.1f", t / hz / n * 1e6 }')"
}

declare -A RESULT=()
for proxy in sdgate haproxy; do
    if [[ $proxy == sdgate ]]; then
        start sdgate env RUST_LOG=warn "$SDGATE" --config "$TMP/sdgate.yaml"
        port=$GATE_PORT
    else
        start haproxy haproxy -db -f "$TMP/haproxy.cfg"
        port=$HAPROXY_PORT
    fi
    pid=$LAST_PID
    wait_port "$port" "$pid"
    # Until the pod is ready behind it (sdgate probes it first).
    for i in $(seq 1 $((WAIT_SECS * 5))); do
        code=$(curl -s -o /dev/null -w '%{http_code}' --cacert "$TMP/cert.pem" -m 5 \
            "https://$HOST_NAME:$port/sdapi/v1/options" || true)
        [[ $code == 200 ]] && break
        sleep 0.2
    done
    [[ $code == 200 ]] || die "no 200 through $proxy over TLS (last: $code)"
    for mode in handshakes keep-alive; do
        log "$proxy: $mode, wrk -t1 -c$WRK_CONNS -d$DURATION"
        RESULT[$proxy-$mode]=$(run "$proxy" "$port" "$pid" "$mode")
    done
    stop "$pid"
done

printf '\n| proxy | handshakes/s (Connection: close) | CPU per handshake | keep-alive requests/s | CPU per request |\n'
printf '| --- | ---: | ---: | ---: | ---: |\n'
for proxy in sdgate haproxy; do
    read -r hs hcpu <<<"${RESULT[$proxy-handshakes]}"
    read -r ka kcpu <<<"${RESULT[$proxy-keep-alive]}"
    printf '| %s | %s | %s us | %s | %s us |\n' "$proxy" "$hs" "$hcpu" "$ka" "$kcpu"
done
read -r _ s_hcpu <<<"${RESULT[sdgate-handshakes]}"
read -r _ h_hcpu <<<"${RESULT[haproxy-handshakes]}"
read -r _ s_kcpu <<<"${RESULT[sdgate-keep-alive]}"
read -r _ h_kcpu <<<"${RESULT[haproxy-keep-alive]}"
awk -v a="$s_hcpu" -v b="$h_hcpu" -v c="$s_kcpu" -v d="$h_kcpu" \
    'BEGIN { printf "\nsdgate / HAProxy CPU: %.2fx per handshake, %.2fx per kept-alive request\n", a / b, c / d }'
