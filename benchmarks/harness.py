"""What the benchmarks share: fresh subprocesses per measured variant, training runs of the scripts,
held-out comparison of LoRAs against their base, and printing/saving results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def public_flags(args) -> list[str]:
    """The command line that reproduces ``args`` (private ``_*`` options left out)."""
    return [f"--{k}={v}" for k, v in vars(args).items() if not k.startswith("_") and v is not None]


def run_isolated(module: str, option: str, variants, args) -> dict[str, dict]:
    """Run ``python -m module --option=variant <flags>`` for each variant in a fresh process (so peak
    memory is the variant's own) and read the JSON it prints last."""
    results = {}
    for variant in variants:
        command = [sys.executable, "-m", module, f"--{option}={variant}", *public_flags(args)]
        out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{out.stderr[-3000:]}")
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    return results


def publish(result: dict, table: str, output_json: str | None) -> dict:
    print(table)
    if output_json:
        with open(output_json, "w") as handle:
            json.dump(result, handle, indent=2)
    return result


ACCELERATE = os.path.join(os.path.dirname(sys.executable), "accelerate")


def train_run(script: str, flags: list[str], output_dir: str, launcher: list[str] | None = None) -> float:
    """Run ``script`` (``train_drpo.py`` ...) with ``flags`` into ``output_dir``; returns wall seconds.

    ``launcher`` defaults to this Python (one process, all CPU threads); the quickstart uses
    ``accelerate launch --cpu`` as its README command does.
    """
    flags = [f for f in flags if not f.startswith("--output_dir=")] + [f"--output_dir={output_dir}", "--report_to=none"]
    command = [*(launcher or [sys.executable]), script, *flags]
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return time.perf_counter() - start


def compare_to_base(model: str, loras: dict[str, str], rewards: list[str], prompts: list[str],
                    seeds: list[int]) -> dict[str, dict]:
    """Each LoRA against the base model on the same held-out (prompt, seed) images, one pipeline.

    Per LoRA: ``summarize`` of every reward (base vs LoRA) and ``image_distance``, the RMS pixel
    difference to the base model's image of the same prompt and seed (how far the LoRA moved).
    """
    from pipelines.evaluate import summarize
    from pipelines.inference import generate_images, load_lora, load_one_step_pipeline
    from pipelines.rewards import load_reward, score_candidates

    reward_fns = {name: load_reward(name) for name in rewards}
    pipe = load_one_step_pipeline(model)
    per_image_prompts = [p for p in prompts for _ in seeds]

    def scores(images):
        return {name: score_candidates(fn, images, per_image_prompts, name).reported.view(len(prompts), len(seeds))
                for name, fn in reward_fns.items()}

    base_images = generate_images(pipe, prompts, seeds, progress=True, description="base")
    base = scores(base_images)
    results = {}
    for name, lora in loras.items():
        load_lora(pipe, lora)
        images = generate_images(pipe, prompts, seeds, progress=True, description=name)
        pipe.unload_lora_weights()
        tuned = scores(images)
        results[name] = {reward: summarize(base[reward], tuned[reward]) for reward in rewards}
        results[name]["image_distance"] = (images - base_images).square().mean().sqrt().item()
    return results


def mean_step_seconds(output_dir: str) -> float:
    """Mean optimisation-step time of a run, from its reward_history.jsonl."""
    with open(os.path.join(output_dir, "reward_history.jsonl")) as handle:
        times = [json.loads(line)["step_time"] for line in handle]
    return sum(times) / len(times)
