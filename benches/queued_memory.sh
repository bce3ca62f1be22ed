#!/usr/bin/env bash
# Memory per waiting client: sdgate against HAProxy, side by side (issue 10).
#
# One `sdgate sim` pod (container_concurrency 1) is kept busy by one long
# generation; then N clients each open a connection, send one POST txt2img
# and hold it, so N requests wait in the proxy's queue. The script reports
# the proxy's RSS before and with the N queued, and the RSS per queued
# request. Then every client leaves at once: for sdgate it checks that the
# queue and in-flight return to 0 and that the pod saw none of them (only
# the busy generation). Each (proxy, N) runs on a fresh proxy and pod.
#
# HAProxy 2.6 gets `maxconn 1` on its server and `option abortonclose`, so
# that it too drops the requests of clients that left (without it HAProxy
# forwards them to the pod once it is free).
#
# Usage: bash benches/queued_memory.sh        (NS="1000 10000" by default)
# Installs haproxy, curl and python3 with apt-get when missing (needs root),
# builds sdgate in release mode, only listens on 127.0.0.1, and stops every
# process it starts.
set -euo pipefail

NS=${NS:-"1000 10000"}
SIM_PORT=${SIM_PORT:-27860}
GATE_PORT=${GATE_PORT:-28080}
ADMIN_PORT=${ADMIN_PORT:-29090}
HAPROXY_PORT=${HAPROXY_PORT:-28081}
HAPROXY_STATS_PORT=${HAPROXY_STATS_PORT:-28082}
SKIP_BUILD=${SKIP_BUILD:-0}
KEEP_TMP=${KEEP_TMP:-0}
PROXIES=${PROXIES:-"sdgate haproxy"}

WAIT_SECS=${WAIT_SECS:-10}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SDGATE="$ROOT/target/release/sdgate"
NAME=queued_memory.sh
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"
bench_init queued

# Every client is a descriptor here and in the proxy.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
max_n=0
for n in $NS; do ((n > max_n)) && max_n=$n; done
(($(ulimit -n) > max_n + 1000)) || die "open-files limit $(ulimit -n) is too low for N=$max_n (raise ulimit -Hn)"

install_tools haproxy curl python3
build

cat >"$TMP/gate.yaml" <<EOF
listen: 127.0.0.1:$GATE_PORT
admin: 127.0.0.1:$ADMIN_PORT
services:
  - name: sd
    hosts: ["*"]
    container_concurrency: 1
    queue: { max_depth: 20000, timeout: 600s }
    readiness: { tcp: true, period: 50ms }
    # The busy generation's client leaves too: its pod is told to stop.
    interrupt_on_disconnect: /sdapi/v1/interrupt
    backend: { fixed: ["127.0.0.1:$SIM_PORT"] }
EOF

# HAProxy reserves two descriptors per connection: under a hard limit of
# 20000 it takes at most ~9,900 clients, and runs with that many.
HAPROXY_MAXCONN=$(( ($(ulimit -Hn) - 200) / 2 ))
((HAPROXY_MAXCONN > 30000)) && HAPROXY_MAXCONN=30000
cat >"$TMP/haproxy.cfg" <<EOF
global
    maxconn $HAPROXY_MAXCONN

defaults
    mode http
    option http-keep-alive
    option abortonclose
    timeout connect 5s
    timeout client 600s
    timeout server 600s
    timeout queue 600s

frontend fe
    bind 127.0.0.1:$HAPROXY_PORT
    maxconn $HAPROXY_MAXCONN
    default_backend sd

frontend stats
    bind 127.0.0.1:$HAPROXY_STATS_PORT
    stats enable
    stats uri /stats

backend sd
    server s1 127.0.0.1:$SIM_PORT maxconn 1
EOF
haproxy -c -q -f "$TMP/haproxy.cfg" || die "haproxy rejected its config"

# The clients: a busy generation, then N waiting requests; RSS before and
# after; then all leave at once. Prints one JSON line.
cat >"$TMP/hold.py" <<'EOF'
import json, resource, socket, sys, time, urllib.request

proxy, port, pid, n, source = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
queue_url, sim_url = sys.argv[6], sys.argv[7]
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

def rss_kib():
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])

def fetch(url):
    with urllib.request.urlopen(url, timeout=5) as answer:
        return answer.read().decode()

def queued():
    text = fetch(queue_url)
    if proxy == "sdgate":
        for line in text.splitlines():
            if line.startswith('sdgate_queue_depth{service="sd"}'):
                return int(float(line.split()[-1]))
        return 0
    for line in text.splitlines():  # HAProxy CSV: pxname,svname,qcur,...
        fields = line.split(",")
        if fields[:2] == ["sd", "BACKEND"]:
            return int(fields[2] or 0)
    return 0

