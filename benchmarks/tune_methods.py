"""Every method at its best on the same budget: a small grid per method, chosen on training seeds, reported
on held-out seeds beside the paper's setting.

    python -m benchmarks.tune_methods --update_readme       # ~40 minutes on 2 CPU cores
    python -m benchmarks.tune_methods --steps=2 --rewards color_match --num_seeds=1 --num_prompts=2  # smoke

Each method (DrPO included) gets the same number of runs: four grid points over the learning rate and
its own scale (DrPO's eta, DRaFT's learning rate alone, VGG-Flow's lambda_r, DPO's beta, GRPO's sigma),
plus the paper's setting at the base learning rate, each with the same steps, prompts, seed and K = 8
(``benchmarks.compare_methods``' base flags; there GRPO's fixed settings use K = 16). A run is scored on the training prompts at seeds 1000+ (selection), the
best grid point and the paper's setting then on held-out seeds 3000+ (report): effect size of the
trained reward (mean change / base seed-std) ± SE, the change of the other reward, the pixel distance
to the base model and the seconds per step. The trained rewards: ``brightness`` (differentiable),
``color_match`` (a rule: DRaFT and VGG-Flow cannot use it) and ``warmth`` (differentiable, magnitude
~0.02, a reward no default was chosen on).
"""

from __future__ import annotations

import argparse
import os
import tempfile

from benchmarks.compare_methods import BASE_FLAGS, BRIGHTNESS, COLOR, NEEDS_GRADIENTS, REWARD_GRADIENT
from benchmarks.harness import ROOT, compare_to_base, effect_and_se, mean_step_seconds, train_run
from benchmarks.readme import save_result

WARMTH = "benchmarks.rewards:warmth"
REWARDS = {BRIGHTNESS: COLOR, COLOR: BRIGHTNESS, WARMTH: COLOR}  # trained -> the other reward reported
# The paper's setting of each method (its Appendix C values; unit scales where it reports none), at the base
# learning rate; the project's normalised reward gradients are off here.
PAPER = {
    "drpo": ["--method=drpo", "--drift_preset=paper"],
    "draft": ["--method=draft", "--draft_gradient=raw"],
    "vggflow": ["--method=vggflow", "--vggflow_gradient=raw"],
    "dpo": ["--method=dpo"],
    "grpo": ["--method=grpo"],
}
GRPO_FRESH = ["--grpo_exploration=fresh", "--grpo_ref_weight=0"]
GRID = {
    "drpo": [[f"--learning_rate={lr}", f"--velocity_scale={eta}"] for lr in ("1e-3", "3e-3") for eta in (1, 3)],
    "draft": [[f"--learning_rate={lr}"] for lr in ("1e-4", "3e-4", "1e-3", "3e-3")],
    "vggflow": [[f"--learning_rate={lr}", f"--vggflow_reward_scale={scale}"] for lr in ("1e-3", "3e-3")
                for scale in (0.1, 1)],
    "dpo": [[f"--learning_rate={lr}", f"--dpo_beta={beta}"] for lr in ("1e-3", "3e-3") for beta in (0.01, 0.1)],
    "grpo": [[f"--learning_rate={lr}", f"--grpo_sigma={sigma}", *GRPO_FRESH] for lr in ("1e-3", "3e-3")
             for sigma in (0.1, 0.5)],
}
SELECTION_SEEDS, REPORT_SEEDS = 1000, 3000


def settings(method: str) -> dict[str, list[str]]:
    """The runs of one method: 'paper' and each grid point, by a short name."""
    named = {"paper": PAPER[method]}
    for flags in GRID[method]:
        named[" ".join(flag.lstrip("-") for flag in flags if flag not in GRPO_FRESH)] = [f"--method={method}", *flags]
    return named


def train_grid(reward: str, steps: int, work: str) -> dict[str, dict[str, str]]:
    """Output folder of every run (method -> setting -> folder) on ``reward``."""
    budget = [f"--reward={reward}", f"--max_train_steps={steps}", f"--checkpointing_steps={steps}"]
    runs = {}
    for method in GRID:
        if method in REWARD_GRADIENT and reward == COLOR:
            continue
        runs[method] = {}
        for index, (name, flags) in enumerate(settings(method).items()):
            runs[method][name] = os.path.join(work, f"{reward.split(':')[-1]}-{method}-{index}")
            train_run("train_drpo.py", BASE_FLAGS + flags + budget, runs[method][name])
    return runs


