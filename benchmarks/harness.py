"""What the benchmarks share: fresh subprocesses per measured variant, training runs of the scripts,
held-out comparison of LoRAs against their base, and printing/saving results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def public_flags(args) -> list[str]:
    """The command line that reproduces ``args`` (private ``_*`` options left out; booleans as switches,
    lists comma-separated)."""
    flags = []
    for key, value in vars(args).items():
        if key.startswith("_") or value is None or value is False:
            continue
        if value is True:
            flags.append(f"--{key}")
        else:
            flags.append(f"--{key}={','.join(map(str, value)) if isinstance(value, list) else value}")
    return flags


# glibc returns freed blocks to the system at once and serves large ones by mmap, so a process' resident
# high-water mark follows the bytes it holds instead of what its arenas cached.
MALLOC_ENV = {"MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_MMAP_THRESHOLD_": "65536"}


def run_isolated(module: str, option: str, variants, args) -> dict[str, dict]:
    """Run ``python -m module --option=variant <flags>`` for each variant in a fresh process (so peak
    memory is the variant's own) and read the JSON it prints last."""
    results = {}
    for variant in variants:
        command = [sys.executable, "-m", module, f"--{option}={variant}", *public_flags(args)]
        out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **MALLOC_ENV})
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{out.stderr[-3000:]}")
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    return results


def publish(result: dict, table: str, output_json: str | None) -> dict:
    print(table)
    if output_json:
        with open(output_json, "w") as handle:
            json.dump(result, handle, indent=2, allow_nan=False)
    return result


ACCELERATE = os.path.join(os.path.dirname(sys.executable), "accelerate")


def train_run(script: str, flags: list[str], output_dir: str, launcher: list[str] | None = None,
              measure_peak: bool = False):
    """Run ``script`` (``train_drpo.py`` ...) with ``flags`` into ``output_dir``; returns wall seconds
    (and, with ``measure_peak``, the process' peak resident memory in bytes).

    ``launcher`` defaults to this Python (one process, all CPU threads); the quickstart uses
    ``accelerate launch --cpu`` as its README command does.
    """
    flags = [f for f in flags if not f.startswith("--output_dir=")] + [f"--output_dir={output_dir}", "--report_to=none"]
    command = [*(launcher or [sys.executable]), script, *flags]
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise subprocess.CalledProcessError(os.waitstatus_to_exitcode(status), command)
    return (seconds, usage.ru_maxrss * 1024) if measure_peak else seconds


def compare_to_base(model: str, loras: dict[str, str], rewards: list[str], prompts: list[str],
                    seeds: list[int]) -> dict[str, dict]:
    """Each LoRA against the base model on the same held-out (prompt, seed) images, one pipeline.

    Per LoRA: ``summarize`` of every reward (base vs LoRA) and ``image_distance``, the RMS pixel
    difference to the base model's image of the same prompt and seed (how far the LoRA moved).
    """
    from pipelines.scoring import summarize
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


def effect_and_se(summary: dict) -> tuple[float, float]:
    """A ``summarize`` result's effect size and its standard error, both in the base model's seed-std."""
    size = summary["effect_size"] or 0.0
    seed_std = summary["change"] / size if size else float("nan")
    return size, summary["change_se"] / seed_std


def mean_step_seconds(output_dir: str) -> float:
    """Mean optimisation-step time of a run, from its reward_history.jsonl."""
    with open(os.path.join(output_dir, "reward_history.jsonl")) as handle:
        times = [json.loads(line)["step_time"] for line in handle]
    return sum(times) / len(times)


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def reset_peak(device: torch.device) -> int:
    """Start a new peak-memory window; returns the memory in use now.

    CPU: Linux's resident high-water mark (VmHWM), reset by writing 5 to /proc/self/clear_refs, so
    the transient copies made while loading the weights do not hide the passes' own peak.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return _status_bytes("VmRSS")


def peak_bytes(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated() if device.type == "cuda" else _status_bytes("VmHWM")
