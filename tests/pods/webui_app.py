"""A fake AUTOMATIC1111 WebUI pod on the WebUI's own server stack.

FastAPI 0.94 on starlette 0.26, served by uvicorn with the h11 parser and the
asyncio loop, as `webui.py --nowebui` serves its API (requirements.txt says
which versions, and why). The routes and their semantics are `sdgate sim`'s
(sdworker.py); what the stack itself does (parsing, keep-alive, 422s, gzip,
running sync endpoints in a thread pool) is the WebUI's.
"""

import asyncio
import hashlib
import os
import time
from typing import Any

import uvicorn
from fastapi import Body, FastAPI, Request, WebSocket
from fastapi.middleware.gzip import GZipMiddleware
from fastapi.responses import StreamingResponse

from sdworker import Worker, large_body, now_us, parse_args, query_number, start


def create_app(worker: Worker) -> FastAPI:
    app = FastAPI()
    # As the WebUI's api_only() (modules/initialize_util.py, setup_middleware).
    app.add_middleware(GZipMiddleware, minimum_size=1000)

    @app.middleware("http")
    async def log_and_time(request: Request, call_next):
        # The WebUI's own middleware (modules/api/api.py) times each answer in
        # X-Process-Time. The sim's hooks ride on it: X-Worker, and the time
        # a generation arrived (before its body is read, as the sim takes it).
        request.state.arrived_us = now_us()
        started = time.time()
        response = await call_next(request)
        response.headers["X-Process-Time"] = str(round(time.time() - started, 4))
        response.headers["X-Worker"] = worker.name
        return response

    # Sync endpoints, as the WebUI's: FastAPI runs each in its thread pool (40
    # threads), where a generation waits for the lock and, once running, ends
    # even if its client has left. A body that is no JSON object is FastAPI's
    # 422; an empty one is {}, as the sim takes it.
    def generate(request: Request, payload: dict[str, Any] = Body({})):
        with worker.inside():
            return worker.generate(payload, request.state.arrived_us)

    app.add_api_route("/sdapi/v1/txt2img", generate, methods=["POST"])
    app.add_api_route("/sdapi/v1/img2img", generate, methods=["POST"])

    @app.get("/sdapi/v1/progress")
    def progress(skip_current_image: bool = False):
        return worker.progress(skip_current_image)

    def interrupt():
        worker.interrupt()
        return {}

    app.add_api_route("/sdapi/v1/interrupt", interrupt, methods=["POST"])
    app.add_api_route("/sdapi/v1/skip", interrupt, methods=["POST"])

    @app.get("/sdapi/v1/options")
    def get_options():
        return worker.options()

    @app.post("/sdapi/v1/options")
    def set_options(options: dict[str, Any]):
        name = options.get("sd_model_checkpoint")
        if isinstance(name, str):
            worker.set_checkpoint(name)

    @app.get("/sdapi/v1/sd-models")
    def sd_models():
        return worker.sd_models()

    @app.get("/internal/ping")
    def ping():
        return {}

    # gradio 3's queue is a websocket on the same server.
    @app.websocket("/queue/join")
    async def queue_join(websocket: WebSocket):
        await websocket.accept(headers=[(b"x-worker", worker.name.encode())])
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") is not None:
                await websocket.send_text(message["text"])
            elif message.get("bytes") is not None:
                await websocket.send_bytes(message["bytes"])

    # The test hooks are async: they answer even while every thread of the
    # pool waits for the generation lock.
    @app.get("/sim/stats")
    async def stats():
        return worker.stats()

    @app.get("/sim/headers")
    async def headers(request: Request):
        return dict(request.headers.items())

    @app.get("/sim/events")
    async def events(request: Request):
        count = query_number(request.query_params.get("count"), 5)
        interval = query_number(request.query_params.get("interval_ms"), 100) / 1000

        async def stream():
            for i in range(count):
                if i:
                    await asyncio.sleep(interval)
                yield f"data: {i}\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/sim/echo")
    async def echo(request: Request):
        digest, length = hashlib.sha256(), 0
        async for chunk in request.stream():
            digest.update(chunk)
            length += len(chunk)
        return {"length": length, "sha256": digest.hexdigest()}

    @app.get("/sim/large")
    async def large(request: Request):
        size = query_number(request.query_params.get("bytes"), 1 << 20)

        async def body():
            for chunk in large_body(size):
                yield chunk

        return StreamingResponse(
            body(),
            media_type="application/octet-stream",
            headers={"Content-Length": str(size)},
        )

    return app


class Server(uvicorn.Server):
    def handle_exit(self, sig, frame):
        # SIGTERM or SIGINT: gone at once, as `sdgate sim` (and the WebUI on
        # SIGINT). uvicorn would first finish the requests in flight, queued
        # generations included.
        os._exit(0)


def main():
    args = parse_args(
        __doc__,
        keep_alive_default=5.0,
        keep_alive_help="seconds an idle connection is kept (uvicorn's timeout_keep_alive; default 5, "
        "uvicorn's own; the WebUI passes its --timeout-keep-alive, 30 by default)",
    )
    sock, worker = start(args)
    config = uvicorn.Config(
        create_app(worker),
        # What uvicorn picks in the WebUI's venv, which has no httptools nor
        # uvloop; forced, so that it stays so wherever this runs.
        http="h11",
        loop="asyncio",
        timeout_keep_alive=args.keep_alive,
        # The WebUI logs each request at "info"; the tests want stderr quiet.
        log_level="warning",
    )
    Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
