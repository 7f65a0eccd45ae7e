"""VGG-Flow(1-step) (Liu et al., 2025, adapted in the paper's Appendix C.2): regress the clean latent onto
a target built from the reward's gradient around the frozen reference.

    mu_k^target = mu_ref,k + eta lambda_r clip(grad_mu R(D(mu_theta,k), p))        (--vggflow_gradient raw)
    mu_k^target = mu_ref,k + eta lambda_r g_k / RMS(g_k),  g_k = grad_mu R(...)      (normalised, the default)
    L = 1/K sum_k ||mu_theta,k - mu_k^target||^2 + lambda_ref 1/K sum_k ||mu_theta,k - mu_ref,k||^2

The reward gradient is taken at the current sample mu_theta,k (no gradient to the LoRA through it)
and norm-clipped per sample; eta is fixed in the one-step setting. ``--vggflow_gradient normalised``
(the default, ours) replaces clip(grad) by grad / RMS(grad) per sample, so the target sits eta lambda_r
latent units (RMS per element) from mu_ref whatever the reward's scale (the norm clip allows at most
RMS 1/sqrt(D) over D latent dimensions); ``raw`` is C.2 as written. The target is closed-form and
detached, so --candidate_chunk_size recomputes mu_theta C candidates at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipelines import candidates, flags, methods
from pipelines.baselines.draft import latent_anchor, reward_gradient, unit_rms


def clip_per_sample(gradient: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Scale each sample's gradient down to L2 norm ``max_norm`` where it is larger (C.2's norm clip)."""
    norms = gradient.flatten(1).norm(dim=1).clamp_min(1e-12)
    factor = (max_norm / norms).clamp(max=1.0)
    return gradient * factor.view(-1, *[1] * (gradient.ndim - 1))


def vggflow_target(ref_latents: torch.Tensor, reward_gradient: torch.Tensor, eta: float, reward_scale: float,
                   max_norm: float, normalised: bool = False) -> torch.Tensor:
    """mu^target = mu_ref + eta lambda_r clip(grad_mu R) (Appendix C.2); ``normalised``: grad_mu R / RMS(grad_mu R)
    in place of the clip."""
    gradient = reward_gradient.float()
    direction = unit_rms(gradient) if normalised else clip_per_sample(gradient, max_norm)
    return ref_latents.float() + eta * reward_scale * direction


def vggflow_loss(latents: torch.Tensor, target: torch.Tensor, ref_latents: torch.Tensor, ref_weight: float,
                 count: int | None = None) -> torch.Tensor:
    """1/K sum_k ||mu_theta,k - mu_k^target||^2 + lambda_ref 1/K sum_k ||mu_theta,k - mu_ref,k||^2."""
    count = count or len(latents)
    matching = (latents.float() - target.detach()).square().flatten(1).sum(1)
    return (matching.sum() + ref_weight * latent_anchor(latents, ref_latents).sum()) / count


@dataclass(frozen=True)
class VGGFlowOptions:
    """--method vggflow (Appendix C.2; the paper reports no values, these are ours)."""

    vggflow_eta: float = flags.option(1.0, flags.positive_float, "eta(t), fixed at the one-step timestep.")
    vggflow_reward_scale: float = flags.option(1.0, flags.positive_float, "lambda_r, the reward's scale.")
    vggflow_clip: float = flags.option(1.0, flags.positive_float, "Per-sample L2 norm clip of grad_mu R (with "
                                                                  "--vggflow_gradient raw).")
    vggflow_gradient: str = flags.option(
        "normalised", None, "grad_mu R per sample: rescaled to unit RMS (ours: independent of the reward's scale) "
                            "or norm-clipped (raw, C.2 as written).", choices=["normalised", "raw"])
    vggflow_ref_weight: float = flags.option(0.0, flags.non_negative_float, "lambda_ref of the latent anchor.")


@dataclass
class Proposal:
    condition: dict
    noise: torch.Tensor
    ref_latents: torch.Tensor
    target: torch.Tensor
    rewards: torch.Tensor


def propose(ctx: candidates.StepContext, prompt: str, rng: torch.Generator) -> Proposal:
    """Current and reference latents without gradient, the reward gradient at the current ones, the target."""
    options, k = ctx.options, ctx.num_candidates
    condition, noise = candidates.prompt_condition(ctx, prompt, k), candidates.candidate_noise(ctx, k, rng)
    ref_latents = candidates.reference_latents(ctx, condition, noise)
    gradients, rewards = [], []
    for rows in candidates.chunk_rows(k, ctx.chunk_size):  # the reward's backward, C candidates at a time
        with torch.no_grad():
            latents = candidates.current_latents(ctx, candidates.rows_of(condition, rows), noise[rows])
        gradient, scores = reward_gradient(ctx, latents, prompt)
        gradients.append(gradient)
        rewards.append(scores)
    target = vggflow_target(ref_latents, torch.cat(gradients), options.vggflow_eta, options.vggflow_reward_scale,
                            options.vggflow_clip, normalised=options.vggflow_gradient == "normalised")
    return Proposal(condition, noise, ref_latents, target, torch.cat(rewards))


def update(ctx: candidates.StepContext, proposal: Proposal):
    """Yields the target-matching loss, recomputing mu_theta chunk by chunk; returns stats."""
    k = ctx.num_candidates

    def loss_of_rows(rows):
        latents = candidates.current_latents(ctx, candidates.rows_of(proposal.condition, rows), proposal.noise[rows])
        return vggflow_loss(latents, proposal.target[rows], proposal.ref_latents[rows],
                            ctx.options.vggflow_ref_weight, k)

    loss = yield from candidates.loss_pieces(ctx, k, loss_of_rows)
    scores = proposal.rewards.double().cpu()
    return {"loss": loss, "reward_mean": scores.mean().item(), "reward_std": scores.std().item()}


METHOD = methods.register(methods.Method(
    "vggflow", "VGG-Flow(1-step): regress onto a reward-gradient target (Appendix C.2)", propose, update,
    options=VGGFlowOptions, reward_gradient=True))
