#!/usr/bin/env python3
"""sdgate in front of real diffusion workers on GPUs: the measurements of issue 13.

Run by benches/gpu/run.sh on the GPU machine (see benches/gpu/RESULTS.md). All
traffic is on 127.0.0.1. Writes into $OUT (or --out):

  results.json   every figure, the per-request data and the /metrics timelines
  results.md     the tables
  pool.png       pool size and queue depth over time, scale 0..1 and 0..N runs
  sdgate.log     the logs of sdgate (with its workers' output) and of the
                 directly started worker

Parts (each skipped when too little time is left before --deadline):
  cold    cold start from zero through sdgate: request sent -> first image, split
          into sdgate's reaction, process start (interpreter + imports), CUDA init,
          model build, readiness -> dispatch, first generation, answer back
  onegpu  one GPU, the same load (hey -n 40 -c 8) through sdgate at
          container_concurrency 1 and 2, and with no gate at all, against one
          worker started with --concurrent (no lock: the worker runs whatever it
          is sent at once, so the gate alone decides); latency, images/s, GPU
          overlaps, peak GPU memory
  scale   the guides' `hey -n 50 -c 5 -t 180` from zero with scale 0..1 and 0..N
          (N = GPUs), then a warm `hey -n 40 -c 8`; /metrics scraped every 0.25 s
  large   onegpu again with 1024x1024 images (`hey -n 12 -c 4`)

benches/gpu/RESULTS.md has a run's figures and how it was made.
"""

import argparse
import http.client
import json
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(ROOT, "examples", "diffusers-worker", "worker.py")
HOST = "stable-diffusion.default.example.com"
GUIDES_BODY = '{"prompt": "pretty dog"}'
GATE_PORT, ADMIN_PORT, POOL_PORT_BASE, DIRECT_PORT = 18080, 19090, 17860, 17990
CLK_TCK = os.sysconf("SC_CLK_TCK")
T0 = time.time()
LOG_LOCK = threading.Lock()


def log(message):
    with LOG_LOCK:
        sys.stderr.write(f"[bench {time.time() - T0:7.1f}s] {message}\n")
        sys.stderr.flush()


