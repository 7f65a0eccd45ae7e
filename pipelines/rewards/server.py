"""Serve any DrPO reward over HTTP, so a large reward can run on other GPUs or in its own environment.

    python -m pipelines.rewards.server --reward pickscore --port 8000 --token s3cret
    accelerate launch train_drpo.py ... --reward http://127.0.0.1:8000/score   # DRPO_REWARD_TOKEN=s3cret

An ASGI app (Starlette) served by uvicorn. ``POST /score`` with ``{"prompts": [...], "images": [base64 PNG,
...]}`` answers ``{"scores": [...]}``; ``GET /health`` answers ``{"status": "ok"}`` and ``GET /info`` the
reward, the version and the limits (both check the token too, so a client's start-up probe finds a wrong
URL or token). It binds 127.0.0.1 unless --host says otherwise, rejects requests without the shared token
when one is set (--token or DRPO_REWARD_TOKEN), and only ever parses JSON and PNG (nothing is unpickled).

Every limit (``ServerLimits``) is enforced before the work it bounds: a body over --max_request_mb is
refused (413) from its Content-Length or as soon as the bytes read pass it (a chunked body), a body with
neither is refused (411); the whole body must arrive within --request_timeout (408, however slowly it
drips); a batch over --max_batch images, an image over --max_image_pixels or a batch over
--max_request_pixels is refused from the PNG headers before anything is decoded; at most
--max_connections connections are served (uvicorn answers 503 beyond) and --max_queued batches wait for a
worker (503 beyond). Decoding and scoring run off the event loop, one batch at a time per worker
(``--devices cuda:0,cuda:1``: one copy of the reward per device, behind the same port). SIGTERM / Ctrl-C
stop accepting, finish the requests in flight, then exit.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import os
import socket
import threading
from dataclasses import asdict, dataclass

import torch

from pipelines import flags
from pipelines.rewards import RewardError, load_reward, score_candidates
from pipelines.rewards.remote import MAX_PIXELS, TOKEN_ENV, open_png, png_pixels, png_size

DRAIN_FACTOR = 4  # a body declared up to this many times the cap is read and dropped before its 413
PROTOCOL_VERSION = "2"  # /score as before; /health and /info added with the ASGI server


@dataclass(frozen=True)
class ServerLimits:
    """What one request, and the server as a whole, may cost."""

    max_request_bytes: int = 64 * 2**20
    max_batch: int = 64
    max_image_pixels: int = MAX_PIXELS  # one image, 2048 x 2048
    max_request_pixels: int = 64 * 512 * 512  # a full --max_batch of 512 px images; ~200 MB once decoded
    request_timeout: float = 60.0  # seconds for the whole body to arrive
    max_connections: int = 64
    max_queued: int = 32  # batches waiting for a worker


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def json_answer(status: int, payload: dict):
    from starlette.responses import Response

    return Response(json.dumps(payload, allow_nan=False), status_code=status, media_type="application/json")


async def read_body(request, limit: int) -> bytes:
    """The request body, at most ``limit`` bytes: refused from its Content-Length when that says more,
    while reading when a chunked body grows past it, and with 411 when it declares neither."""
    declared = request.headers.get("content-length")
    chunked = "chunked" in request.headers.get("transfer-encoding", "").lower()
    if declared is None and not chunked:
        raise RequestError(411, "a request body needs a Content-Length (or chunked transfer encoding)")
    if declared is not None and not declared.isdigit():
        raise RequestError(400, f"bad Content-Length {declared!r}")
    if declared is not None and int(declared) > limit:
        if int(declared) <= DRAIN_FACTOR * limit:  # read and drop it, so the client reads the 413, not a reset
            async for _ in request.stream():
                pass
        raise RequestError(413, f"request body must be 1..{limit} bytes (--max_request_mb), got {declared}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(413, f"request body must be 1..{limit} bytes (--max_request_mb), got more")
    if not body:
        raise RequestError(400, "empty request body")
    return bytes(body)


def parse_batch(raw: bytes, limits: ServerLimits) -> tuple[list[str], list[str]]:
    """(prompts, base64 PNGs) of a /score body, checked for shape, types and the batch cap."""
    try:
        body = json.loads(raw)
        prompts, encoded = body["prompts"], body["images"]
    except (ValueError, KeyError, TypeError) as error:
        raise RequestError(400, f"expected JSON with 'prompts' and 'images': {error}") from error
    if not isinstance(prompts, list) or not isinstance(encoded, list) or len(prompts) != len(encoded):
        raise RequestError(400, "'prompts' and 'images' must be lists of the same length")
    if not encoded:
        raise RequestError(400, "the batch is empty: send 1 or more images")
    if len(encoded) > limits.max_batch:
        raise RequestError(413, f"batch must hold 1..{limits.max_batch} images, got {len(encoded)}")
    if not all(isinstance(p, str) for p in prompts):
        raise RequestError(400, "every prompt must be a string")
    return prompts, encoded


def decode_batch(encoded: list, limits: ServerLimits) -> torch.Tensor:
    """[N, 3, H, W] from base64 PNGs, after checking every image's header: each image within
    --max_image_pixels, the total within --max_request_pixels (what decoding will cost), one size for the
    batch. Decoded one by one into a single float tensor: the peak is that tensor (12 bytes a pixel) plus
    one image."""
    try:
        sizes = [png_size(item) for item in encoded]
    except Exception as error:  # any unreadable image is the client's error
        raise RequestError(400, f"images must be base64 PNG: {error}") from error
    largest = max(width * height for width, height in sizes)
    if largest > limits.max_image_pixels:
        raise RequestError(413, f"an image holds {largest} pixels, more than --max_image_pixels="
                                f"{limits.max_image_pixels}")
    total = sum(width * height for width, height in sizes)
    if total > limits.max_request_pixels:
        raise RequestError(413, f"the batch holds {total} pixels, more than --max_request_pixels="
                                f"{limits.max_request_pixels}")
    if len(set(sizes)) != 1:
        raise RequestError(400, "all images of a batch must have the same size")
    width, height = sizes[0]
    images = torch.empty(len(encoded), 3, height, width)
    try:
        for index, item in enumerate(encoded):
            images[index].copy_(png_pixels(open_png(item, limits.max_image_pixels)))  # uint8 into float
    except Exception as error:  # any undecodable image is the client's error
        raise RequestError(400, f"images must be base64 PNG: {error}") from error
    return images.div_(255.0)


class Workers:
    """One reward copy per device; a batch takes a free one (decoding and scoring in a thread, off the event
    loop), at most ``max_queued`` batches wait for one and any further one is refused with 503."""

    def __init__(self, reward_fns: list, reward_name: str, limits: ServerLimits):
        self.reward_fns, self.reward_name, self.limits = reward_fns, reward_name, limits
        self.free: asyncio.Queue | None = None  # made on the serving loop, at the first request
        self.waiting = 0

    async def score(self, prompts: list[str], encoded: list[str]) -> list[float]:
        from starlette.concurrency import run_in_threadpool

        if self.free is None:
            self.free = asyncio.Queue()
            for reward_fn in self.reward_fns:
                self.free.put_nowait(reward_fn)
        if self.free.empty() and self.waiting >= self.limits.max_queued:
            raise RequestError(503, f"{self.waiting} batches already wait for a worker (--max_queued)")
        self.waiting += 1
        try:
            reward_fn = await self.free.get()
        finally:
            self.waiting -= 1
        try:
            return await run_in_threadpool(self.score_now, reward_fn, prompts, encoded)
        finally:
            self.free.put_nowait(reward_fn)

    def score_now(self, reward_fn, prompts: list[str], encoded: list[str]) -> list[float]:
        images = decode_batch(encoded, self.limits)
        return score_candidates(reward_fn, images, prompts, self.reward_name).ranking.tolist()


def authorized(request, token: str | None) -> bool:
    given = request.headers.get("authorization", "").removeprefix("Bearer ")
    return token is None or hmac.compare_digest(given.encode(), token.encode())


async def answer(request, token: str | None, limits: ServerLimits, info: dict, score):
    """One request to the protocol's three routes (this server and the Ray Serve replicas): token, limits,
    and every error mapped to its status; ``score(prompts, encoded)`` scores a checked batch."""
    from starlette.requests import ClientDisconnect

    path = request.url.path.rstrip("/")
    try:
        if not authorized(request, token):
            raise RequestError(401, "missing or wrong token")
        if request.method == "GET" and path in ("/health", "/info"):
            return json_answer(200, {"status": "ok", "reward": info["reward"]} if path == "/health" else info)
        if request.method != "POST" or path != "/score":
            raise RequestError(404, "POST /score, GET /health or GET /info")
        raw = await asyncio.wait_for(read_body(request, limits.max_request_bytes), limits.request_timeout)
        return json_answer(200, {"scores": await score(*parse_batch(raw, limits))})
    except asyncio.TimeoutError:
        return json_answer(408, {"error": f"the request did not arrive within {limits.request_timeout:g} s "
                                          "(--request_timeout)"})
    except RequestError as error:
        return json_answer(error.status, {"error": str(error)})
    except RewardError as error:  # the reward's own fault: deterministic, not worth a retry
        return json_answer(422, {"error": str(error)})
    except ClientDisconnect:
        return json_answer(400, {"error": "the client went away"})  # never sent: nobody listens


def server_info(reward_name: str, limits: ServerLimits, **facts) -> dict:
    return {"reward": reward_name, "protocol_version": PROTOCOL_VERSION, **facts, "limits": asdict(limits)}


def build_app(reward_fns: list, reward_name: str, token: str | None, limits: ServerLimits):
    """The ASGI app: /score, /health and /info, token-checked, every limit enforced."""
    from starlette.applications import Starlette
    from starlette.routing import Route

    workers = Workers(reward_fns, reward_name, limits)
    info = server_info(reward_name, limits, workers=len(reward_fns))

    async def route(request):
        return await answer(request, token, limits, info, workers.score)

    async def server_error(request, error):
        return json_answer(500, {"error": f"{type(error).__name__}: {error}"})

    return Starlette(routes=[Route("/score", route, methods=["POST"]), Route("/health", route, methods=["GET"]),
                             Route("/info", route, methods=["GET"])],
                     exception_handlers={Exception: server_error})


class RewardServer:
    """uvicorn serving ``app`` on a socket bound at construction (so port 0 has its number at once):
    ``serve_forever()`` (blocks), ``shutdown()`` (graceful: finishes the requests in flight),
    ``server_close()``."""

    def __init__(self, app, host: str, port: int, limits: ServerLimits):
        import uvicorn

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.socket.listen(2048)  # connections made before uvicorn starts wait in the backlog, not refused
        self.server_port = self.socket.getsockname()[1]
        config = uvicorn.Config(app, limit_concurrency=limits.max_connections, timeout_keep_alive=5,
                                timeout_graceful_shutdown=int(limits.request_timeout), log_level="warning",
                                access_log=bool(os.environ.get("DRPO_REWARD_SERVER_VERBOSE")), lifespan="off")
        self.server = uvicorn.Server(config)
        self.stopped = threading.Event()

    def serve_forever(self) -> None:
        try:
            self.server.run(sockets=[self.socket])
        finally:
            self.stopped.set()

    def shutdown(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.stopped.wait(timeout)

    def server_close(self) -> None:
        self.socket.close()


def build_server(reward: str, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
                 max_request_mb: float = 64.0, max_batch: int = 64, devices: tuple[str, ...] = ("cpu",),
                 max_request_pixels: int = ServerLimits.max_request_pixels, **limits) -> RewardServer:
    """The server: one copy of the reward per entry of ``devices`` (a worker each), behind one port;
    ``limits``: any other field of ``ServerLimits``."""
    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        raise ValueError(f"serving on {host!r} (beyond loopback) needs a shared --token or ${TOKEN_ENV}")
    caps = ServerLimits(max_request_bytes=int(max_request_mb * 2**20), max_batch=max_batch,
                        max_request_pixels=max_request_pixels, **limits)
    reward_fns = [load_reward(reward, device=device) for device in devices]
    return RewardServer(build_app(reward_fns, reward, token, caps), host, port, caps)


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = flags.Parser(description=__doc__.splitlines()[0], add_help=add_help)
    parser.add_argument("--reward", required=True, help="Any --reward of train_drpo.py (name, file.py:fn, module:fn).")
    parser.add_argument("--host", default="127.0.0.1", help="Interface to bind (default: loopback only).")
    parser.add_argument("--port", type=flags.port, default=8000)
    parser.add_argument("--token", default=None, help=f"Shared secret (default: ${TOKEN_ENV}); none: no check.")
    parser.add_argument("--max_request_mb", type=flags.positive_float, default=64.0,
                        help="Largest request body; a larger one is answered 413 before it is read.")
    parser.add_argument("--max_batch", type=flags.positive_int, default=64, help="Most images per request.")
    parser.add_argument("--max_image_pixels", type=flags.positive_int, default=ServerLimits.max_image_pixels,
                        help="Most pixels of one image, checked from its PNG header before decoding.")
    parser.add_argument("--max_request_pixels", type=flags.positive_int, default=ServerLimits.max_request_pixels,
                        help="Most pixels per request, all images together (decoded: 12 bytes each); checked from "
                             "the PNG headers before anything is decoded.")
    parser.add_argument("--request_timeout", type=flags.positive_float, default=ServerLimits.request_timeout,
                        help="Seconds the whole request body may take to arrive (408 after).")
    parser.add_argument("--max_connections", type=flags.positive_int, default=ServerLimits.max_connections,
                        help="Most connections served at once (503 beyond).")
    parser.add_argument("--max_queued", type=flags.positive_int, default=ServerLimits.max_queued,
                        help="Most batches waiting for a free worker (503 beyond).")
    parser.add_argument("--devices", default="cuda" if torch.cuda.is_available() else "cpu",
                        type=flags.names,
                        help="One worker (a copy of the reward) per comma-separated device, e.g. cuda:0,cuda:1; "
                             "requests are scored concurrently, one per worker.")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    token = args.token or os.environ.get(TOKEN_ENV) or None
    try:
        server = build_server(args.reward, args.host, args.port, token, args.max_request_mb, args.max_batch,
                              args.devices, args.max_request_pixels, max_image_pixels=args.max_image_pixels,
                              request_timeout=args.request_timeout, max_connections=args.max_connections,
                              max_queued=args.max_queued)
    except (ValueError, OSError) as error:
        parser.error(str(error))
    print(f"serving reward {args.reward!r} on http://{args.host}:{server.server_port}/score with "
          f"{len(args.devices)} worker(s) on {', '.join(args.devices)}{' (token required)' if token else ''}",
          flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