def compare(dirs: dict[str, str], rewards: list[str], num_prompts: int, seeds: list[int]) -> dict[str, dict]:
    from pipelines.prompts import load_prompts

    prompts = load_prompts(os.path.join(ROOT, "assets", "tiny_prompts.txt"))[:num_prompts]
    return compare_to_base(os.path.join(ROOT, "assets", "tiny-sd-turbo"), dirs, rewards, prompts, seeds)


def tune_reward(reward: str, args, work: str) -> dict:
    """Train the grid on ``reward``, pick each method's best grid point on training seeds, report on held-out."""
    other = REWARDS[reward]
    runs = train_grid(reward, args.steps, work)
    flat = {f"{method}|{name}": folder for method, named in runs.items() for name, folder in named.items()}
    selection = compare(flat, [reward], args.num_prompts // 2 or 1,
                        list(range(SELECTION_SEEDS, SELECTION_SEEDS + max(1, args.num_seeds // 2))))
    methods = {}
    for method, named in runs.items():
        grid_scores = {name: selection[f"{method}|{name}"][reward]["effect_size"] or 0.0 for name in named}
        best = max((name for name in named if name != "paper"), key=grid_scores.get)
        methods[method] = {"selection_effect_size": grid_scores, "best": best}
    chosen = {f"{method}|{which}": runs[method][name] for method, facts in methods.items()
              for which, name in (("paper", "paper"), ("best", facts["best"]))}
    report = compare(chosen, [reward, other], args.num_prompts,
                     list(range(REPORT_SEEDS, REPORT_SEEDS + args.num_seeds)))
    for method, facts in methods.items():
        for which in ("paper", "best"):
            name = "paper" if which == "paper" else facts["best"]
            facts[which + "_report"] = {**report[f"{method}|{which}"],
                                        "step_seconds": mean_step_seconds(runs[method][name])}
    return {"reward": reward, "other": other, "methods": methods}


def effect(summary: dict) -> str:
    """'effect size ± SE' in base seed-std."""
    size, se = effect_and_se(summary)
    return f"{size:+.2f} ± {se:.2f}"


def render_reward(part: dict) -> list[str]:
    reward, other = part["reward"], part["other"]
    lines = [f"**Trained on `{reward}`** (`{other}` not trained on)", "",
             "| method | paper's setting: gain | best grid point | its gain | its `" + other.split(":")[-1]
             + "` change | its pixel distance | its s / step |", "|---|---|---|---|---|---|---|"]
    for method in GRID:
        if method not in part["methods"]:
            lines.append(f"| {method} | {NEEDS_GRADIENTS} | | | | | |")
            continue
        facts = part["methods"][method]
        best = facts["best_report"]
        lines.append(f"| {method} | {effect(facts['paper_report'][reward])} | `{facts['best']}` | "
                     f"{effect(best[reward])} | {best[other]['change']:+.4f} | {best['image_distance']:.3f} | "
                     f"{best['step_seconds']:.2f} |")
    return lines + [""]


def render(result: dict) -> str:
    lines = [line for part in result["parts"] for line in render_reward(part)]
    grid = "; ".join(f"{method}: " + ", ".join(f"`{name}`" for name in settings(method) if name != "paper")
                     for method in GRID)
    lines += [f"Gain = effect size ± SE in base seed-std on {result['num_prompts']} prompts x {result['num_seeds']} "
              f"held-out seeds ({REPORT_SEEDS}+); each run {result['steps']} steps of "
              f"`{' '.join(BASE_FLAGS)}`. Grid (best chosen on {result['num_prompts'] // 2} training prompts x "
              f"{result['num_seeds'] // 2} seeds {SELECTION_SEEDS}+): {grid}; GRPO's grid explores with fresh "
              "noise and no anchor (`--grpo_exploration=fresh --grpo_ref_weight=0`). Paper's settings: "
              + "; ".join(f"{m} `{' '.join(PAPER[m][1:]) or 'defaults'}`" for m in PAPER)
              + ". Regenerate with `python -m benchmarks.tune_methods --update_readme`."]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--num_prompts", type=int, default=16)
    parser.add_argument("--num_seeds", type=int, default=8)
    parser.add_argument("--rewards", nargs="+", default=list(REWARDS), choices=list(REWARDS))
    parser.add_argument("--update_readme", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="drpo-tune-") as work:
        parts = [tune_reward(reward, args, work) for reward in args.rewards]
    result = {"steps": args.steps, "num_prompts": args.num_prompts, "num_seeds": args.num_seeds, "parts": parts,
              "grid": {method: settings(method) for method in GRID}, "base_flags": BASE_FLAGS}
    markdown = render(result)
    print(markdown)
    if args.rewards == list(REWARDS):
        save_result("tune_methods", result, markdown, update_readme=args.update_readme)
    return result


if __name__ == "__main__":
    main()
