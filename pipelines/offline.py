"""Offline DrPO and offline DPO(1-step) on a preference dataset (Section 4, "Offline variant";
Appendix B; Algorithm A3 with offline triples), as per-prompt methods of the shared training loop.

Offline DrPO: for a prompt, the dataset's chosen images are A+ and its rejected images A- (encoded
into phi once, ``pipelines/preference_data.py``); the queries are K samples of the current generator
for that prompt; the reference drift and the regression of Eqs. 16-17 are unchanged. No reward is
called. Offline DPO(1-step): the same pairs as y+ / y- of the sigmoid margin (``baselines/dpo.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import drpo_utils
from pipelines import candidates, preference_data
from pipelines.baselines import dpo

OFFLINE_METHODS = ("drpo", "dpo")


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


def preference_space(args) -> str:
    """What the dataset images are encoded into: phi for DrPO (and DPO with --dpo_space features), else the latent."""
    if args.method == "dpo" and args.dpo_space == "latent":
        return "latent"
    return f"features:{args.feature_extractor}:{args.feature_extractor_path}"


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


def load_store(args, pipe, feature_map, encode_prompts, accelerator) -> preference_data.PreferenceStore:
    """The run's encoded preference pairs: built once by the main process (the others wait), then read."""
    space = preference_space(args)
    with accelerator.main_process_first():
        return preference_data.load_store(
            args, space, image_encoder(pipe, feature_map, space, accelerator),
            caption_embedder(pipe, encode_prompts, accelerator, args.resolution), accelerator.is_main_process)


def drpo_update(ctx: candidates.StepContext, proposal: OfflineProposal):
    """Algorithm 1, lines 8-12, with the dataset's A+ / A- in place of lines 6-7 (Section 4, "Offline variant")."""
    queries = proposal.queries
    targets, stats = drpo_utils.offline_drift_targets(queries.features, queries.ref_features, proposal.chosen,
                                                      proposal.rejected, ctx.config)
    stats.update(loss=(yield from candidates.regression_pieces(ctx, queries, targets)), num_pairs=proposal.num_pairs)
    return stats


def dpo_update(ctx: candidates.StepContext, proposal: OfflineProposal):
    """Algorithm A3 on the dataset's triples (p, y+, y-) of the prompt."""
    condition = candidates.prompt_condition(ctx, proposal.prompt, 1)
    loss = yield from dpo.margin_pieces(ctx, condition, proposal.rng, proposal.chosen, proposal.rejected)
    return {"loss": loss, "num_pairs": proposal.num_pairs}


def method(name: str, store: preference_data.PreferenceStore) -> candidates.Method:
    """``--method drpo|dpo`` on ``store``: each prompt draws at most --num_pairs of its pairs."""

    def propose(ctx: candidates.StepContext, prompt: str, rng: torch.Generator) -> OfflineProposal:
        chosen, rejected, count = store.pairs(prompt, ctx.args.num_pairs, rng, ctx.accelerator.device)
        queries = candidates.candidates(ctx, prompt, rng, scored=False) if name == "drpo" else None
        return OfflineProposal(prompt, rng, chosen, rejected, count, queries)

    return candidates.Method(name, propose, {"drpo": drpo_update, "dpo": dpo_update}[name])
