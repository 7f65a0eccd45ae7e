"""Sample grids of the embedded tiny models (docs/tiny-models.md, docs/generators.md) and how much their samples
vary across prompts and across seeds (mean colour), generated the way the trainer's final check does.

    python -m benchmarks.tiny_samples            # every tiny model
    python -m benchmarks.tiny_samples --models tiny-flux-schnell
"""

from __future__ import annotations

import argparse
import os

import torch

from benchmarks.harness import ROOT
from pipelines import files, generators
from pipelines.build_tiny_models import ONE_STEP_SCHEDULER, ONE_STEP_TIMESTEP, ONE_STEP_UNET_FILE
from pipelines.config import ModelConfig
from pipelines.images import labelled_grid
from pipelines.inference import generate_images, load_one_step_pipeline


def asset(name: str) -> str:
    return os.path.join(ROOT, "assets", name)


# name -> (the model as the trainer's flags give it, the sample grid it writes)
MODELS = {
    "tiny-sd-turbo": (ModelConfig(asset("tiny-sd-turbo")), "tiny_sd_turbo_samples.png"),
    "tiny-sdxl-turbo": (ModelConfig(asset("tiny-sdxl-turbo")), "tiny_sdxl_turbo_samples.png"),
    "tiny-sdxl-base": (ModelConfig(asset("tiny-sdxl-base"), unet=asset(f"tiny-sdxl-base/{ONE_STEP_UNET_FILE}"),
                                   scheduler=ONE_STEP_SCHEDULER, timesteps=(ONE_STEP_TIMESTEP,)),
                       "tiny_sdxl_base_samples.png"),
    "tiny-flux-schnell": (ModelConfig(asset("tiny-flux-schnell")), "tiny_flux_schnell_samples.png"),
}


def spread(images: torch.Tensor, prompts: int, seeds: int) -> tuple[float, float]:
    """Std of the mean colour across prompts (of the per-prompt means) and across seeds (within a prompt)."""
    colour = images.mean(dim=(2, 3)).view(prompts, seeds, 3)
    return colour.mean(1).std(0).mean().item(), colour.std(1).mean().item()


def sample(name: str, prompts: list[str], seeds: list[int]) -> tuple[float, float]:
    model, picture = MODELS[name]
    pipe = load_one_step_pipeline(model.pretrained_model_name_or_path, call_arguments=generators.call_arguments(model),
                                  **generators.pipeline_components(model, torch.float32))
    images = generate_images(pipe, prompts, seeds)
    files.save_image(labelled_grid(prompts, {name: images}, len(seeds)), os.path.join(ROOT, "assets", picture))
    return spread(images, len(prompts), len(seeds))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"Comma-separated, of {', '.join(MODELS)}.")
    args = parser.parse_args(argv)
    with open(os.path.join(ROOT, "assets", "tiny_prompts.txt"), encoding="utf-8") as handle:
        prompts = [line.strip() for line in handle][:8]
    for name in args.models.split(","):
        across_prompts, across_seeds = sample(name, prompts, list(range(8)))
        print(f"{name}: mean colour std across prompts {across_prompts:.3f}, across seeds {across_seeds:.3f}")


if __name__ == "__main__":
    main()
