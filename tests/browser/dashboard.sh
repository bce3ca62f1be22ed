#!/usr/bin/env bash
# CI step: the dashboard page, rendered by headless Chromium, shows the numbers
# that /status reports. Two sim workers behind sdgate (fixed backend,
# container_concurrency 1), a few requests (one to an unknown host), then the
# page's rendered DOM is read back and compared, number by number, with /status.
# The page is opened for the first time (a fresh profile) after the requests:
# its charts must start with the samples /status/history had, not empty.
# With no routes and no reload yet, the page shows neither.
# Then the config file is rewritten (an atomic rename; sdgate reloads it within
# a second): two more services, each on its own sim worker, and a route that
# splits a host between them 60/20. After requests to that host, a fresh page
# must show the route: each service's weight (and its part of the weights,
# 75 % and 25 %), and its requests and share of the last minute, as /status
# says, and the reload in the header. The reload also adds a service with API
# keys: after two callers' requests (one making 3 images, one loading a
# checkpoint), the page's spend table must show each caller's requests,
# GPU-seconds, images and loads this hour and today as /status says. Last, a config that does not load (the
# split names a service that does not exist): the page must show the reload as
# refused, with /status's error, and the route as it was.
# Needs: chromium, jq, curl (tests/browser/deps.sh installs them).
# The page as served is also opened from a file, where nothing can be fetched:
# its first paint must show the same figures (sdgate inlines its state), no
# tile's text may run past its tile at 1280 px, and a screenshot of it is
# taken (kept in $SHOT_DIR when that is set). The same page with its inlined
# state edited (no answers in a 42 s window, a failing probe whose result is
# markup, an endpoint not yet probed) must show no success rate, one window
# everywhere, and the probe's result as text.
# Usage: bash tests/browser/dashboard.sh    (SDGATE=path to use a built binary)
set -euo pipefail
# shellcheck source=tests/browser/lib.sh
. "$(dirname "$0")/lib.sh"
bounded 300 "$@"

REQUESTS=${REQUESTS:-8}
SERVICE=stable-diffusion
find_sdgate
for _ in 1 2 3 4 5; do start_sim --step-time 20ms --image-bytes 1024; done
# A service on fixed pods: name, hosts (a YAML list), then its pods' addresses.
service_yaml() {
  local name=$1 hosts=$2
  shift 2
  local pods
  pods=$(printf '"%s", ' "$@")
  cat <<YAML
  - name: $name
    hosts: $hosts
    container_concurrency: 1
    queue: { timeout: 60s }
    readiness: { http: /internal/ping, period: 25ms }
    # Short windows, so that the autoscaler settles before the page is read (a
    # fixed backend keeps its pods whatever it is told).
    scale: { max: 2, stable_window: 2s, panic_window: 1s, scale_to_zero_grace: 1s, tick: 200ms }
    backend: { fixed: [${pods%, }] }
YAML
}
# The gateway's config (stdin), written in one rename: the file sdgate watches
# is never seen half-written.
write_config() {
  cat >"$WORK/next.yaml"
  mv "$WORK/next.yaml" "$WORK/sdgate.yaml"
}
{
  printf 'listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\ndrain_timeout: 5s\nservices:\n'
  service_yaml "$SERVICE" "[\"$HOST_HEADER\"]" "${SIMS[0]}" "${SIMS[1]}"
} | write_config
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
# (An endpoint's probe counts and ages move with every probe: only what it saw is compared.)
stable='[.services[] | {queue_depth, inflight, ready_replicas, desired_replicas, requests: .recent.requests,
  codes: .recent.codes, success_rate: .recent.success_rate, last_scale: (.last_scale.desired),
  endpoints: [.endpoints[] | del(.probe) + {probe: (.probe | if . then {ok, result} else null end)}]}]'
[ "$(jq -c "$stable" "$WORK/before.json")" = "$(jq -c "$stable" "$WORK/after.json")" ] ||
  die "/status changed while the page loaded: $(jq -c "$stable" "$WORK/before.json") vs $(jq -c "$stable" "$WORK/after.json")"

