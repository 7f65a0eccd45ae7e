"""One reward of a base model against a LoRA on the same prompts and seeds: the score tables and the
summary (means, standard errors, paired difference, effect size) that the training run's final check, the
tests and the benchmarks report. ``python -m pipelines.evaluate`` is the full harness (several metrics,
caches, bootstrap over prompts, judge); this is its single-reward core.
"""

from __future__ import annotations

import torch

from pipelines.inference import generate_images, load_lora, load_one_step_pipeline
from pipelines.rewards import load_reward, score_candidates


def reward_table(pipe, reward_fn, reward_name: str, prompts: list[str], seeds: list[int], resolution=None,
                 progress: bool = False, description: str = "generating"):
    """Rewards [len(prompts), len(seeds)] and the images they score (a mixture: its reported raw sum,
    comparable across models)."""
    images = generate_images(pipe, prompts, seeds, resolution, progress=progress, description=description)
    scores = score_candidates(reward_fn, images, [p for p in prompts for _ in seeds], reward_name).reported
    return scores.view(len(prompts), len(seeds)), images


def summarize(base: torch.Tensor, tuned: torch.Tensor) -> dict:
    """Means, standard errors, the paired difference and the effect size of tuned - base.

    A ratio whose denominator is zero is ``None`` with a ``<name>_undefined`` entry saying why (strict
    JSON has no NaN): an unchanged model has no paired z, a reward that does not vary has no effect size.
    """
    n = base.numel()
    difference = (tuned - base).flatten().double()
    base_se, tuned_se = base.double().std() / n**0.5, tuned.double().std() / n**0.5
    change, change_se = difference.mean(), difference.std() / n**0.5
    # Across-seed spread of the base reward, averaged over prompts (the noise DrPO can exploit).
    seed_std = base.double().std(dim=1).mean() if base.shape[1] > 1 else base.double().std()
    result = {"samples": n, "base_mean": base.mean().item(), "base_se": base_se.item(),
              "lora_mean": tuned.mean().item(), "lora_se": tuned_se.item(), "change": change.item(),
              "change_se": change_se.item()}
    ratios = {"z_unpaired": (change, (base_se**2 + tuned_se**2).sqrt(), "the reward is the same for every image"),
              "z_paired": (change, change_se, "the LoRA changes no score (every paired difference is equal)"),
              "effect_size": (change, seed_std, "the base reward does not vary across seeds")}
    for name, (numerator, denominator, reason) in ratios.items():
        defined = bool(denominator > 0) and bool(torch.isfinite(numerator / denominator))
        result[name] = (numerator / denominator).item() if defined else None
        if not defined:
            result[f"{name}_undefined"] = reason
    return result


def describe_change(metrics: dict) -> str:
    """'effect size 1.23, paired z 4.5', or the reason a figure is undefined, in words."""
    parts = []
    for name, label, digits in (("effect_size", "effect size", 2), ("z_paired", "paired z", 1)):
        value = metrics[name]
        parts.append(f"{label} {value:.{digits}f}" if value is not None
                     else f"{label} undefined: {metrics[f'{name}_undefined']}")
    return ", ".join(parts)


def evaluate(model: str, lora: str, reward: str, prompts: list[str], seeds: list[int], resolution=None,
             progress: bool = False, device=None):
    """One reward of the base model vs base + LoRA on the same prompts and seeds (no cache, one process),
    fp32 on ``device`` (default: the GPU if there is one)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    reward_fn = load_reward(reward, device)
    pipe = load_one_step_pipeline(model, device=device)
    base, base_images = reward_table(pipe, reward_fn, reward, prompts, seeds, resolution, progress, "base")
    load_lora(pipe, lora)
    tuned, tuned_images = reward_table(pipe, reward_fn, reward, prompts, seeds, resolution, progress, "LoRA")
    return summarize(base, tuned), base_images, tuned_images
