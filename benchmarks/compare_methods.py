"""DrPO against the paper's baselines on the embedded tiny model: same prompts, seeds, reward and budget.

    python -m benchmarks.compare_methods --update_readme

Two trained rewards: ``brightness`` (differentiable: every method runs) and ``color_match`` (a rule with
no gradient: DRaFT and VGG-Flow cannot use it). Each method trains with the same seed and prompts,
first for the same number of steps, then for the same wall-clock time (DrPO's, its steps scaled by
each method's measured seconds per step); each LoRA is evaluated on held-out seeds against the base
model: the gain of the trained reward (effect size = mean change / across-seed std of the base, with
its standard error), the change of the other reward (not trained on), the RMS pixel distance to the
base model's images of the same prompts and seeds, seconds per step and the run's peak memory.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile

from benchmarks.harness import ROOT, compare_to_base, effect_and_se, mean_step_seconds, train_run
from benchmarks.readme import save_result

BRIGHTNESS, COLOR = "benchmarks.rewards:brightness", "color_match"
BASE_FLAGS = ["--pretrained_model_name_or_path=assets/tiny-sd-turbo", "--prompts_file=assets/tiny_prompts.txt",
              "--feature_extractor=image", "--num_candidates=8", "--num_pairs=8", "--learning_rate=1e-3",
              "--validation_steps=0", "--seed=0"]
# Settings set by hand at which each method learns at this model's scale (latents of 1024 dimensions, a reward in
# [0, 1]), with the reward gradients raw as Appendix C writes them; ``benchmarks.tune_methods`` gives every method
# the same tuning budget instead. The behavioural tests train with these settings.
METHOD_FLAGS = {
    "drpo": ["--method=drpo", "--drift_preset=paper"],
    "draft": ["--method=draft", "--draft_gradient=raw"],
    "vggflow": ["--method=vggflow", "--vggflow_gradient=raw", "--vggflow_reward_scale=1000"],
    "dpo": ["--method=dpo", "--dpo_beta=0.1"],
    "grpo": ["--method=grpo", "--grpo_exploration=fresh", "--grpo_sigma=0.5", "--grpo_ref_weight=0",
             "--learning_rate=3e-3", "--num_candidates=16", "--num_pairs=8"],
    "grpo (paper: u = normalised z, sigma 0.05)": ["--method=grpo"],
}
REWARD_GRADIENT = {"draft", "vggflow"}
NEEDS_GRADIENTS = "n/a — needs reward gradients"


def run_methods(reward: str, steps: dict[str, int], work: str) -> dict[str, dict]:
    """Train every method that can use ``reward`` for its number of ``steps``; returns run facts by method."""
    runs = {}
    for index, (method, flags) in enumerate(METHOD_FLAGS.items()):
        if method.split(" ")[0] in REWARD_GRADIENT and reward == COLOR or method not in steps:
            continue
        output = os.path.join(work, f"{reward.split(':')[-1]}-{index}-{steps[method]}")  # one folder per run
        seconds, peak = train_run("train_drpo.py", BASE_FLAGS + flags + [
            f"--reward={reward}", f"--max_train_steps={steps[method]}", f"--checkpointing_steps={steps[method]}"],
            output, measure_peak=True)
        runs[method] = {"dir": output, "steps": steps[method], "run_seconds": seconds, "peak_mb": peak / 2**20,
                        "step_seconds": mean_step_seconds(output)}
    return runs


def evaluate_runs(runs: dict, trained: str, other: str, num_prompts: int, num_seeds: int) -> dict[str, dict]:
    from pipelines.prompts import load_prompts

    prompts = load_prompts(os.path.join(ROOT, "assets", "tiny_prompts.txt"))[:num_prompts]
    compared = compare_to_base(os.path.join(ROOT, "assets", "tiny-sd-turbo"), {m: r["dir"] for m, r in runs.items()},
                               [trained, other], prompts, list(range(3000, 3000 + num_seeds)))
    return {method: {**{k: v for k, v in runs[method].items() if k != "dir"}, "trained": compared[method][trained],
                     "other": compared[method][other], "image_distance": compared[method]["image_distance"]}
            for method in runs}


def one_reward(reward: str, other: str, args, work: str) -> dict:
    """Same steps for every method, then the same wall-clock time (DrPO's)."""
    same_steps = evaluate_runs(run_methods(reward, {m: args.steps for m in METHOD_FLAGS}, work), reward, other,
                               args.num_prompts, args.num_seeds)
    budget = same_steps["drpo"]["step_seconds"] * args.steps
    steps = {m: max(1, math.floor(budget / r["step_seconds"])) for m, r in same_steps.items()}
    retrain = {m: n for m, n in steps.items() if n != args.steps}
    same_time = {**{m: r for m, r in same_steps.items() if m not in retrain},
                 **evaluate_runs(run_methods(reward, retrain, work), reward, other, args.num_prompts, args.num_seeds)}
    return {"reward": reward, "other": other, "same_steps": same_steps, "same_time": same_time,
            "time_budget_seconds": budget}


def render_table(rows: dict, reward: str, other: str) -> list[str]:
    lines = [f"| method | steps | `{reward}` gain: effect size ± SE | `{other}` change | pixel distance to base | "
             "s / step | peak memory (MB) |", "|---|---|---|---|---|---|---|"]
    for method in METHOD_FLAGS:
        if method not in rows:
            lines.append(f"| {method} | {NEEDS_GRADIENTS} | | | | | |")
            continue
        row = rows[method]
        size, se = effect_and_se(row["trained"])
        lines.append(f"| {method} | {row['steps']} | {size:+.2f} ± {se:.2f} | {row['other']['change']:+.4f} | "
                     f"{row['image_distance']:.3f} | {row['step_seconds']:.2f} | {row['peak_mb']:.0f} |")
    return lines


def render(result: dict) -> str:
    lines = []
    for part in result["rewards"]:
        for budget, title in (("same_steps", f"same budget: {result['steps']} steps"),
                              ("same_time", f"same wall-clock: {part['time_budget_seconds']:.0f} s of training")):
            lines += [f"**Trained on `{part['reward']}`, {title}**", "", *render_table(part[budget], part["reward"],
                                                                                        part["other"]), ""]
    lines.append(f"Held-out: {result['num_prompts']} prompts x {result['num_seeds']} seeds (3000+). "
                 "Regenerate with `python -m benchmarks.compare_methods --update_readme`.")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--num_prompts", type=int, default=16)
    parser.add_argument("--num_seeds", type=int, default=8)
    parser.add_argument("--update_readme", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="drpo-compare-") as work:
        parts = [one_reward(BRIGHTNESS, COLOR, args, work), one_reward(COLOR, BRIGHTNESS, args, work)]
    result = {"steps": args.steps, "num_prompts": args.num_prompts, "num_seeds": args.num_seeds, "rewards": parts,
              "base_flags": BASE_FLAGS, "method_flags": METHOD_FLAGS}
    markdown = render(result)
    print(markdown)
    save_result("compare_methods", result, markdown, update_readme=args.update_readme)
    return result


if __name__ == "__main__":
    main()