# The text of the first element whose opening tag has these attributes, in order.
dom() {
  grep -o "$1[^>]*>[^<]*<" "${DOMFILE:-$WORK/dom.html}" | head -n1 | sed 's/.*>\([^<]*\)<$/\1/'
}
# The value of attribute $2 of the first element whose opening tag has $1.
attr() {
  grep -o "$1[^>]*>" "$WORK/dom.html" | head -n1 | sed -n "s/.* $2=\"\([^\"]*\)\".*/\1/p"
}
failures=0
checks=0
# A check that the command (after the label) succeeds; `not CMD` for one that fails.
not() { ! "$@"; }
check() {
  local what=$1
  shift
  checks=$((checks + 1))
  if "$@"; then
    printf '  ok    %s\n' "$what"
  else
    printf '  WRONG %s\n' "$what"
    failures=$((failures + 1))
  fi
}
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
  for field in state inflight sessions served checkpoint checkpoint_loads; do
    compare "endpoint $address $field" "$(jq -r "$svc.endpoints[] | select(.address == \"$address\") | .$field" "$J")" \
      "$(dom "$S data-metric=\"$field\" data-endpoint=\"$address\"")"
  done
  # Its last readiness probe: "ok" (these pods answer their probes).
  compare "endpoint $address probe" "$(jq -r "$svc.endpoints[] | select(.address == \"$address\") | .probe.result // \"-\"" "$J")" \
    "$(dom "$S data-metric=\"probe\" data-endpoint=\"$address\"")"
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
# The tiles, the answers/s legend, the latency chart and the codes table name
# one window: that of /status's recent summary.
windows=$(grep -o 'data-window="[^"]*"' "$WORK/dom.html" | sort | uniq -c)
check "one window named by 3 tiles, the legend and 2 titles: $(echo $windows)" \
  grep -Eqx ' *6 data-window="last [0-9]+ s"' <<<"$windows"

# The first paint has data: the page as served (sdgate inlines the state it
# opens on), opened from a file, where no fetch of /status can succeed.
echo "first paint, with nothing fetched (the page as served, opened from a file):"
curl -sS --max-time 10 "http://$ADMIN/" >"$WORK/page.html" || die "cannot read the dashboard page"
status_json >"$WORK/served.json"
# The page with a script after its own that lists, on <body>, the tile texts
# wider than their box (none should be, at 1280 px).
overflow='<script>document.body.setAttribute("data-overflow", [...document.querySelectorAll(".tile .label, .tile .value")]
  .filter((e) => e.scrollWidth > e.clientWidth).map((e) => e.textContent).join(" | "));</script>'
OVERFLOW=$overflow awk '/^<\/body>/ { print ENVIRON["OVERFLOW"] } { print }' "$WORK/page.html" >"$WORK/page-measured.html"
chromium_run --user-data-dir="$WORK/profile-file" --virtual-time-budget=500 --window-size=1280,1400 --dump-dom \
  "file://$WORK/page-measured.html" >"$WORK/dom-file.html" || die "chromium failed on the saved page (see chromium.log)"
chromium_run --user-data-dir="$WORK/profile-shot" --window-size=1280,1400 --screenshot="$WORK/first-paint.png" \
  "file://$WORK/page.html" >/dev/null || die "chromium could not take the screenshot (see chromium.log)"
DOMFILE="$WORK/dom-file.html"
compare "first paint: answers in window" "$(jq -r "$svc.recent.requests" "$WORK/served.json")" "$(dom "$S data-metric=\"requests\"")"
compare "first paint: served by all endpoints" "$REQUESTS" "$(dom "$S data-metric=\"served_total\"")"
compare "first paint: ready replicas" "$(jq -r "$svc.ready_replicas" "$WORK/served.json")" "$(dom "$S data-metric=\"ready_replicas\"")"
check "first paint: the window is named (answers/s (last 60 s) or less)" \
  grep -qE 'data-label="requests_per_second">answers/s <span class="window" data-window="last [0-9]+ s">\(last [0-9]+ s\)<' \
  "$WORK/dom-file.html"
check "first paint: a chart line from the inlined history" grep -q '<polyline' "$WORK/dom-file.html"
# Served/s has a line from the history: its legend says its value, not "-".
served_legend=$(dom 'data-series="served"')
check "first paint: served/s legend has a value (\"$served_legend\")" grep -Eqx 'served/s by pods: [0-9.]+' <<<"$served_legend"
overflowing=$(grep -o '<body data-overflow="[^"]*"' "$WORK/dom-file.html" | sed 's/.*data-overflow="//; s/"$//')
check "first paint: no tile text wider than its tile at 1280 px (${overflowing:-none})" \
  grep -q '<body data-overflow="">' "$WORK/dom-file.html"
