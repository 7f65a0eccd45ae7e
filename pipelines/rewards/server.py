"""Serve any DrPO reward over HTTP, so a large reward can run on other GPUs or in its own environment.

    python -m pipelines.rewards.server --reward pickscore --port 8000 --token s3cret
    accelerate launch train_drpo.py ... --reward http://127.0.0.1:8000/score   # DRPO_REWARD_TOKEN=s3cret

POST /score with ``{"prompts": [...], "images": [base64 PNG, ...]}`` answers ``{"scores": [...]}``.
It binds 127.0.0.1 unless --host says otherwise, rejects requests without the shared token when one
is set (--token or DRPO_REWARD_TOKEN), and only ever parses JSON and PNG (nothing is unpickled).

Memory is bounded by the caps, whatever the clients send: a body over --max_request_mb is refused
(413) before it is read, a batch over --max_batch images or --max_request_pixels pixels (read from
the PNG headers) before anything is decoded, and decoding and scoring run one batch at a time per
worker (``--devices cuda:0,cuda:1``: one copy of the reward per device, behind the same port).
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import queue
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from pipelines import flags
from pipelines.rewards import RewardError, load_reward, score_candidates
from pipelines.rewards.remote import TOKEN_ENV, open_png, png_pixels, png_size

MAX_REQUEST_PIXELS = 64 * 512 * 512  # a full --max_batch of 512 px images; about 200 MB once decoded
DRAIN_FACTOR = 4  # an oversized body up to this many times the cap is read and dropped (the client then reads
# its 413 instead of a broken pipe); a larger one closes the connection


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def make_handler(reward_fns: list, reward_name: str, token: str | None, max_bytes: int, max_batch: int,
                 max_pixels: int):
    # Admission: one batch per worker (one reward copy per --devices entry) decoded and scored at a time, so
    # memory is bounded by the caps times the workers; further requests wait for a free worker.
    workers = queue.Queue()
    for reward_fn in reward_fns:
        workers.put(reward_fn)

    class Handler(BaseHTTPRequestHandler):
        timeout = 60  # seconds a client may take to send its request

        def do_POST(self):  # the http.server API name
            self.body_read = False
            try:
                self.check_request()
                prompts, encoded = self.read_batch()
                reward_fn = workers.get()
                try:
                    images = decode_batch(encoded, max_pixels)
                    scores = score_candidates(reward_fn, images, prompts, reward_name).ranking
                finally:
                    workers.put(reward_fn)
                self.answer(200, {"scores": scores.tolist()})
            except RequestError as error:
                self.answer(error.status, {"error": str(error)})
            except RewardError as error:  # the reward's own fault: deterministic, not worth a retry
                self.answer(422, {"error": str(error)})
            except Exception as error:  # noqa: BLE001 - answer rather than drop the connection
                self.answer(500, {"error": f"{type(error).__name__}: {error}"})

        def check_request(self):
            if self.path.rstrip("/") != "/score":
                raise RequestError(404, "POST /score")
            if token is not None:
                given = self.headers.get("Authorization", "").removeprefix("Bearer ")
                if not hmac.compare_digest(given.encode(), token.encode()):
                    raise RequestError(401, "missing or wrong token")
            if not (self.headers.get("Content-Length") or "0").isdigit():
                raise RequestError(400, "bad Content-Length")
            length = self.declared_length()
            if length <= 0 or length > max_bytes:
                raise RequestError(413, f"request body must be 1..{max_bytes} bytes (--max_request_mb), got {length}")

        def declared_length(self) -> int:
            try:
                return int(self.headers.get("Content-Length") or 0)
            except ValueError:
                return 0

        def read_batch(self):
            raw = self.rfile.read(self.declared_length())
            self.body_read = True
            try:
                body = json.loads(raw)
                prompts, encoded = body["prompts"], body["images"]
            except (ValueError, KeyError, TypeError) as error:
                raise RequestError(400, f"expected JSON with 'prompts' and 'images': {error}") from error
            if not isinstance(prompts, list) or not isinstance(encoded, list) or len(prompts) != len(encoded):
                raise RequestError(400, "'prompts' and 'images' must be lists of the same length")
            if not 1 <= len(encoded) <= max_batch:
                raise RequestError(413, f"batch must hold 1..{max_batch} images, got {len(encoded)}")
            if not all(isinstance(p, str) for p in prompts):
                raise RequestError(400, "every prompt must be a string")
            return prompts, encoded

        def drain(self):
            """Read and drop an unread body (up to DRAIN_FACTOR x the cap) so the client can read the answer."""
            length = 0 if self.body_read else self.declared_length()
            if 0 < length <= DRAIN_FACTOR * max_bytes:
                while length > 0 and (chunk := self.rfile.read(min(length, 2**20))):
                    length -= len(chunk)
            elif length:
                self.close_connection = True

        def answer(self, status: int, payload: dict):
            if status != 200:
                self.drain()
            data = json.dumps(payload, allow_nan=False).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format, *args):  # quieter than the default per-request stderr line
            if os.environ.get("DRPO_REWARD_SERVER_VERBOSE"):
                super().log_message(format, *args)

    return Handler


def decode_batch(encoded: list, max_pixels: int) -> torch.Tensor:
    """[N, 3, H, W] from base64 PNGs, after checking every image's header: the total pixel count
    within ``max_pixels`` (what decoding will cost) and one size for the batch. The images are decoded
    one by one into a single float tensor, so the peak is that tensor (12 bytes a pixel) plus one image."""
    try:
        sizes = [png_size(item) for item in encoded]
    except Exception as error:  # any unreadable image is the client's error
        raise RequestError(400, f"images must be base64 PNG: {error}") from error
    total = sum(width * height for width, height in sizes)
    if total > max_pixels:
        raise RequestError(413, f"the batch holds {total} pixels, more than --max_request_pixels={max_pixels}")
    if len(set(sizes)) != 1:
        raise RequestError(400, "all images of a batch must have the same size")
    width, height = sizes[0]
    images = torch.empty(len(encoded), 3, height, width)
    try:
        for index, item in enumerate(encoded):
            images[index].copy_(png_pixels(open_png(item, max_pixels)))  # uint8 into float: no float copy
    except Exception as error:  # any undecodable image is the client's error
        raise RequestError(400, f"images must be base64 PNG: {error}") from error
    return images.div_(255.0)


def build_server(reward: str, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
                 max_request_mb: float = 64.0, max_batch: int = 64, devices: tuple[str, ...] = ("cpu",),
                 max_request_pixels: int = MAX_REQUEST_PIXELS) -> ThreadingHTTPServer:
    """The server: one copy of the reward per entry of ``devices`` (a worker each), behind one port."""
    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        raise ValueError(f"serving on {host!r} (beyond loopback) needs a shared --token or ${TOKEN_ENV}")
    reward_fns = [load_reward(reward, device=device) for device in devices]
    handler = make_handler(reward_fns, reward, token, int(max_request_mb * 2**20), max_batch, max_request_pixels)
    return ThreadingHTTPServer((host, port), handler)


def build_parser() -> argparse.ArgumentParser:
    parser = flags.Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--reward", required=True, help="Any --reward of train_drpo.py (name, file.py:fn, module:fn).")
    parser.add_argument("--host", default="127.0.0.1", help="Interface to bind (default: loopback only).")
    parser.add_argument("--port", type=flags.port, default=8000)
    parser.add_argument("--token", default=None, help=f"Shared secret (default: ${TOKEN_ENV}); none: no check.")
    parser.add_argument("--max_request_mb", type=flags.positive_float, default=64.0,
                        help="Largest request body; a larger one is answered 413 before it is read.")
    parser.add_argument("--max_batch", type=flags.positive_int, default=64, help="Most images per request.")
    parser.add_argument("--max_request_pixels", type=flags.positive_int, default=MAX_REQUEST_PIXELS,
                        help="Most pixels per request, all images together (decoded: 12 bytes each); checked from "
                             "the PNG headers before anything is decoded.")
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
                              args.devices, args.max_request_pixels)
    except (ValueError, OSError) as error:
        parser.error(str(error))
    print(f"serving reward {args.reward!r} on http://{args.host}:{server.server_port}/score with "
          f"{len(args.devices)} worker(s) on {', '.join(args.devices)}{' (token required)' if token else ''}",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
