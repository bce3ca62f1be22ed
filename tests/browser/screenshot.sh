#!/usr/bin/env bash
# Takes a PNG screenshot of the dashboard during a short `hey` run that scales
# a local pool of sim workers 0 -> 4 -> 0, as the demo does (for the README).
# Not a CI step.
#
# The page starts its charts from the server's last five minutes
# (/status/history), so a single visit at the end takes the screenshot; the
# script only watches /status meanwhile to choose the moment.
# Needs: chromium, hey, jq, curl.
# Usage: bash tests/browser/screenshot.sh [OUT.png]   (default deploy/dashboard.png)
#   SHOT_AT=peak  screenshot once the pool is at its largest (default: after
#                 hey, once scale-down has started; SHOT_AT=zero: back at zero)
set -euo pipefail
# shellcheck source=tests/browser/lib.sh
. "$(dirname "$0")/lib.sh"
bounded 300 "$@"

OUT=${1:-$ROOT/deploy/dashboard.png}
SHOT_AT=${SHOT_AT:-scaledown}
command -v hey >/dev/null 2>&1 || die "hey is not installed (apt-get install -y hey)"
find_sdgate

# Four free ports in a row for the workers (the demo's config/default.yaml
# scales 0..4).
MAX=4
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for _ in $(seq 50); do
  base=$((20000 + RANDOM % 20000))
  ok=1
  for p in $(seq "$base" $((base + MAX - 1))); do port_free "$p" || ok=0; done
  [ "$ok" = 1 ] && break
done
[ "$ok" = 1 ] || die "no $MAX free ports in a row"

cat >"$WORK/sdgate.yaml" <<YAML
listen: 127.0.0.1:0
admin: 127.0.0.1:0
drain_timeout: 5s
services:
  - name: stable-diffusion
    hosts: ["$HOST_HEADER"]
    container_concurrency: 1
    readiness: { http: /internal/ping, period: 25ms }
    scale: { min: 0, max: $MAX, stable_window: 10s, panic_window: 3s, scale_to_zero_grace: 3s, tick: 500ms }
    backend:
      process:
        command: ["{sdgate}", "sim", "--port", "{port}", "--startup-delay", "2s", "--step-time", "50ms"]
        port_base: $base
        stop_grace: 2s
YAML
RUST_LOG="info,sdgate::proxy=warn" start_gateway "$WORK/sdgate.yaml"
echo "gateway $GATEWAY, admin http://$ADMIN/, workers from port $base"

hey -n 60 -c 5 -t 120 -m POST -host "$HOST_HEADER" -H "Content-Type: application/json" \
  -d '{"prompt": "pretty dog"}' "http://$GATEWAY/sdapi/v1/txt2img" >"$WORK/hey.txt" 2>&1 &
HEY=$!
PIDS+=("$HEY")
peak=0
while kill -0 "$HEY" 2>/dev/null; do
  ready=$(status_json | jq '.services[0].ready_replicas')
  [ "$ready" -gt "$peak" ] && peak=$ready
  if [ "$SHOT_AT" = peak ] && [ "$ready" -ge "$MAX" ]; then break; fi
  sleep 0.5
done
if [ "$SHOT_AT" != peak ]; then
  wait "$HEY" || die "hey failed: $(cat "$WORK/hey.txt")"
  grep -E 'Requests/sec|\[[0-9]{3}\]' "$WORK/hey.txt" || true
  grep -q '\[200\][[:space:]]*60 responses' "$WORK/hey.txt" || die "not all 60 answers were 200: $(cat "$WORK/hey.txt")"
  # After hey: wait until the scale-down starts (or the pool is at zero).
  for _ in $(seq 120); do
    s=$(status_json)
    if [ "$SHOT_AT" = zero ]; then
      [ "$(jq '.services[0].endpoints | length' <<<"$s")" = 0 ] && break
    else
      [ "$(jq '.services[0].desired_replicas' <<<"$s")" -lt "$peak" ] && break
    fi
    sleep 0.5
  done
fi
# A short virtual-time budget: the page reads the history and polls once or twice.
chromium_run --user-data-dir="$WORK/profile" --virtual-time-budget=1500 --screenshot="$WORK/shot.png" \
  --window-size=1280,900 "http://$ADMIN/" >/dev/null
[ -s "$WORK/shot.png" ] || die "chromium wrote no screenshot"
mkdir -p "$(dirname "$OUT")"
cp "$WORK/shot.png" "$OUT"
echo "screenshot: $OUT ($(stat -c %s "$OUT") bytes; peak $peak ready workers)"
