"""DrPO on a toy one-step generator: a non-differentiable reward goes up, lambda keeps it near the base."""

import copy

import pytest
import torch
from conftest import TRAINING_SEED, assert_above

from drpo_utils import DriftConfig, drpo_loss, sample_reward_pairs


def reward(points: torch.Tensor) -> torch.Tensor:
    """Non-differentiable rule: 1 if the point lies right of the y axis."""
    return (points[:, 0] > 0).float()


def train_toy(ref_weight: float, steps: int = 300, seed: int = TRAINING_SEED):
    torch.manual_seed(seed)
    generator = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.Tanh(), torch.nn.Linear(64, 2))
    base = copy.deepcopy(generator).requires_grad_(False)
    optimizer = torch.optim.Adam(generator.parameters(), lr=3e-3)
    config = DriftConfig(radii=(0.05, 0.2, 0.5), ref_weight=ref_weight)
    pair_rng = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        noise = torch.randn(32, 2)
        z = generator(noise)
        with torch.no_grad():
            z_ref = base(noise)
            rewards = reward(z)  # only ever ranks candidates
        winners, losers = sample_reward_pairs(rewards, 128, pair_rng)
        loss, _ = drpo_loss(z, z_ref, winners, losers, config)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return generator, base


@torch.no_grad()
def evaluate(generator, base, num=4000):
    noise = torch.randn(num, 2, generator=torch.Generator().manual_seed(1234))  # held-out noises
    z, z_ref = generator(noise), base(noise)
    r, r_ref = reward(z), reward(z_ref)
    return r.mean().item(), r_ref.mean().item(), (z - z_ref).square().sum(1).mean().item()


@pytest.mark.behaviour
def test_drpo_raises_a_non_differentiable_reward_and_lambda_anchors_to_base():
    """The share of points right of the y axis starts anywhere in (0, 1) (0.11-0.96 over seeds 0-11), so the
    gain is measured as the part of the possible gain 1 - before that DrPO achieved (0.93-1.00 there; the
    lambda = 0.2 run, so the reference drift does not stop training)."""
    generator, base = train_toy(ref_weight=0.2)
    after, before, _ = evaluate(generator, base)
    possible_gain = max(1 - before, 0.05)  # a base already near 1 leaves a gain too small to measure
    assert_above((after - before) / possible_gain, 0.75, (before, after))
    # lambda anchors: with a strong reference drift the generator stays near the base model (the mean
    # squared move was 0.0001-0.05 of the unanchored generator's over seeds 0-11).
    _, _, free_distance = evaluate(*train_toy(ref_weight=0.0))
    _, _, anchored_distance = evaluate(*train_toy(ref_weight=3.0))
    assert_above(-anchored_distance / free_distance, -0.25, (anchored_distance, free_distance))
