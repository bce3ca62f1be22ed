#!/usr/bin/env bash
# A profile-guided release build of sdgate: build it instrumented, run it
# through the traffic the benchmarks measure (tiny requests at
# container_concurrency 0, and generations queued at container_concurrency 1,
# through the lobby), then build it again with that profile. LLVM then lays
# out the hot code together and inlines along the paths taken, which halves
# sdgate's L1 instruction-cache misses per request (README, "Proxy overhead").
#
# Usage: bash benches/pgo.sh    -> target/pgo/release/sdgate
# Then:  SDGATE=target/pgo/release/sdgate bash benches/load.sh   (or instructions.sh)
#
# Installs wrk, hey and curl with apt-get when missing, and the llvm-tools
# rustup component (llvm-profdata, matching rustc's LLVM). Two release builds
# (about 10 minutes each on 2 cores) and 30 s of training on 127.0.0.1.

set -euo pipefail

TRAIN_SECS=${TRAIN_SECS:-15}       # wrk run of the tiny-request training
HOST_HEADER=${HOST_HEADER:-sd.bench.local}
SIM_BASE_PORT=${SIM_BASE_PORT:-47860}  # 4 sims: 47860 (cc 0), 47861..47863 (cc 1)
GATE_PORT=${GATE_PORT:-48080}
ADMIN_PORT=${ADMIN_PORT:-49090}
WAIT_SECS=${WAIT_SECS:-10}
KEEP_TMP=${KEEP_TMP:-0}
SKIP_BUILD=0

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NAME=pgo.sh
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"
bench_init pgo

install_tools wrk hey curl
rustup component add llvm-tools >/dev/null 2>&1 || rustup component add llvm-tools-preview >/dev/null 2>&1 ||
    die "cannot add the llvm-tools rustup component"
HOST_TRIPLE=$(rustc -vV | sed -n 's/^host: //p')
PROFDATA="$(rustc --print sysroot)/lib/rustlib/$HOST_TRIPLE/bin/llvm-profdata"
[[ -x $PROFDATA ]] || die "no llvm-profdata at $PROFDATA"
require_free $(seq "$SIM_BASE_PORT" $((SIM_BASE_PORT + 3))) "$GATE_PORT" "$ADMIN_PORT"

log "1/3 instrumented build (target/pgo-gen)"
(cd "$ROOT" && RUSTFLAGS="-Cprofile-generate=$TMP/profiles" \
    cargo build --release --locked --quiet --bin sdgate --target-dir target/pgo-gen) || die "instrumented build failed"
SDGATE="$ROOT/target/pgo-gen/release/sdgate"

log "2/3 training"
# The workers are the same binary; their profiles go elsewhere and are dropped.
for ((i = 0; i < 4; i++)); do
    start "sim-$i" env RUST_LOG=warn LLVM_PROFILE_FILE="$TMP/dropped/%p.profraw" \
        "$SDGATE" sim --port $((SIM_BASE_PORT + i)) --step-time 20ms
    wait_port $((SIM_BASE_PORT + i)) "$LAST_PID"
done
cat >"$TMP/sdgate.yaml" <<EOF
listen: 127.0.0.1:$GATE_PORT
admin: 127.0.0.1:$ADMIN_PORT
services:
  - name: tiny
    hosts: ["$HOST_HEADER"]
    container_concurrency: 0
    queue: { max_depth: 10000, timeout: 60s }
    readiness: { tcp: true, period: 50ms }
    backend: { fixed: ["127.0.0.1:$SIM_BASE_PORT"] }
  - name: generate
    hosts: ["generate.$HOST_HEADER"]
    container_concurrency: 1
    queue: { max_depth: 10000, timeout: 60s }
    readiness: { tcp: true, period: 50ms }
    backend: { fixed: ["127.0.0.1:$((SIM_BASE_PORT + 1))", "127.0.0.1:$((SIM_BASE_PORT + 2))", "127.0.0.1:$((SIM_BASE_PORT + 3))"] }
EOF
start sdgate env RUST_LOG=warn LLVM_PROFILE_FILE="$TMP/profiles/sdgate-%p.profraw" "$SDGATE" --config "$TMP/sdgate.yaml"
GATE_PID=$LAST_PID
wait_port "$GATE_PORT" "$GATE_PID"
for i in $(seq 1 $((WAIT_SECS * 10))); do
    code=$(curl -s -o /dev/null -w '%{http_code}' -m 2 -H "Host: $HOST_HEADER" "http://127.0.0.1:$GATE_PORT/sdapi/v1/options" || true)
    [[ $code == 200 ]] && break
    sleep 0.1
done
[[ $code == 200 ]] || die "sdgate did not answer 200 within ${WAIT_SECS}s (last: $code)"
timeout --kill-after=5 $((TRAIN_SECS + 30)) wrk -t2 -c64 -d"${TRAIN_SECS}s" -H "Host: $HOST_HEADER" \
    "http://127.0.0.1:$GATE_PORT/sdapi/v1/options" >"$TMP/wrk.txt" 2>&1 || die "wrk failed: $(tail -n 5 "$TMP/wrk.txt")"
timeout --kill-after=5 120 hey -n 144 -c 12 -t 60 -m POST -T application/json -d '{"prompt":"x","steps":2}' \
    -host "generate.$HOST_HEADER" "http://127.0.0.1:$GATE_PORT/sdapi/v1/txt2img" >"$TMP/hey.txt" 2>&1 ||
    die "hey failed: $(tail -n 5 "$TMP/hey.txt")"
grep -q '\[200\].*144 responses' "$TMP/hey.txt" || die "not 144 x 200 in training: $(cat "$TMP/hey.txt")"
log "trained: $(awk '/requests in/ { print $1 }' "$TMP/wrk.txt") tiny requests, 144 queued generations"
# SIGINT (stop): sdgate drains and exits, and the profile is written at exit.
stop "$GATE_PID"
compgen -G "$TMP/profiles/sdgate-*.profraw" >/dev/null || die "sdgate wrote no profile"
"$PROFDATA" merge -o "$TMP/sdgate.profdata" "$TMP"/profiles/sdgate-*.profraw || die "llvm-profdata merge failed"

log "3/3 build with the profile (target/pgo)"
(cd "$ROOT" && RUSTFLAGS="-Cprofile-use=$TMP/sdgate.profdata" \
    cargo build --release --locked --quiet --bin sdgate --target-dir target/pgo) || die "profile-guided build failed"
log "done: $ROOT/target/pgo/release/sdgate"