check "first paint: a screenshot of it ($(stat -c %s "$WORK/first-paint.png" 2>/dev/null || echo 0) bytes)" \
  test "$(stat -c %s "$WORK/first-paint.png" 2>/dev/null || echo 0)" -gt 20000
unset DOMFILE
if [ -n "${SHOT_DIR:-}" ]; then cp "$WORK/first-paint.png" "$SHOT_DIR/dashboard-first-paint.png"; fi

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

# The same page with its inlined state edited: no answers in a 42 s window;
# the first endpoint's probe failing with a result that is markup (a pod's
# answer is quoted in it), the second not yet probed.
echo "edited state: no answers, a failing probe, an endpoint not yet probed:"
initial=$(grep -m1 '^const INITIAL = ' "$WORK/page.html" | sed 's/^const INITIAL = //; s/;$//')
[ -n "$initial" ] || die "the served page has no inlined state"
edited=$(jq -c '.status.services[0] |= (
    .recent = { window_seconds: 42.4, requests: 0, requests_per_second: 0, success_rate: 1, codes: {}, latency_seconds: {} }
    | .endpoints[0].probe = { ok: false, result: "<b>GET /internal/ping -> 400</b> & co", times: 3, for_seconds: 2.46,
        seconds_ago: 0.1 }
    | del(.endpoints[1].probe))' <<<"$initial" | sed 's#</#<\\/#g') || die "cannot edit the inlined state"
EDITED=$edited awk '/^const INITIAL = / { print "const INITIAL = " ENVIRON["EDITED"] ";"; next } { print }' "$WORK/page.html" \
  >"$WORK/page-edited.html"
chromium_run --user-data-dir="$WORK/profile-edited" --virtual-time-budget=500 --dump-dom "file://$WORK/page-edited.html" \
  >"$WORK/dom-edited.html" || die "chromium failed on the edited page (see chromium.log)"
DOMFILE="$WORK/dom-edited.html"
first=$(jq -r ".status$svc.endpoints[0].address" <<<"$initial")
second=$(jq -r ".status$svc.endpoints[1].address" <<<"$initial")
compare "no answers: success rate" "-" "$(dom "$S data-metric=\"success_rate\"")"
compare "no answers: status codes" "no answers in the last 42 s" "$(dom 'class="empty"')"
windows=$(grep -o 'data-window="[^"]*"' "$WORK/dom-edited.html" | sort | uniq -c)
check "one window, 42 s, named by 3 tiles, the legend and 2 titles: $(echo $windows)" \
  grep -Eqx ' *6 data-window="last 42 s"' <<<"$windows"
compare "answers/s legend" "answers/s (last 42 s): 0" "$(dom 'data-series="rps"')"
compare "failing probe, as text" "&lt;b&gt;GET /internal/ping -&gt; 400&lt;/b&gt; &amp; co (3× in 2.5 s)" \
  "$(dom "$S data-metric=\"probe\" data-endpoint=\"$first\"")"
check "failing probe: its cell holds that text and no element" \
  grep -q "$S data-metric=\"probe\" data-endpoint=\"$first\"[^>]*>[^<]*</td>" "$WORK/dom-edited.html"
compare "endpoint not yet probed" "-" "$(dom "$S data-metric=\"probe\" data-endpoint=\"$second\"")"
unset DOMFILE

# No routes and no reload yet: the routes panel and the reload line are hidden
# and empty.
echo "no routes, no reload:"
check "routes panel hidden" grep -q '<section class="routes" id="routes" hidden=""></section>' "$WORK/dom.html"
check "no route rendered" not grep -Eq '<[a-z0-9]+ [^>]*data-route=' "$WORK/dom.html"
check "reload line hidden" grep -q '<span id="reload" hidden=""></span>' "$WORK/dom.html"
check "reload error hidden" grep -q '<div id="reload-error" hidden=""></div>' "$WORK/dom.html"

# A reload: two more services, each on one sim worker, and a route across
# them; and a service with API keys (its callers' spend on the page).
ROUTE_HOST=gray.example.com
KEYS_HOST=keys.example.com
printf 'keys:\n  - { name: team-a, sha256: "%s" }\n  - { name: team-b, sha256: "%s" }\n' \
  "$(printf %s sdg_dash_a | sha256sum | cut -d' ' -f1)" "$(printf %s sdg_dash_b | sha256sum | cut -d' ' -f1)" >"$WORK/keys.yaml"
