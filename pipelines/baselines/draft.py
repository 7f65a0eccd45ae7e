"""DRaFT (Clark et al., 2024) in the one-step setting: backpropagate a differentiable reward through the
decoder and the generator (paper, Appendix C.1).

    L_DRaFT = -1/K sum_k R(D(mu_theta,k), p) + lambda_ref 1/K sum_k ||mu_theta,k - mu_ref,k||^2

mu_theta,k is the one-step clean latent of noise k, D the VAE decoder, mu_ref,k the frozen base model's
latent for the same prompt and noise. With --candidate_chunk_size the K candidates go C at a time
(the chunking C.1 describes), each chunk through generator, decoder and reward with gradient.

``--draft_gradient normalised`` (the default, ours) takes each candidate's reward gradient at its latent,
g_k = grad_mu R(D(mu_k)), rescales it to unit RMS and backpropagates -1/K sum_k <mu_theta,k, sg(g_k / RMS(g_k))>
through the generator, so that the update no longer depends on the reward's scale (a reward 100x smaller
trains the same LoRA); ``raw`` is C.1 as written.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import drpo_utils
from pipelines import candidates, flags, methods
from pipelines.rewards.protocol import differentiable_scores


def latent_anchor(latents: torch.Tensor, ref_latents: torch.Tensor) -> torch.Tensor:
    """||mu_theta,k - mu_ref,k||^2 per candidate k (summed over the latent's elements)."""
    return (latents.float() - ref_latents.float()).square().flatten(1).sum(1)


def unit_rms(gradient: torch.Tensor) -> torch.Tensor:
    """g_k / RMS(g_k) per sample (computed in float64, so a gradient of any magnitude keeps its direction)."""
    flat = gradient.double().flatten(1)
    rms = flat.square().mean(1).sqrt().clamp_min(torch.finfo(torch.float64).tiny)
    return (flat / rms[:, None]).view_as(gradient).to(gradient.dtype)


def normalised_draft_loss(rewards: torch.Tensor, reward_gradient: torch.Tensor, latents: torch.Tensor,
                          ref_latents: torch.Tensor, ref_weight: float, count: int | None = None) -> torch.Tensor:
    """``draft_loss``'s value with the gradient of -1/K sum_k <mu_theta,k, sg(g_k / RMS(g_k))> + the anchor, where
    g_k = grad_mu R_k at mu_theta,k: each candidate pushed along its reward's ascent direction at unit RMS, whatever
    the reward's scale (``rewards`` and ``reward_gradient`` detached)."""
    count = count or len(latents)
    direction = unit_rms(reward_gradient.detach()).float()
    surrogate = -(latents.float() * direction).flatten(1).sum(1).sum() / count
    return draft_loss(rewards.detach(), latents, ref_latents, ref_weight, count) + surrogate - surrogate.detach()


def draft_loss(rewards: torch.Tensor, latents: torch.Tensor, ref_latents: torch.Tensor, ref_weight: float,
               count: int | None = None) -> torch.Tensor:
    """Appendix C.1: -1/K sum_k R_k + lambda_ref 1/K sum_k ||mu_theta,k - mu_ref,k||^2 (K = ``count``, the
    whole candidate set, when these are one chunk of it)."""
    count = count or len(rewards)
    return (-rewards.float().sum() + ref_weight * latent_anchor(latents, ref_latents).sum()) / count


@dataclass(frozen=True)
class DRaFTOptions:
    """--method draft (Appendix C.1)."""

    draft_ref_weight: float = flags.option(
        0.0, flags.non_negative_float, "lambda_ref of the latent anchor (the paper does not report its value; 0 is "
                                       "plain DRaFT).")
    draft_gradient: str = flags.option(
        "normalised", None, "grad_mu R per candidate: rescaled to unit RMS (ours: independent of the reward's scale) "
                            "or raw (C.1 as written).", choices=["normalised", "raw"])


@dataclass
class Proposal:
    prompt: str
    condition: dict
    noise: torch.Tensor
    ref_latents: torch.Tensor


def propose(ctx: candidates.StepContext, prompt: str, rng: torch.Generator) -> Proposal:
    """Condition, noises and the base model's latents; everything else needs gradient."""
    k = ctx.num_candidates
    condition, noise = candidates.prompt_condition(ctx, prompt, k), candidates.candidate_noise(ctx, k, rng)
    return Proposal(prompt, condition, noise, candidates.reference_latents(ctx, condition, noise))


def reward_gradient(ctx: candidates.StepContext, latents: torch.Tensor, prompt: str) -> tuple[torch.Tensor, ...]:
    """grad_mu R(D(mu), p) at ``latents`` (through the decoder and the reward only, not the generator) and R."""
    leaf = latents.detach().float().requires_grad_(True)
    scores = differentiable_scores(ctx.scorer.reward_fn, drpo_utils.decode_latents(ctx.pipe.vae, leaf),
                                   [prompt] * len(leaf), ctx.scorer.name)
    (gradient,) = torch.autograd.grad(scores.sum(), leaf)
    return gradient, scores.detach()


def update(ctx: candidates.StepContext, proposal: Proposal):
    """Yields the DRaFT loss of each chunk (generator, decoder and reward with gradient); returns stats."""
    k, rewards = ctx.num_candidates, []

    def loss_of_rows(rows):
        latents = candidates.current_latents(ctx, candidates.rows_of(proposal.condition, rows), proposal.noise[rows])
        if ctx.options.draft_gradient == "normalised":
            gradient, scores = reward_gradient(ctx, latents, proposal.prompt)
            rewards.append(scores)
            return normalised_draft_loss(scores, gradient, latents, proposal.ref_latents[rows],
                                         ctx.options.draft_ref_weight, k)
        images = drpo_utils.decode_latents(ctx.pipe.vae, latents)
        scores = differentiable_scores(ctx.scorer.reward_fn, images, [proposal.prompt] * len(images), ctx.scorer.name)
        rewards.append(scores.detach())
        return draft_loss(scores, latents, proposal.ref_latents[rows], ctx.options.draft_ref_weight, k)

    loss = yield from candidates.loss_pieces(ctx, k, loss_of_rows)
    scores = torch.cat(rewards).double().cpu()
    return {"loss": loss, "reward_mean": scores.mean().item(), "reward_std": scores.std().item()}


METHOD = methods.register(methods.Method(
    "draft", "DRaFT: backpropagate a differentiable reward through decoder and generator (Appendix C.1)",
    propose, update, options=DRaFTOptions, reward_gradient=True))
