#!/usr/bin/env python3
"""Load for benches/fairness.sh: one greedy client and light clients.

  fairness_load.py URL HOST [--greedy N] [--light K] [--each M] [--steps S]
                   [--batch-host H]

The greedy client sends N txt2img requests at once (header X-Api-Key:
greedy; with --batch-host, to that host, as batch work); 50 ms later K light
clients each send M requests one after another (X-Api-Key: light-i). Prints
JSON: per-request latencies of the light clients, each client's throughput,
Jain's fairness index over the clients' throughputs, and the failures.
Standard library only; every request goes to 127.0.0.1.
"""

import argparse
import json
import threading
import time
import urllib.error
import urllib.request


def post(url, host, key, steps):
    body = json.dumps({"prompt": key, "steps": steps}).encode()
    request = urllib.request.Request(url, data=body, method="POST")
    request.add_header("Host", host)
    request.add_header("Content-Type", "application/json")
    request.add_header("X-Api-Key", key)
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=300) as answer:
            answer.read()
            status = answer.status
    except urllib.error.HTTPError as error:
        status = error.code
    except OSError:
        status = 0
    return status, time.monotonic() - started


def percentile(values, p):
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, int(round(p / 100 * len(ordered) + 0.5)) - 1))
    return ordered[rank]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("host")
    parser.add_argument("--greedy", type=int, default=40)
    parser.add_argument("--light", type=int, default=4)
    parser.add_argument("--each", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-host", default=None)
    args = parser.parse_args()

    lock = threading.Lock()
    results = {}  # client -> list of (status, latency, ended_at)
    origin = time.monotonic()

    def record(client, status, latency):
        with lock:
            results.setdefault(client, []).append((status, latency, time.monotonic() - origin))

    def greedy_one():
        status, latency = post(args.url, args.batch_host or args.host, "greedy", args.steps)
        record("greedy", status, latency)

    def light(i):
        for _ in range(args.each):
            status, latency = post(args.url, args.host, f"light-{i}", args.steps)
            record(f"light-{i}", status, latency)

    threads = [threading.Thread(target=greedy_one) for _ in range(args.greedy)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    started_light = time.monotonic() - origin
    light_threads = [threading.Thread(target=light, args=(i,)) for i in range(args.light)]
    for t in light_threads:
        t.start()
    for t in threads + light_threads:
        t.join()

    throughput = {}
    for client, answers in results.items():
        start = started_light if client.startswith("light") else 0.0
        span = max(ended for _, _, ended in answers) - start
        throughput[client] = len(answers) / span if span > 0 else 0.0
    values = list(throughput.values())
    jain = sum(values) ** 2 / (len(values) * sum(v * v for v in values)) if values else None
    light_latencies = [lat for c, a in results.items() if c.startswith("light") for _, lat, _ in a]
    failures = sum(1 for a in results.values() for status, _, _ in a if status != 200)
    print(json.dumps({
        "light_p50": percentile(light_latencies, 50),
        "light_p95": percentile(light_latencies, 95),
        "light_max": max(light_latencies) if light_latencies else None,
        "greedy_done_s": max((e for _, _, e in results.get("greedy", [])), default=None),
        "jain": jain,
        "throughput": throughput,
        "failures": failures,
        "requests": sum(len(a) for a in results.values()),
    }))


if __name__ == "__main__":
    main()
