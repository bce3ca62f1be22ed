"""A fake Stable Diffusion pod on ComfyUI's server stack.

aiohttp, set up as ComfyUI's server.py does (a web.Application with its
middlewares and upload limit, web.AppRunner without access log, web.TCPSite),
serving the routes of `sdgate sim` (sdworker.py) so that the same scenarios
run, plus a few of ComfyUI's own: GET /system_stats, POST /prompt, GET /ws.
What the stack itself does (parsing, keep-alive, streaming) is aiohttp's.
"""

import asyncio
import hashlib
import ipaddress
import json
import os
import socket
import sys
import urllib.parse
import uuid
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from sdworker import Worker, large_body, now_us, parse_args, query_number, start

# ComfyUI's --max-upload-size default: 100 MB.
MAX_UPLOAD_SIZE = 100 * 1024 * 1024

# pydantic's words for true, as FastAPI reads the WebUI's query flags.
TRUE_WORDS = {"1", "on", "t", "true", "y", "yes"}


async def is_loopback(host):
    """Whether `host` is a loopback address or a name for loopback addresses
    only, as ComfyUI decides it."""
    if host is None:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    loopback = False
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            addresses = await loop.getaddrinfo(host, None, family=family, type=socket.SOCK_STREAM)
        except socket.gaierror:
            continue
        for *_, address in addresses:
            if not ipaddress.ip_address(address[0]).is_loopback:
                return loopback
            loopback = True
    return loopback


@web.middleware
async def origin_only(request, handler):
    """ComfyUI's guard against other sites' pages posting to a local server:
    with a loopback Host, a request whose Origin names another host gets 403
    (ports are compared only when both carry one). OPTIONS answers 200 empty."""
    host, origin = request.headers.get("Host"), request.headers.get("Origin")
    if host is not None and origin is not None:
        origin_url = urllib.parse.urlparse(origin)
        host_url = urllib.parse.urlsplit("//" + host.lower())
        host_name = host.lower() if origin_url.port is not None else host_url.hostname
        origin_name = origin_url.netloc.lower() if host_url.port is not None else origin_url.hostname
        if host_name and origin_name and host_name != origin_name and await is_loopback(host_url.hostname):
            return web.Response(status=403)
    if request.method == "OPTIONS":
        return web.Response()
    return await handler(request)


def json_object(body):
    """A generation's body as the sim reads it: a JSON object, {} when empty,
    None when it is not one."""
    if not body:
        return {}
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    return payload if isinstance(payload, dict) else None


def unprocessable(detail):
    return web.json_response({"detail": detail}, status=422)