# ---------------------------------------------------------------- small HTTP helpers
def http_call(port, method, path, body=None, timeout=30, host=None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"}
        if host:
            headers["Host"] = host
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        data = response.read()
        return response.status, data
    finally:
        connection.close()


def http_json(port, method, path, body=None, timeout=30):
    status, data = http_call(port, method, path, body, timeout)
    return status, json.loads(data) if data else {}


def wait_until(predicate, timeout, interval=0.1):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if predicate():
                return True
        except (OSError, http.client.HTTPException, ValueError):
            pass
        time.sleep(interval)
    return False


def percentile(values, q):
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def r(x, digits=3):
    return None if x is None else round(x, digits)


def proc_cpu_seconds(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime
    except (OSError, ValueError, IndexError):
        return None


# ---------------------------------------------------------------- GPU sampler
class GpuSampler:
    """nvidia-smi every 200 ms: memory used and utilisation per GPU."""

    def __init__(self):
        self.samples = []  # (t, index, memory_used_mib, utilization_pct)
        self.process = None
        if shutil.which("nvidia-smi"):
            self.process = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=index,memory.used,utilization.gpu", "--format=csv,noheader,nounits",
                 "-lms", "200"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            threading.Thread(target=self.read, daemon=True).start()

    def read(self):
        for line in self.process.stdout:
            try:
                index, memory, util = (int(float(x.strip())) for x in line.split(","))
            except ValueError:
                continue
            self.samples.append((time.time(), index, memory, util))

    def window(self, start, end, gpus=None):
        rows = [s for s in self.samples if start <= s[0] <= end and (gpus is None or s[1] in gpus)]
        if not rows:
            return {"peak_memory_used_mib": None, "mean_utilization_pct": None, "samples": 0}
        return {
            "peak_memory_used_mib": max(s[2] for s in rows),
            "mean_utilization_pct": r(statistics.mean(s[3] for s in rows), 1),
            "samples": len(rows),
        }

    def stop(self):
        if self.process:
            self.process.terminate()


# ---------------------------------------------------------------- processes
class Processes:
    def __init__(self, logdir):
        self.logdir = logdir
        self.live = []

    def start(self, name, argv, env=None):
        path = os.path.join(self.logdir, f"{name}.log")
        handle = open(path, "ab")
        handle.write(f"==== {name}: {shlex.join(argv)}\n".encode())
        handle.flush()
        full_env = dict(os.environ)
        full_env.update(env or {})
        process = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT,
                                   start_new_session=True)
        process.log_path = path
        self.live.append(process)
        return process

    def stop(self, process, grace=40):
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        if process in self.live:
            self.live.remove(process)

    def stop_all(self):
        for process in list(self.live):
            try:
                self.stop(process, grace=10)
            except Exception as error:  # noqa: BLE001
                log(f"stopping {process.pid}: {error}")


# ---------------------------------------------------------------- sdgate
def gate_config(path, backend, cc=1, scale_max=1, fast=True):
    if backend == "process":
        worker_args = ", ".join(json.dumps(a) for a in ARGS.worker_args)
        backend_yaml = f"""      process:
        command: ["{sys.executable}", "{WORKER}", {worker_args}, "--host", "127.0.0.1", "--port", "{{port}}"]
        env: {{ CUDA_VISIBLE_DEVICES: "{{index}}", PYTHONUNBUFFERED: "1" }}
        port_base: {POOL_PORT_BASE}
        host: 127.0.0.1
        stop_grace: 10s"""
    else:
        backend_yaml = f'      fixed: ["127.0.0.1:{DIRECT_PORT}"]'
    # As config/gpu-workers.yaml, with short autoscaler windows so a run shows
    # 0 -> N -> 0 within a minute, and the bench's loopback ports.
    windows = ("stable_window: 10s, panic_window: 4s, scale_to_zero_grace: 3s, tick: 1s" if fast
               else "stable_window: 120s, panic_window: 10s, scale_to_zero_grace: 300s")
    text = f"""# written by benches/gpu/bench.py (as config/gpu-workers.yaml, shorter windows)
listen: 127.0.0.1:{GATE_PORT}
admin: 127.0.0.1:{ADMIN_PORT}
drain_timeout: 30s
services:
  - name: stable-diffusion
    hosts: ["*"]
    container_concurrency: {cc}
    queue: {{ max_depth: 1000, timeout: 600s }}
    request_timeout: 600s
    bypass: ["/sdapi/v1/progress", "/sdapi/v1/interrupt", "/sdapi/v1/skip", "/internal/", "/file="]
    readiness: {{ http: /internal/ping, period: 25ms, ready_period: 1s, timeout: 2s }}
    scale: {{ min: 0, max: {scale_max}, {windows} }}
    backend:
{backend_yaml}
"""
    with open(path, "w") as f:
        f.write(text)
    return text


class Gate:
    def __init__(self, procs, name, config_text_path):
        self.procs = procs
        env = {"RUST_LOG": os.environ.get("RUST_LOG", "info")}
        self.process = procs.start(name, [ARGS.sdgate, "--config", config_text_path], env)
        self.pid = self.process.pid
        if not wait_until(lambda: http_call(ADMIN_PORT, "GET", "/healthz", timeout=2)[0] == 200, 20):
            raise RuntimeError(f"sdgate did not start (see {self.process.log_path})")

    def metrics(self):
        status, data = http_call(ADMIN_PORT, "GET", "/metrics", timeout=5)
        return parse_metrics(data.decode()) if status == 200 else {}

    def cpu(self):
        return proc_cpu_seconds(self.pid)

    def stop(self):
        self.procs.stop(self.process)


METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_metrics(text):
    out = {}
    for line in text.splitlines():
        match = METRIC_LINE.match(line)
        if not match or line.startswith("#"):
            continue
        name, labels, value = match.groups()
        state = re.search(r'state="([^"]*)"', labels or "")
        key = f"{name}[{state.group(1)}]" if state else name
        try:
            out[key] = out.get(key, 0.0) + float(value)
        except ValueError:
            pass
    return out


class Scraper:
    """sdgate's /metrics every 0.25 s: queue depth, endpoints, desired, in flight, CPU."""

    def __init__(self, gate, t_zero):
        self.gate, self.t_zero, self.rows = gate, t_zero, []
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop_event.is_set():
            t = time.time()
            try:
                m = self.gate.metrics()
                self.rows.append({
                    "t": r(t - self.t_zero, 3),
                    "queue_depth": m.get("sdgate_queue_depth", 0),
                    "ready": m.get("sdgate_endpoints[ready]", 0),
                    "not_ready": m.get("sdgate_endpoints[not_ready]", 0),
                    "draining": m.get("sdgate_endpoints[draining]", 0),
                    "desired": m.get("sdgate_desired_replicas", 0),
                    "inflight": m.get("sdgate_inflight_requests", 0),
                    "cpu_s": m.get("process_cpu_seconds_total"),
                })
            except (OSError, http.client.HTTPException):
                pass
            self.stop_event.wait(max(0.0, 0.25 - (time.time() - t)))

    def stop(self):
        self.stop_event.set()
        self.thread.join(timeout=5)
        return self.rows


# ---------------------------------------------------------------- load
def load(url_port, path, n, c, body, timeout_s=180, host=HOST):
    """hey -n N -c C (its CSV output), or the same in Python without hey.
    Returns wall time, per-request (latency, status) and the command."""
    url = f"http://127.0.0.1:{url_port}{path}"
    if ARGS.hey:
        argv = [ARGS.hey, "-n", str(n), "-c", str(c), "-t", str(timeout_s), "-m", "POST", "-host", host,
                "-T", "application/json", "-d", body, "-o", "csv", url]
        start = time.time()
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s + 120)
        wall = time.time() - start
        results = []
        for line in done.stdout.splitlines()[1:]:
            parts = line.split(",")
            if len(parts) >= 8:
                results.append({"latency_s": float(parts[0]), "status": int(parts[6]), "offset_s": float(parts[7])})
        shown = argv[:-3] + [url]  # without "-o csv"
        return {"tool": "hey", "command": shlex.join(shown), "wall_s": wall, "results": results,
                "errors": n - len(results), "stderr": done.stderr[-500:]}
    # Python fallback: C threads, each taking requests until N were sent.
    counter = {"next": 0}
    lock = threading.Lock()
    results = []
    start = time.time()

    def client():
        connection = None
        while True:
            with lock:
                if counter["next"] >= n:
                    break
                counter["next"] += 1
            t = time.time()
            try:
                if connection is None:
                    connection = http.client.HTTPConnection("127.0.0.1", url_port, timeout=timeout_s)
                connection.request("POST", path, body=body, headers={"Host": host, "Content-Type": "application/json"})
                response = connection.getresponse()
                response.read()
                status = response.status
            except (OSError, http.client.HTTPException):
                status = None
                connection = None
            with lock:
                if status is not None:
                    results.append({"latency_s": time.time() - t, "status": status, "offset_s": t - start})

    threads = [threading.Thread(target=client) for _ in range(c)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"tool": "python", "command": f"python load generator: -n {n} -c {c} POST {url} {body}",
            "wall_s": time.time() - start, "results": results, "errors": n - len(results), "stderr": ""}


