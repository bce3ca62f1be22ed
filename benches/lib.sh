# Shared by the benchmark scripts (sourced, not run): log lines, installing
# tools, building sdgate, and the processes a script starts, all stopped when
# it exits (their logs printed and kept on failure).
#
# The sourcing script sets NAME (its log prefix), ROOT, SDGATE, SKIP_BUILD,
# KEEP_TMP and WAIT_SECS, then calls `bench_init TAG` to get $TMP.

log() { printf '[%s] %s\n' "$NAME" "$*" >&2; }
die() { printf '[%s] ERROR: %s\n' "$NAME" "$*" >&2; exit 1; }

# bench_init TAG: a fresh $TMP (/tmp/sdgate-TAG.*) and the exit traps.
bench_init() {
    TMP=$(mktemp -d "/tmp/sdgate-$1.XXXXXX")
    declare -gA PIDS=()    # pid -> label
    trap bench_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

bench_cleanup() {
    local status=$?
    trap - EXIT INT TERM
    local pid
    for pid in "${!PIDS[@]}"; do
        kill -INT "$pid" 2>/dev/null || true; kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${!PIDS[@]}"; do
        local i
        for i in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [[ $status -ne 0 ]] && compgen -G "$TMP/*.log" >/dev/null; then
        log "failed (exit $status); logs of the started processes:"
        local f
        for f in "$TMP"/*.log; do
            [[ -e $f ]] || continue
            printf -- '--- %s (last 20 lines)\n' "$(basename "$f")" >&2
            tail -n 20 "$f" >&2 || true
        done
    fi
    if [[ $KEEP_TMP == 1 || ($status -ne 0 && -n $(ls -A "$TMP")) ]]; then
        log "configs and logs kept in $TMP"
    else
        rm -rf "$TMP"
    fi
    exit "$status"
}

# start LABEL CMD...: runs CMD in the background, output to $TMP/LABEL.log;
# its pid in LAST_PID.
LAST_PID=
start() {
    local label=$1
    shift
    "$@" >"$TMP/$label.log" 2>&1 &
    LAST_PID=$!
    PIDS[$LAST_PID]=$label
}

# stop PID: INT and TERM, wait up to 5 s, then KILL.
# SIGINT then SIGTERM: sdgate drains at once on SIGINT (SIGTERM alone would
# first serve on for shutdown_delay); sims started in the background ignore
# SIGINT (bash does that to background jobs) and stop on SIGTERM.
stop() {
    local pid=$1 i
    kill -INT "$pid" 2>/dev/null || true; kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    unset "PIDS[$pid]"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

require_free() {
    local port
    for port in "$@"; do
        port_open "$port" && die "port $port on 127.0.0.1 is already in use (set the *_PORT variables to move the benchmark)"
    done
    return 0
}

# wait_port PORT PID: until something listens on PORT, at most WAIT_SECS;
# fails early if PID died.
wait_port() {
    local port=$1 pid=$2 label=${PIDS[$2]:-process} i
    for i in $(seq 1 $((WAIT_SECS * 10))); do
        port_open "$port" && return 0
        kill -0 "$pid" 2>/dev/null || die "$label exited before listening on port $port (see $TMP/$label.log)"
        sleep 0.1
    done
    die "$label did not listen on 127.0.0.1:$port within ${WAIT_SECS}s (see $TMP/$label.log)"
}

# install_tools TOOL...: installs the missing ones with apt-get (as root),
# without letting package scripts start system services (haproxy, nginx).
install_tools() {
    local missing=() tool
    for tool in "$@"; do
        command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    [[ $(id -u) -eq 0 ]] || die "missing tools: ${missing[*]}; run as root or install them first"
    command -v apt-get >/dev/null 2>&1 || die "missing tools: ${missing[*]}, and no apt-get to install them"
    log "installing: ${missing[*]}"
    local packages=("${missing[@]/getconf/libc-bin}")
    local policy=/usr/sbin/policy-rc.d made_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && made_policy=1
    fi
    local ok=1
    DEBIAN_FRONTEND=noninteractive apt-get update -q >"$TMP/apt.log" 2>&1 \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${packages[@]}" >>"$TMP/apt.log" 2>&1 \
        || ok=0
    [[ $made_policy -eq 1 ]] && rm -f "$policy"
    [[ $ok -eq 1 ]] || { tail -n 20 "$TMP/apt.log" >&2; die "apt-get install ${packages[*]} failed"; }
    for tool in "${missing[@]}"; do
        command -v "$tool" >/dev/null 2>&1 || die "$tool still missing after apt-get install"
    done
}

# build: cargo build --release, unless SKIP_BUILD=1 or SDGATE names another
# binary (e.g. the profile-guided one benches/pgo.sh builds).
build() {
    if [[ $SKIP_BUILD == 1 || $SDGATE != "$ROOT/target/release/sdgate" ]]; then
        log "using $SDGATE (not built by this script)"
    else
        log "cargo build --release"
        (cd "$ROOT" && cargo build --release --quiet) || die "cargo build --release failed"
    fi
    [[ -x $SDGATE ]] || die "$SDGATE not found"
}

# write_sdgate_config FILE PORT ADMIN_PORT SIM_PORT [TOP_LEVEL_YAML]: sdgate
# on PORT in front of one sim on SIM_PORT, every host, no slot limit
# (container_concurrency 0): the proxy's own work, as HAProxy's is measured.
# TOP_LEVEL_YAML (e.g. a `tls:` block) goes before `services:`.
write_sdgate_config() {
    local file=$1 port=$2 admin=$3 sim=$4 extra=${5:-}
    cat >"$file" <<CFG
listen: 127.0.0.1:$port
admin: 127.0.0.1:$admin
${extra}services:
  - name: sd
    hosts: ["*"]
    container_concurrency: 0
    queue: { max_depth: 10000, timeout: 60s }
    request_timeout: 120s
    readiness: { tcp: true, period: 50ms }
    backend: { fixed: ["127.0.0.1:$sim"] }
CFG
}

# write_haproxy_config FILE PORT FIRST_SIM_PORT N SERVER_OPTS [same-work]: a
# minimal `mode http` HAProxy listening on PORT, keep-alive both ways, with N
# servers on FIRST_SIM_PORT.. (SERVER_OPTS on each, e.g. "maxconn 1");
# BIND_OPTS, when set, on its bind line (e.g. "ssl crt FILE").
# "same-work" has it also do what sdgate does to every request: route by
# Host, set X-Forwarded-For/-Host/-Proto, and give the request and its
# answer an X-Request-Id.
write_haproxy_config() {
    local file=$1 port=$2 first=$3 n=$4 opts=$5 work=${6:-} i
    cat >"$file" <<CFG
global
    maxconn 4096

defaults
    mode http
    option http-keep-alive
    timeout connect 5s
    timeout client 120s
    timeout server 120s
    timeout queue 60s

frontend fe
    bind 127.0.0.1:$port${BIND_OPTS:+ $BIND_OPTS}
CFG
    if [[ $work == same-work ]]; then
        cat >>"$file" <<CFG
    option forwardfor
    http-request set-header X-Forwarded-Host %[req.hdr(host)] unless { req.hdr(x-forwarded-host) -m found }
    http-request set-header X-Forwarded-Proto http unless { req.hdr(x-forwarded-proto) -m found }
    unique-id-format %[uuid()]
    unique-id-header X-Request-Id
    http-response set-header X-Request-Id %[unique-id]
    use_backend sd if { hdr(host) -m str -i ${HOST_HEADER:-sd.bench.local} }
CFG
    fi
    printf '    default_backend sd\n\nbackend sd\n' >>"$file"
    for ((i = 0; i < n; i++)); do
        printf '    server s%d 127.0.0.1:%d%s\n' $((i + 1)) $((first + i)) "${opts:+ $opts}" >>"$file"
    done
}
