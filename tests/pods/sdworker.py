"""The fake Stable Diffusion worker that webui_app.py and comfy_app.py serve.

It is `sdgate sim` (src/tools/sim.rs) in Python: the same checkpoint
semantics, counters and test hooks, so that sdgate's tests can run against
any of the three. Each app only puts it on its own server stack.

Generations are serialised on one lock, as the WebUI's `queue_lock` does,
and run in a thread of their own: a generation whose client has left runs to
its end. Times of jobs are microseconds of the monotonic clock, which all
processes of a machine share.
"""

import argparse
import base64
import collections
import contextlib
import hashlib
import ipaddress
import json
import re
import socket
import struct
import sys
import threading
import time
import zlib

JOB_HISTORY = 1000

# The extensions checkpoint files have (src/gate/models.rs).
EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf")

# What Rust's str::trim strips (char::is_whitespace); str.strip() would also
# strip \x1c-\x1f.
RUST_WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000"

# A 1x1 grey PNG (signature, IHDR, IDAT), then IEND: as sim.rs.
PNG_HEAD = bytes.fromhex(
    "89504e470d0a1a0a"
    "0000000d49484452000000010000000108000000003a7e9b55"
    "0000000a49444154789c636800000082008177cd72b6"
)
PNG_END = bytes.fromhex("0000000049454e44ae426082")

DURATION_UNITS = {
    "ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3,
    "s": 1.0, "sec": 1.0, "secs": 1.0, "m": 60.0, "min": 60.0, "mins": 60.0,
    "h": 3600.0, "hr": 3600.0, "hrs": 3600.0,
}
DURATION_PART = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ns|us|µs|ms|secs|sec|s|mins|min|m|hrs|hr|h)")


def normalize_checkpoint(name):
    """A checkpoint's model name, as `normalize_checkpoint` in src/gate/models.rs:
    the `[hash]` suffix and the extension dropped, directory separators as `_`."""
    name = name.strip(RUST_WHITESPACE)
    bracket = name.rfind(" [")
    if name.endswith("]") and bracket >= 0:
        name = name[:bracket].rstrip(RUST_WHITESPACE)
    for extension in EXTENSIONS:
        tail = name[-len(extension):]
        # ASCII only: Rust compares bytes, and "\u212a".lower() is "k".
        if len(name) > len(extension) and tail.isascii() and tail.lower() == extension:
            name = name[: -len(extension)]
            break
    return name.replace("/", "_").replace("\\", "_")


