"""What a run leaves behind: the per-step history and its reward curve, the final check (the saved LoRA
reloaded into a fresh stock pipeline and scored on held-out seeds against the base), the sample pictures,
and the model card."""

from __future__ import annotations

import json
import os

import torch

from pipelines import files, generators, hub, methods
from pipelines.config import TrainingConfig
from pipelines.images import labelled_grid, to_pil
from pipelines.inference import denoiser, load_lora
from pipelines.lora_files import kohya_base_model_version, save_kohya_lora, save_lora
from pipelines.redact import public_text
from pipelines.scoring import describe_change, reward_table, summarize

HISTORY_FILE = "reward_history.jsonl"


def load_history(output_dir: str, up_to_step: int) -> list[dict]:
    """Per-step logs of an earlier run (for the reward curve of a resumed run)."""
    path = os.path.join(output_dir, HISTORY_FILE)
    if up_to_step == 0 or not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as handle:
        return [row for row in map(json.loads, handle) if row["step"] <= up_to_step]


def save_history(output_dir: str, history: list[dict]) -> None:
    rows = (json.dumps(files.finite_or_none(row), allow_nan=False) + "\n" for row in history)  # undefined: null
    files.write_text(os.path.join(output_dir, HISTORY_FILE), "".join(rows))


def validation_curves(history: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """--validation_rewards in the history: {"validation/<reward>[_base]": [(step, mean), ...]}."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for row in history:
        for key, value in row.items():
            if key.startswith("validation/"):
                curves.setdefault(key, []).append((row["step"], value))
    return curves


def plot_candidate_rewards(ax, trained: list[dict]) -> None:
    """The K candidates' reward per step: mean, its moving mean, and the spread across candidates."""
    steps = [h["step"] for h in trained]
    mean = torch.tensor([h["reward_mean"] for h in trained])
    std = torch.tensor([h["reward_std"] for h in trained])
    window = max(1, len(trained) // 20)
    smooth = torch.nn.functional.avg_pool1d(mean.view(1, 1, -1), window, 1, padding=0).flatten()
    ax.fill_between(steps, mean - std, mean + std, alpha=0.15, label="candidate spread (std)")
    ax.plot(steps, mean, alpha=0.4, label="candidate mean")
    ax.plot(steps[window - 1:], smooth, linewidth=2, label=f"moving mean ({window})")
    ax.set(xlabel="optimisation step", ylabel="reward", title="DrPO: reward of the K candidates")
    ax.legend(loc="best", fontsize=8)


def plot_validation_rewards(ax, validation: dict[str, list[tuple[int, float]]]) -> None:
    """Every --validation_rewards curve of the LoRA against the base model's level."""
    for key, points in validation.items():
        if key.endswith("_base"):
            continue
        line, = ax.plot(*zip(*points), marker="o", label=f"{key.removeprefix('validation/')} (LoRA)")
        if f"{key}_base" in validation:
            ax.plot(*zip(*validation[f"{key}_base"]), linestyle="--", color=line.get_color(), label="base")
    ax.set(xlabel="optimisation step", ylabel="held-out reward", title="validation prompts x seeds")
    ax.legend(loc="best", fontsize=8)


def plot_reward_curve(history: list[dict], path: str) -> None:
    """reward_curve.png: the candidates' reward per step and, beside it, the validation rewards (nothing
    when the history holds neither: offline DrPO without --validation_rewards calls no reward)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained, validation = [h for h in history if "reward_mean" in h], validation_curves(history)
    panels = [(plot_candidate_rewards, trained)] * bool(trained) + [(plot_validation_rewards, validation)] * bool(
        validation)
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.5), dpi=120, squeeze=False)
    for ax, (plot, data) in zip(axes[0], panels):
        plot(ax, data)
    fig.tight_layout()
    files.save_image(fig, path)
    plt.close(fig)


def save_widget_samples(output_dir: str, prompts: list[str], images: torch.Tensor, per_prompt: int) -> list[dict]:
    """The LoRA's first sample of every prompt as samples/prompt_<i>.png: the card's widget gallery."""
    os.makedirs(os.path.join(output_dir, "samples"), exist_ok=True)
    widget = []
    for index, prompt in enumerate(prompts):
        path = f"samples/prompt_{index}.png"
        files.save_image(to_pil(images[index * per_prompt:index * per_prompt + 1]), os.path.join(output_dir, path))
        widget.append({"text": prompt, "output": {"url": path}})
    return widget


def card_setup(config: TrainingConfig) -> str:
    """The card's paragraph on how the LoRA was trained."""
    setup, drift = config.method, config.method.drift
    method = methods.registered()[setup.method]
    offline = f", offline on the preference pairs of `{config.data.preference_dataset}`" if config.data.offline else ""
    pairs = "A+ / A- the top / bottom K/2" if drift.pairing == "top_bottom" else f"M = {setup.num_pairs}"
    return (f"LoRA weights trained with method `{setup.method}` ({method.summary}){offline}, with the DrPO project "
            f"(Drifting Preference Optimization, arXiv 2606.02521): reward `{public_text(config.reward.reward)}`, "
            f"feature map `{setup.feature_extractor}`, K = {setup.num_candidates}, "
            f"{pairs}, drift preset "
            f"`{setup.drift_preset}`: lambda = {drift.ref_weight}, eta = {drift.velocity_scale}, radii "
            f"{','.join(map(str, drift.radii))}, kernel {drift.kernel}; {config.run.max_train_steps} steps at learning "
            f"rate {config.optim.learning_rate}, rank {config.adapter.rank}"
            + (f", starting from the LoRA `{config.adapter.init_lora}`." if config.adapter.init_lora else ".")
            + generators.describe(config.model))


def run_config_section(output_dir: str) -> str:
    """The card's training configuration: the run's ``config.yaml`` (its resolved flags), when there is one."""
    path = os.path.join(output_dir, hub.RUN_CONFIG)
    if not os.path.isfile(path):
        return ""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    return (f"\n## Training configuration\n\n`config.yaml` in this repository, reusable with `--config`:\n\n"
            f"```yaml\n{text}```\n")


def write_model_card(config: TrainingConfig, sample_file: str | None, metrics: dict,
                     widget: list[dict] | None = None, pipeline_cls=None) -> None:
    """``README.md`` model card (huggingface_hub.ModelCard) with the samples, a widget gallery, the base
    model's licence and the training setup."""
    from huggingface_hub import ModelCard, ModelCardData

    output_dir, model = config.run.output_dir, config.model.pretrained_model_name_or_path
    base_model = hub.hub_base_model(model)
    licence, licence_name, licence_link = hub.base_model_licence(base_model)
    samples = (f"![base vs LoRA]({sample_file})\n\nPer prompt (named above its rows): the base model, then the "
               f"same seeds with this LoRA.\n" if sample_file else "")
    family = hub.family_tags(pipeline_cls) if pipeline_cls is not None else []
    datasets = [name for name in (config.data.dataset_name, config.data.preference_dataset)
                if name is not None and not os.path.exists(name)]  # Hub datasets, not local folders
    card_data = ModelCardData(base_model=base_model, library_name="diffusers", license=licence,
                              license_name=licence_name, license_link=licence_link, datasets=datasets or None,
                              widget=widget or None,
                              tags=["text-to-image", "diffusers", "diffusers-training", "lora", "template:sd-lora",
                                    *family, "drpo", "one-step"])  # "drpo": the project's tag, whatever the method
    lines = "\n".join(f"- {k}: {v}" for k, v in metrics.items())
    recipe = run_config_section(output_dir)
    content = f"""---
{card_data.to_yaml()}
---
{hub.CARD_START}

# DrPO LoRA for {base_model or model}

{card_setup(config)}

{samples}
{lines}

```python
from diffusers import AutoPipelineForText2Image
from diffusers.utils import logging

logging.set_verbosity_error()  # a DrPO LoRA has no text-encoder keys: hides "No LoRA keys associated to CLIPTextModel"
{generators.loading_snippet(config.model, base_model or model)}
pipe.load_lora_weights("{hub.repo_name(config.hub, output_dir)}")
image = pipe("a prompt", num_inference_steps=1, guidance_scale=0.0{generators.call_text(config.model)}).images[0]
```
{recipe}
{hub.CARD_END}
"""
    files.write_text(os.path.join(output_dir, "README.md"), str(ModelCard(content)))


def final_check(config: TrainingConfig, fresh, reward_fn, prompts: list[str], seeds: list[int]) -> dict:
    """The saved LoRA, loaded by ``load_lora_weights`` into a fresh stock pipeline, against the base on the
    held-out seeds: final_metrics.json, samples_before_after.png, the widget samples; returns the metrics."""
    output_dir, spec, resolution = config.run.output_dir, config.reward.reward, config.model.resolution
    base, base_images = reward_table(fresh, reward_fn, spec, prompts, seeds, resolution, progress=True,
                                     description="final check: base")
    load_lora(fresh, output_dir)
    tuned, tuned_images = reward_table(fresh, reward_fn, spec, prompts, seeds, resolution, progress=True,
                                       description="final check: LoRA")
    metrics = summarize(base, tuned)
    files.write_json(os.path.join(output_dir, "final_metrics.json"), metrics)
    files.save_image(labelled_grid(prompts, {"base": base_images, "LoRA": tuned_images}, len(seeds)),
                     os.path.join(output_dir, "samples_before_after.png"))
    return {**metrics, "widget": save_widget_samples(output_dir, prompts, tuned_images, len(seeds))}


def finish_training(accelerator, config: TrainingConfig, pipe, history, prompts: list[str], seeds: list[int],
                    reward_fn, repo_id, fresh_pipeline) -> dict:
    """Save the LoRA, reload it into a fresh stock pipeline, score it, plot, write the card, push.

    ``fresh_pipeline()`` loads the base model again exactly as the script does (e.g. SDXL's VAE).
    """
    if not accelerator.is_main_process:
        return {}
    output_dir = config.run.output_dir
    save_lora(output_dir, accelerator.unwrap_model(denoiser(pipe)), type(pipe))
    if config.run.output_kohya_format:
        save_kohya_lora(output_dir, config.adapter.lora_alpha,
                        kohya_base_model_version(type(pipe), pipe.unet.config.cross_attention_dim))
    save_history(output_dir, history)
    plot_reward_curve(history, os.path.join(output_dir, "reward_curve.png"))
    metrics = final_check(config, fresh_pipeline().to(accelerator.device), reward_fn, prompts, seeds)
    widget = metrics.pop("widget")
    spec = public_text(config.reward.reward)
    accelerator.print(f"held-out {spec}: base {metrics['base_mean']:.4f} -> LoRA {metrics['lora_mean']:.4f} "
                      f"({describe_change(metrics)})")
    effect = metrics["effect_size"]
    write_model_card(config, "samples_before_after.png", {
        f"held-out {spec} (base -> LoRA)": f"{metrics['base_mean']:.4f} -> {metrics['lora_mean']:.4f}",
        "effect size (change / across-seed std)": f"{effect:.2f}" if effect is not None
        else f"undefined: {metrics['effect_size_undefined']}"}, widget, type(pipe))
    if repo_id is not None:
        hub.extend_existing_card(config.hub, output_dir, repo_id)  # a card already on the Hub is kept
        hub.push_to_hub(config.hub, output_dir, repo_id)
    return metrics
