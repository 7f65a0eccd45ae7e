"""Mixtures of rewards (``--reward a,b --reward_weights 1,2``), as in the paper's Table A5."""

from __future__ import annotations

import torch

from pipelines.redact import public_text
from pipelines.rewards.protocol import RewardScores, score_candidates


def standardise_per_prompt(scores: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """z-score the scores within each group of identical prompts (a constant group becomes 0)."""
    out = torch.zeros_like(scores, dtype=torch.float64)
    for prompt in dict.fromkeys(prompts):
        index = torch.tensor([i for i, p in enumerate(prompts) if p == prompt])
        group = scores[index].double()
        spread = group.std() if len(group) > 1 else torch.tensor(0.0, dtype=torch.float64)
        out[index] = (group - group.mean()) / spread if spread > 0 else 0.0
    return out


class MixtureReward:
    """Ranks by sum_k w_k * standardise_per_prompt(R_k), so no component's scale dominates.

    ``score_details`` (the reward protocol's optional method) reports the weighted sum of the *raw*
    scores, which stays comparable across prompts and models (per-prompt z-scores would compare
    nothing), and each component's raw scores for logging.
    """

    def __init__(self, components: dict, weights: list[float]):
        if len(weights) != len(components):
            raise ValueError(f"{len(components)} rewards but {len(weights)} --reward_weights")
        self.components, self.weights = components, weights

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.score_details(images, prompts).ranking

    @torch.no_grad()
    def score_details(self, images: torch.Tensor, prompts: list[str]) -> RewardScores:
        ranking = torch.zeros(len(images), dtype=torch.float64)
        reported = torch.zeros(len(images), dtype=torch.float64)
        components = {}
        for (name, reward), weight in zip(self.components.items(), self.weights):
            scores = score_candidates(reward, images, prompts, name).reported
            components[public_text(name)] = scores  # logged as reward/<name>
            ranking += weight * standardise_per_prompt(scores, prompts)
            reported += weight * scores
        return RewardScores(ranking=ranking, reported=reported, components=components)
