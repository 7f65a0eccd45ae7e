"""Resolution and memory before the first step: the model's own resolution, its constraints, and an
estimate of what one DrPO micro-step keeps alive, checked against the machine.

Nothing here loads weights: the resolution comes from the model's config files, and the estimate
counts the tensors autograd saves for backward while the UNet (and, for image feature maps, the VAE
decoder) runs one candidate on the ``meta`` device.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

HEADROOM = 1.25  # allocator fragmentation, optimiser state, the reference pass and features on top


def model_configs(args) -> tuple[dict, dict]:
    """The UNet's and the VAE's config dicts, read from the model's config files (no weights)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    location = dict(pretrained_model_name_or_path=args.pretrained_model_name_or_path, revision=args.revision)
    return (UNet2DConditionModel.load_config(subfolder="unet", **location),
            AutoencoderKL.load_config(subfolder="vae", **location))


def vae_scale_factor(vae_config: dict) -> int:
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def resolve_resolution(args, unet_config: dict, vae_config: dict) -> int:
    """``--resolution``, or the model's own (UNet sample size x VAE scale factor); either way one the
    pipelines accept (a positive multiple of 8 and of the VAE's downsampling factor)."""
    factor = vae_scale_factor(vae_config)
    resolution = args.resolution if args.resolution is not None else unet_config["sample_size"] * factor
    multiple = max(8, factor)
    if resolution <= 0 or resolution % multiple:
        raise ValueError(f"--resolution must be a positive multiple of {multiple} for this model "
                         f"(diffusers pipelines need multiples of 8; its VAE downsamples {factor}x), got {resolution}")
    return resolution


def saved_activation_bytes(module: torch.nn.Module, *inputs, **kwargs) -> int:
    """Bytes autograd saves for backward when ``module`` runs on ``inputs`` with gradient."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), torch.enable_grad():
        module(*inputs, **kwargs)
    return total


def _on_meta(model_cls, config: dict, dtype: torch.dtype) -> torch.nn.Module:
    """The model built from its config on the meta device: shapes only, no memory, every weight trainable
    (so the inputs of every layer count as saved, as with LoRA on its attention layers)."""
    with torch.device("meta"):
        model = model_cls.from_config(config)
    return model.to(dtype).requires_grad_(True)


def estimate_step_bytes(unet_config: dict, vae_config: dict, resolution: int, num_candidates: int,
                        needs_images: bool, dtype: torch.dtype) -> int:
    """Activations one micro-step keeps for K candidates (UNet, plus the VAE decoder when the feature
    map reads images): a one-candidate pass on the meta device, times K, with headroom."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = _on_meta(UNet2DConditionModel, unet_config, dtype)
    config, latent = unet.config, resolution // vae_scale_factor(vae_config)
    meta = dict(device="meta", dtype=dtype)
    inputs = dict(sample=torch.zeros(1, config.in_channels, latent, latent, **meta), timestep=torch.tensor(999),
                  encoder_hidden_states=torch.zeros(1, 77, config.cross_attention_dim, **meta))
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {"text_embeds": torch.zeros(1, pooled, **meta),
                                       "time_ids": torch.zeros(1, 6, **meta)}
    per_candidate = saved_activation_bytes(unet, **inputs)
    if needs_images:
        vae = _on_meta(AutoencoderKL, vae_config, dtype)
        per_candidate += saved_activation_bytes(vae.decode, torch.zeros(1, vae.config.latent_channels, latent, latent,
                                                                        **meta))
    return int(HEADROOM * num_candidates * per_candidate)


def available_bytes(device: torch.device) -> int | None:
    """Free memory of the training device (GPU: free CUDA memory; CPU: MemAvailable), if known."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as handle:
            fields = dict(line.split(":", 1) for line in handle)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def check_step_memory(args, unet_config: dict, vae_config: dict, device, needs_images: bool,
                      dtype: torch.dtype) -> int:
    """Warn before the first step (with what to lower) when one micro-step likely needs more memory
    than the device has free; returns the estimate in bytes."""
    needed = args.train_batch_size * estimate_step_bytes(unet_config, vae_config, args.resolution,
                                                         args.num_candidates, needs_images, dtype)
    free = available_bytes(torch.device(device))
    if free is not None and needed > free:
        own = unet_config["sample_size"] * vae_scale_factor(vae_config)
        logger.warning(
            "one DrPO micro-step at --resolution %d with --num_candidates %d x --train_batch_size %d needs about "
            "%.1f GB of activations, but only %.1f GB are free on %s: expect an out-of-memory kill. Lower "
            "--resolution (this model's own is %d) or --num_candidates%s.",
            args.resolution, args.num_candidates, args.train_batch_size, needed / 2**30, free / 2**30, device, own,
            "" if args.gradient_checkpointing else ", or add --gradient_checkpointing")
    return needed
