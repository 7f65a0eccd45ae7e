"""Remote rewards: a JSON POST of PNG images and prompts, answered by ``{"scores": [...]}``.

The client (``RemoteReward``, what ``--reward http://host:port/score`` builds) and the wire format it
shares with the server (``pipelines/rewards/server.py``).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import time
import urllib.error
import urllib.request

import torch

from pipelines.rewards.protocol import RewardError

TOKEN_ENV = "DRPO_REWARD_TOKEN"


def encode_png(image: torch.Tensor) -> str:
    """[3, H, W] in [0, 1] -> base64 PNG (8-bit, lossless at that depth)."""
    from PIL import Image

    buffer = io.BytesIO()
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


MAX_PIXELS = 2048 * 2048


def decode_png(data: str, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """base64 PNG (and only PNG) -> [3, H, W] float32 in [0, 1] (RGB); refuses more than ``max_pixels``."""
    import numpy as np
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)), formats=["PNG"])
    if image.width * image.height > max_pixels:
        raise ValueError(f"image of {image.width}x{image.height} pixels exceeds {max_pixels}")
    image = image.convert("RGB")
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255.0


class RemoteReward:
    """A reward served over HTTP (e.g. ``python -m pipelines.rewards.server --reward pickscore``).

    Sends ``{"prompts": [...], "images": [base64 PNG, ...]}``; expects ``{"scores": [N numbers]}``.
    Each request has a timeout; connection failures and 5xx answers are retried a bounded number of
    times with backoff; anything else fails at once with a message naming the URL.
    """

    def __init__(self, url: str, token: str | None = None, timeout: float = 60.0, retries: int = 2,
                 backoff: float = 1.0):
        self.url, self.timeout, self.retries, self.backoff = url, timeout, retries, backoff
        self.token = token if token is not None else os.environ.get(TOKEN_ENV)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> list[float]:
        body = json.dumps({"prompts": list(prompts), "images": [encode_png(image) for image in images]}).encode()
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        for attempt in range(self.retries + 1):
            try:
                request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    answer = json.loads(response.read())
                break
            except urllib.error.HTTPError as error:
                detail = error.read()[:500].decode(errors="replace")
                if error.code < 500 or attempt == self.retries:
                    raise RewardError(f"reward server {self.url} answered HTTP {error.code}: {detail}") from error
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as error:
                if attempt == self.retries:
                    raise RewardError(
                        f"reward server {self.url} unreachable or too slow after {self.retries + 1} attempts "
                        f"(timeout {self.timeout}s): {error}"
                    ) from error
            except json.JSONDecodeError as error:
                raise RewardError(f"reward server {self.url} did not answer JSON: {error}") from error
            time.sleep(self.backoff * 2**attempt)
        scores = answer.get("scores") if isinstance(answer, dict) else None
        if not isinstance(scores, list) or not all(isinstance(s, (int, float)) and not isinstance(s, bool)
                                                   for s in scores):
            raise RewardError(f"reward server {self.url} did not return a list of numbers: {str(answer)[:200]}")
        return scores
