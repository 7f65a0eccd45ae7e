"""DPO(1-step): DPO's sigmoid preference margin on the one-step clean latent (paper, Appendix C.3,
Algorithm A3; Rafailov et al., 2023; Wallace et al., 2024).

    g_theta = s(psi(mu_theta), psi(y+)) - s(psi(mu_theta), psi(y-)),   s(a, b) = -||a - b||^2
    g_ref   = the same with mu_ref (the frozen base model, same noise and prompt)
    L = -log sigmoid(beta [g_theta - g_ref]) + lambda_ref ||mu_theta - mu_ref||^2

Online (``--method dpo``): y+ / y- are reward-ordered pairs of the current generator's K candidates
(as DrPO's A+ / A-); mu_theta is generated from a fresh noise per pair (Algorithm A3, line 3). psi is
the raw latent or the run's feature map (``--dpo_space``). The pairs go C at a time with
--candidate_chunk_size. Offline (``--preference_dataset``, ``pipelines/offline.py``): y+ / y- are a
dataset's chosen / rejected images, through the same ``margin_pieces``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import drpo_utils
from pipelines import candidates, flags, methods
from pipelines.baselines.draft import latent_anchor


def squared_distance(a: dict, b: dict) -> torch.Tensor:
    """||a - b||^2 per row, summed over every named tensor of a (multi-tensor) preference space."""
    return sum((a[name].float().flatten(1) - b[name].float().flatten(1)).square().sum(1) for name in a)


def preference_margin(h: dict, h_pos: dict, h_neg: dict) -> torch.Tensor:
    """g = s(h, h+) - s(h, h-) with s(a, b) = -||a - b||^2 (Algorithm A3, lines 6-8)."""
    return -squared_distance(h, h_pos) + squared_distance(h, h_neg)


def dpo_loss(h_theta: dict, h_ref: dict, h_pos: dict, h_neg: dict, latents: torch.Tensor, ref_latents: torch.Tensor,
             beta: float, ref_weight: float, count: int | None = None) -> torch.Tensor:
    """Mean over pairs of -log sigmoid(beta (g_theta - g_ref)) + lambda_ref ||mu_theta - mu_ref||^2 (Algorithm A3,
    line 9); ``count`` is the number of pairs when these rows are one chunk of them."""
    count = count or len(latents)
    margin = preference_margin(h_theta, h_pos, h_neg) - preference_margin(h_ref, h_pos, h_neg)
    terms = -F.logsigmoid(beta * margin) + ref_weight * latent_anchor(latents, ref_latents)
    return terms.sum() / count


@dataclass(frozen=True)
class DPOOptions:
    """--method dpo (Appendix C.3, Algorithm A3)."""

    dpo_beta: float = flags.option(30.0, flags.positive_float, "beta, the inverse temperature (paper: 30).")
    dpo_ref_weight: float = flags.option(0.0, flags.non_negative_float, "lambda_ref of the latent anchor (paper: 0).")
    dpo_space: str = flags.option("latent", None, "psi: the raw latent, or the run's --feature_extractor (the paper "
                                                  "tests both).", choices=["latent", "features"])


def preference_space(ctx: candidates.StepContext, latents: torch.Tensor, condition: dict) -> dict:
    """psi(mu): {"latent": mu}, or phi(mu) (decoding first when phi reads images)."""
    if ctx.options.dpo_space == "latent":
        return {"latent": latents}
    images = drpo_utils.decode_latents(ctx.pipe.vae, latents) if ctx.feature_map.needs_images else None
    return candidates.phi(ctx, latents, images, condition)


def propose(ctx: candidates.StepContext, prompt: str, rng: torch.Generator) -> candidates.Candidates:
    """The current generator's K candidates for the reward to rank (no gradient)."""
    return candidates.candidates(ctx, prompt, rng, grad=False)


def update(ctx: candidates.StepContext, cand: candidates.Candidates):
    """Reward-ordered pairs of the current generator's candidates as y+ / y-; yields the loss pair chunk by chunk."""
    scores, waited = ctx.scorer.result(cand.scores)
    winners, losers = drpo_utils.sample_reward_pairs(scores.ranking, ctx.setup.num_pairs, cand.rng)
    stats = {"reward_mean": scores.reported.mean().item(), "reward_std": scores.reported.std().item(),
             "num_pairs": len(winners), "reward_wait": waited}
    if len(winners) == 0:  # all rewards tied: no preference to learn from
        yield candidates.zero_piece(ctx, cand.condition, cand.noise), True
        stats["loss"] = 0.0
        return stats
    with torch.no_grad():
        pairs = preference_space(ctx, cand.latents, cand.condition)
        h_pos = {name: value[winners] for name, value in pairs.items()}
        h_neg = {name: value[losers] for name, value in pairs.items()}
    stats["loss"] = yield from margin_pieces(ctx, cand.condition, cand.rng, h_pos, h_neg)
    return stats


def margin_pieces(ctx: candidates.StepContext, condition: dict, rng: torch.Generator, h_pos: dict, h_neg: dict):
    """Algorithm A3, lines 3-9, for P pairs psi(y+) / psi(y-) of one prompt (online candidates or offline
    triples): a fresh noise per pair for mu_theta and mu_ref; yields the loss C pairs at a time."""
    options = ctx.options
    count = len(next(iter(h_pos.values())))
    condition = {name: value[:1].expand(count, *value.shape[1:]) for name, value in condition.items()}
    noise = candidates.candidate_noise(ctx, count, rng)
    ref_latents = candidates.reference_latents(ctx, condition, noise)
    with torch.no_grad():
        h_ref = preference_space(ctx, ref_latents, condition)

    def loss_of_rows(rows):
        rows_condition = candidates.rows_of(condition, rows)
        latents = candidates.current_latents(ctx, rows_condition, noise[rows])
        pick = lambda tensors: {name: value[rows] for name, value in tensors.items()}  # noqa: E731
        return dpo_loss(preference_space(ctx, latents, rows_condition), pick(h_ref), pick(h_pos), pick(h_neg),
                        latents, ref_latents[rows], options.dpo_beta, options.dpo_ref_weight, count)

    return (yield from candidates.loss_pieces(ctx, count, loss_of_rows))


def offline_update(ctx: candidates.StepContext, proposal):
    """Algorithm A3 on a prompt's dataset triples (p, y+, y-): offline DPO(1-step) (``pipelines/offline.py``)."""
    condition = candidates.prompt_condition(ctx, proposal.prompt, 1)
    loss = yield from margin_pieces(ctx, condition, proposal.rng, proposal.chosen, proposal.rejected)
    return {"loss": loss, "num_pairs": proposal.num_pairs}


METHOD = methods.register(methods.Method(
    "dpo", "DPO(1-step): the sigmoid preference margin on the one-step latent (Appendix C.3); ranks only",
    propose, update, options=DPOOptions, offline_update=offline_update,
    offline_space=lambda options: options.dpo_space))
