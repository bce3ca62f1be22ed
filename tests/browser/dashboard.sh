#!/usr/bin/env bash
# CI step: the dashboard page, rendered by headless Chromium, shows the numbers
# that /status reports. Two sim workers behind sdgate (fixed backend,
# container_concurrency 1), a few requests (one to an unknown host), then the
# page's rendered DOM is read back and compared, number by number, with /status.
# The page is opened for the first time (a fresh profile) after the requests:
# its charts must start with the samples /status/history had, not empty.
# Needs: chromium, jq, curl (tests/browser/deps.sh installs them).
# Usage: bash tests/browser/dashboard.sh    (SDGATE=path to use a built binary)
set -euo pipefail
# shellcheck source=tests/browser/lib.sh
. "$(dirname "$0")/lib.sh"
bounded 240 "$@"

REQUESTS=${REQUESTS:-8}
SERVICE=stable-diffusion
find_sdgate
start_sim --step-time 20ms --image-bytes 1024
start_sim --step-time 20ms --image-bytes 1024
cat >"$WORK/sdgate.yaml" <<YAML
listen: 127.0.0.1:0
admin: 127.0.0.1:0
drain_timeout: 5s
services:
  - name: $SERVICE
    hosts: ["$HOST_HEADER"]
    container_concurrency: 1
    queue: { timeout: 60s }
    readiness: { http: /internal/ping, period: 25ms }
    # Short windows, so that the autoscaler settles before the page is read (a
    # fixed backend keeps its pods whatever it is told).
    scale: { max: 2, stable_window: 2s, panic_window: 1s, scale_to_zero_grace: 1s, tick: 200ms }
    backend: { fixed: ["${SIMS[0]}", "${SIMS[1]}"] }
YAML
start_gateway "$WORK/sdgate.yaml"
echo "sims ${SIMS[*]}, gateway $GATEWAY, admin $ADMIN"
wait_status '.services[0].ready_replicas == 2'

# $REQUESTS generations at once (some queue: 2 pods, one generation each).
clients=()
for i in $(seq "$REQUESTS"); do
  txt2img "$HOST_HEADER" 10 >"$WORK/code$i" &
  clients+=($!)
done
wait "${clients[@]}"
for i in $(seq "$REQUESTS"); do [ "$(cat "$WORK/code$i")" = 200 ] || die "request $i answered $(cat "$WORK/code$i")"; done
code=$(txt2img unknown.example.com 1)
[ "$code" = 404 ] || die "the unknown host answered $code, not 404"
wait_status ".services[0].inflight == 0 and .services[0].queue_depth == 0 and .services[0].recent.requests == $REQUESTS"
# The autoscaler has settled: no change for longer than its windows (2 s + 1 s).
wait_status '.services[0].last_scale.seconds_ago > 4' 30

status_json >"$WORK/before.json"
history_json >"$WORK/history-before.json"
chromium_run --user-data-dir="$WORK/profile" --virtual-time-budget=5000 --dump-dom "http://$ADMIN/" >"$WORK/dom.html" ||
  die "chromium failed (see chromium.log)"
status_json >"$WORK/after.json"
history_json >"$WORK/history-after.json"
[ -s "$WORK/dom.html" ] || die "chromium dumped an empty DOM"

# The figures compared must not have moved while the page loaded.
stable='[.services[] | {queue_depth, inflight, ready_replicas, desired_replicas, requests: .recent.requests,
  codes: .recent.codes, success_rate: .recent.success_rate, endpoints, last_scale: (.last_scale.desired)}]'
[ "$(jq -c "$stable" "$WORK/before.json")" = "$(jq -c "$stable" "$WORK/after.json")" ] ||
  die "/status changed while the page loaded: $(jq -c "$stable" "$WORK/before.json") vs $(jq -c "$stable" "$WORK/after.json")"

# The text of the first element whose opening tag has these attributes, in order.
dom() {
  grep -o "$1[^>]*>[^<]*<" "$WORK/dom.html" | head -n1 | sed 's/.*>\([^<]*\)<$/\1/'
}
failures=0
checks=0
compare() {
  local what=$1 expected=$2 shown=$3
  checks=$((checks + 1))
  if [ "$expected" = "$shown" ]; then
    printf '  ok    %-36s /status %-10s page %s\n' "$what" "$expected" "$shown"
  else
    printf '  WRONG %-36s /status %-10s page %s\n' "$what" "$expected" "$shown"
    failures=$((failures + 1))
  fi
}
S="data-service=\"$SERVICE\""
J="$WORK/after.json"
svc='.services[0]'
conn=$(dom 'id="conn"')
case "$conn" in
  updated*) echo "page says: $conn" ;;
  *) die "the page did not read /status: \"$conn\"" ;;
