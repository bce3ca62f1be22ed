#!/usr/bin/env bash
# Peak memory of sdgate with big request bodies that name a checkpoint,
# against the same bodies that do not (one run, a fresh sdgate for each).
#
# CLIENTS (16) clients each POST one txt2img body of BODY_MIB (16) MiB less
# 1 KiB (under limits.buffer_body_bytes, so it is buffered whole): a
# stranger's body made to cost a JSON tree the most (`"pad": [0,0,0,...]`,
# each two bytes a tree node), or with SHAPE=image an init image in base64,
# and, in the first case, `override_settings.sd_model_checkpoint` after it;
# in the second case the key is misspelt, so no body is searched. One `sdgate sim` pod at container_concurrency 1 takes
# them one by one, so most bodies wait buffered in sdgate at once. Reports
# sdgate's VmHWM (peak RSS) for each case and their ratio: reading a
# checkpoint must not add more than the bodies themselves cost (the
# checkpoint's value is found in one pass that keeps nothing else; a JSON
# tree of such a body took ~290 MB each).
#
# Usage: bash benches/body_memory.sh   (SDGATE=path to use another binary;
# SKIP_BUILD=1). Installs python3 when missing; only listens on 127.0.0.1.
set -euo pipefail

CLIENTS=${CLIENTS:-16}
SHAPE=${SHAPE:-hostile}
BODY_MIB=${BODY_MIB:-16}
SIM_PORT=${SIM_PORT:-27870}
GATE_PORT=${GATE_PORT:-28090}
ADMIN_PORT=${ADMIN_PORT:-29095}
SKIP_BUILD=${SKIP_BUILD:-0}
KEEP_TMP=${KEEP_TMP:-0}
WAIT_SECS=${WAIT_SECS:-10}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SDGATE=${SDGATE:-"$ROOT/target/release/sdgate"}
NAME=body_memory.sh
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"
bench_init body-memory

install_tools python3
build

cat >"$TMP/gate.yaml" <<YAML
listen: 127.0.0.1:$GATE_PORT
admin: 127.0.0.1:$ADMIN_PORT
services:
  - name: sd
    hosts: ["*"]
    container_concurrency: 1
    queue: { max_depth: 1000, timeout: 600s }
    readiness: { http: /internal/ping, period: 50ms }
    backend: { fixed: ["127.0.0.1:$SIM_PORT"] }
YAML

# send KEY: CLIENTS concurrent POSTs whose checkpoint key is KEY; prints the
# status codes seen.
send() {
    python3 - "$GATE_PORT" "$CLIENTS" "$BODY_MIB" "$1" "$SHAPE" <<'PY'
import http.client, sys, threading, collections
port, clients, mib, key, shape = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
size = mib * 1024 * 1024 - 1024
if shape == "image":
    head, tail = '{"prompt":"pretty dog","init_images":["', '"],'
    fill = "A" * (size - len(head) - len(tail) - 80)
else:
    head, tail = '{"prompt":"pretty dog","pad":[', '0],'
    fill = "0," * ((size - len(head) - len(tail) - 80) // 2)
end = '"steps":1,"override_settings":{"%s":"sdxl.safetensors"}}' % key
body = (head + fill + tail + end).encode()
codes = collections.Counter()
def one():
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    c.request("POST", "/sdapi/v1/txt2img", body=body, headers={"Content-Type": "application/json"})
    r = c.getresponse(); r.read(); codes[r.status] += 1
threads = [threading.Thread(target=one) for _ in range(clients)]
for t in threads: t.start()
for t in threads: t.join()
print(" ".join(f"{n}x{code}" for code, n in sorted(codes.items())))
PY
}

# hwm PID: VmHWM in MiB.
hwm() { awk '/VmHWM/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status"; }

start sim "$SDGATE" sim --port "$SIM_PORT" --step-time 1ms --image-bytes 1024
sim_pid=$LAST_PID
wait_port "$SIM_PORT" "$sim_pid"

declare -A peak
for case in named unnamed; do
    key=sd_model_checkpoint
    [[ $case == unnamed ]] && key=sd_model_checkpoinX
    start "gate-$case" "$SDGATE" --config "$TMP/gate.yaml"
    gate_pid=$LAST_PID
    wait_port "$GATE_PORT" "$gate_pid"
    base=$(hwm "$gate_pid")
    codes=$(send "$key")
    peak[$case]=$(hwm "$gate_pid")
    log "$case: $CLIENTS $SHAPE bodies of $BODY_MIB MiB: answers $codes; VmHWM ${base} MiB at start, ${peak[$case]} MiB at peak"
    stop "$gate_pid"
done
ratio=$(awk -v a="${peak[named]}" -v b="${peak[unnamed]}" 'BEGIN { printf "%.3f", a / b }')
log "peak RSS naming a checkpoint / not naming one: ${peak[named]} / ${peak[unnamed]} MiB = $ratio"
awk -v r="$ratio" 'BEGIN { exit !(r <= 1.10) }' || die "naming a checkpoint costs more than 10 % of peak memory"
