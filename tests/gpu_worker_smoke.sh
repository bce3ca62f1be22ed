#!/usr/bin/env bash
# CPU smoke test of the diffusers worker (examples/diffusers-worker/worker.py):
# starts it with `--random-weights --tiny --device cpu` on a loopback port,
# checks that /internal/ping turns 200 once the model is built, that a 2-step
# txt2img answers a decodable PNG of the asked size, that /sdapi/v1/progress
# reports the running generation (job_count 1, a real sampling step) and goes
# back to idle, and that /worker/stats counted the generations without overlap.
#
# Needs a Python with torch and diffusers (transformers is optional). Without
# them it prints `SKIP: ...` and exits 0: CI does not install them (PyPI's torch
# for Linux pulls ~3 GB of CUDA wheels). To run it, point PYTHON at one:
#   PYTHON=/path/to/venv/bin/python bash tests/gpu_worker_smoke.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if ! command -v "$PY" >/dev/null 2>&1; then
    echo "SKIP: gpu_worker_smoke: no $PY on PATH (set PYTHON to a Python with torch and diffusers)"
    exit 0
fi
if ! missing=$("$PY" -c 'import torch, diffusers' 2>&1); then
    echo "SKIP: gpu_worker_smoke: $PY cannot import torch and diffusers ($(printf '%s' "$missing" | tail -n 1)); set PYTHON to a Python that has them"
    exit 0
fi

TMP=$(mktemp -d /tmp/gpu-worker-smoke.XXXXXX)
WORKER_PID=
cleanup() {
    if [ -n "$WORKER_PID" ] && kill -0 "$WORKER_PID" 2>/dev/null; then
        kill -TERM "$WORKER_PID" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$WORKER_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$WORKER_PID" 2>/dev/null || true
    fi
    rm -rf "$TMP"
}
trap cleanup EXIT

PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
echo "== gpu_worker_smoke: worker on 127.0.0.1:$PORT ($PY)"
PYTHONUNBUFFERED=1 "$PY" examples/diffusers-worker/worker.py \
    --random-weights --tiny --device cpu --host 127.0.0.1 --port "$PORT" >"$TMP/worker.log" 2>&1 &
WORKER_PID=$!

set +e
PORT=$PORT WORKER_PID=$WORKER_PID timeout 300 "$PY" - <<'EOF'
import base64, io, json, os, threading, time, urllib.error, urllib.request

base = "http://127.0.0.1:%s" % os.environ["PORT"]
pid = int(os.environ["WORKER_PID"])
passed = failed = 0


def check(name, ok, detail=""):
    global passed, failed
    if ok:
        passed += 1
        print("ok   " + name)
    else:
        failed += 1
        print("FAIL " + name + (": " + detail if detail else ""))


def call(method, path, body=None, timeout=60):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


# 1. /internal/ping: 503 while loading (if we are early enough), then 200.
deadline = time.time() + 240
codes = set()
while time.time() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        break
    try:
        code, _ = call("GET", "/internal/ping", timeout=5)
        codes.add(code)
        if code == 200:
            break
    except (OSError, ValueError):
        pass
    time.sleep(0.2)
check("/internal/ping answers 200 once the model is built", 200 in codes, "codes seen: %s" % sorted(codes))
if 200 not in codes:
    print("%d passed, %d failed" % (passed, failed))
    raise SystemExit(1)

# 2. one txt2img, 2 steps: a decodable PNG of the asked size.
code, answer = call("POST", "/sdapi/v1/txt2img",
                    {"prompt": "pretty dog", "steps": 2, "width": 64, "height": 64, "seed": 7, "batch_size": 1})
png = base64.b64decode(answer["images"][0]) if code == 200 and answer.get("images") else b""
size = None
try:
    from PIL import Image

    size = Image.open(io.BytesIO(png)).size
except Exception as error:  # noqa: BLE001
    size = "undecodable: %s" % error
check("txt2img answers one decodable 64x64 PNG", code == 200 and png[:8] == b"\x89PNG\r\n\x1a\n" and size == (64, 64),
      "status %s, size %s" % (code, size))
info = json.loads(answer.get("info", "{}")) if code == 200 else {}
check("info and parameters echo the request", info.get("steps") == 2 and info.get("seed") == 7
      and answer.get("parameters", {}).get("prompt") == "pretty dog", str(info)[:200])

# 3. progress during a longer generation: job_count 1 and a real step.
result = {}
thread = threading.Thread(target=lambda: result.update(
    answer=call("POST", "/sdapi/v1/txt2img", {"prompt": "cat", "steps": 40, "width": 64, "height": 64}, timeout=120)))
thread.start()
seen = []
deadline = time.time() + 120
while thread.is_alive() and time.time() < deadline:
    code, progress = call("GET", "/sdapi/v1/progress", timeout=5)
    state = progress.get("state", {})
    seen.append((code, state.get("job_count"), state.get("sampling_step"), state.get("sampling_steps")))
    time.sleep(0.02)
thread.join(timeout=120)
running = [s for s in seen if s[0] == 200 and s[1] == 1 and s[3] == 40]
stepping = [s for s in running if 0 < s[2] <= 40]
check("/sdapi/v1/progress reports the running generation (job_count 1, sampling_steps 40, a step > 0)",
      bool(stepping), "polls: %d, last: %s" % (len(seen), seen[-3:]))
code, idle = call("GET", "/sdapi/v1/progress")
check("/sdapi/v1/progress is idle afterwards", code == 200 and idle["state"]["job_count"] == 0
      and result.get("answer", (0,))[0] == 200, str(idle)[:200])

# 4. stats: two served, none overlapping.
code, stats = call("GET", "/worker/stats")
check("/worker/stats: served 2, overlaps 0, phases timed",
      code == 200 and stats["served"] == 2 and stats["overlaps"] == 0 and stats["gpu_overlaps"] == 0
      and stats["phase_seconds"]["model_build"] is not None,
      str({k: stats.get(k) for k in ("served", "overlaps", "gpu_overlaps", "phase_seconds")}))
print("gpu_worker_smoke: %d passed, %d failed" % (passed, failed))
raise SystemExit(1 if failed else 0)
EOF
status=$?
set -e
if [ "$status" -ne 0 ]; then
    echo "== gpu_worker_smoke: FAILED (status $status); worker log:"
    cat "$TMP/worker.log"
    exit 1
fi
