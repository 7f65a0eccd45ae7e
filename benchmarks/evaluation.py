"""The README's evaluation example, measured: two LoRAs of the tiny SD-Turbo model, each trained on
another weight-free reward, evaluated by ``python -m pipelines.evaluate`` on three metrics at once.

    python -m benchmarks.evaluation --update_readme

Each LoRA is scored on its own reward and on the other two metrics (the held-out check of the
paper's tables: does a gain on the trained reward cost anything elsewhere?).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from benchmarks.harness import ROOT, train_run
from benchmarks.readme import save_result

BRIGHTNESS = "benchmarks/rewards.py:brightness"
TRAINING = ["--pretrained_model_name_or_path=assets/tiny-sd-turbo", "--prompts_file=assets/tiny_prompts.txt",
            "--feature_extractor=image", "--num_candidates=16", "--num_pairs=16", "--learning_rate=1e-3",
            "--validation_steps=0", "--checkpointing_steps=1000", "--seed=0", "--drift_preset=paper"]
LORAS = {"color-lora": "--reward=color_match", "bright-lora": f"--reward={BRIGHTNESS}"}
METRICS = f"color_match,jpeg_compressibility,brightness={BRIGHTNESS}"


def evaluation_flags(work: str, num_prompts: int, seeds: str) -> list[str]:
    loras = [f"--lora={os.path.join(work, name)}" for name in LORAS]
    return ["--pretrained_model_name_or_path=assets/tiny-sd-turbo", *loras, "--prompts_file=assets/tiny_prompts.txt",
            f"--max_prompts={num_prompts}", f"--seeds={seeds}", f"--metrics={METRICS}", "--bootstrap=1000",
            f"--output_dir={os.path.join(work, 'evaluation')}"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max_train_steps", type=int, default=60)
    parser.add_argument("--num_prompts", type=int, default=16)
    parser.add_argument("--seeds", default="1000-1003", help="Held-out seeds (training never draws them).")
    parser.add_argument("--update_readme", action="store_true", help="Rewrite the README's evaluation block.")
    args = parser.parse_args(argv)
    work = tempfile.mkdtemp(prefix="drpo-evaluation-")
    for name, reward in LORAS.items():
        train_run("train_drpo.py", [*TRAINING, reward, f"--max_train_steps={args.max_train_steps}"],
                  os.path.join(work, name))
    from pipelines import evaluate
    from pipelines.eval_tables import render_markdown

    os.chdir(ROOT)  # the flags' relative paths, as in the README command
    flags = evaluation_flags(work, args.num_prompts, args.seeds)
    result = evaluate.main(flags)
    command = "python -m pipelines.evaluate " + " ".join(f.replace(work + os.sep, "") for f in flags)
    markdown = render_markdown(result) + (
        f"\nLoRAs trained {args.max_train_steps} steps (K = 16) on `color_match` and on `brightness`; evaluated with "
        f"`{command}`. Regenerate with `python -m benchmarks.evaluation --update_readme`.\n")
    save_result("evaluation", {"training": TRAINING, "loras": LORAS, "metrics.json": result}, markdown,
                update_readme=args.update_readme)
    print(markdown)


if __name__ == "__main__":
    sys.exit(main())
