"""The reward protocol: what a reward is given, what it returns, and how the trainer checks it.

A reward is any callable ``reward(images, prompts)``:

- ``images``: a float32 tensor [N, 3, H, W] in [0, 1] on the CPU, detached;
- ``prompts``: a ``list[str]`` of length N (the prompt of each image);
- it returns N finite numbers (a list, a numpy array or a tensor); higher is better.

DrPO only *ranks* the K candidates of one prompt with it, always under ``torch.no_grad()``, so it
may be anything: a model, a rule, a remote service, differentiable or not.

One optional method, for rewards whose ranking scores are not what should be reported:

- ``score_details(images, prompts) -> RewardScores``: the scores to rank by, the scores to log and
  evaluate (comparable across prompts and models), and per-component scores to log as
  ``reward/<name>``. A mixture ranks by per-prompt z-scores but reports its weighted raw sum.

Everything calls a reward through ``score_candidates``, which enforces the protocol: the wrong
count, non-numbers or NaN/inf stop the run with a ``RewardError`` naming the reward.

Reward-gradient methods (``--method draft``, ``vggflow``) call the same function through
``differentiable_scores`` instead: with gradient enabled, on the decoded images on the training
device (float32, [0, 1], ``requires_grad``), and it must return a tensor of N scores connected to
``images``. A reward that returns python floats, a detached tensor or anything without a gradient
stops at that first call with a message naming it and the methods that only rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from pipelines.redact import public_text

RewardFn = Callable[[torch.Tensor, list[str]], object]


class RewardError(RuntimeError):
    """A reward returned something DrPO cannot rank with (wrong count, NaN, non-numbers)."""


@dataclass(frozen=True)
class RewardScores:
    """One reward call: ``ranking`` orders candidates, ``reported`` is logged and evaluated (float64 [N])."""

    ranking: torch.Tensor
    reported: torch.Tensor
    components: dict[str, torch.Tensor] = field(default_factory=dict)


def as_scores(raw, count: int, name: str) -> torch.Tensor:
    """``raw`` as ``count`` finite float64 scores, or a ``RewardError`` naming the reward."""
    name = public_text(name)
    try:
        scores = torch.as_tensor(raw, dtype=torch.float64).flatten()
    except (TypeError, ValueError, RuntimeError) as error:
        raise RewardError(f"reward {name!r} did not return numbers: {str(raw)[:200]}") from error
    if len(scores) != count:
        raise RewardError(f"reward {name!r} returned {len(scores)} scores for {count} images")
    if not torch.isfinite(scores).all():
        raise RewardError(f"reward {name!r} returned non-finite scores: {scores.tolist()}")
    return scores  # float64: a float32 cast would create artificial ties


@torch.no_grad()
def score_candidates(reward_fn: RewardFn, images: torch.Tensor, prompts: list[str], name: str) -> RewardScores:
    """Call a reward as the protocol says (no gradient, float32 CPU images in [0, 1]) and check its answer."""
    images = images.detach().float().clamp(0, 1).cpu()
    prompts = list(prompts)
    details = getattr(reward_fn, "score_details", None)
    if details is None:
        scores = as_scores(reward_fn(images, prompts), len(images), name)
        return RewardScores(ranking=scores, reported=scores)
    result = details(images, prompts)
    return RewardScores(
        ranking=as_scores(result.ranking, len(images), name),
        reported=as_scores(result.reported, len(images), name),
        components={key: as_scores(value, len(images), key) for key, value in result.components.items()},
    )


RANKING_METHODS = "drpo, dpo or grpo"  # the methods that only rank, for the message below


def differentiable_scores(reward_fn: RewardFn, images: torch.Tensor, prompts: list[str], name: str) -> torch.Tensor:
    """N scores with a gradient to ``images`` (the reward-gradient methods), or a ``RewardError``."""
    if not images.requires_grad:
        raise ValueError("differentiable_scores needs images that require grad")
    name = public_text(name)
    components = getattr(reward_fn, "components", None)  # a mixture: its weighted sum of raw scores
    if components is not None:
        return sum(weight * differentiable_scores(reward, images, prompts, part)
                   for (part, reward), weight in zip(components.items(), reward_fn.weights))
    needs = (f"--method draft and vggflow backpropagate through the reward, so it must return a tensor computed "
             f"from `images`; with this reward use --method {RANKING_METHODS}, which only rank")
    try:
        with torch.enable_grad():
            scores = reward_fn(images, list(prompts))
    except Exception as error:  # noqa: BLE001 - e.g. .numpy() on images that require grad
        raise RewardError(f"reward {name!r} failed on images that require grad ({error}): {needs}") from error
    if not isinstance(scores, torch.Tensor) or scores.grad_fn is None:
        got = type(scores).__name__ + ("" if not isinstance(scores, torch.Tensor) else " without grad_fn")
        raise RewardError(f"reward {name!r} returned no gradient with respect to the images (got {got}): {needs}")
    scores = scores.flatten()
    if len(scores) != len(images):
        raise RewardError(f"reward {name!r} returned {len(scores)} scores for {len(images)} images")
    if not torch.isfinite(scores.detach()).all():
        raise RewardError(f"reward {name!r} returned non-finite scores: {scores.detach().tolist()}")
    return scores.float()
