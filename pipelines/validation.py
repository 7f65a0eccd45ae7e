"""Validation while training: held-out prompts and seeds, the base-vs-LoRA grid every --validation_steps
(written and sent to the trackers) and the --validation_rewards of both, so reward hacking shows while it
happens."""

from __future__ import annotations

import logging
import os

import torch

from drpo_utils import lora_disabled
from pipelines import files
from pipelines.config import ValidationConfig
from pipelines.images import labelled_grid
from pipelines.inference import denoiser, generate_images
from pipelines.redact import public_text
from pipelines.rewards import score_candidates

logger = logging.getLogger(__name__)

VALIDATION_SEED = 10_000  # held-out: training noises come from runtime.step_generator
MIN_PROMPTS_TO_HOLD_OUT = 100


def held_out_count(distinct_prompts: int) -> int:
    """How many prompts a set of 100+ holds out: 1 in 20, at least 4 (a bootstrap over prompts needs
    several) and at most 16 (each is generated at every validation)."""
    return min(16, max(4, distinct_prompts // 20))


def split_validation_prompts(validation: ValidationConfig, prompts: list[str]) -> tuple[list[str], list[str]]:
    """(training prompts, validation prompts). --validation_prompts if given; otherwise, when the set has
    at least 100 distinct prompts, its last ``held_out_count`` (1 in 20, 4 to 16), held out of training; a
    smaller set validates on its first 4 training prompts, with a warning."""
    if validation.validation_prompts:
        return prompts, list(validation.validation_prompts)
    distinct = list(dict.fromkeys(prompts))
    if len(distinct) < MIN_PROMPTS_TO_HOLD_OUT:
        logger.warning(f"{len(distinct)} prompts: too few to hold prompts out (it takes {MIN_PROMPTS_TO_HOLD_OUT}), "
                       "so validation uses the first 4 training prompts (give held-out ones with "
                       "--validation_prompts)")
        return prompts, distinct[:4]
    held_out = set(distinct[-held_out_count(len(distinct)):])
    return [p for p in prompts if p not in held_out], [p for p in distinct if p in held_out]


def validation_seeds(count: int) -> list[int]:
    return list(range(VALIDATION_SEED, VALIDATION_SEED + count))


def log_images(accelerator, name: str, image, step: int) -> None:
    """Send a PIL image to every active tracker (tensorboard / wandb)."""
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(name, np.asarray(image), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({name: wandb.Image(image)}, step=step)


class Validation:
    """Every --validation_steps, on the main process: the grid (per prompt, the base model's row above the
    LoRA's, same held-out seeds) and the --validation_rewards of both. The base's images and scores are
    computed once per run (in memory). No autocast: each module runs in its own dtype (an fp32 SDXL VAE
    stays fp32)."""

    def __init__(self, accelerator, pipe, prompts: list[str], seeds: list[int], resolution: int, folder: str,
                 rewards: dict):
        self.accelerator, self.pipe, self.prompts, self.seeds = accelerator, pipe, prompts, seeds
        self.resolution, self.folder, self.rewards = resolution, folder, rewards
        self.base_images, self.base_scores = None, {}

    def scores(self, images: torch.Tensor, suffix: str) -> dict[str, float]:
        per_image = [p for p in self.prompts for _ in self.seeds]
        return {f"validation/{public_text(name)}{suffix}":  # a logged name: never with a URL's credential
                score_candidates(fn, images, per_image, public_text(name)).reported.mean().item()
                for name, fn in self.rewards.items()}

    def __call__(self, step: int) -> dict[str, float]:
        """Writes and logs the grid of ``step``; returns the validation rewards' means to log."""
        if not self.accelerator.is_main_process:
            return {}
        if self.base_images is None:
            with lora_disabled(denoiser(self.pipe)):
                self.base_images = generate_images(self.pipe, self.prompts, self.seeds, self.resolution)
            self.base_scores = self.scores(self.base_images, "_base")
        tuned = generate_images(self.pipe, self.prompts, self.seeds, self.resolution)
        grid = labelled_grid(self.prompts, {"base": self.base_images, "LoRA": tuned}, len(self.seeds))
        os.makedirs(self.folder, exist_ok=True)
        files.save_image(grid, os.path.join(self.folder, f"step-{step:06d}.png"))
        log_images(self.accelerator, "validation/base_vs_lora", grid, step)
        return {**self.scores(tuned, ""), **self.base_scores}
