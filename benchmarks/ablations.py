"""The paper's Table 3 ablations (and the reference-drift rows of Table 4) on the embedded tiny model.

    python -m benchmarks.ablations --update_readme          # the full grid, ~15 minutes on 2 CPU cores
    python -m benchmarks.ablations --max_train_steps=2 ...  # a smoke run (the test suite runs one)

One factor at a time from a base run (the quickstart's settings with fewer steps, under the paper's
estimator): the candidate count K, the feature map, sum vs mean over a multi-tensor feature map's losses,
the kernel, the authors' preset at pair weights 1000-10000 (the paper's
"velocity scale" beta), the pairing (random reward-ordered pairs vs the released top / bottom split, under
either estimator), radii sets, the reference weight lambda and the unmasked reference drift.
Every run has the same seed, prompts and step budget and is evaluated on the same held-out seeds:
the gain of the trained reward (``color_match``), the change of a reward it was not trained on
(``jpeg_compressibility``: minus the JPEG size, i.e. how smooth the image stays), the RMS pixel
distance to the base model's image of the same prompt and seed, and the seconds per step.
"""

from __future__ import annotations

import argparse
import os
import tempfile

from benchmarks.harness import ROOT, compare_to_base, mean_step_seconds, train_run
from benchmarks.readme import save_result

TRAINED, HELD_OUT = "color_match", "jpeg_compressibility"
BASE_FLAGS = ["--pretrained_model_name_or_path=assets/tiny-sd-turbo", "--prompts_file=assets/tiny_prompts.txt",
              f"--reward={TRAINED}", "--feature_extractor=image", "--num_candidates=16", "--num_pairs=16",
              "--learning_rate=1e-3", "--validation_steps=0", "--seed=0", "--drift_preset=paper"]

# (factor, setting shown, flags added to the base run); "base" is the shared reference row.
GRID = [
    ("candidates K", "K = 8", ["--num_candidates=8", "--num_pairs=8"]),
    ("candidates K", "K = 16 (base)", []),
    ("candidates K", "K = 24", ["--num_candidates=24", "--num_pairs=12"]),
    ("feature map", "latent", ["--feature_extractor=latent"]),
    ("feature tensors (teacher_unet: 3)", "sum of their losses (Drifting Models)", ["--feature_extractor=teacher_unet"]),
    ("feature tensors (teacher_unet: 3)", "mean of their losses (released code)",
     ["--feature_extractor=teacher_unet", "--feature_reduction=mean"]),
    ("kernel", "cosine", ["--drift_kernel=cosine"]),
    ("kernel", "exponential", ["--drift_kernel=exponential"]),
    ("kernel", "laplacian", ["--drift_kernel=laplacian"]),
    ("pair weight beta (authors' preset)", "beta = 1000", ["--drift_preset=authors", "--pair_weight=1000"]),
    ("pair weight beta (authors' preset)", "beta = 3000", ["--drift_preset=authors"]),
    ("pair weight beta (authors' preset)", "beta = 5000", ["--drift_preset=authors", "--pair_weight=5000"]),
    ("pair weight beta (authors' preset)", "beta = 10000", ["--drift_preset=authors", "--pair_weight=10000"]),
    ("pairing", "top / bottom K/2 (released recipe), paper estimator", ["--pairing=top_bottom"]),
    ("pairing", "random M pairs, authors' preset", ["--drift_preset=authors", "--pairing=random"]),
    ("radii", "0.02,0.05,0.2 (exact Eqs. 22-25)", ["--drift_radii=0.02,0.05,0.2"]),
    ("radii", "0.2,0.5,1.0", ["--drift_radii=0.2,0.5,1.0"]),
    ("reference drift", "lambda = 0", ["--ref_weight=0"]),
    ("reference drift", "lambda = 1", ["--ref_weight=1"]),
    ("reference drift", "--no-mask_self (literal Eq. 22)", ["--no-mask_self"]),
]
BASE_ROW = "K = 16 (base)"


def run(args) -> dict:
    from pipelines.prompts import load_prompts

    work = tempfile.mkdtemp(prefix="drpo-ablations-")
    grid = GRID if args.rows is None else [row for row in GRID if row[1] in args.rows]
    dirs, seconds = {}, {}
    budget = [f"--max_train_steps={args.max_train_steps}", f"--checkpointing_steps={args.max_train_steps}"]
    for index, (_, setting, flags) in enumerate(grid):
        dirs[setting] = os.path.join(work, f"run{index}")
        seconds[setting] = train_run("train_drpo.py", BASE_FLAGS + budget + flags, dirs[setting])
    prompts = load_prompts(os.path.join(ROOT, "assets", "tiny_prompts.txt"))[: args.num_prompts]
    seeds = list(range(2000, 2000 + args.num_seeds))
    compared = compare_to_base(os.path.join(ROOT, "assets", "tiny-sd-turbo"), dirs, [TRAINED, HELD_OUT], prompts, seeds)
    rows = [{"factor": factor, "setting": setting, "flags": flags, "run_seconds": seconds[setting],
             "step_seconds": mean_step_seconds(dirs[setting]), **compared[setting]} for factor, setting, flags in grid]
    return {"base_flags": BASE_FLAGS, "max_train_steps": args.max_train_steps, "prompts": len(prompts),
            "seeds": len(seeds), "rows": rows}


def render(result: dict) -> str:
    lines = [f"| factor | setting | `{TRAINED}` gain: change ± SE (effect size) | `{HELD_OUT}` change ± SE (kB) | "
             "pixel distance to base | s / step |", "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        trained, held = row[TRAINED], row[HELD_OUT]
        lines.append(
            f"| {row['factor']} | {row['setting']} | {trained['change']:+.4f} ± {trained['change_se']:.4f} "
            f"({trained['effect_size']:.2f}) | {held['change']:+.3f} ± {held['change_se']:.3f} | "
            f"{row['image_distance']:.3f} | {row['step_seconds']:.2f} |")
    lines += ["", f"Each run: the base flags `{' '.join(result['base_flags'])}` plus its own, "
              f"{result['max_train_steps']} steps; evaluated on {result['prompts']} prompts x {result['seeds']} "
              "held-out seeds (2000+). Regenerate with `python -m benchmarks.ablations --update_readme`."]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max_train_steps", type=int, default=40)
    parser.add_argument("--num_prompts", type=int, default=16)
    parser.add_argument("--num_seeds", type=int, default=8)
    parser.add_argument("--rows", nargs="*", default=None, help="Only these settings (the test suite's reduced grid).")
    parser.add_argument("--update_readme", action="store_true", help="Rewrite the README's ablation table.")
    args = parser.parse_args(argv)
    result = run(args)
    markdown = render(result)
    print(markdown)
    if args.rows is None:
        save_result("ablations", result, markdown, update_readme=args.update_readme)
    return result


if __name__ == "__main__":
    main()
