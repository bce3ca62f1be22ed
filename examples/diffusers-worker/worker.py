#!/usr/bin/env python3
"""An AUTOMATIC1111-compatible Stable Diffusion worker on PyTorch + diffusers.

Just enough of the WebUI's API for sdgate and its benchmarks:

  POST /sdapi/v1/txt2img    {prompt, negative_prompt, steps, width, height, seed,
                             batch_size, cfg_scale} -> {images: [base64 PNG],
                             parameters, info}
  GET  /sdapi/v1/progress   the real sampling step of the running generation
  POST /sdapi/v1/interrupt  stops the running denoising loop (also /skip)
  GET  /sdapi/v1/options    a few options
  GET  /internal/ping       200 once the model is loaded, 503 before
  GET  /worker/stats        counters (served, max_inflight, overlaps, ...), the
                            start-up phase times and the last 1000 jobs
  POST /worker/reset        zeroes the counters and the CUDA memory peak

One generation at a time per process, like the WebUI: every generation runs on
one dedicated thread, in arrival order, and a request that arrives while another
generates waits inside the worker. (Not on the connection's own thread: PyTorch
sets up CUDA handles once per thread, which cost a new connection's first
generation half a second or more on an H200.) A generation goes on when its
client disconnects (as the WebUI's does). `--concurrent` runs requests at once on
a pool of threads instead (for benchmarks only: many generations at once on one
GPU).

Models: `--model PATH` loads a local diffusers folder (unet/, vae/,
text_encoder/, optional tokenizer/ and scheduler/); `--random-weights` builds the
Stable Diffusion 1.5 architecture (UNet, VAE, CLIP ViT-L/14 text encoder) from
its default configs with random weights: the same compute and memory as the
real model, noise for images, nothing downloaded. `--tiny` makes that a tiny
configuration of the same architecture, for CPU smoke tests. Without a
tokenizer file, prompts become token ids by hashing their words.

Only the standard library's HTTP server, plus torch and diffusers (transformers
is used for the text encoder when installed; otherwise a plain-PyTorch CLIP text
transformer of the same shape).
"""

import time

T_MAIN = time.time()

import argparse  # noqa: E402
import base64  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402
import zlib  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402

JOB_HISTORY = 1000