routed_config() { # $1: the split's second service
  printf 'listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\ndrain_timeout: 5s\nservices:\n'
  service_yaml "$SERVICE" "[\"$HOST_HEADER\"]" "${SIMS[0]}" "${SIMS[1]}"
  service_yaml sd-v1 "[]" "${SIMS[2]}"
  service_yaml sd-v2 "[]" "${SIMS[3]}"
  service_yaml sd-keys "[\"$KEYS_HOST\"]" "${SIMS[4]}"
  printf '    auth: { keys_file: "%s" }\n' "$WORK/keys.yaml"
  cat <<YAML
routes:
  - hosts: ["$ROUTE_HOST"]
    split:
      - { service: sd-v1, weight: 60 }
      - { service: $1, weight: 20 }
YAML
}
routed_config sd-v2 | write_config
wait_status '.last_reload.ok == true and (.routes | length) == 1' 30
wait_status '[.services[] | select(.name == "sd-v1" or .name == "sd-v2") | .ready_replicas] == [1, 1]'
# Requests to the route's host until each service had some (the split is
# random; 12 at least, 40 at most: under 80, no share is a tie at one decimal
# that jq and the page could round apart).
sent=0
while :; do
  code=$(txt2img "$ROUTE_HOST" 1)
  [ "$code" = 200 ] || die "request $((sent + 1)) to $ROUTE_HOST answered $code"
  sent=$((sent + 1))
  if [ "$sent" -ge 12 ] && status_json | jq -e '[.routes[0].split[].requests_last_minute] | all(. > 0)' >/dev/null; then
    break
  fi
  [ "$sent" -lt 40 ] || die "after $sent requests to $ROUTE_HOST, a service of its split has none: $(status_json | jq -c .routes)"
done
wait_status "([.routes[0].split[].requests_last_minute] | add) == $sent and all(.services[]; .inflight == 0)"
# Callers with keys: team-a makes 1 + 3 images (batch_size 3), one asking
# for a checkpoint the pod does not hold; team-b one image.
keyed() { # key, body
  curl -sS -o /dev/null -w '%{http_code}' --max-time 60 -X POST -H "Host: $KEYS_HOST" -H "Authorization: Bearer $1" \
    -H 'Content-Type: application/json' -d "$2" "http://$GATEWAY/sdapi/v1/txt2img"
}
for call in 'sdg_dash_a {"prompt": "a", "steps": 10}' \
  'sdg_dash_a {"prompt": "a", "steps": 1, "batch_size": 3, "override_settings": {"sd_model_checkpoint": "sdxl"}}' \
  'sdg_dash_b {"prompt": "b", "steps": 1}'; do
  code=$(keyed "${call%% *}" "${call#* }")
  [ "$code" = 200 ] || die "a keyed request answered $code"
done
[ "$(keyed sdg_wrong '{"prompt": "x"}')" = 401 ] || die "a wrong key was not refused"
wait_status '([.tenants[] | select(.service == "sd-keys") | .today.requests] | sort) == [1, 2]'

