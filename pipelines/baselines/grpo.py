"""GRPO(1-step): a group-relative, clipped policy gradient whose action is a perturbed clean latent (paper,
Appendix C.4, Algorithm A4; Shao et al., 2024).

    a_k = sg(mu_old,k) + sigma_a u_k,   u_k = (z_k - mean(z_k)) / (std(z_k) + eps)
    A_k = clip(alpha_adv (r_k - mean(r)) / (std(r) + eps_r), -A_max, A_max)
    l_theta(a_k) = -1/2 mean[((a_k - mu_theta,k) / sigma_a)^2]          (mean over latent dimensions)
    rho_k = exp(clip(l_theta(a_k) - l_old(a_k), -M, M))
    L_policy = -1/K sum_k min(rho_k A_k, clip(rho_k, 1 - eps, 1 + eps) A_k)
    L = L_policy + lambda_ref 1/K sum_k ||mu_theta,k - mu_ref,k||^2 + beta_kl 1/K sum_k (rho_k - 1 - log rho_k)

The reward ranks the decoded actions (no gradient), so it may be any reward and can be scored in
the background; the loss is per candidate, so --candidate_chunk_size recomputes mu_theta in chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import drpo_utils
from pipelines import candidates, flags, methods
from pipelines.baselines.draft import latent_anchor

NORMALISE_EPS = 1e-6  # eps of u_k and eps_r of the advantages


def normalised_noise(noise: torch.Tensor) -> torch.Tensor:
    """u_k = (z_k - mean(z_k)) / (std(z_k) + eps), per sample over its latent dimensions."""
    flat = noise.float().flatten(1)
    return ((flat - flat.mean(1, keepdim=True)) / (flat.std(1, keepdim=True) + NORMALISE_EPS)).view_as(noise)


def group_advantages(rewards: torch.Tensor, scale: float, max_abs: float) -> torch.Tensor:
    """A_k = clip(alpha_adv (r_k - mean r) / (std r + eps_r), -A_max, A_max) within the prompt's group."""
    rewards = rewards.double()
    return (scale * (rewards - rewards.mean()) / (rewards.std() + NORMALISE_EPS)).clamp(-max_abs, max_abs).float()


def gaussian_log_prob(actions: torch.Tensor, means: torch.Tensor, sigma: float) -> torch.Tensor:
    """l(a_k) = -1/2 mean[((a_k - mu_k) / sigma_a)^2] over each sample's latent dimensions."""
    return -0.5 * ((actions.float() - means.float()) / sigma).square().flatten(1).mean(1)


def grpo_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, latents: torch.Tensor,
              ref_latents: torch.Tensor, clip_eps: float, log_ratio_clip: float, ref_weight: float, kl_weight: float,
              count: int | None = None) -> torch.Tensor:
    """L_policy + lambda_ref anchor + beta_kl (rho - 1 - log rho), each averaged over the K candidates."""
    count = count or len(log_prob)
    log_ratio = (log_prob - old_log_prob).clamp(-log_ratio_clip, log_ratio_clip)
    ratio = log_ratio.exp()
    policy = -torch.minimum(ratio * advantages, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages)
    kl = ratio - 1 - log_ratio
    return (policy + ref_weight * latent_anchor(latents, ref_latents) + kl_weight * kl).sum() / count


@dataclass(frozen=True)
class GRPOOptions:
    """--method grpo (Appendix C.4, Algorithm A4; defaults: the paper's values)."""

    grpo_sigma: float = flags.option(0.05, flags.positive_float, "sigma_a, the action noise.")
    grpo_clip_eps: float = flags.option(0.2, flags.positive_float, "eps of the clipped ratio.")
    grpo_log_ratio_clip: float = flags.option(10.0, flags.positive_float, "M, the clip of the log-ratio.")
    grpo_adv_scale: float = flags.option(1.0, flags.positive_float, "alpha_adv, the advantage scale.")
    grpo_adv_clip: float = flags.option(5.0, flags.positive_float, "A_max, the advantage clip.")
    grpo_ref_weight: float = flags.option(0.05, flags.non_negative_float, "lambda_ref of the latent anchor.")
    grpo_kl_weight: float = flags.option(0.0, flags.non_negative_float, "beta_kl of the ratio KL term.")
    grpo_exploration: str = flags.option(
        "initial_noise", None, "u_k: the normalised initial noise z_k (Algorithm A4, line 6), or a fresh standard "
                               "normal draw independent of z_k (ours: an unbiased exploration direction).",
        choices=["initial_noise", "fresh"])


@dataclass
class Proposal:
    condition: dict
    noise: torch.Tensor
    actions: torch.Tensor
    old_log_prob: torch.Tensor
    ref_latents: torch.Tensor
    scores: object  # Future -> (RewardScores, seconds)


@torch.no_grad()
def propose(ctx: candidates.StepContext, prompt: str, rng: torch.Generator) -> Proposal:
    """Algorithm A4, lines 3-8: mu_old without gradient, the actions a_k, their decodes sent to the reward."""
    sigma, k = ctx.options.grpo_sigma, ctx.num_candidates
    condition, noise = candidates.prompt_condition(ctx, prompt, k), candidates.candidate_noise(ctx, k, rng)
    old = candidates.current_latents(ctx, condition, noise).float()
    exploration = noise if ctx.options.grpo_exploration == "initial_noise" else torch.randn(
        noise.shape, generator=rng).to(noise.device)
    actions = old + sigma * normalised_noise(exploration)
    images = drpo_utils.decode_latents(ctx.pipe.vae, actions)
    return Proposal(condition, noise, actions, gaussian_log_prob(actions, old, sigma),
                    candidates.reference_latents(ctx, condition, noise), ctx.scorer.submit(images, [prompt] * k))


def update(ctx: candidates.StepContext, proposal: Proposal):
    """Algorithm A4, lines 9-14: advantages, then the clipped objective with mu_theta recomputed."""
    options, k = ctx.options, ctx.num_candidates
    scores, waited = ctx.scorer.result(proposal.scores)
    advantages = group_advantages(scores.ranking, options.grpo_adv_scale, options.grpo_adv_clip)
    advantages = advantages.to(proposal.actions.device)

    def loss_of_rows(rows):
        latents = candidates.current_latents(ctx, candidates.rows_of(proposal.condition, rows), proposal.noise[rows])
        log_prob = gaussian_log_prob(proposal.actions[rows], latents, options.grpo_sigma)
        return grpo_loss(log_prob, proposal.old_log_prob[rows], advantages[rows], latents, proposal.ref_latents[rows],
                         options.grpo_clip_eps, options.grpo_log_ratio_clip, options.grpo_ref_weight,
                         options.grpo_kl_weight, k)

    loss = yield from candidates.loss_pieces(ctx, k, loss_of_rows)
    return {"loss": loss, "reward_mean": scores.reported.mean().item(), "reward_std": scores.reported.std().item(),
            "reward_wait": waited}


METHOD = methods.register(methods.Method(
    "grpo", "GRPO(1-step): a group-relative clipped policy gradient on a perturbed latent (Appendix C.4); ranks "
            "only", propose, update, options=GRPOOptions))