def short_hash(name):
    """A stand-in for a checkpoint's short hash: 10 hex digits of FNV-1a, as sim.rs."""
    value = 0xCBF29CE484222325
    for byte in name.encode():
        value = ((value ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{value & 0xFFFFFFFFFF:010x}"


def title(name):
    """A checkpoint's title as the WebUI writes it: file name and short hash."""
    return f"{name}.safetensors [{short_hash(name)}]"


def png_base64(size):
    """A decodable PNG in base64 of about `size` characters, byte for byte the
    sim's: a 1x1 image padded by a private ancillary chunk that decoders skip."""
    padding = max(size * 3 // 4 - (len(PNG_HEAD) + len(PNG_END) + 12), 0)
    chunk = b"sdPd" + bytes(padding)
    png = PNG_HEAD + struct.pack(">I", padding) + chunk + struct.pack(">I", zlib.crc32(chunk)) + PNG_END
    return base64.b64encode(png).decode()


def parse_duration(text):
    """Seconds in a duration such as "50ms", "1.5s" or "1m 30s"."""
    seconds, at = 0.0, 0
    while at < len(text):
        part = DURATION_PART.match(text, at)
        if part is None:
            raise argparse.ArgumentTypeError(f"not a duration: {text!r}")
        seconds += float(part[1]) * DURATION_UNITS[part[2]]
        at = part.end()
    if at == 0:
        raise argparse.ArgumentTypeError("empty duration")
    return seconds


def query_number(value, default):
    """A query parameter as the sim reads it: a u64, else the default."""
    if value is None or not re.fullmatch(r"\+?[0-9]+", value) or int(value) >= 2**64:
        return default
    return int(value)


def large_body(size):
    """The `size` bytes of `/sim/large`, in chunks."""
    chunk = b"x" * 65536
    for start in range(0, size, len(chunk)):
        yield chunk[: size - start]


def now_us():
    return time.monotonic_ns() // 1000


def parse_args(description, keep_alive_default, keep_alive_help):
    """The command line of `sdgate sim`, plus --keep-alive."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--port", type=int, required=True, help="port to listen on")
    parser.add_argument("--host", type=ipaddress.ip_address, default="127.0.0.1", help="address to listen on")
    parser.add_argument("--step-time", type=parse_duration, default="50ms",
                        help='time per sampling step ("50ms"); a request\'s `steps` defaults to 20')
    parser.add_argument("--image-bytes", type=int, default=65536, help="size of the base64 image in each answer")
    parser.add_argument("--startup-delay", type=parse_duration, default="0s",
                        help="wait this long before opening the port (a model loading)")
    parser.add_argument("--name", help="name sent in the X-Worker header (default sim-PORT)")
    parser.add_argument("--checkpoint", default="sim", help="the checkpoint it holds at start")
    parser.add_argument("--load-time", type=parse_duration, default="0s", help="time a checkpoint load takes")
    parser.add_argument("--keep-alive", type=float, default=keep_alive_default, help=keep_alive_help)
    parser.add_argument("--available", default="",
                        help="comma-separated checkpoints it has (default: any name); a request naming another "
                             "runs on the setting, as the WebUI does (SimOptions.available)")
    return parser.parse_args()


def start(args):
    """Waits --startup-delay (a model loading), opens the port, says so on
    stderr as the tests wait for, and makes the worker, named after the port."""
    time.sleep(args.startup_delay)
    host = args.host
    family = socket.AF_INET6 if host.version == 6 else socket.AF_INET
    sock = socket.create_server((str(host), args.port), family=family)
    port = sock.getsockname()[1]
    print(f"listening on {f'[{host}]' if host.version == 6 else host}:{port}", file=sys.stderr, flush=True)
    worker = Worker(args.name or f"sim-{port}", args.checkpoint, args.step_time, args.load_time, args.image_bytes)
    worker.available = [normalize_checkpoint(name) for name in args.available.split(",") if name.strip()]
    return sock, worker


class Worker:
    """One fake WebUI: its checkpoint, its generation lock and its counters."""

    def __init__(self, name, checkpoint, step_time, load_time, image_bytes):
        self.name = name
        self.step_time = step_time
        self.load_time = load_time
        self.image = png_base64(image_bytes)
        self.preview = png_base64(0)
        checkpoint = normalize_checkpoint(checkpoint)
        # The checkpoint in memory, and the setting (`sd_model_checkpoint`):
        # changed under the generation lock.
        self.loaded = checkpoint
        self.setting = checkpoint
        self.known = [checkpoint]
        # The checkpoints it has (empty: any name is one it has).
        self.available = []
        self.generation = threading.Lock()
        # Guards the counters and the progress; held only briefly.
        self.state = threading.Lock()
        self.inflight = 0
        self.max_inflight = 0
        self.overlaps = 0
        self.served = 0
        self.interrupts = 0
        self.loads = 0
        self.jobs = collections.deque(maxlen=JOB_HISTORY)
        self.step = 0
        self.steps = 0
        self.running = False
        self.interrupted = False

    @contextlib.contextmanager
    def inside(self):
        """Counts a generation request inside the worker (running or waiting
        for the lock) until it ends, also when its client has left."""
        with self.state:
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
            if self.inflight > 1:
                self.overlaps += 1
        try:
            yield
        finally:
            with self.state:
                self.inflight -= 1

    def generate(self, payload, arrived_us):
        """Runs one txt2img/img2img request (a JSON object); returns the answer."""
        steps = payload.get("steps")
        valid_steps = isinstance(steps, int) and not isinstance(steps, bool) and 0 <= steps < 2**64
        steps = min(max(steps if valid_steps else 20, 1), 10_000)
        prompt = payload.get("prompt")
        prompt = prompt if isinstance(prompt, str) else ""
        overrides = payload.get("override_settings")
        named = overrides.get("sd_model_checkpoint") if isinstance(overrides, dict) else None
        restore = payload.get("override_settings_restore_afterwards")
        restore = restore if isinstance(restore, bool) else True
        with self.generation:
            # As the WebUI: the named checkpoint, else the setting, loaded first.
            wanted = normalize_checkpoint(named) if isinstance(named, str) else ""
            if self.available and wanted not in self.available:
                wanted = ""
            target = wanted or self.setting
            loaded = self.load(target)
            if wanted and not restore:
                self.setting = wanted
            with self.state:
                self.step, self.steps, self.running, self.interrupted = 0, steps, True, False
            interrupted = False
            for step in range(1, steps + 1):
                time.sleep(self.step_time)
                with self.state:
                    self.step = step
                    if self.interrupted:
                        interrupted = True
                        break
            with self.state:
                self.running = False
            info = {
                "worker": self.name,
                "steps": steps,
                "interrupted": interrupted,
                "sd_model_name": target,
                "sd_model_hash": short_hash(target),
            }
            with self.state:
                self.served += 1
                self.jobs.append({
                    "prompt": prompt,
                    "arrived_us": arrived_us,
                    "ended_us": now_us(),
                    "interrupted": interrupted,
                    "checkpoint": target,
                    "loaded": loaded,
                })
        return {"images": [self.image], "parameters": payload, "info": compact_json(info)}

    def load(self, checkpoint):
        """Loads `checkpoint` unless it is in memory (the caller holds the
        generation lock); returns whether it loaded."""
        if self.loaded == checkpoint:
            return False
        time.sleep(self.load_time)
        with self.state:
            self.loaded = checkpoint
            self.loads += 1
            if checkpoint not in self.known:
                self.known.append(checkpoint)
        return True

    def set_checkpoint(self, name):
        """`POST /sdapi/v1/options` naming a checkpoint: the WebUI loads the
        new setting at once, under the generation lock."""
        name = normalize_checkpoint(name)
        with self.generation:
            self.setting = name
            self.load(name)

    def interrupt(self):
        """`/sdapi/v1/interrupt` and `/sdapi/v1/skip`: the running job stops at its next step."""
        with self.state:
            self.interrupts += 1
            self.interrupted = True

    def progress(self, skip_current_image):
        with self.state:
            step, steps, running, interrupted = self.step, self.steps, self.running, self.interrupted
        return {
            "progress": step / steps if running and steps else 0.0,
            "eta_relative": self.step_time * max(steps - step, 0) if running else 0.0,
            "state": {
                "job_count": int(running),
                "sampling_step": step,
                "sampling_steps": steps,
                "interrupted": interrupted,
            },
            "current_image": self.preview if running and not skip_current_image else None,
        }

    def options(self):
        return {"sd_model_checkpoint": title(self.setting)}

    def sd_models(self):
        """`GET /sdapi/v1/sd-models`: the checkpoints it started with or loaded,
        in the WebUI's shape (whose `hash` is the first 10 digits of `sha256`)."""
        with self.state:
            known = list(self.known)
        return [
            {
                "title": title(name),
                "model_name": name,
                "hash": short_hash(name),
                "sha256": short_hash(name) + hashlib.sha256(name.encode()).hexdigest()[10:],
                "filename": f"/models/Stable-diffusion/{name}.safetensors",
                "config": None,
            }
            for name in known
        ]

    def stats(self):
        """`GET /sim/stats`: the sim's `SimStats`."""
        with self.state:
            return {
                "name": self.name,
                "served": self.served,
                "inflight": self.inflight,
                "max_inflight": self.max_inflight,
                "overlaps": self.overlaps,
                "interrupts": self.interrupts,
                "loads": self.loads,
                "checkpoint": self.loaded,
                "jobs": [dict(job) for job in self.jobs],
            }


def compact_json(value):
    """JSON as the sim's serde_json writes it: keys sorted, no spaces, no
    escaped non-ASCII."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=True)
