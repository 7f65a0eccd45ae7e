"""The README's quickstart, measured: train with its command (and with the paper's estimator) and regenerate the
README's table and pictures from what each run writes itself (``final_metrics.json``: the prompts the run
held out x its held-out validation seeds), so a user's own run reproduces the table.

    python -m benchmarks.quickstart --update_readme

Variants: the quickstart command itself (the default ``authors`` estimator); ``--drift_preset=paper
--num_pairs=16`` (Appendix A's, with 16 random reward-ordered pairs). The pictures
(``assets/readme_before_after.png``, ``assets/readme_reward_curve.png``) come from the quickstart run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile

from benchmarks.harness import ACCELERATE, ROOT, train_run
from benchmarks.readme import save_result

QUICKSTART_FLAGS = [
    "--pretrained_model_name_or_path=assets/tiny-sd-turbo", "--prompts_file=assets/tiny_prompts_all.txt",
    "--reward=color_match", "--feature_extractor=image", "--num_candidates=16",
    "--learning_rate=1e-3", "--max_train_steps=100", "--validation_steps=50", "--checkpointing_steps=50",
    "--seed=0", "--output_dir=drpo-tiny",
]
VARIANTS = {"quickstart command": [], "with --drift_preset=paper (16 random pairs)": ["--drift_preset=paper",
                                                                                   "--num_pairs=16"]}
LAUNCHER = [ACCELERATE, "launch", "--quiet", "--cpu"]  # as the README command (--cpu: all cores, not one thread)


def run_metrics(output_dir: str) -> dict:
    """The run's own held-out check (``final_metrics.json``)."""
    with open(os.path.join(output_dir, "final_metrics.json"), encoding="utf-8") as handle:
        return json.load(handle)


def render(result: dict) -> str:
    rows = ["| run | run time (launch to exit) | `color_match` base → LoRA (mean ± SE) | change ± SE | z (paired) "
            "| effect size |", "|---|---|---|---|---|---|"]
    for name, run in result["runs"].items():
        rows.append(f"| {name} | {run['train_seconds']:.0f} s | {run['base_mean']:.4f} ± {run['base_se']:.4f} → "
                    f"{run['lora_mean']:.4f} ± {run['lora_se']:.4f} | {run['change']:+.4f} ± {run['change_se']:.4f} "
                    f"| {run['z_paired']:.0f} | {run['effect_size']:.2f} |")
    first = next(iter(result["runs"].values()))
    rows.append("")
    rows.append(f"From each run's own `final_metrics.json`: the {first['prompts']} prompts it held out of training x "
                f"{first['seeds']} held-out seeds; standard errors by bootstrap over prompts (as everywhere in the "
                "project); effect size = mean change / across-seed standard deviation of the base reward. "
                "Regenerate with `python -m benchmarks.quickstart --update_readme`.")
    return "\n".join(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update_readme", action="store_true", help="Rewrite the README block and pictures.")
    args = parser.parse_args(argv)
    work = tempfile.mkdtemp(prefix="drpo-quickstart-")
    seconds, dirs = {}, {}
    for index, (name, extra) in enumerate(VARIANTS.items()):
        dirs[name] = os.path.join(work, f"run{index}")
        seconds[name] = train_run("train_drpo.py", QUICKSTART_FLAGS + extra, dirs[name], LAUNCHER)
    result = {"command": QUICKSTART_FLAGS,
              "runs": {name: {"train_seconds": seconds[name], **run_metrics(dirs[name])} for name in VARIANTS}}
    markdown = render(result)
    print(markdown)
    if args.update_readme:
        quickstart = dirs["quickstart command"]
        shutil.copy(os.path.join(quickstart, "samples_before_after.png"),
                    os.path.join(ROOT, "assets", "readme_before_after.png"))
        shutil.copy(os.path.join(quickstart, "reward_curve.png"),
                    os.path.join(ROOT, "assets", "readme_reward_curve.png"))
    save_result("quickstart", result, markdown, update_readme=args.update_readme)
    shutil.rmtree(work, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