def create_app(worker: Worker) -> web.Application:
    # ComfyUI runs prompts one at a time, in order, on one thread; here that
    # thread runs the generations and checkpoint loads.
    jobs = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prompt_worker")
    # Jobs whose handler may be gone: referenced until they end.
    running = set()
    prompt_number = 0

    async def to_end(coroutine):
        """Runs `coroutine` to its end, even if its client leaves and aiohttp
        cancels the handler (it may: handler_cancellation)."""
        task = asyncio.ensure_future(coroutine)
        running.add(task)
        task.add_done_callback(running.discard)
        return await asyncio.shield(task)

    async def on_job_thread(job, *args):
        return await asyncio.get_running_loop().run_in_executor(jobs, job, *args)

    async def generation(payload, arrived_us):
        with worker.inside():
            return await on_job_thread(worker.generate, payload, arrived_us)

    async def generate(request):
        arrived_us = now_us()
        payload = json_object(await request.read())
        if payload is None:
            return unprocessable("request body is not a JSON object")
        return web.json_response(await to_end(generation(payload, arrived_us)))

    async def progress(request):
        skip = request.query.get("skip_current_image", "").lower() in TRUE_WORDS
        return web.json_response(worker.progress(skip))

    async def interrupt(request):
        worker.interrupt()
        return web.json_response({})

    async def get_options(request):
        return web.json_response(worker.options())

    async def set_options(request):
        try:
            options = json.loads(await request.read())
        except ValueError:
            return unprocessable("request body is not JSON")
        name = options.get("sd_model_checkpoint") if isinstance(options, dict) else None
        if isinstance(name, str):
            await to_end(on_job_thread(worker.set_checkpoint, name))
        return web.json_response(None)

    async def sd_models(request):
        return web.json_response(worker.sd_models())

    async def ping(request):
        return web.json_response({})

    async def queue_join(request):
        """gradio's queue websocket: echoes text and binary messages."""
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if message.type == web.WSMsgType.TEXT:
                await ws.send_str(message.data)
            elif message.type == web.WSMsgType.BINARY:
                await ws.send_bytes(message.data)
        return ws

    async def stats(request):
        return web.json_response(worker.stats())

    async def headers(request):
        return web.json_response({name.lower(): value for name, value in request.headers.items()})

    async def events(request):
        count = query_number(request.query.get("count"), 5)
        interval = query_number(request.query.get("interval_ms"), 100) / 1000
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        for i in range(count):
            if i:
                await asyncio.sleep(interval)
            await response.write(f"data: {i}\n\n".encode())
        await response.write_eof()
        return response

    async def echo(request):
        # Streamed: the upload limit applies to read(), not to this.
        digest, length = hashlib.sha256(), 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            length += len(chunk)
        return web.json_response({"length": length, "sha256": digest.hexdigest()})

    async def large(request):
        size = query_number(request.query.get("bytes"), 1 << 20)
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = size
        await response.prepare(request)
        for chunk in large_body(size):
            await response.write(chunk)
        await response.write_eof()
        return response

    async def system_stats(request):
        page = os.sysconf("SC_PAGE_SIZE")
        return web.json_response({
            "system": {
                "os": os.name,
                "ram_total": page * os.sysconf("SC_PHYS_PAGES"),
                "ram_free": page * os.sysconf("SC_AVPHYS_PAGES"),
                "comfyui_version": "sim",
                "python_version": sys.version,
                "pytorch_version": "none",
                "embedded_python": False,
                "argv": sys.argv,
            },
            "devices": [{
                "name": "cpu", "type": "cpu", "index": None,
                "vram_total": 0, "vram_free": 0, "torch_vram_total": 0, "torch_vram_free": 0,
            }],
        })

    async def post_prompt(request):
        """Queues nothing: answers as ComfyUI does to a prompt it accepted."""
        nonlocal prompt_number
        data = await request.json()
        if "prompt" not in data:
            return web.json_response({"error": "no prompt", "node_errors": []}, status=400)
        prompt_number += 1
        return web.json_response({"prompt_id": str(uuid.uuid4()), "number": prompt_number - 1, "node_errors": {}})

    async def comfy_ws(request):
        """ComfyUI's event socket: a status message, then it reads and ignores."""
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        sid = request.query.get("clientId") or uuid.uuid4().hex
        queue = {"exec_info": {"queue_remaining": worker.inflight}}
        await ws.send_json({"type": "status", "data": {"status": queue, "sid": sid}})
        async for _ in ws:
            pass
        return ws

    async def add_worker_header(request, response):
        response.headers["X-Worker"] = worker.name

    app = web.Application(client_max_size=MAX_UPLOAD_SIZE, middlewares=[origin_only])
    # Every answer, 101s, streams and errors included, is prepared here.
    app.on_response_prepare.append(add_worker_header)
    app.add_routes([
        web.post("/sdapi/v1/txt2img", generate),
        web.post("/sdapi/v1/img2img", generate),
        web.get("/sdapi/v1/progress", progress),
        web.post("/sdapi/v1/interrupt", interrupt),
        web.post("/sdapi/v1/skip", interrupt),
        web.get("/sdapi/v1/options", get_options),
        web.post("/sdapi/v1/options", set_options),
        web.get("/sdapi/v1/sd-models", sd_models),
        web.get("/internal/ping", ping),
        web.get("/queue/join", queue_join),
        web.get("/sim/stats", stats),
        web.get("/sim/headers", headers),
        web.get("/sim/events", events),
        web.post("/sim/echo", echo),
        web.get("/sim/large", large),
    ])
    # ComfyUI serves its routes both as they are and under /api.
    for prefix in ("", "/api"):
        app.add_routes([
            web.get(prefix + "/system_stats", system_stats),
            web.post(prefix + "/prompt", post_prompt),
            web.get(prefix + "/ws", comfy_ws),
        ])
    return app


async def serve(sock, worker, keep_alive):
    options = {} if keep_alive is None else {"keepalive_timeout": keep_alive}
    runner = web.AppRunner(create_app(worker), access_log=None, **options)
    await runner.setup()
    # ComfyUI's web.TCPSite binds the port itself; this is the same server
    # on a socket bound first, so that the worker is named after its port.
    await web.SockSite(runner, sock).start()
    await asyncio.Event().wait()


def main():
    args = parse_args(
        __doc__,
        keep_alive_default=None,
        keep_alive_help="seconds an idle connection is kept (aiohttp's keepalive_timeout; default aiohttp's "
        "own, 3630 in aiohttp 3.14, which ComfyUI keeps)",
    )
    sock, worker = start(args)
    # No signal handler, as ComfyUI: SIGTERM ends the process at once.
    asyncio.run(serve(sock, worker, args.keep_alive))


if __name__ == "__main__":
    main()
