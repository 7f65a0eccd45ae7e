"""Offline DrPO against offline DPO(1-step) on the embedded tiny model (the shape of the paper's Figure 10).

    python -m benchmarks.offline --update_readme

A preference set in the Pick-a-Pic v2 layout is built from the tiny model's own samples: for every
training prompt, pairs of images from different seeds, labelled by a reward the trainers are never
given (``brightness``: ``label_0`` = 1 when image 0 is brighter). Offline DrPO and offline
DPO(1-step) train on it with the same seed, prompts and budget; every checkpoint is scored on
held-out seeds with that reward, giving the held-out reward against steps.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile

from benchmarks.harness import ROOT, compare_to_base, train_run
from benchmarks.readme import save_result

TINY_SD = os.path.join(ROOT, "assets", "tiny-sd-turbo")
HIDDEN_REWARD = "benchmarks.rewards:brightness"
# The trainers' settings (the tests train with them too): features and learning rates at the tiny model's scale.
OFFLINE_FLAGS = ["--resolution=64", "--feature_extractor=image", "--num_candidates=8", "--num_pairs=8",
                 "--learning_rate=1e-3", "--validation_steps=0", "--seed=0",
                 f"--reward={HIDDEN_REWARD}"]  # offline, the reward only scores the final check
METHOD_FLAGS = {"drpo": ["--method=drpo", "--drift_preset=paper"], "dpo": ["--method=dpo", "--dpo_beta=0.1"]}


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def build_preference_set(folder: str, prompts: list[str], pairs_per_prompt: int, reward: str = HIDDEN_REWARD,
                         model: str = TINY_SD, reverse: bool = False, first_seed: int = 20000) -> str:
    """A Pick-a-Pic v2-layout parquet file of ``model``'s samples, ``pairs_per_prompt`` pairs per prompt,
    labelled by ``reward`` (``reverse``: the opposite labels); returns the folder."""
    import datasets

    from pipelines.inference import generate_images, load_one_step_pipeline
    from pipelines.rewards import load_reward, score_candidates
    from pipelines.images import to_pil

    pipe, reward_fn = load_one_step_pipeline(model), load_reward(reward)
    seeds = list(range(first_seed, first_seed + 2 * pairs_per_prompt))
    images = generate_images(pipe, prompts, seeds)
    scores = score_candidates(reward_fn, images, [p for p in prompts for _ in seeds], reward).reported
    records = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": []}
    for index in range(0, len(images), 2):
        first_wins = bool(scores[index] > scores[index + 1]) != reverse
        records["caption"].append(prompts[index // len(seeds)])
        records["jpg_0"].append(png_bytes(to_pil(images[index:index + 1])))
        records["jpg_1"].append(png_bytes(to_pil(images[index + 1:index + 2])))
        records["label_0"].append(1.0 if first_wins else 0.0)
    os.makedirs(folder, exist_ok=True)
    datasets.Dataset.from_dict(records).to_parquet(os.path.join(folder, "train-00000.parquet"))
    return folder


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_prompts", type=int, default=16, help="Training prompts in the preference set.")
    parser.add_argument("--pairs_per_prompt", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=10, help="Evaluate a checkpoint every N steps.")
    parser.add_argument("--num_seeds", type=int, default=8, help="Held-out seeds per prompt.")
    parser.add_argument("--update_readme", action="store_true")
    args = parser.parse_args(argv)
    from pipelines.prompts import load_prompts

    prompts = load_prompts(os.path.join(ROOT, "assets", "tiny_prompts.txt"))[:args.num_prompts]
    curves = {}
    with tempfile.TemporaryDirectory(prefix="drpo-offline-") as work:
        data = build_preference_set(os.path.join(work, "data"), prompts, args.pairs_per_prompt)
        for method, flags in METHOD_FLAGS.items():
            output = os.path.join(work, method)
            seconds = train_run("train_drpo.py", [
                f"--pretrained_model_name_or_path={TINY_SD}", f"--preference_dataset={data}",
                f"--feature_cache_dir={os.path.join(work, 'cache')}", f"--max_train_steps={args.steps}",
                f"--checkpointing_steps={args.every}", *OFFLINE_FLAGS, *flags], output)
            steps = list(range(args.every, args.steps + 1, args.every))
            checkpoints = {f"{method}@{s}": os.path.join(output, f"checkpoint-{s}") for s in steps}
            compared = compare_to_base(TINY_SD, checkpoints, [HIDDEN_REWARD], prompts,
                                       list(range(3000, 3000 + args.num_seeds)))
            curves[method] = {"seconds": seconds, "points": [
                {"step": s, **{k: compared[f"{method}@{s}"][HIDDEN_REWARD][k]
                               for k in ("base_mean", "lora_mean", "effect_size", "change", "change_se")}}
                for s in steps]}
    result = {"num_prompts": args.num_prompts, "pairs_per_prompt": args.pairs_per_prompt, "steps": args.steps,
              "num_seeds": args.num_seeds, "flags": OFFLINE_FLAGS, "method_flags": METHOD_FLAGS, "curves": curves}
    markdown = render(result)
    print(markdown)
    save_result("offline", result, markdown, update_readme=args.update_readme)
    plot(result, os.path.join(ROOT, "assets", "readme_offline_curve.png"))
    return result


def render(result: dict) -> str:
    methods = list(result["curves"])
    lines = ["| step | " + " | ".join(f"offline {m}: held-out brightness (effect size ± SE)" for m in methods) + " |",
             "|---|" + "---|" * len(methods)]
    for index, point in enumerate(result["curves"][methods[0]]["points"]):
        cells = []
        for method in methods:
            p = result["curves"][method]["points"][index]
            seed_std = p["change"] / p["effect_size"] if p["effect_size"] else float("nan")
            cells.append(f"{p['lora_mean']:.4f} ({p['effect_size']:+.2f} ± {p['change_se'] / seed_std:.2f})")
        lines.append(f"| {point['step']} | " + " | ".join(cells) + " |")
    base = result["curves"][methods[0]]["points"][0]["base_mean"]
    lines += ["", f"Base model: {base:.4f}. Data: {result['num_prompts']} prompts x {result['pairs_per_prompt']} "
              f"pairs labelled by brightness (never given to the trainers); held-out: the same prompts x "
              f"{result['num_seeds']} seeds (3000+). Training time: "
              + ", ".join(f"{m} {c['seconds']:.0f} s" for m, c in result["curves"].items())
              + ". Regenerate with `python -m benchmarks.offline --update_readme`."]
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipelines import files

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    for method, curve in result["curves"].items():
        steps = [0] + [p["step"] for p in curve["points"]]
        means = [curve["points"][0]["base_mean"]] + [p["lora_mean"] for p in curve["points"]]
        ax.plot(steps, means, marker="o", label=f"offline {method}")
    ax.set(xlabel="optimisation step", ylabel="held-out brightness", title="Offline DrPO vs DPO(1-step), tiny SD")
    ax.legend()
    fig.tight_layout()
    files.save_image(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    main()