def summarise_load(run, n):
    lat = [x["latency_s"] for x in run["results"] if x["status"] == 200]
    codes = {}
    for x in run["results"]:
        codes[str(x["status"])] = codes.get(str(x["status"]), 0) + 1
    return {
        "requests": n,
        "ok_200": len(lat),
        "codes": codes,
        "errors": run["errors"],
        "wall_s": r(run["wall_s"]),
        "images_per_s": r(len(lat) / run["wall_s"]) if run["wall_s"] > 0 else None,
        "latency_p50_s": r(percentile(lat, 0.5)),
        "latency_p99_s": r(percentile(lat, 0.99)),
        "latency_max_s": r(max(lat) if lat else None),
        "command": run["command"],
        "tool": run["tool"],
    }


def worker_stats(port):
    status, stats = http_json(port, "GET", "/worker/stats", timeout=10)
    return stats if status == 200 else {}


def worker_summary(stats):
    jobs = stats.get("jobs", [])
    gen = [j["generate_s"] + j["encode_s"] for j in jobs]
    keys = ("served", "max_inflight", "overlaps", "max_generating", "gpu_overlaps", "client_gone", "errors",
            "txt2img_connections")
    out = {k: stats.get(k) for k in keys}
    out["generation_p50_s"] = r(percentile(gen, 0.5))
    out["generation_p99_s"] = r(percentile(gen, 0.99))
    out["denoise_p50_s"] = r(percentile([j["denoise_s"] for j in jobs if "denoise_s" in j], 0.5))
    # per job: [wait, denoise (text encoder + UNet steps), VAE decode, PNG encode] seconds, the connection
    # (handler thread) it came on, the generation thread it ran on
    out["jobs"] = [[j.get("wait_s"), j.get("denoise_s"), j.get("decode_s"), j.get("encode_s"), j.get("connection"),
                    j.get("thread")] for j in jobs]
    out["cuda_peak_allocated_mib"] = (r(stats["cuda_peak_allocated_bytes"] / 2**20, 0)
                                      if stats.get("cuda_peak_allocated_bytes") is not None else None)
    out["cuda_peak_reserved_mib"] = (r(stats["cuda_peak_reserved_bytes"] / 2**20, 0)
                                     if stats.get("cuda_peak_reserved_bytes") is not None else None)
    return out


def time_left():
    return ARGS.deadline - (time.time() - T0)