esac
grep -q "<section class=\"service\" $S" "$WORK/dom.html" || die "the rendered page has no section for $SERVICE (is JavaScript running?)"

echo "dashboard vs /status for $SERVICE:"
for key in queue_depth inflight ready_replicas desired_replicas; do
  compare "$key" "$(jq -r "$svc.$key" "$J")" "$(dom "$S data-metric=\"$key\"")"
done
compare "answers in window (recent.requests)" "$(jq -r "$svc.recent.requests" "$J")" "$(dom "$S data-metric=\"requests\"")"
compare "success rate" "$(jq -r "$svc.recent.success_rate * 1000 | round / 10 | tostring + \" %\"" "$J" | sed 's/^\([0-9]*\) %$/\1.0 %/')" \
  "$(dom "$S data-metric=\"success_rate\"")"
for code in $(jq -r "$svc.recent.codes | keys[]" "$J"); do
  compare "answers with code $code" "$(jq -r "$svc.recent.codes[\"$code\"]" "$J")" \
    "$(dom "$S data-metric=\"code\" data-code=\"$code\"")"
done
total=0
for address in $(jq -r "$svc.endpoints[].address" "$J"); do
  for field in state inflight sessions served; do
    compare "endpoint $address $field" "$(jq -r "$svc.endpoints[] | select(.address == \"$address\") | .$field" "$J")" \
      "$(dom "$S data-metric=\"$field\" data-endpoint=\"$address\"")"
  done
  total=$((total + $(jq -r "$svc.endpoints[] | select(.address == \"$address\") | .served" "$J")))
done
compare "served by all endpoints" "$total" "$(dom "$S data-metric=\"served_total\"")"
compare "served = requests sent" "$REQUESTS" "$total"
compare "last scale decision" "$(jq -r "$svc.last_scale.desired // \"none\"" "$J")" "$(dom "$S data-metric=\"last_scale_desired\"")"
# As the page writes seconds: "638 ms" below 1 s, "1.25 s" below 2 min.
seconds='if . == null then "-" elif . < 0.001 then "\(. * 100000 | round / 100) ms"
  elif . < 1 then "\(. * 1000 | round) ms"
  else (. * 100 | round) as $c | "\($c / 100 | floor).\($c % 100 | tostring | if length == 1 then "0" + . else . end) s" end'
for p in p50 p90 p95 p99; do
  compare "latency $p" "$(jq -r "$svc.recent.latency_seconds.$p | $seconds" "$J")" "$(dom "$S data-metric=\"latency_$p\"")"
done
grep -q '<polyline' "$WORK/dom.html" || { echo "  WRONG no chart line drawn"; failures=$((failures + 1)); }

# History: the fresh page took every sample the server had when it loaded
# (between the counts just before and just after), at least the few taken
# while the requests ran and the autoscaler settled, and drew them: the first
# line (answers/s) has a point for each, then the page's own polls.
before=$(jq '.services[0].samples | length' "$WORK/history-before.json")
after=$(jq '.services[0].samples | length' "$WORK/history-after.json")
seeded=$(grep -o "<section class=\"service\" $S[^>]*data-history-samples=\"[0-9]*\"" "$WORK/dom.html" |
  sed 's/.*data-history-samples="\([0-9]*\)"/\1/')
checks=$((checks + 1))
if [ -n "$seeded" ] && [ "$seeded" -ge 2 ] && [ "$seeded" -ge "$before" ] && [ "$seeded" -le "$after" ]; then
  printf '  ok    %-36s /status/history %s..%s  page %s\n' "history samples seeded" "$before" "$after" "$seeded"
else
  printf '  WRONG %-36s /status/history %s..%s  page %s\n' "history samples seeded" "$before" "$after" "${seeded:-none}"
  failures=$((failures + 1))
fi
points=$(grep -o '<polyline points="[^"]*"' "$WORK/dom.html" | head -n1 | sed 's/<polyline points="//; s/"$//' | wc -w)
checks=$((checks + 1))
if [ -n "$seeded" ] && [ "$points" -gt "$seeded" ]; then
  printf '  ok    %-36s %s points (%s from the server)\n' "answers/s line" "$points" "$seeded"
else
  printf '  WRONG %-36s %s points, %s seeded\n' "answers/s line" "$points" "${seeded:-none}"
  failures=$((failures + 1))
fi

if [ "$failures" -ne 0 ]; then
  die "$failures of $checks dashboard figures differ from /status"
fi
echo "dashboard: $checks figures match /status"
