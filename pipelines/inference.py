"""One-step generation with stock diffusers pipelines (the inference side; training's differentiable
generator is ``drpo_utils.one_step_latents``, which reproduces it exactly).

    from pipelines.inference import load_one_step_pipeline, generate_images
    pipe = load_one_step_pipeline("stabilityai/sd-turbo", lora="drpo-output")
    images = generate_images(pipe, ["a cat"], seeds=[0, 1, 2])  # [3, 3, H, W] in [0, 1]
"""

from __future__ import annotations

import contextlib
import logging

import torch
from tqdm.auto import tqdm

from drpo_utils import decode_latents

UNET_ONLY_LORA_WARNING = "No LoRA keys associated to"
FLUX_MAX_SEQUENCE_LENGTH = 256  # FLUX.1-schnell's T5 limit (its model card's call); the pipeline's default is 512


class _DropUnetOnlyLoraWarning(logging.Filter):
    """diffusers warns that a UNet-only LoRA has no text-encoder keys; a DrPO LoRA never has any."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(UNET_ONLY_LORA_WARNING)


@contextlib.contextmanager
def _quiet_unet_only_lora():
    loggers = [logging.getLogger(name) for name in ("diffusers.loaders.lora_base", "diffusers.loaders.peft")]
    quiet = _DropUnetOnlyLoraWarning()
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)


def load_lora(pipe, lora: str) -> None:
    """``pipe.load_lora_weights(lora)`` (a folder, a file or a Hub id), without the text-encoder warning."""
    with _quiet_unet_only_lora():
        pipe.load_lora_weights(lora)


def load_one_step_pipeline(model: str, lora: str | None = None, *, dtype=torch.float32, device="cpu",
                           call_arguments: dict | None = None, **kwargs):
    """``AutoPipelineForText2Image`` with an optional DrPO LoRA loaded by ``load_lora_weights``, on ``device``
    (None: where it loads); the one loader of the project (training, evaluation, tests). ``kwargs`` go to
    ``from_pretrained`` (components such as a distilled ``unet`` or its ``scheduler`` among them);
    ``call_arguments``: what the model's one-step call needs beyond steps and guidance (a distilled UNet's
    ``timesteps=[399]``, FLUX's ``max_sequence_length``), kept as ``pipe.one_step_arguments`` and passed by
    every generation here (and read by the trainer's prompt encoding, so training and sampling agree)."""
    from diffusers import AutoPipelineForText2Image

    pipe = AutoPipelineForText2Image.from_pretrained(model, dtype=dtype, **kwargs)
    if lora is not None:
        load_lora(pipe, lora)
    pipe.set_progress_bar_config(disable=True)
    defaults = {"max_sequence_length": FLUX_MAX_SEQUENCE_LENGTH} if type(pipe).__name__.startswith("Flux") else {}
    pipe.one_step_arguments = {**defaults, **(call_arguments or {})}
    return pipe if device is None else pipe.to(device)


def one_step_arguments(pipe) -> dict:
    """The stock one-step call: one step at guidance 0, plus the model's own arguments (``load_one_step_pipeline``)."""
    return {"num_inference_steps": 1, "guidance_scale": 0.0, **(getattr(pipe, "one_step_arguments", None) or {})}


def denoiser(pipe):
    """The network a LoRA trains: the UNet (SD, SDXL and their distilled UNets) or FLUX's transformer."""
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def latent_channels(pipe) -> int:
    """Channels of the initial noise: the UNet's input; FLUX packs 2x2 patches, so a quarter of its input."""
    channels = denoiser(pipe).config.in_channels
    return channels if hasattr(pipe, "unet") else channels // 4


def default_resolution(pipe) -> int:
    """The resolution the model was trained at (``pipelines.memory.own_resolution`` of its configs)."""
    from pipelines.memory import own_resolution

    return own_resolution(denoiser(pipe).config, pipe.vae.config)


def initial_noise(pipe, seed: int, height: int, width: int, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """The pipeline's own initial latent noise for ``seed`` (CPU generator, as ``pipe(generator=...)``)."""
    generator = torch.Generator("cpu").manual_seed(seed)
    shape = (1, latent_channels(pipe), height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    return torch.randn(shape, generator=generator, dtype=dtype).to(device)


def unpacked(pipe, latents: torch.Tensor, resolution: int) -> torch.Tensor:
    """The pipeline's latent output as [B, C, h, w]: FLUX returns its 2x2-packed token sequence."""
    if latents.dim() == 4:
        return latents
    return pipe._unpack_latents(latents, resolution, resolution, pipe.vae_scale_factor)


@torch.no_grad()
def generate_images(pipe, prompts: list[str], seeds: list[int], resolution: int | None = None,
                    progress: bool = False, description: str = "generating") -> torch.Tensor:
    """One image per (prompt, seed), prompt-major: ``num_inference_steps=1, guidance_scale=0``.

    Returns float32 [len(prompts) * len(seeds), 3, H, W] in [0, 1] on the CPU. The latents come from
    the pipeline; decoding runs the VAE in its own dtype, so an fp32-kept SDXL VAE next to a bf16/fp16
    UNet works without autocast (and without running that VAE in fp16). ``progress`` shows a bar.
    """
    resolution = resolution or default_resolution(pipe)
    images = []
    for prompt in tqdm(prompts, desc=description, unit="prompt", disable=not progress):
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        latents = pipe(
            [prompt] * len(seeds), generator=generators, height=resolution, width=resolution, output_type="latent",
            **one_step_arguments(pipe),
        ).images
        images.append(decode_latents(pipe.vae, unpacked(pipe, latents, resolution)).cpu())
    return torch.cat(images)