# ---------------------------------------------------------------- parts
def part_cold(procs, gpu, results):
    runs = []
    cfg = os.path.join(ARGS.tmp, "cold.yaml")
    gate_config(cfg, "process", cc=1, scale_max=1, fast=False)
    for i in range(ARGS.cold_runs):
        if time_left() < 60:
            log("cold: out of time, stopping")
            break
        log(f"cold start {i + 1}/{ARGS.cold_runs}")
        gate = Gate(procs, "sdgate-cold", cfg)
        try:
            m0 = gate.metrics()
            if m0.get("sdgate_endpoints[ready]", 0) or m0.get("sdgate_endpoints[not_ready]", 0):
                log("cold: the pool is not empty at the start")
            t_send = time.time()
            status, data = http_call(GATE_PORT, "POST", "/sdapi/v1/txt2img", GUIDES_BODY, timeout=300, host=HOST)
            t_done = time.time()
            images = len(json.loads(data).get("images", [])) if status == 200 else 0
            stats = worker_stats(POOL_PORT_BASE)
            t2 = time.time()
            status2, _ = http_call(GATE_PORT, "POST", "/sdapi/v1/txt2img", GUIDES_BODY, timeout=300, host=HOST)
            warm_s = time.time() - t2
            stats2 = worker_stats(POOL_PORT_BASE)
            metrics = gate.metrics()
        finally:
            gate.stop()
        ph = stats.get("phases", {})

        def d(a, b):
            return r(ph[b] - ph[a]) if a in ph and b in ph else None

        warm_job = stats2.get("jobs", [{}])[-1] if stats2.get("jobs") else {}
        run = {
            "status": status,
            "images": images,
            "total_s": r(t_done - t_send),
            "split_s": {
                "sdgate_request_to_fork": r(ph["process_created_at"] - t_send) if "process_created_at" in ph else None,
                "process_start": d("process_created_at", "imports_done_at"),
                "cuda_init": d("imports_done_at", "cuda_ready_at"),
                "model_build": d("cuda_ready_at", "model_ready_at"),
                "ready_to_dispatch": d("model_ready_at", "first_generation_started_at"),
                "first_generation": d("first_generation_started_at", "first_generation_done_at"),
                "answer_back": r(t_done - ph["first_generation_done_at"]) if "first_generation_done_at" in ph else None,
            },
            "process_start_detail_s": {"interpreter": d("process_created_at", "main_started_at"),
                                       "imports": d("main_started_at", "imports_done_at")},
            "warm_request_s": r(warm_s) if status2 == 200 else None,
            "warm_generation_s": r(warm_job.get("generate_s", 0) + warm_job.get("encode_s", 0)) if warm_job else None,
            "sdgate_cold_start_seconds_sum": r(metrics.get("sdgate_cold_start_seconds_sum")),
            "worker_overlaps": stats2.get("overlaps"),
            "device": stats.get("device"),
            "model": stats.get("model"),
        }
        log(f"cold start {i + 1}: {run['total_s']} s, split {run['split_s']}")
        runs.append(run)
    if runs:
        keys = runs[0]["split_s"].keys()
        results["cold_start"] = {
            "runs": runs,
            "median_total_s": r(statistics.median(x["total_s"] for x in runs)),
            "median_split_s": {k: r(statistics.median(x["split_s"][k] for x in runs
                                                     if x["split_s"][k] is not None)) for k in keys},
            "note": "first run: the OS file cache is cold (Python, torch and diffusers read from disk)",
        }


