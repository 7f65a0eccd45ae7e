"""Resolution and memory before the first step: the model's own resolution and its constraints (from
config files, before any weights load), and what one micro-step will keep alive for backward,
measured on one candidate and checked against the free memory of the device.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from pipelines.config import ModelConfig

logger = logging.getLogger(__name__)

HEADROOM = 1.25  # transient buffers of the largest layer, the reference pass, reward images


def model_configs(model: ModelConfig) -> tuple[dict, dict]:
    """The denoiser's (the UNet, or FLUX's transformer) and the VAE's config dicts, read from the model's
    config files (no weights)."""
    from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel

    location = dict(pretrained_model_name_or_path=model.pretrained_model_name_or_path, revision=model.revision,
                    cache_dir=model.cache_dir)
    components = DiffusionPipeline.load_config(**location)
    denoiser = "unet" if "unet" in components else "transformer"
    return (UNet2DConditionModel.load_config(subfolder=denoiser, **location),  # load_config reads any config.json
            AutoencoderKL.load_config(subfolder="vae", **location))


def vae_scale_factor(vae_config: dict) -> int:
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def own_resolution(unet_config: dict, vae_config: dict) -> int:
    """The resolution the model was trained at: UNet sample size x VAE scale factor (SD-Turbo: 512); a
    transformer without a sample size (FLUX): the VAE's (FLUX.1: 1024)."""
    if "sample_size" not in unet_config:
        return vae_config["sample_size"]
    return unet_config["sample_size"] * vae_scale_factor(vae_config)


def resolve_resolution(requested: int | None, unet_config: dict, vae_config: dict) -> int:
    """``--resolution``, or the model's own; either way one the pipelines accept (a positive multiple of
    8 and of the VAE's downsampling factor, twice that for FLUX, which packs 2x2 latent patches)."""
    resolution = requested if requested is not None else own_resolution(unet_config, vae_config)
    factor = vae_scale_factor(vae_config)
    packs = unet_config.get("_class_name", "").startswith("Flux")
    multiple = max(8, factor * (2 if packs else 1))
    if resolution <= 0 or resolution % multiple:
        raise ValueError(f"--resolution must be a positive multiple of {multiple} for this model "
                         f"(diffusers pipelines need multiples of 8; its VAE downsamples {factor}x"
                         f"{' and FLUX packs 2x2 latent patches' if packs else ''}), got {resolution}")
    return resolution


def saved_activation_bytes(forward: Callable[[], object]) -> int:
    """Bytes autograd saves for backward while ``forward()`` runs (the graph is then dropped).

    This is what a candidate keeps alive until the backward pass: on the tiny model it matched the
    resident-memory growth of K = 8 candidates to 3 % at 128 and 256 px.
    """
    total = 0

    def count(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor), torch.enable_grad():
        forward()
    return total


class SavedActivationPeak:
    """``with SavedActivationPeak() as peak: ...``; then ``peak.bytes`` is the most memory autograd held
    saved for backward at any one moment inside the block (each save counted, weights saved for a
    gradient included): the part of a step's memory that grows with the candidates backpropagated
    together, measured exactly on any device, independent of the allocator."""

    class Saved:
        __slots__ = ("tensor", "size", "owner")

        def __init__(self, tensor, owner):
            self.tensor, self.size, self.owner = tensor, tensor.numel() * tensor.element_size(), owner
            owner.alive += self.size
            owner.bytes = max(owner.bytes, owner.alive)

        def __del__(self):
            self.owner.alive -= self.size

    def __enter__(self):
        self.alive = self.bytes = 0
        self.hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: self.Saved(t, self), lambda s: s.tensor)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)
        return False


def available_bytes(device: torch.device) -> int | None:
    """Free memory of the training device (GPU: free CUDA memory; CPU: available memory, via psutil)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil  # any OS (installed with accelerate)

    return psutil.virtual_memory().available


def check_step_memory(per_candidate_bytes: int, together: int, device, resolution: int, model_resolution: int,
                      checkpointing: bool) -> int:
    """Warn before the first step (saying what to lower) when the ``together`` candidates backpropagated at
    once (K, or C with --candidate_chunk_size; prompts go one at a time) likely need more memory than the
    device has free; returns the estimate in bytes."""
    needed = int(HEADROOM * per_candidate_bytes * together)
    free = available_bytes(torch.device(device))
    if free is not None and needed > free:
        logger.warning(
            "one prompt at --resolution %d with %d candidates backpropagated together keeps about %.1f GB of "
            "activations, but only %.1f GB are free on %s: expect an out-of-memory kill. Lower --resolution (this "
            "model's own is %d), or backpropagate fewer candidates at once with --candidate_chunk_size%s.",
            resolution, together, needed / 2**30, free / 2**30, device, model_resolution,
            "" if checkpointing else ", or add --gradient_checkpointing")
    return needed