# A fresh page, read as above, and /status just before and after: the figures
# compared must not have moved in between.
# $1: a name for the files.
read_page() {
  status_json >"$WORK/$1-before.json"
  chromium_run --user-data-dir="$WORK/profile-$1" --virtual-time-budget=5000 --dump-dom "http://$ADMIN/" >"$WORK/$1.html" ||
    die "chromium failed (see chromium.log)"
  status_json >"$WORK/$1-after.json"
  [ -s "$WORK/$1.html" ] || die "chromium dumped an empty DOM"
  local moving='{routes, last_reload, services: [.services[].name]}'
  [ "$(jq -c "$moving" "$WORK/$1-before.json")" = "$(jq -c "$moving" "$WORK/$1-after.json")" ] ||
    die "/status changed while the page loaded: $(jq -c "$moving" "$WORK/$1-before.json") vs $(jq -c "$moving" "$WORK/$1-after.json")"
  cp "$WORK/$1.html" "$WORK/dom.html" # what dom() and attr() read
  J="$WORK/$1-after.json"
}
# As the page writes a fraction: "62.5 %", "75.0 %".
percent='. * 1000 | round | "\(. / 10 | floor).\(. % 10) %"'
check_routes() {
  local route service
  route=$(jq -r '.routes[0].name' "$J")
  R="data-route=\"$route\""
  check "routes panel shown" not grep -q '<section class="routes" id="routes" hidden' "$WORK/dom.html"
  compare "route name" "$ROUTE_HOST" "$route"
  check "route $route rendered" grep -q "<div class=\"route\" $R>" "$WORK/dom.html"
  compare "route requests (60 s)" "$sent" "$(dom "$R data-metric=\"route_requests_total\"")"
  for service in sd-v1 sd-v2; do
    local RS="$R data-service=\"$service\"" split=".routes[0].split[] | select(.service == \"$service\")"
    compare "$service weight" "$(jq -r "$split.weight" "$J")" "$(dom "$RS data-metric=\"route_weight\"")"
    compare "$service part of the weights" "$([ "$service" = sd-v1 ] && echo "75.0 %" || echo "25.0 %")" \
      "$(dom "$RS data-metric=\"route_weight_share\"")"
    compare "$service requests (60 s)" "$(jq -r "$split.requests_last_minute" "$J")" "$(dom "$RS data-metric=\"route_requests\"")"
    compare "$service share (60 s)" "$(jq -r "$split.share_last_minute | $percent" "$J")" "$(dom "$RS data-metric=\"route_share\"")"
    check "$service has its service section" grep -q "<section class=\"service\" data-service=\"$service\"" "$WORK/dom.html"
  done
}
# Each caller's spend as /status says it, this hour and today.
check_tenants() {
  local tenant metric field
  check "spend panel shown" not grep -q '<section class="routes" id="tenants" hidden' "$WORK/dom.html"
  for tenant in team-a team-b; do
    local T="data-service=\"sd-keys\" data-tenant=\"$tenant\"" row=".tenants[] | select(.tenant == \"$tenant\")"
    for metric in requests:requests images:images loads:checkpoint_loads gpu_seconds:gpu_seconds; do
      field=${metric#*:}
      local fmt=""
      [ "$field" = gpu_seconds ] &&
        fmt=' * 100 | round | "\(. / 100 | floor).\(. % 100 | tostring | if length < 2 then "0" + . else . end)"'
      compare "$tenant ${metric%%:*} this hour" "$(jq -r "$row.this_hour.$field$fmt" "$J")" \
        "$(attr "$T data-metric=\"tenant_${metric%%:*}\"" data-hour)"
      compare "$tenant ${metric%%:*} today" "$(jq -r "$row.today.$field$fmt" "$J")" \
        "$(attr "$T data-metric=\"tenant_${metric%%:*}\"" data-day)"
    done
  done
  compare "team-a images" 4 "$(jq -r '.tenants[] | select(.tenant == "team-a") | .today.images' "$J")"
  compare "team-a loads" 1 "$(jq -r '.tenants[] | select(.tenant == "team-a") | .today.checkpoint_loads' "$J")"
}
echo "after a reload that added a route:"
read_page routed
check_routes
check_tenants
compare "last reload" ok "$(attr 'id="reload"' data-value)"
compare "last reload at" "$(jq -r '.last_reload.at' "$J")" "$(attr 'id="reload"' data-at)"
reload_line=$(dom 'id="reload"')
check "reload line: \"$reload_line\"" grep -Eqx 'config reloaded [0-9]+ s ago' <<<"$reload_line"
check "reload error hidden" grep -q '<div id="reload-error" hidden=""></div>' "$WORK/dom.html"

# A config that does not load: refused, the route stays as it was.
routed_config sd-v3 | write_config
wait_status '.last_reload.ok == false' 30
echo "after a refused reload:"
read_page refused
check_routes
compare "last reload" refused "$(attr 'id="reload"' data-value)"
compare "last reload at" "$(jq -r '.last_reload.at' "$J")" "$(attr 'id="reload"' data-at)"
reload_line=$(dom 'id="reload"')
check "reload line: \"$reload_line\"" grep -Eqx 'config reload refused [0-9]+ s ago' <<<"$reload_line"
check "reload error shown" grep -q '<div id="reload-error">' "$WORK/dom.html"
error=$(jq -r '.last_reload.error' "$J")
case "$error" in *sd-v3*) ;; *) die "the refusal does not name sd-v3: $error" ;; esac
compare "reload error" "$error" "$(dom 'data-metric="last_reload_error"')"

if [ "$failures" -ne 0 ]; then
  die "$failures of $checks dashboard checks failed"
fi
echo "dashboard: $checks checks passed (figures match /status)"