def part_onegpu(procs, gpu, results, key="one_gpu", body=None, n=None, c=None):
    body, n, c = body or GUIDES_BODY, n or ARGS.n, c or ARGS.c
    log(f"one GPU ({key}): starting a --concurrent worker on GPU 0")
    worker = procs.start("worker-direct", [sys.executable, WORKER, *ARGS.worker_args, "--concurrent", "--host",
                                           "127.0.0.1", "--port", str(DIRECT_PORT)],
                         {"CUDA_VISIBLE_DEVICES": "0", "PYTHONUNBUFFERED": "1"})
    try:
        if not wait_until(lambda: http_call(DIRECT_PORT, "GET", "/internal/ping", timeout=2)[0] == 200, 180, 0.25):
            raise RuntimeError("the direct worker did not become ready")
        # Warm-up: c at once (each of the worker's generation threads makes its
        # CUDA handles once), then two alone.
        warmers = [threading.Thread(target=http_call, args=(DIRECT_PORT, "POST", "/sdapi/v1/txt2img", body, 300))
                   for _ in range(c)]
        for thread in warmers:
            thread.start()
        for thread in warmers:
            thread.join()
        for _ in range(2):
            http_call(DIRECT_PORT, "POST", "/sdapi/v1/txt2img", body, timeout=120)
        modes = []
        for mode, cc in (("sdgate cc=1", 1), ("sdgate cc=2", 2), ("no gate", None)):
            if time_left() < 45:
                log(f"one GPU: out of time before {mode}")
                break
            gate = None
            if cc is not None:
                cfg = os.path.join(ARGS.tmp, f"cc{cc}.yaml")
                gate_config(cfg, "fixed", cc=cc, scale_max=1)
                gate = Gate(procs, f"sdgate-cc{cc}", cfg)
                wait_until(lambda: gate.metrics().get("sdgate_endpoints[ready]", 0) >= 1, 10)
            http_json(DIRECT_PORT, "POST", "/worker/reset", "{}")
            cpu0 = gate.cpu() if gate else None
            start = time.time()
            run = load(GATE_PORT if gate else DIRECT_PORT, "/sdapi/v1/txt2img", n, c, body)
            end = time.time()
            cpu1 = gate.cpu() if gate else None
            if gate:
                gate.stop()
            row = {"mode": mode, **summarise_load(run, n), **worker_summary(worker_stats(DIRECT_PORT)),
                   **{f"gpu_{k}": v for k, v in GPU.window(start, end, {0}).items()}}
            if gate:
                row["sdgate_cpu_s"] = r(cpu1 - cpu0, 3) if cpu0 is not None and cpu1 is not None else None
            log(f"one GPU, {mode}: {json.dumps({k: row[k] for k in ('images_per_s', 'latency_p50_s', 'latency_p99_s', 'max_generating', 'gpu_overlaps', 'gpu_peak_memory_used_mib')})}")
            modes.append(row)
            results[key] = {"load": f"-n {n} -c {c}", "body": body, "rows": modes,
                                  "worker": "one worker with --concurrent (no lock): at cc=1 only the gate keeps "
                                            "generations apart"}
            write_outputs(results)
    finally:
        procs.stop(worker)


def part_scale(procs, gpu, results, gpus):
    runs = []
    pools = [1] + ([gpus] if gpus >= 2 else [])
    for pool in pools:
        if time_left() < 90:
            log(f"scale: out of time before 0..{pool}")
            break
        log(f"scale 0..{pool}: the guides' hey -n 50 -c 5 from zero")
        cfg = os.path.join(ARGS.tmp, f"scale{pool}.yaml")
        gate_config(cfg, "process", cc=1, scale_max=pool, fast=True)
        gate = Gate(procs, f"sdgate-scale{pool}", cfg)
        try:
            t_zero = time.time()
            scraper = Scraper(gate, t_zero)
            cpu0 = gate.cpu()
            cold = load(GATE_PORT, "/sdapi/v1/txt2img", ARGS.guides_n, ARGS.guides_c, GUIDES_BODY, timeout_s=180)
            t_cold_end = time.time()
            cpu1 = gate.cpu()
            warm = None
            if time_left() > 60:
                warm = load(GATE_PORT, "/sdapi/v1/txt2img", ARGS.n, ARGS.c, GUIDES_BODY)
            t_warm_end = time.time()
            cpu2 = gate.cpu()
            stats = []
            for i in range(pool):
                try:
                    stats.append({"worker": i, **worker_summary(worker_stats(POOL_PORT_BASE + i))})
                except (OSError, http.client.HTTPException, ValueError):
                    stats.append({"worker": i, "served": None})
            # Watch the pool go back to zero (bounded).
            wait_until(lambda: (scraper.rows and scraper.rows[-1]["ready"] == 0
                                and scraper.rows[-1]["not_ready"] == 0 and scraper.rows[-1]["draining"] == 0),
                       min(45, max(0, time_left() - 60)), 0.5)
            timeline = scraper.stop()
            cpu3 = gate.cpu()
        finally:
            gate.stop()
        run = {
            "pool": f"0..{pool}",
            "gpus": pool,
            "from_zero": summarise_load(cold, ARGS.guides_n),
            "from_zero_ended_at_s": r(t_cold_end - t_zero),
            "warm": summarise_load(warm, ARGS.n) if warm else None,
            "warm_ended_at_s": r(t_warm_end - t_zero),
            "workers": stats,
            "gpu": GPU.window(t_zero, t_warm_end),
            "sdgate_cpu_s": {"from_zero": r(cpu1 - cpu0), "warm": r(cpu2 - cpu1), "whole_run": r(cpu3 - cpu0),
                             "whole_run_wall_s": r(time.time() - t_zero)},
            "max_ready": max((x["ready"] for x in timeline), default=0),
            "max_queue_depth": max((x["queue_depth"] for x in timeline), default=0),
            "back_to_zero_at_s": next((x["t"] for x in timeline if x["t"] > t_warm_end - t_zero and x["ready"] == 0
                                       and x["not_ready"] == 0 and x["draining"] == 0), None),
            "first_ready_at_s": next((x["t"] for x in timeline if x["ready"] >= 1), None),
            "all_ready_at_s": next((x["t"] for x in timeline if x["ready"] >= pool), None),
            "timeline": timeline,
        }
        log(f"scale 0..{pool}: from zero {run['from_zero']['images_per_s']} img/s, "
            f"warm {run['warm']['images_per_s'] if run['warm'] else None} img/s, workers {stats}")
        runs.append(run)
        results["scale"] = runs
        write_outputs(results)


