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
    loose, loose_base = train_toy(ref_weight=0.2)
    tight, tight_base = train_toy(ref_weight=1.0)
    after, before, loose_distance = evaluate(loose, loose_base)
    tight_after, _, tight_distance = evaluate(tight, tight_base)
    # Binomial standard error of a mean over 4000 samples is <= 0.008: demand a 0.2 gain.
    assert_above(after - before, 0.2, (before, after))
    assert_above(tight_after - before, 0.2, (before, tight_after))
    # A larger reference weight keeps the generator measurably closer to the base model.
    assert_above(-tight_distance / loose_distance, -0.5, (tight_distance, loose_distance))
