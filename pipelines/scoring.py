"""One reward of a base model against a LoRA on the same prompts and seeds: the score tables and the
summary (means, standard errors, paired difference, effect size) that the training run's final check, the
tests and the benchmarks report. ``python -m pipelines.evaluate`` is the full harness (several metrics,
caches, judge); this is its single-reward core, with the same statistics.
"""

from __future__ import annotations

import math

import torch

from pipelines.eval_stats import bootstrap_indices, mean_and_se, paired_difference
from pipelines.inference import generate_images, load_lora, load_one_step_pipeline
from pipelines.rewards import load_reward, score_candidates


def reward_table(pipe, reward_fn, reward_name: str, prompts: list[str], seeds: list[int], resolution=None,
                 progress: bool = False, description: str = "generating"):
    """Rewards [len(prompts), len(seeds)] and the images they score (a mixture: its reported raw sum,
    comparable across models)."""
    images = generate_images(pipe, prompts, seeds, resolution, progress=progress, description=description)
    scores = score_candidates(reward_fn, images, [p for p in prompts for _ in seeds], reward_name).reported
    return scores.view(len(prompts), len(seeds)), images


def summarize(base: torch.Tensor, tuned: torch.Tensor, bootstrap: int = 1000, seed: int = 0) -> dict:
    """Means, standard errors, the paired difference and the effect size of tuned - base ([prompts, seeds]).

    Standard errors are the evaluation harness's (and the paper's, Appendix B): bootstrap over prompts, the
    two arms of the paired difference resampled together (``pipelines/eval_stats.py``), so
    ``final_metrics.json``, ``python -m pipelines.evaluate`` and the README's tables report one quantity.
    A ratio whose denominator is zero or undefined is ``None`` with a ``<name>_undefined`` entry saying why
    (strict JSON has no NaN): one prompt has no bootstrap, an unchanged model has no paired z, a reward
    that does not vary has no effect size.
    """
    indices = bootstrap_indices(base.shape[0], bootstrap, seed)
    base_stats, tuned_stats = mean_and_se(base, indices), mean_and_se(tuned, indices)
    paired = paired_difference(base, tuned, indices)
    # Across-seed spread of the base reward, averaged over prompts (the noise DrPO can exploit).
    seed_std = base.double().std(dim=1).mean() if base.shape[1] > 1 else base.double().std()
    result = {"samples": base.numel(), "prompts": base.shape[0], "seeds": base.shape[1],
              "standard_error": f"bootstrap over prompts, {bootstrap} resamples",
              "base_mean": base_stats["mean"], "base_se": base_stats["se"], "lora_mean": tuned_stats["mean"],
              "lora_se": tuned_stats["se"], "change": paired["delta"], "change_se": paired["delta_se"]}
    no_bootstrap = "fewer than two prompts to resample"
    unpaired_se = None if None in (base_stats["se"], tuned_stats["se"]) else math.hypot(base_stats["se"],
                                                                                         tuned_stats["se"])
    ratios = {"z_unpaired": (unpaired_se, "the reward is the same for every image"),
              "z_paired": (paired["delta_se"], "the LoRA changes no score (every paired difference is equal)"),
              "effect_size": (seed_std.item(), "the base reward does not vary across seeds")}
    for name, (denominator, reason) in ratios.items():
        defined = denominator is not None and denominator > 0 and math.isfinite(paired["delta"] / denominator)
        result[name] = paired["delta"] / denominator if defined else None
        if not defined:
            result[f"{name}_undefined"] = no_bootstrap if denominator is None else reason
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