# ---------------------------------------------------------------- outputs
def fmt(x, unit=""):
    if x is None:
        return "n/a"
    if unit == " s" and isinstance(x, float) and abs(x) < 0.01:
        return "<0.01 s"  # e.g. /proc start times have 10 ms resolution
    if isinstance(x, float):
        return f"{x:.3g}{unit}" if abs(x) < 100 else f"{x:.0f}{unit}"
    return f"{x}{unit}"


def write_markdown(results):
    env = results["environment"]
    lines = [f"# sdgate on GPUs: {env.get('gpu_name')} x{env.get('gpus')}, {env.get('date')}", ""]
    lines.append(f"Model: {env.get('model')}; torch {env.get('torch')}, diffusers {env.get('diffusers')}, "
                 f"driver {env.get('driver')}. Requests: `{GUIDES_BODY}` (the worker's defaults: 512x512, "
                 f"20 DDIM steps, classifier-free guidance, batch 1). Load: {env.get('load_tool')}.")
    lines.append("")
    cold = results.get("cold_start")
    if cold:
        lines += ["## Cold start from zero (request sent -> first image, through sdgate)", "",
                  "| run | total | sdgate: request -> fork | process start (Python + imports) | CUDA init | "
                  "model build | ready -> dispatch | first generation | answer back | warm generation |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for i, run in enumerate(cold["runs"], 1):
            s = run["split_s"]
            lines.append(f"| {i} | {fmt(run['total_s'], ' s')} | {fmt(s['sdgate_request_to_fork'], ' s')} | "
                         f"{fmt(s['process_start'], ' s')} | {fmt(s['cuda_init'], ' s')} | {fmt(s['model_build'], ' s')} | "
                         f"{fmt(s['ready_to_dispatch'], ' s')} | {fmt(s['first_generation'], ' s')} | "
                         f"{fmt(s['answer_back'], ' s')} | {fmt(run['warm_generation_s'], ' s')} |")
        m = cold["median_split_s"]
        lines.append(f"| median | {fmt(cold['median_total_s'], ' s')} | {fmt(m['sdgate_request_to_fork'], ' s')} | "
                     f"{fmt(m['process_start'], ' s')} | {fmt(m['cuda_init'], ' s')} | {fmt(m['model_build'], ' s')} | "
                     f"{fmt(m['ready_to_dispatch'], ' s')} | {fmt(m['first_generation'], ' s')} | "
                     f"{fmt(m['answer_back'], ' s')} | |")
        lines += ["", f"({cold['note']}.)", ""]
    for key in ("one_gpu", "one_gpu_large"):
        one = results.get(key)
        if not one:
            continue
        lines += [f"## One GPU: the same load (`hey {one['load']}`, body `{one['body']}`) three ways", "",
                  f"({one['worker']}.)", "",
                  "| path | 200s | makespan | images/s | latency p50 | p99 | generation p50 (in worker) | "
                  "most generations at once | GPU overlaps | peak GPU memory (nvidia-smi) | torch peak allocated | "
                  "GPU util | sdgate CPU | connections that carried txt2img |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for row in one["rows"]:
            lines.append(f"| {row['mode']} | {row['ok_200']}/{row['requests']} | {fmt(row['wall_s'], ' s')} | "
                         f"{fmt(row['images_per_s'])} | {fmt(row['latency_p50_s'], ' s')} | "
                         f"{fmt(row['latency_p99_s'], ' s')} | {fmt(row['generation_p50_s'], ' s')} | "
                         f"{fmt(row['max_generating'])} | {fmt(row['gpu_overlaps'])} | "
                         f"{fmt(row['gpu_peak_memory_used_mib'], ' MiB')} | {fmt(row['cuda_peak_allocated_mib'], ' MiB')} | "
                         f"{fmt(row['gpu_mean_utilization_pct'], ' %')} | {fmt(row.get('sdgate_cpu_s'), ' s')} | "
                         f"{fmt(row.get('txt2img_connections'))} |")
        lines.append("")
    scale = results.get("scale")
    if scale:
        lines += ["## Pools from zero: the guides' load, then a warm one", "",
                  "| pool | run | 200s | makespan | images/s | latency p50 | p99 | served per worker | "
                  "overlaps per worker | connections per worker | sdgate CPU |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- | --- | ---: |"]
        for run in scale:
            served = " / ".join(fmt(w.get("served")) for w in run["workers"])
            overlaps = " / ".join(fmt(w.get("overlaps")) for w in run["workers"])
            connections = " / ".join(fmt(w.get("txt2img_connections")) for w in run["workers"])
            for label, key, cpu in ((f"from zero: -n {ARGS.guides_n} -c {ARGS.guides_c}", "from_zero",
                                     run["sdgate_cpu_s"]["from_zero"]),
                                    (f"warm: -n {ARGS.n} -c {ARGS.c}", "warm", run["sdgate_cpu_s"]["warm"])):
                s = run.get(key)
                if not s:
                    continue
                lines.append(f"| {run['pool']} | {label} | {s['ok_200']}/{s['requests']} | {fmt(s['wall_s'], ' s')} | "
                             f"{fmt(s['images_per_s'])} | {fmt(s['latency_p50_s'], ' s')} | {fmt(s['latency_p99_s'], ' s')} | "
                             f"{served} | {overlaps} | {connections} | {fmt(cpu, ' s')} |")
        lines.append("")
        lines.append("(served, overlaps and connections per worker count both runs of the pool.)")
        for run in scale:
            c = run["sdgate_cpu_s"]
            lines.append(f"- pool {run['pool']}: first worker ready at {fmt(run['first_ready_at_s'], ' s')}, "
                         f"all {run['gpus']} at {fmt(run['all_ready_at_s'], ' s')}, max queue depth "
                         f"{fmt(run['max_queue_depth'])}, back to zero at {fmt(run['back_to_zero_at_s'], ' s')}; "
                         f"sdgate used {fmt(c['whole_run'], ' s')} of CPU over {fmt(c['whole_run_wall_s'], ' s')}.")
        lines += ["", "![pool size and queue depth over time](pool.png)", ""]
    lines += ["Commands: `" + results["command"] + "`", ""]
    return "\n".join(lines)


def plot(results, path):
    scale = results.get("scale") or []
    if not scale:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        log(f"no plot: {error}")
        return None
    fig, axes = plt.subplots(len(scale), 1, figsize=(12, 3.6 * len(scale)), squeeze=False)
    for ax, run in zip(axes[:, 0], scale):
        tl = run["timeline"]
        t = [x["t"] for x in tl]
        ax.step(t, [x["ready"] for x in tl], where="post", label="workers ready", color="tab:green", linewidth=2)
        ax.fill_between(t, [x["ready"] for x in tl], [x["ready"] + x["not_ready"] for x in tl], step="post",
                        color="tab:olive", alpha=0.3, label="workers starting (not ready)")
        ax.step(t, [x["desired"] for x in tl], where="post", label="desired replicas", color="tab:blue", linestyle="--")
        ax.step(t, [x["queue_depth"] for x in tl], where="post", label="queue depth", color="tab:red")
        ax.step(t, [x["inflight"] for x in tl], where="post", label="in flight", color="tab:purple", alpha=0.5)
        ax.axvline(run["from_zero_ended_at_s"], color="grey", linestyle="-.", linewidth=1)
        ax.text(run["from_zero_ended_at_s"], ax.get_ylim()[1] * 0.95, " the guides' run done", fontsize=8, color="grey",
                va="top")
        if run.get("warm"):
            ax.axvline(run["warm_ended_at_s"], color="grey", linestyle="-.", linewidth=1)
            ax.text(run["warm_ended_at_s"], ax.get_ylim()[1] * 0.8, " warm run done", fontsize=8, color="grey", va="top")
        ax.set_title(f"scale {run['pool']} ({results['environment'].get('gpu_name')}): hey -n {ARGS.guides_n} "
                     f"-c {ARGS.guides_c} from zero, then -n {ARGS.n} -c {ARGS.c}", fontsize=10)
        ax.set_xlabel("seconds since the first request")
        ax.set_ylabel("count")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def write_outputs(results):
    with open(os.path.join(ARGS.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(ARGS.out, "results.md"), "w") as f:
        f.write(write_markdown(results))


def environment(gpus):
    env = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "gpus": gpus, "cpus": os.cpu_count(),
           "python": sys.version.split()[0], "worker_args": ARGS.worker_args,
           "load_tool": "hey" if ARGS.hey else "Python load generator (no hey)"}
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True).stdout.strip().splitlines()
        if q:
            name, memory, driver = (x.strip() for x in q[0].split(","))
            env.update(gpu_name=name, gpu_memory=memory, driver=driver, gpu_list=q)
    try:
        versions = subprocess.run([sys.executable, "-c", "import torch, diffusers; print(torch.__version__, diffusers.__version__)"],
                                  capture_output=True, text=True, timeout=120).stdout.split()
        env["torch"], env["diffusers"] = versions[0], versions[1]
    except (IndexError, subprocess.TimeoutExpired):
        pass
    env.setdefault("gpu_name", "cpu")
    return env


def main():
    global ARGS, GPU, GUIDES_BODY
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu-bench-out"))
    parser.add_argument("--sdgate", default=os.path.join(ROOT, "target", "release", "sdgate"))
    parser.add_argument("--hey", default=shutil.which("hey"))
    parser.add_argument("--worker-args", default="--random-weights", help="model arguments of the worker")
    parser.add_argument("--gpus", type=int, default=None, help="default: nvidia-smi -L")
    parser.add_argument("--parts", default="cold,onegpu,scale,large")
    parser.add_argument("--large-body", default='{"prompt": "pretty dog", "width": 1024, "height": 1024}',
                        help="the body of the 'large' part: the one-GPU comparison with bigger images")
    parser.add_argument("--large-n", type=int, default=12)
    parser.add_argument("--large-c", type=int, default=4)
    parser.add_argument("--cold-runs", type=int, default=3)
    parser.add_argument("-n", type=int, default=40)
    parser.add_argument("-c", type=int, default=8)
    parser.add_argument("--guides-n", type=int, default=50)
    parser.add_argument("--guides-c", type=int, default=5)
    parser.add_argument("--body", default=GUIDES_BODY, help="the txt2img body (default: the guides')")
    parser.add_argument("--deadline", type=float, default=540, help="seconds; parts that would not fit are skipped")
    ARGS = parser.parse_args()
    GUIDES_BODY = ARGS.body
    ARGS.worker_args = shlex.split(ARGS.worker_args)
    os.makedirs(ARGS.out, exist_ok=True)
    ARGS.tmp = os.path.join("/tmp", f"gpu-bench-{os.getpid()}")
    os.makedirs(ARGS.tmp, exist_ok=True)
    gpus = ARGS.gpus
    if gpus is None:
        gpus = 0
        if shutil.which("nvidia-smi"):
            gpus = sum(1 for x in subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.splitlines()
                       if x.startswith("GPU "))
    results = {"environment": environment(gpus), "command": " ".join(shlex.quote(a) for a in sys.argv)}
    log(f"environment: {json.dumps(results['environment'])}")
    GPU = GpuSampler()
    procs = Processes(ARGS.tmp)
    parts = ARGS.parts.split(",")

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        large = lambda p, g, res: part_onegpu(p, g, res, "one_gpu_large", ARGS.large_body, ARGS.large_n, ARGS.large_c)
        for name, fn in (("cold", part_cold), ("onegpu", part_onegpu), ("scale", part_scale), ("large", large)):
            if name not in parts:
                continue
            if name == "large" and time_left() < 100:
                log("large: out of time, skipped")
                continue
            try:
                if name == "scale":
                    fn(procs, GPU, results, max(gpus, 1))
                else:
                    fn(procs, GPU, results)
            except Exception as error:  # noqa: BLE001
                log(f"part {name} failed: {type(error).__name__}: {error}")
                results.setdefault("failures", []).append(f"{name}: {type(error).__name__}: {error}")
                procs.stop_all()
            write_outputs(results)
    except KeyboardInterrupt:
        results.setdefault("failures", []).append("interrupted")
    finally:
        procs.stop_all()
        GPU.stop()
        results["environment"]["model"] = next((x.get("model") for x in results.get("cold_start", {}).get("runs", [])),
                                               None)
        write_outputs(results)
        try:
            plot(results, os.path.join(ARGS.out, "pool.png"))
        except Exception as error:  # noqa: BLE001
            log(f"plot failed: {error}")
        with open(os.path.join(ARGS.out, "sdgate.log"), "wb") as out:
            for name in sorted(os.listdir(ARGS.tmp)):
                if name.endswith(".log"):
                    with open(os.path.join(ARGS.tmp, name), "rb") as f:
                        out.write(f.read()[-2_000_000:])
        print(open(os.path.join(ARGS.out, "results.md")).read())


if __name__ == "__main__":
    main()
