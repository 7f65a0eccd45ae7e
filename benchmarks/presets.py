"""Which drift estimator to ship by default: each candidate trained on several rewards, on the tiny model.

    python -m benchmarks.presets --update_readme      # ~15 minutes on 2 CPU cores
    python -m benchmarks.presets --max_train_steps=2 --rewards color_match --num_seeds=1   # a smoke run

Every candidate configuration (the ``paper`` estimator of Appendix A, the paper estimator with the
released top / bottom pairing, the ``authors`` preset) trains the same LoRA from the same seed on each
reward in turn (the rule the tiny model was built around, ``color_match``, and three it was not:
``jpeg_compressibility`` and two colour statistics, ``saturation`` and ``warmth``, that no default was
chosen on); each LoRA is scored on held-out seeds against the base model on the reward it trained on.
The gain is an effect size (mean change / the base model's across-seed std) with its standard error.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

from benchmarks.harness import ROOT, compare_to_base, effect_and_se, train_run
from benchmarks.readme import save_result

REWARDS = ["color_match", "jpeg_compressibility", "benchmarks.rewards:saturation", "benchmarks.rewards:warmth"]
BASE_FLAGS = ["--pretrained_model_name_or_path=assets/tiny-sd-turbo", "--prompts_file=assets/tiny_prompts.txt",
              "--feature_extractor=image", "--num_candidates=16", "--num_pairs=16", "--learning_rate=1e-3",
              "--validation_steps=0", "--seed=0"]
CANDIDATES = {
    "paper (Appendix A)": ["--drift_preset=paper"],
    "paper + top / bottom pairing": ["--drift_preset=paper", "--pairing=top_bottom"],
    "authors (released estimator)": ["--drift_preset=authors"],
}


def train_all(rewards: list[str], steps: int, work: str) -> dict[str, dict[str, str]]:
    """Output folder of every (reward, candidate) run."""
    budget = [f"--max_train_steps={steps}", f"--checkpointing_steps={steps}"]
    runs = {}
    for r, reward in enumerate(rewards):
        runs[reward] = {}
        for c, (name, flags) in enumerate(CANDIDATES.items()):
            runs[reward][name] = os.path.join(work, f"reward{r}-candidate{c}")
            train_run("train_drpo.py", BASE_FLAGS + budget + flags + [f"--reward={reward}"], runs[reward][name])
    return runs


def run(args) -> dict:
    from pipelines.prompts import load_prompts

    prompts = load_prompts(os.path.join(ROOT, "assets", "tiny_prompts.txt"))[: args.num_prompts]
    seeds = list(range(2000, 2000 + args.num_seeds))
    with tempfile.TemporaryDirectory(prefix="drpo-presets-") as work:
        runs = train_all(args.rewards, args.max_train_steps, work)
        gains = {}
        for reward, dirs in runs.items():
            compared = compare_to_base(os.path.join(ROOT, "assets", "tiny-sd-turbo"), dirs, [reward], prompts, seeds)
            gains[reward] = {name: compared[name][reward] for name in dirs}
    return {"base_flags": BASE_FLAGS, "candidates": CANDIDATES, "max_train_steps": args.max_train_steps,
            "prompts": len(prompts), "seeds": len(seeds), "gains": gains}


def render(result: dict) -> str:
    rewards = list(result["gains"])
    lines = ["| estimator | " + " | ".join(f"`{r.split(':')[-1]}`" for r in rewards) + " | mean effect size |",
             "|---|" + "---|" * (len(rewards) + 1)]
    for name in result["candidates"]:
        cells = [effect_and_se(result["gains"][reward][name]) for reward in rewards]
        mean = statistics.fmean(size for size, _ in cells)
        lines.append(f"| {name} | " + " | ".join(f"{size:+.2f} ± {se:.2f}" for size, se in cells) + f" | {mean:+.2f} |")
    lines += ["", f"Gain of the reward each run trained on, effect size ± SE in base seed-std; each run: "
              f"`{' '.join(result['base_flags'])}` plus its estimator's flags and `--reward`, "
              f"{result['max_train_steps']} steps; {result['prompts']} prompts x {result['seeds']} held-out seeds "
              "(2000+). Regenerate with `python -m benchmarks.presets --update_readme`."]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max_train_steps", type=int, default=40)
    parser.add_argument("--num_prompts", type=int, default=16)
    parser.add_argument("--num_seeds", type=int, default=8)
    parser.add_argument("--rewards", nargs="+", default=REWARDS)
    parser.add_argument("--update_readme", action="store_true", help="Rewrite the README's preset table.")
    args = parser.parse_args(argv)
    result = run(args)
    markdown = render(result)
    print(markdown)
    if args.rewards == REWARDS:
        save_result("presets", result, markdown, update_readme=args.update_readme)
    return result


if __name__ == "__main__":
    main()
