"""Held-out evaluation: a reward of the base model vs the base model + DrPO LoRA, same prompts and seeds.

    python -m pipelines.evaluate --pretrained_model_name_or_path assets/tiny-sd-turbo \
        --lora drpo-output --reward color_match --prompts_file assets/tiny_prompts.txt --seeds 1000-1015

Prints mean +- standard error for both, the paired difference, its z score and the effect size
(mean change / across-seed standard deviation of the base reward), and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json

import torch

from pipelines.inference import generate_images, load_lora, load_one_step_pipeline
from pipelines.prompts import load_prompts
from pipelines.rewards import load_reward, score_candidates


def parse_seeds(spec: str) -> list[int]:
    """"1000-1015" or "1,2,3"."""
    if "-" in spec:
        start, stop = (int(x) for x in spec.split("-"))
        return list(range(start, stop + 1))
    return [int(x) for x in spec.split(",")]


def reward_table(pipe, reward_fn, reward_name: str, prompts: list[str], seeds: list[int], resolution=None,
                 progress: bool = False, description: str = "generating"):
    """Rewards [len(prompts), len(seeds)] and the images they score (a mixture: its reported raw sum,
    comparable across models)."""
    images = generate_images(pipe, prompts, seeds, resolution, progress=progress, description=description)
    scores = score_candidates(reward_fn, images, [p for p in prompts for _ in seeds], reward_name).reported
    return scores.view(len(prompts), len(seeds)), images


def summarize(base: torch.Tensor, tuned: torch.Tensor) -> dict[str, float]:
    """Means, standard errors, the paired difference and the effect size of tuned - base."""
    n = base.numel()
    difference = (tuned - base).flatten()
    base_se = base.std() / n**0.5
    tuned_se = tuned.std() / n**0.5
    change = difference.mean()
    # Across-seed spread of the base reward, averaged over prompts (the noise DrPO can exploit).
    seed_std = base.std(dim=1).mean() if base.shape[1] > 1 else base.std()
    return {
        "samples": n,
        "base_mean": base.mean().item(),
        "base_se": base_se.item(),
        "lora_mean": tuned.mean().item(),
        "lora_se": tuned_se.item(),
        "change": change.item(),
        "change_se": (difference.std() / n**0.5).item(),
        "z_unpaired": (change / (base_se**2 + tuned_se**2).sqrt()).item(),
        "z_paired": (change / (difference.std() / n**0.5)).item(),
        "effect_size": (change / seed_std).item(),
    }


def evaluate(model: str, lora: str, reward: str, prompts: list[str], seeds: list[int], resolution=None,
             progress: bool = False):
    reward_fn = load_reward(reward)
    pipe = load_one_step_pipeline(model)
    base, base_images = reward_table(pipe, reward_fn, reward, prompts, seeds, resolution, progress, "base")
    load_lora(pipe, lora)
    tuned, tuned_images = reward_table(pipe, reward_fn, reward, prompts, seeds, resolution, progress, "LoRA")
    return summarize(base, tuned), base_images, tuned_images


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained_model_name_or_path", required=True)
    parser.add_argument("--lora", required=True, help="Folder (or Hub id) with pytorch_lora_weights.safetensors.")
    parser.add_argument("--reward", required=True)
    parser.add_argument("--prompts_file", required=True)
    parser.add_argument("--seeds", default="1000-1015")
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args(argv)
    prompts = load_prompts(args.prompts_file)
    result, _, _ = evaluate(args.pretrained_model_name_or_path, args.lora, args.reward, prompts,
                            parse_seeds(args.seeds), args.resolution, progress=True)
    for key, value in result.items():
        print(f"{key:>12}: {value:.4f}" if isinstance(value, float) else f"{key:>12}: {value}")
    if args.output_json:
        with open(args.output_json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
