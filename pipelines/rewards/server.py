"""Serve any DrPO reward over HTTP, so a large reward can run on other GPUs or in its own environment.

    python -m pipelines.rewards.server --reward pickscore --port 8000 --token s3cret
    accelerate launch train_drpo.py ... --reward http://127.0.0.1:8000/score   # DRPO_REWARD_TOKEN=s3cret

POST /score with ``{"prompts": [...], "images": [base64 PNG, ...]}`` answers ``{"scores": [...]}``.
It binds 127.0.0.1 unless --host says otherwise, rejects requests without the shared token when one
is set (--token or DRPO_REWARD_TOKEN), caps the request size and the batch size, and only ever
parses JSON and PNG (nothing is unpickled).
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from pipelines.rewards import RewardError, load_reward, score_candidates
from pipelines.rewards.remote import TOKEN_ENV, decode_png


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def make_handler(reward_fn, reward_name: str, token: str | None, max_bytes: int, max_batch: int):
    lock = threading.Lock()  # one batch on the reward model at a time

    class Handler(BaseHTTPRequestHandler):
        timeout = 60  # seconds a client may take to send its request

        def do_POST(self):  # noqa: N802 (http.server API)
            try:
                self.check_request()
                prompts, images = self.read_batch()
                with lock:
                    scores = score_candidates(reward_fn, images, prompts, reward_name).ranking
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
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError as error:
                raise RequestError(400, "bad Content-Length") from error
            if length <= 0 or length > max_bytes:
                raise RequestError(413, f"request body must be 1..{max_bytes} bytes, got {length}")

        def read_batch(self):
            try:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompts, encoded = body["prompts"], body["images"]
            except (ValueError, KeyError, TypeError) as error:
                raise RequestError(400, f"expected JSON with 'prompts' and 'images': {error}") from error
            if not isinstance(prompts, list) or not isinstance(encoded, list) or len(prompts) != len(encoded):
                raise RequestError(400, "'prompts' and 'images' must be lists of the same length")
            if not 1 <= len(encoded) <= max_batch:
                raise RequestError(413, f"batch must hold 1..{max_batch} images, got {len(encoded)}")
            try:
                images = [decode_png(item) for item in encoded]
            except Exception as error:  # noqa: BLE001 - any undecodable image is the client's error
                raise RequestError(400, f"images must be base64 PNG: {error}") from error
            if len({tuple(image.shape) for image in images}) != 1:
                raise RequestError(400, "all images of a batch must have the same size")
            return [str(p) for p in prompts], torch.stack(images)

        def answer(self, status: int, payload: dict):
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format, *args):  # quieter than the default per-request stderr line
            if os.environ.get("DRPO_REWARD_SERVER_VERBOSE"):
                super().log_message(format, *args)

    return Handler


def build_server(reward: str, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
                 max_request_mb: float = 64.0, max_batch: int = 64, device: str = "cpu") -> ThreadingHTTPServer:
    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        raise ValueError(f"serving on {host!r} (beyond loopback) needs a shared --token or ${TOKEN_ENV}")
    reward_fn = load_reward(reward, device=device)
    handler = make_handler(reward_fn, reward, token, int(max_request_mb * 2**20), max_batch)
    return ThreadingHTTPServer((host, port), handler)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reward", required=True, help="Any --reward of train_drpo.py (name, file.py:fn, module:fn).")
    parser.add_argument("--host", default="127.0.0.1", help="Interface to bind (default: loopback only).")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--token", default=None, help=f"Shared secret (default: ${TOKEN_ENV}); none: no check.")
    parser.add_argument("--max_request_mb", type=float, default=64.0)
    parser.add_argument("--max_batch", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    token = args.token or os.environ.get(TOKEN_ENV) or None
    try:
        server = build_server(args.reward, args.host, args.port, token, args.max_request_mb, args.max_batch,
                              args.device)
    except (ValueError, OSError) as error:
        parser.error(str(error))
    print(f"serving reward {args.reward!r} on http://{args.host}:{server.server_port}/score"
          f"{' (token required)' if token else ''}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
