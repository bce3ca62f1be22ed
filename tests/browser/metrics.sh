#!/usr/bin/env bash
# CI step: `promtool check metrics` (Debian package `prometheus`) on a real
# scrape of a gateway that has served requests, including a 404, a queue
# timeout and a pod that answered too late, so that every series exists.
# Also checks that every metric of README's Metrics table is in the scrape.
# Usage: bash tests/browser/metrics.sh    (SDGATE=path to use a built binary)
set -euo pipefail
# shellcheck source=tests/browser/lib.sh
. "$(dirname "$0")/lib.sh"
bounded 180 "$@"

command -v promtool >/dev/null 2>&1 || die "promtool is not installed (apt-get install -y prometheus)"
find_sdgate
start_sim --step-time 10ms --image-bytes 1024
start_sim --step-time 50ms --image-bytes 1024
cat >"$WORK/sdgate.yaml" <<YAML
listen: 127.0.0.1:0
admin: 127.0.0.1:0
drain_timeout: 5s
services:
  - name: stable-diffusion
    hosts: ["$HOST_HEADER"]
    container_concurrency: 1
    queue: { timeout: 300ms }
    request_timeout: 500ms
    readiness: { http: /internal/ping, period: 25ms }
    backend: { fixed: ["${SIMS[0]}"] }
  - name: slow
    hosts: ["slow.example.com"]
    container_concurrency: 1
    request_timeout: 100ms
    readiness: { http: /internal/ping, period: 25ms }
    backend: { fixed: ["${SIMS[1]}"] }
YAML
start_gateway "$WORK/sdgate.yaml"
wait_status '[.services[].ready_replicas] == [1, 1]'

# Four generations at once on one pod (0.2 s each, 0.3 s queue timeout): some
# are served, the last ones time out in the queue (504).
clients=()
for i in 1 2 3 4; do
  txt2img "$HOST_HEADER" 20 >"$WORK/code$i" &
  clients+=($!)
done
wait "${clients[@]}"
codes=$(for i in 1 2 3 4; do printf "%s " "$(cat "$WORK/code$i")"; done)
for code in $codes; do [ "$code" = 200 ] || [ "$code" = 504 ] || die "a generation answered $code"; done
# One generation naming another checkpoint than the pod's: it loads it.
code=$(curl -sS -o /dev/null -w '%{http_code}' --max-time 60 -X POST -H "Host: $HOST_HEADER" \
  -H 'Content-Type: application/json' \
  -d '{"prompt": "pretty dog", "steps": 2, "override_settings": {"sd_model_checkpoint": "sdxl.safetensors"}}' \
  "http://$GATEWAY/sdapi/v1/txt2img")
[ "$code" = 200 ] || die "the generation naming a checkpoint answered $code"
[ "$(txt2img unknown.example.com 1)" = 404 ] || die "the unknown host did not answer 404"
[ "$(txt2img slow.example.com 20)" = 504 ] || die "the slow pod did not answer 504 (request_timeout)"
echo "answers: $codes+ 404 + 504 (slow pod)"
wait_status '[.services[] | .inflight + .queue_depth] == [0, 0]'

curl -fsS --max-time 5 "http://$ADMIN/metrics" >"$WORK/metrics.txt"
echo "scrape: $(grep -c '^# TYPE' "$WORK/metrics.txt") metric families, $(grep -vc '^#' "$WORK/metrics.txt") samples"
for name in sdgate_requests_total sdgate_request_duration_seconds sdgate_queue_depth sdgate_queue_wait_seconds \
  sdgate_inflight_requests sdgate_endpoints sdgate_desired_replicas sdgate_cold_start_seconds \
  sdgate_upstream_errors_total sdgate_checkpoint_requests_total sdgate_checkpoint_loads_total \
  process_resident_memory_bytes; do
  grep -q "^# TYPE $name " "$WORK/metrics.txt" || die "the scrape has no $name"
done
grep -q '^sdgate_checkpoint_loads_total{checkpoint="sdxl",service=' "$WORK/metrics.txt" ||
  die "no checkpoint load counted: $(grep checkpoint "$WORK/metrics.txt")"
grep -q '^sdgate_upstream_errors_total{kind="timeout",service="slow"} 1$' "$WORK/metrics.txt" ||
  die "no upstream timeout counted: $(grep upstream_errors "$WORK/metrics.txt")"

echo "promtool check metrics:"
if ! promtool check metrics <"$WORK/metrics.txt" >"$WORK/promtool.out" 2>&1; then
  cat "$WORK/promtool.out"
  die "promtool check metrics found problems"
fi
cat "$WORK/promtool.out"
echo "promtool: the scrape passes ($(promtool --version 2>&1 | head -n1))"