def inflight():
    if proxy != "sdgate":
        return 0
    for line in fetch(queue_url).splitlines():
        if line.startswith('sdgate_inflight_requests{service="sd"}'):
            return int(float(line.split()[-1]))
    return 0

def until(what, check, limit):
    deadline = time.time() + limit
    while not check():
        if time.time() > deadline:
            sys.exit(f"{proxy}: timed out waiting for {what}")
        time.sleep(0.05)

def request(steps):
    body = json.dumps({"prompt": "pretty dog", "steps": steps}).encode()
    return (b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: sd\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

def client(data):
    s = socket.socket()
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    s.sendall(data)
    return s

busy = client(request(1000000))
until("the busy generation at the pod", lambda: json.loads(fetch(sim_url))["inflight"] == 1, 30)
time.sleep(1)
before = rss_kib()
started = time.time()
waiting = [client(request(1)) for _ in range(n)]
until(f"{n} queued", lambda: queued() == n, 300)
took = time.time() - started
time.sleep(1)
after = rss_kib()
for s in waiting + [busy]:
    s.close()
left = time.time()
until("the queue back to 0", lambda: queued() == 0, 120)
until("nothing in flight", lambda: inflight() == 0, 120)
drained = time.time() - left
sim = json.loads(fetch(sim_url))
print(json.dumps({"proxy": proxy, "n": n, "before_kib": before, "after_kib": after,
                  "per_queued_kib": (after - before) / n, "queue_secs": took, "drain_secs": drained,
                  "pod_saw": sim["served"] + sim["inflight"]}))
EOF

run() { # run PROXY N SOURCE_ADDRESS
    local proxy=$1 n=$2 source=$3 proxy_pid port queue_url
    start sim "$SDGATE" sim --port "$SIM_PORT" --step-time 100ms --cancel-on-disconnect
    local sim_pid=$LAST_PID
    wait_port "$SIM_PORT" "$sim_pid"
    if [[ $proxy == sdgate ]]; then
        start sdgate "$SDGATE" --config "$TMP/gate.yaml"
        proxy_pid=$LAST_PID port=$GATE_PORT queue_url="http://127.0.0.1:$ADMIN_PORT/metrics"
    else
        ((n > HAPROXY_MAXCONN - 10)) && n=$((HAPROXY_MAXCONN - 10))
        start haproxy haproxy -db -f "$TMP/haproxy.cfg"
        proxy_pid=$LAST_PID port=$HAPROXY_PORT queue_url="http://127.0.0.1:$HAPROXY_STATS_PORT/stats;csv"
    fi
    wait_port "$port" "$proxy_pid"
    sleep 1 # readiness probes (sdgate: 50 ms period)
    log "$proxy: $n waiting clients"
    python3 "$TMP/hold.py" "$proxy" "$port" "$proxy_pid" "$n" "$source" "$queue_url" \
        "http://127.0.0.1:$SIM_PORT/sim/stats" >>"$TMP/results.jsonl" \
        || die "$proxy with $n clients failed; see $TMP (KEEP_TMP=1)"
    stop "$proxy_pid"
    stop "$sim_pid"
}

# Each run's clients come from their own loopback address, so that the
# previous run's closed connections (TIME_WAIT) take no ports from it.
source_index=1
for n in $NS; do
    for proxy in $PROXIES; do
        source_index=$((source_index + 1))
        run "$proxy" "$n" "127.0.0.$source_index"
    done
done

python3 - "$TMP/results.jsonl" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print("| proxy | waiting clients | RSS before | RSS with them waiting | per waiting client | all left: queue and in flight at 0 after | generations the pod ran |")
print("|---|---:|---:|---:|---:|---:|---:|")
for r in rows:
    print(f"| {r['proxy']} | {r['n']} | {r['before_kib']/1024:.1f} MiB | {r['after_kib']/1024:.1f} MiB "
          f"| {r['per_queued_kib']:.2f} KiB | {r['drain_secs']:.2f} s | {r['pod_saw']} |")
by = {(r["proxy"], r["n"]): r for r in rows}
sdgate = [r for r in rows if r["proxy"] == "sdgate"]
haproxy = [r for r in rows if r["proxy"] == "haproxy"]
for r, h in zip(sdgate, haproxy):
    ratio = r["per_queued_kib"] / h["per_queued_kib"]
    print(f"{r['n']} waiting clients (HAProxy {h['n']}): sdgate uses {ratio:.2f}x HAProxy's memory per waiting client")
failed = [r for r in rows if r["proxy"] == "sdgate" and r["pod_saw"] > 1]
if failed:
    sys.exit(f"the pod saw requests of clients that had left: {failed}")
EOF
