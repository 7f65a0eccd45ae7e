"""Remote rewards: a JSON POST of PNG images and prompts, answered by ``{"scores": [...]}``.

The client (``RemoteReward``, what ``--reward http://host:port/score`` builds) and the wire format it
shares with the server (``pipelines/rewards/server.py``).
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import json
import logging
import os
import socket
import threading
import time
import urllib.parse

import torch

from pipelines.redact import public_text
from pipelines.rewards.protocol import RewardError

logger = logging.getLogger(__name__)
TOKEN_ENV = "DRPO_REWARD_TOKEN"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def encode_png(image: torch.Tensor) -> str:
    """[3, H, W] in [0, 1] -> base64 PNG (8-bit, lossless at that depth)."""
    from PIL import Image

    buffer = io.BytesIO()
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


MAX_PIXELS = 2048 * 2048


def png_size(data: str) -> tuple[int, int]:
    """(width, height) of a base64 PNG, read from its header (the first 24 bytes) without decoding it."""
    if not isinstance(data, str):
        raise TypeError(f"expected a base64 string, got {type(data).__name__}")
    try:
        header = base64.b64decode(data[:32], validate=True)
    except (binascii.Error, ValueError) as error:
        raise ValueError(f"not base64: {error}") from error
    if len(header) < 24 or not header.startswith(PNG_SIGNATURE) or header[12:16] != b"IHDR":
        raise ValueError("not a PNG (no PNG signature and IHDR header)")
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


def open_png(data: str, max_pixels: int = MAX_PIXELS):
    """base64 PNG (and only PNG) -> an RGB PIL image; refuses more than ``max_pixels`` before decoding."""
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)), formats=["PNG"])
    if image.width * image.height > max_pixels:
        raise ValueError(f"image of {image.width}x{image.height} pixels exceeds {max_pixels}")
    return image if image.mode == "RGB" else image.convert("RGB")


def png_pixels(image) -> torch.Tensor:
    """An RGB PIL image -> [3, H, W] uint8."""
    import numpy as np

    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def decode_png(data: str, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """base64 PNG (and only PNG) -> [3, H, W] float32 in [0, 1] (RGB); refuses more than ``max_pixels``."""
    return png_pixels(open_png(data, max_pixels)).float().div_(255.0)


class RemoteReward:
    """A reward served over HTTP (e.g. ``python -m pipelines.rewards.server --reward pickscore``).

    Sends ``{"prompts": [...], "images": [base64 PNG, ...]}``; expects ``{"scores": [N numbers]}``.
    ``timeout`` is a deadline for the *whole* request (connect, send, wait, read), however slowly the
    server trickles its answer. Connection failures, timeouts and 5xx answers are retried ``retries``
    times with exponential backoff, each retry logged; anything else fails at once naming the URL.
    """

    def __init__(self, url: str, token: str | None = None, timeout: float = 60.0, retries: int = 2,
                 backoff: float = 1.0):
        self.url, self.timeout, self.retries, self.backoff = url, timeout, retries, backoff
        self.name = public_text(url)  # what messages and logs say: the URL without its credentials
        self.token = token if token is not None else os.environ.get(TOKEN_ENV)
        parts = urllib.parse.urlsplit(url)
        # user:password@ in the URL: HTTP basic authentication, unless a bearer token is given
        self.basic = base64.b64encode(f"{parts.username}:{parts.password or ''}".encode()).decode() \
            if parts.username else None

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> list[float]:
        body = json.dumps({"prompts": list(prompts), "images": [encode_png(image) for image in images]}).encode()
        headers = {"Content-Type": "application/json"}
        if self.token or self.basic:
            headers["Authorization"] = f"Bearer {self.token}" if self.token else f"Basic {self.basic}"
        attempt = 0
        while True:
            try:
                status, data = post_within(self.url, body, headers, self.timeout)
            except (OSError, http.client.HTTPException) as error:  # refused, reset, deadline passed, truncated
                if attempt == self.retries:
                    raise RewardError(f"reward server {self.name} unreachable or too slow after {attempt + 1} "
                                      f"attempts (deadline {self.timeout:g} s per request, --reward_timeout): "
                                      f"{type(error).__name__}: {error}") from error
                reason = f"{type(error).__name__}: {error}"
            else:
                if status < 500 or attempt == self.retries:
                    return self.scores_of(status, data)
                reason = f"HTTP {status}"
            delay = self.backoff * 2**attempt
            attempt += 1
            logger.warning("reward server %s: %s; retry %d of %d in %g s", self.name, reason, attempt, self.retries,
                           delay)
            time.sleep(delay)

    def scores_of(self, status: int, data: bytes) -> list[float]:
        """The scores of a complete answer, or a ``RewardError`` naming the URL."""
        if status != 200:
            answer = data[:500].decode(errors="replace")
            raise RewardError(f"reward server {self.name} answered HTTP {status}: {answer}")
        try:
            answer = json.loads(data)
        except json.JSONDecodeError as error:
            raise RewardError(f"reward server {self.name} did not answer JSON: {error}") from error
        scores = answer.get("scores") if isinstance(answer, dict) else None
        if not isinstance(scores, list) or not all(isinstance(s, (int, float)) and not isinstance(s, bool)
                                                   for s in scores):
            raise RewardError(f"reward server {self.name} did not return a list of numbers: {str(answer)[:200]}")
        return scores


def post_within(url: str, body: bytes, headers: dict, timeout: float) -> tuple[int, bytes]:
    """POST ``body`` to ``url`` and read the whole answer within ``timeout`` seconds (connect, send, wait,
    read, however slowly the server trickles it), or ``TimeoutError``. Returns (status, body)."""
    parts = urllib.parse.urlsplit(url)
    connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = connection_class(parts.netloc.rsplit("@", 1)[-1], timeout=timeout)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    outcome: dict = {}

    def exchange():
        try:
            connection.request("POST", path, body=body, headers=headers)
            response = connection.getresponse()
            outcome["answer"] = (response.status, response.read())
        except Exception as error:  # noqa: BLE001 - handed to the caller below
            outcome["error"] = error

    worker = threading.Thread(target=exchange, name="http-request", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        abort(connection)
        raise TimeoutError(f"no complete answer within {timeout:g} s")
    connection.close()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["answer"]


def abort(connection: http.client.HTTPConnection) -> None:
    """Shut the connection's socket down, which wakes a thread blocked reading it, then close it."""
    if connection.sock is not None:
        try:
            connection.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed by the other side
    connection.close()


