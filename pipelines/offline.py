"""Offline DrPO and offline DPO(1-step) on a preference dataset (Section 4, "Offline variant";
Appendix B; Algorithm A3 with offline triples), as per-prompt methods of the shared training loop.

A method with an offline form (``Method.offline_update``) gets, per prompt, the dataset's chosen / rejected
images encoded once into its space (``pipelines/preference_data.py``) and, if it asks, the current
generator's K candidates as queries; no reward is called. Offline DrPO (``train_drpo.offline_drpo_update``):
A+ / A- from the dataset, the reference drift and the regression of Eqs. 16-17 unchanged. Offline
DPO(1-step) (``baselines/dpo.py``): the same pairs as y+ / y- of the sigmoid margin.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from pipelines import candidates, methods, preference_data
from pipelines.config import MethodConfig, TrainingConfig


@dataclass
class OfflineProposal:
    """One prompt's drawn preference pairs (A+ / A-, or psi(y+) / psi(y-)) and, for DrPO, its queries."""

    prompt: str
    rng: torch.Generator
    chosen: dict
    rejected: dict
    num_pairs: int
    queries: candidates.Candidates | None = None


def encode_images(vae, images: torch.Tensor) -> torch.Tensor:
    """The inverse of ``decode_latents`` for dataset images in [0, 1]: the VAE posterior's mode, scaled
    into the generator's latent space (offline DrPO's A+ / A-, Appendix B)."""
    pixels = (images.to(vae.device, vae.dtype) * 2 - 1)
    with torch.autocast(pixels.device.type, enabled=False):
        latents = vae.encode(pixels).latent_dist.mode()
    if getattr(vae.config, "shift_factor", None):
        latents = latents - vae.config.shift_factor
    return latents * vae.config.scaling_factor


def preference_space(method: methods.Method, setup: MethodConfig) -> str:
    """What the dataset images are encoded into: the method's space, phi (named with its weights) or the latent."""
    if method.offline_space(setup.options) == "latent":
        return "latent"
    return f"features:{setup.feature_extractor}:{setup.feature_extractor_path}"


def image_encoder(pipe, feature_map, space: str, accelerator):
    """images [B, 3, R, R] in [0, 1] -> the preference space: VAE-encoded for the latent and latent
    feature maps, read directly by image feature maps (no decode)."""

    @torch.no_grad()
    def encode(images: torch.Tensor) -> dict:
        images = images.to(accelerator.device)
        with accelerator.autocast():
            if space == "latent":
                return {"latent": encode_images(pipe.vae, images)}
            if feature_map.needs_images:
                return feature_map(None, images)
            return feature_map(encode_images(pipe.vae, images), None)

    return encode


def caption_embedder(pipe, encode_prompts, accelerator, resolution: int):
    """caption -> the generator's own text condition, mean over tokens (for --offline_neighbours)."""

    @torch.no_grad()
    def embed(caption: str) -> torch.Tensor:
        condition = encode_prompts(pipe, [caption], accelerator.device, resolution)
        return condition["encoder_hidden_states"][0].float().mean(0)

    return embed


def load_store(config: TrainingConfig, space: str, pipe, feature_map, encode_prompts,
               accelerator) -> preference_data.PreferenceStore:
    """The run's encoded preference pairs: built once by the main process (the others wait), then read."""
    with accelerator.main_process_first():
        return preference_data.load_store(
            config, space, image_encoder(pipe, feature_map, space, accelerator),
            caption_embedder(pipe, encode_prompts, accelerator, config.model.resolution), accelerator.is_main_process)


def offline_form(method: methods.Method, store: preference_data.PreferenceStore) -> methods.Method:
    """``method`` on ``store``'s pairs: each prompt draws at most --num_pairs of them (and, when the method
    needs them, the current generator's K candidates as queries, without a reward)."""

    def propose(ctx: candidates.StepContext, prompt: str, rng: torch.Generator) -> OfflineProposal:
        chosen, rejected, count = store.pairs(prompt, ctx.setup.num_pairs, rng, ctx.accelerator.device)
        queries = candidates.candidates(ctx, prompt, rng, scored=False) if method.offline_queries else None
        return OfflineProposal(prompt, rng, chosen, rejected, count, queries)

    return dataclasses.replace(method, propose=propose, update=method.offline_update)
