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


def saturation(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Mean chroma (max minus min channel per pixel): a smooth colour statistic no default was tuned on."""
    return (images.amax(dim=1) - images.amin(dim=1)).mean(dim=(1, 2))


def warmth(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Mean red minus mean blue: a small-magnitude colour statistic no default was tuned on."""
    return (images[:, 0] - images[:, 2]).mean(dim=(1, 2))