NOT_A_DRPO_SERVER = (404, 405, 501)  # a service of its own with /score only: nothing to probe


def probe_server(url: str, token: str | None = None, timeout: float = 10.0) -> None:
    """GET the /health beside ``url``'s /score (the trainer does it at start-up, before any model loads): a
    server that is down, refuses the token or fails stops the run with a ``ValueError`` naming it; a
    service without /health (not this project's server) is logged and left to the first request."""
    parts, name = urllib.parse.urlsplit(url), public_text(url)
    token = token if token is not None else os.environ.get(TOKEN_ENV)
    path = parts.path.rsplit("/", 1)[0] + "/health" + (f"?{parts.query}" if parts.query else "")
    connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = connection_class(parts.netloc.rsplit("@", 1)[-1], timeout=timeout)
    try:
        connection.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
        response = connection.getresponse()
        status, body = response.status, response.read(500).decode(errors="replace")
    except (OSError, http.client.HTTPException) as error:
        raise ValueError(f"reward server {name} is not reachable ({type(error).__name__}: {error}); start it "
                         "first (python -m pipelines.rewards.server) or fix the URL") from error
    finally:
        connection.close()
    if status == 401:
        raise ValueError(f"reward server {name} refused the token: set ${TOKEN_ENV} to the server's --token")
    if status in NOT_A_DRPO_SERVER:
        logger.warning("reward server %s has no /health (HTTP %d): not checked before training", name, status)
    elif status != 200:
        raise ValueError(f"reward server {name} is not healthy: HTTP {status}: {body}")


class ShardedRemoteReward:
    """One reward served by several servers (``--reward http://a:8000/score|http://b:8000/score``): each
    call's images are split into one contiguous part per server, scored concurrently, and joined in
    order, so the scores are those one server would give."""

    def __init__(self, urls: list[str], timeout: float = 60.0):
        self.replicas = [RemoteReward(url, timeout=timeout) for url in urls]
        self.url = "|".join(urls)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> list[float]:
        from concurrent.futures import ThreadPoolExecutor

        size = -(-len(images) // len(self.replicas))
        parts = [(replica, images[start:start + size], prompts[start:start + size])
                 for replica, start in zip(self.replicas, range(0, len(images), size))]
        with ThreadPoolExecutor(len(parts), thread_name_prefix="reward-shard") as pool:
            scored = list(pool.map(lambda part: part[0](part[1], part[2]), parts))
        return [score for part in scored for score in part]
