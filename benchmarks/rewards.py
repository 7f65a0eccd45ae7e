"""Weight-free rewards for the benchmarks (the reward protocol: images [N, 3, H, W] in [0, 1], prompts -> N scores)."""

from __future__ import annotations

import os
import time

import torch


def brightness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Mean pixel value: differentiable, so every --method can train on it."""
    return images.mean(dim=(1, 2, 3))


def slow_brightness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """``brightness`` after sleeping $DRPO_BENCH_LATENCY seconds: a stand-in for a large reward elsewhere."""
    time.sleep(float(os.environ.get("DRPO_BENCH_LATENCY", "0")))
    return brightness(images, prompts)