def process_created_at():
    """Wall-clock time at which this process was forked (from /proc), or now."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22, starttime, in clock ticks since boot
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - (uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return T_MAIN


T_CREATED = min(process_created_at(), T_MAIN)


class Worker:
    def __init__(self, args):
        self.args = args
        self.name = args.name or f"diffusers-{args.port}"
        self.loaded = False
        self.load_error = None
        self.phase = "starting"
        self.stats_lock = threading.Lock()
        # Generations run here: one thread (a FIFO queue, as the WebUI's lock),
        # or a pool with --concurrent.
        self.executor = ThreadPoolExecutor(max_workers=args.max_concurrent if args.concurrent else 1,
                                           thread_name_prefix="generation")
        self.phases = {"process_created_at": T_CREATED, "main_started_at": T_MAIN}
        self.device_name = None
        self.model_desc = None
        self.running = []  # jobs generating now
        self.reset()

    def reset(self):
        with self.stats_lock:
            self.served = 0
            self.inflight = 0  # txt2img requests inside the worker (waiting or generating)
            self.max_inflight = 0
            self.overlaps = 0  # requests that arrived while another was inside
            self.generating = 0
            self.max_generating = 0
            self.gpu_overlaps = 0  # generations that started while another was generating
            self.interrupts = 0
            self.client_gone = 0
            self.errors = 0
            self.txt2img_connections = 0  # TCP connections that carried a txt2img
            self.jobs = []
        if self.loaded and self.torch is not None and self.device.type == "cuda":
            self.torch.cuda.reset_peak_memory_stats(self.device)

    # ------------------------------------------------------------ loading
    def log(self, message):
        sys.stderr.write(f"[{self.name}] {message}\n")
        sys.stderr.flush()

    def mark(self, key, since_key, label):
        now = time.time()
        self.phases[key] = now
        self.log(f"{label}: {now - self.phases[since_key]:.3f} s")

    def load(self):
        args = self.args
        self.torch = None
        self.phase = "importing torch and diffusers"
        import torch  # noqa: F401
        import diffusers  # noqa: F401

        self.torch = torch
        diffusers.utils.logging.set_verbosity_error()
        self.mark("imports_done_at", "main_started_at", f"imports (torch {torch.__version__}, diffusers {diffusers.__version__})")
        self.log(f"process start (fork -> imports done): {self.phases['imports_done_at'] - T_CREATED:.3f} s")

        self.phase = "initialising the device"
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.init()
            torch.zeros(1, device=self.device)
            torch.cuda.synchronize(self.device)
            self.device_name = torch.cuda.get_device_name(self.device)
        else:
            self.device_name = "cpu"
        if args.dtype == "auto":
            self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        else:
            self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
        self.mark("cuda_ready_at", "imports_done_at", f"device init ({self.device_name})")

        self.phase = "building the model" if args.random_weights else "loading the model"
        if args.random_weights:
            self.build_random(args.tiny)
        else:
            self.load_folder(args.model)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.mark("model_ready_at", "cuda_ready_at", f"model {'build' if args.random_weights else 'load'} ({self.model_desc})")
        self.phase = "ready"
        self.loaded = True
        self.reset()
        self.log(f"ready: {time.time() - T_CREATED:.3f} s after the fork")

    def scheduler_defaults(self):
        return dict(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
            prediction_type="epsilon",
        )

    def build_random(self, tiny):
        torch = self.torch
        from diffusers import AutoencoderKL, UNet2DConditionModel

        if tiny:
            unet_cfg = dict(
                sample_size=8,
                block_out_channels=(32, 64),
                layers_per_block=1,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=32,
                attention_head_dim=2,
            )
            vae_cfg = dict(  # 8x down, as SD's VAE
                block_out_channels=(32, 32, 64, 64),
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=1,
                latent_channels=4,
                sample_size=32,
            )
            text_cfg = dict(vocab=1000, hidden=32, intermediate=64, layers=2, heads=2, positions=77)
            self.model_desc = "tiny SD 1.5-shaped, random weights"
        else:
            # Stable Diffusion 1.5 (runwayml/stable-diffusion-v1-5 configs).
            unet_cfg = dict(
                sample_size=64,
                in_channels=4,
                out_channels=4,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                block_out_channels=(320, 640, 1280, 1280),
                layers_per_block=2,
                cross_attention_dim=768,
                attention_head_dim=8,
            )
            vae_cfg = dict(
                in_channels=3,
                out_channels=3,
                block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2,
                latent_channels=4,
                sample_size=512,
                scaling_factor=0.18215,
            )
            text_cfg = dict(vocab=49408, hidden=768, intermediate=3072, layers=12, heads=12, positions=77)
            self.model_desc = "SD 1.5 architecture, random weights"
        # Random init directly on the device, then cast.
        with torch.device(self.device):
            unet = UNet2DConditionModel(**unet_cfg)
            vae = AutoencoderKL(**vae_cfg)
            text = make_text_encoder(torch, text_cfg)
        self.unet = unet.to(self.dtype).eval().requires_grad_(False)
        self.vae = vae.to(self.dtype).eval().requires_grad_(False)
        self.text_encoder = text.to(self.dtype).eval().requires_grad_(False)
        self.vocab = text_cfg["vocab"]
        self.max_tokens = text_cfg["positions"]
        self.tokenizer = None
        self.scheduler_config = self.scheduler_defaults()
        self.model_desc += f", {self.text_encoder.kind} text encoder, {self.param_count() / 1e6:.0f}M parameters, {str(self.dtype)[6:]}"

    def load_folder(self, path):
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel

        self.unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=self.dtype)
        self.vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=self.dtype)
        text = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=self.dtype)
        text.kind = "CLIP (transformers)"
        for name in ("unet", "vae"):
            setattr(self, name, getattr(self, name).to(self.device).eval().requires_grad_(False))
        self.text_encoder = text.to(self.device).eval().requires_grad_(False)
        self.vocab = text.config.vocab_size
        self.max_tokens = text.config.max_position_embeddings
        self.tokenizer = None
        if os.path.isdir(os.path.join(path, "tokenizer")):
            try:
                from transformers import CLIPTokenizer

                self.tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
            except Exception as error:  # noqa: BLE001
                self.log(f"no tokenizer ({error}); prompts are hashed into token ids")
        try:
            self.scheduler_config = dict(DDIMScheduler.load_config(path, subfolder="scheduler"))
        except Exception:  # noqa: BLE001
            self.scheduler_config = self.scheduler_defaults()
        self.model_desc = f"{path}, {self.param_count() / 1e6:.0f}M parameters, {str(self.dtype)[6:]}"

    def param_count(self):
        return sum(p.numel() for m in (self.unet, self.vae, self.text_encoder) for p in m.parameters())

    # ------------------------------------------------------------ generation
    def token_ids(self, prompt):
        n = self.max_tokens
        if self.tokenizer is not None:
            ids = self.tokenizer(prompt, padding="max_length", max_length=n, truncation=True).input_ids
            return ids
        bos, eos = self.vocab - 2, self.vocab - 1
        words = [zlib.crc32(w.encode()) % (self.vocab - 2) for w in prompt.lower().split()]
        ids = [bos] + words[: n - 2] + [eos]
        return ids + [eos] * (n - len(ids))

    def encode(self, prompts):
        torch = self.torch
        ids = torch.tensor([self.token_ids(p) for p in prompts], dtype=torch.long, device=self.device)
        out = self.text_encoder(ids)
        return out if isinstance(out, torch.Tensor) else out[0]

    def generate(self, job):
        """Runs one generation; returns a list of PNG bytes."""
        torch = self.torch
        from diffusers import DDIMScheduler

        p = job["request"]
        batch, steps = p["batch_size"], p["steps"]
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        scheduler = DDIMScheduler.from_config(self.scheduler_config)
        cuda = self.device.type == "cuda"
        events = []
        job["events"] = events
        with torch.inference_mode():
            context = torch.cat([self.encode([p["negative_prompt"]] * batch), self.encode([p["prompt"]] * batch)])
            generator = torch.Generator(device="cpu").manual_seed(p["seed"])
            shape = (batch, self.unet.config.in_channels, p["height"] // factor, p["width"] // factor)
            latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device, self.dtype)
            latents = latents * scheduler.init_noise_sigma
            scheduler.set_timesteps(steps, device=self.device)
            for i, t in enumerate(scheduler.timesteps):
                if job["interrupted"]:
                    break
                model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
                noise = self.unet(model_input, t, encoder_hidden_states=context).sample
                uncond, cond = noise.chunk(2)
                noise = uncond + p["cfg_scale"] * (cond - uncond)
                latents = scheduler.step(noise, t, latents).prev_sample
                if cuda:
                    event = torch.cuda.Event()
                    event.record()
                    events.append(event)
                    if i >= 2:  # stay at most two steps ahead of the GPU
                        events[i - 2].synchronize()
                else:
                    job["step"] = i + 1
            if cuda:
                for event in events:
                    event.synchronize()
                job["step"] = len(events)
            job["denoised_at"] = time.time()
            images = self.vae.decode(latents / self.vae.config.scaling_factor).sample
            images = torch.nan_to_num((images.float() / 2 + 0.5).clamp(0, 1), nan=0.0)
            pixels = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        job["generated_at"] = time.time()
        from PIL import Image

        pngs = []
        for array in pixels:
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format="PNG")
            pngs.append(buffer.getvalue())
        return pngs

    def current_step(self, job):
        if job.get("step") is not None:
            return job["step"]
        done = 0
        for event in list(job.get("events", [])):
            if not event.query():
                break
            done += 1
        return done

    def txt2img(self, payload):
        """Returns (status, body dict). Waits for the generation thread."""
        arrived = time.time()
        with self.stats_lock:
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
            if self.inflight > 1:
                self.overlaps += 1
        try:
            request = normalise(payload)
        except ValueError as error:
            with self.stats_lock:
                self.inflight -= 1
            return 422, {"error": "invalid request", "detail": str(error)}
        job = {"request": request, "interrupted": False, "step": None, "arrived_at": arrived}
        try:
            # The generation runs on the executor's thread(s), never on the
            # connection's: one thread (FIFO) unless --concurrent, and CUDA
            # handles are created once per generation thread, not per connection.
            started, ended, pngs = self.executor.submit(self.run_job, job).result()
        except Exception as error:  # noqa: BLE001
            self.log("generation failed:\n" + traceback.format_exc())
            with self.stats_lock:
                self.inflight -= 1
                self.errors += 1
            return 500, {"error": "generation failed", "detail": f"{type(error).__name__}: {error}"}
        record = {
            "arrived_at": round(arrived, 4),
            "started_at": round(started, 4),
            "ended_at": round(ended, 4),
            "wait_s": round(started - arrived, 4),
            "generate_s": round(job["generated_at"] - started, 4),
            "denoise_s": round(job["denoised_at"] - started, 4),
            "decode_s": round(job["generated_at"] - job["denoised_at"], 4),
            "encode_s": round(ended - job["generated_at"], 4),
            "seed": request["seed"],
            "connection": threading.current_thread().name.split()[0],  # one handler thread per connection
            "thread": job.get("thread"),
            "steps": request["steps"],
            "steps_done": job["step"],
            "size": f"{request['width']}x{request['height']}",
            "batch_size": request["batch_size"],
            "interrupted": job["interrupted"],
        }
        info = {
            "prompt": request["prompt"],
            "negative_prompt": request["negative_prompt"],
            "seed": request["seed"],
            "steps": request["steps"],
            "width": request["width"],
            "height": request["height"],
            "cfg_scale": request["cfg_scale"],
            "batch_size": request["batch_size"],
            "sampler_name": "DDIM",
            "sd_model_name": self.model_desc,
            "worker": self.name,
            "device": self.device_name,
            "interrupted": job["interrupted"],
            "generation_seconds": record["generate_s"],
        }
        body = {
            "images": [base64.b64encode(png).decode("ascii") for png in pngs],
            "parameters": payload if isinstance(payload, dict) else {},
            "info": json.dumps(info),
        }
        # Leave before the answer is sent: once its last byte is out the gateway
        # may send the next request, which must not find this one still inside.
        with self.stats_lock:
            self.inflight -= 1
            self.served += 1
            self.jobs.append(record)
            del self.jobs[:-JOB_HISTORY]
        return 200, body

    def run_job(self, job):
        started = time.time()
        job["thread"] = threading.current_thread().name
        with self.stats_lock:
            self.generating += 1
            self.max_generating = max(self.max_generating, self.generating)
            if self.generating > 1:
                self.gpu_overlaps += 1
            self.running.append(job)
        first = "first_generation_started_at" not in self.phases
        if first:
            self.phases["first_generation_started_at"] = started
        try:
            pngs = self.generate(job)
        finally:
            with self.stats_lock:
                self.generating -= 1
                self.running.remove(job)
        ended = time.time()
        if first:
            self.phases["first_generation_done_at"] = ended
            self.log(f"first generation: {ended - started:.3f} s")
        return started, ended, pngs

    def progress(self):
        with self.stats_lock:
            job = self.running[0] if self.running else None
        if job is None:
            return {
                "progress": 0.0,
                "eta_relative": 0.0,
                "state": {"skipped": False, "interrupted": False, "job": "", "job_count": 0,
                          "job_no": 0, "sampling_step": 0, "sampling_steps": 0},
                "current_image": None,
                "textinfo": None,
            }
        steps = job["request"]["steps"]
        step = self.current_step(job)
        elapsed = time.time() - job["arrived_at"]
        fraction = step / steps if steps else 0.0
        eta = elapsed / fraction * (1 - fraction) if fraction > 0 else 0.0
        return {
            "progress": fraction,
            "eta_relative": eta,
            "state": {"skipped": False, "interrupted": job["interrupted"], "job": "txt2img", "job_count": 1,
                      "job_no": 0, "sampling_step": step, "sampling_steps": steps},
            "current_image": None,
            "textinfo": None,
        }

    def interrupt(self):
        with self.stats_lock:
            self.interrupts += 1
            for job in self.running:
                job["interrupted"] = True

    def stats(self):
        torch = getattr(self, "torch", None)
        with self.stats_lock:
            out = {
                "name": self.name,
                "loaded": self.loaded,
                "phase": self.phase,
                "load_error": self.load_error,
                "device": self.device_name,
                "model": self.model_desc,
                "concurrent": self.args.concurrent,
                "served": self.served,
                "inflight": self.inflight,
                "max_inflight": self.max_inflight,
                "overlaps": self.overlaps,
                "generating": self.generating,
                "max_generating": self.max_generating,
                "gpu_overlaps": self.gpu_overlaps,
                "interrupts": self.interrupts,
                "client_gone": self.client_gone,
                "errors": self.errors,
                "txt2img_connections": self.txt2img_connections,
                "jobs": list(self.jobs),
            }
        ph = dict(self.phases)
        out["phases"] = {k: round(v, 4) for k, v in ph.items()}

        def span(a, b):
            return round(ph[b] - ph[a], 4) if a in ph and b in ph else None

        out["phase_seconds"] = {
            "interpreter": span("process_created_at", "main_started_at"),
            "imports": span("main_started_at", "imports_done_at"),
            "process_start": span("process_created_at", "imports_done_at"),
            "cuda_init": span("imports_done_at", "cuda_ready_at"),
            "model_build": span("cuda_ready_at", "model_ready_at"),
            "first_generation": span("first_generation_started_at", "first_generation_done_at"),
        }
        if self.loaded and torch is not None and self.device.type == "cuda":
            out["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
            out["cuda_peak_reserved_bytes"] = torch.cuda.max_memory_reserved(self.device)
        return out


def make_text_encoder(torch, cfg):
    """CLIP text transformer: transformers' CLIPTextModel when installed, else
    the same shape in plain PyTorch (causal self-attention, quick GELU)."""
    try:
        from transformers import CLIPTextConfig, CLIPTextModel

        config = CLIPTextConfig(
            vocab_size=cfg["vocab"],
            hidden_size=cfg["hidden"],
            intermediate_size=cfg["intermediate"],
            num_hidden_layers=cfg["layers"],
            num_attention_heads=cfg["heads"],
            max_position_embeddings=cfg["positions"],
            hidden_act="quick_gelu",
            bos_token_id=cfg["vocab"] - 2,
            eos_token_id=cfg["vocab"] - 1,
            pad_token_id=cfg["vocab"] - 1,
        )
        model = CLIPTextModel(config)
        model.kind = "CLIP (transformers)"
        return model
    except ImportError:
        pass
    nn = torch.nn

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1 = nn.LayerNorm(cfg["hidden"])
            self.attn = nn.MultiheadAttention(cfg["hidden"], cfg["heads"], batch_first=True)
            self.ln2 = nn.LayerNorm(cfg["hidden"])
            self.fc1 = nn.Linear(cfg["hidden"], cfg["intermediate"])
            self.fc2 = nn.Linear(cfg["intermediate"], cfg["hidden"])

        def forward(self, x, mask):
            h = self.ln1(x)
            x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
            h = self.fc1(self.ln2(x))
            return x + self.fc2(h * torch.sigmoid(1.702 * h))

    class TextEncoder(nn.Module):
        kind = "CLIP-shaped (plain PyTorch)"

        def __init__(self):
            super().__init__()
            self.token = nn.Embedding(cfg["vocab"], cfg["hidden"])
            self.position = nn.Embedding(cfg["positions"], cfg["hidden"])
            self.layers = nn.ModuleList(Layer() for _ in range(cfg["layers"]))
            self.final = nn.LayerNorm(cfg["hidden"])

        def forward(self, ids):
            n = ids.shape[1]
            x = self.token(ids) + self.position(torch.arange(n, device=ids.device))
            mask = torch.full((n, n), float("-inf"), device=ids.device, dtype=x.dtype).triu(1)
            for layer in self.layers:
                x = layer(x, mask)
            return self.final(x)

    return TextEncoder()


def normalise(payload):
    if not isinstance(payload, dict):
        raise ValueError("the body must be a JSON object")

    def integer(key, default, low, high):
        value = payload.get(key, default)
        if value is None:
            value = default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise ValueError(f"{key} must be an integer")
        value = int(value)
        if not low <= value <= high:
            raise ValueError(f"{key} must be within {low}..{high}")
        return value

    seed = integer("seed", -1, -1, 2**32 - 1)
    if seed == -1:
        seed = random.randrange(2**32)
    cfg = payload.get("cfg_scale", 7.0)
    if isinstance(cfg, bool) or not isinstance(cfg, (int, float)):
        raise ValueError("cfg_scale must be a number")
    return {
        "prompt": str(payload.get("prompt") or ""),
        "negative_prompt": str(payload.get("negative_prompt") or ""),
        "steps": integer("steps", 20, 1, 150),
        "width": integer("width", 512, 8, 2048) // 8 * 8,
        "height": integer("height", 512, 8, 2048) // 8 * 8,
        "seed": seed,
        "batch_size": integer("batch_size", 1, 1, 8),
        "cfg_scale": float(cfg),
    }


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "diffusers-worker"
    worker = None  # set in main

    def log_message(self, format, *args):  # noqa: A002
        pass  # probes and polls would flood the log; generations log themselves

    def reply(self, status, body):
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("X-Worker", self.worker.name)
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            with self.worker.stats_lock:
                self.worker.client_gone += 1
            self.close_connection = True

    def read_json(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw.strip():
            return {}
        return json.loads(raw)

    def do_GET(self):  # noqa: N802
        w = self.worker
        path = self.path.split("?", 1)[0]
        if path == "/internal/ping":
            if w.loaded:
                self.reply(200, {})
            else:
                self.reply(503, {"error": "loading", "phase": w.phase})
        elif path == "/sdapi/v1/progress":
            self.reply(200, w.progress() if w.loaded else {"progress": 0.0, "state": {"job_count": 0}})
        elif path == "/sdapi/v1/options":
            self.reply(200, {"sd_model_checkpoint": w.model_desc, "samples_format": "png"})
        elif path == "/worker/stats":
            self.reply(200, w.stats())
        else:
            self.reply(404, {"error": "not found"})

    def do_POST(self):  # noqa: N802
        w = self.worker
        path = self.path.split("?", 1)[0]
        try:
            payload = self.read_json()
        except (ValueError, UnicodeDecodeError):
            self.reply(422, {"error": "invalid JSON"})
            return
        if path in ("/sdapi/v1/txt2img",):
            if not w.loaded:
                self.reply(503, {"error": "model not loaded yet", "phase": w.phase})
                return
            t0 = time.time()
            if not getattr(self, "carried_txt2img", False):
                self.carried_txt2img = True
                with w.stats_lock:
                    w.txt2img_connections += 1
            status, body = w.txt2img(payload)
            self.reply(status, body)
            if status == 200:
                w.log(f"txt2img {status} in {time.time() - t0:.3f} s")
        elif path in ("/sdapi/v1/interrupt", "/sdapi/v1/skip"):
            w.interrupt()
            self.reply(200, {})
        elif path == "/worker/reset":
            w.reset()
            self.reply(200, {})
        else:
            self.reply(404, {"error": "not found"})


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def handle_error(self, request, client_address):
        error = sys.exc_info()[1]
        if isinstance(error, (BrokenPipeError, ConnectionResetError, TimeoutError)):
            return
        super().handle_error(request, client_address)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a local diffusers model folder (unet/, vae/, text_encoder/)")
    source.add_argument("--random-weights", action="store_true",
                        help="build the SD 1.5 architecture with random weights (no download)")
    parser.add_argument("--tiny", action="store_true", help="with --random-weights: a tiny config, for CPU tests")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp16", "bf16", "fp32"],
                        help="auto: fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--concurrent", action="store_true",
                        help="no one-at-a-time: run requests at once (benchmarks only)")
    parser.add_argument("--max-concurrent", type=int, default=32,
                        help="with --concurrent: most generations at once (32)")
    parser.add_argument("--name", default=None, help="sent in X-Worker (default diffusers-PORT)")
    args = parser.parse_args()
    if args.tiny and not args.random_weights:
        parser.error("--tiny needs --random-weights")

    worker = Worker(args)
    Handler.worker = worker
    try:
        server = Server((args.host, args.port), Handler)
    except OSError as error:
        worker.log(f"cannot listen on {args.host}:{args.port}: {error}")
        sys.exit(1)
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    worker.log(f"listening on {args.host}:{args.port} (/internal/ping answers 503 until the model is loaded)")
    try:
        worker.load()
    except Exception as error:  # noqa: BLE001
        worker.load_error = f"{type(error).__name__}: {error}"
        worker.log("loading failed:\n" + traceback.format_exc())
        sys.exit(1)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
