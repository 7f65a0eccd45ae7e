"""The drift field, pairs and DrPO loss against hand-computed values and the paper's equations."""

import math

import pytest
import torch

from drpo_utils import DriftConfig, drift_field, drpo_loss, max_pairs, sample_reward_pairs


def reference_drift(z, pos, neg, radii, kernel="rbf", weights=None, mask_self=False):
    """Eqs. 18-26 written out with explicit loops over queries and supports (float64)."""
    z, pos, neg = z.double(), pos.double(), neg.double()
    supports = torch.cat([neg, pos])
    num_q, num_b, d = len(z), len(supports), z.shape[1]
    w = torch.ones(num_b, dtype=torch.float64) if weights is None else weights.double()
    delta = [[math.dist(z[i].tolist(), supports[j].tolist()) for j in range(num_b)] for i in range(num_q)]
    s = sum(w[j] * delta[i][j] for i in range(num_q) for j in range(num_b)) / (num_q * num_b) / (w.sum() / num_b)
    s_z = s / math.sqrt(d)
    total = torch.zeros(num_q, d, dtype=torch.float64)
    for rho in radii:
        if kernel == "rbf":
            logit = [[-(delta[i][j] / s) ** 2 / (2 * rho**2) for j in range(num_b)] for i in range(num_q)]
        else:
            logit = [[-(delta[i][j] / s) / rho for j in range(num_b)] for i in range(num_q)]
        if mask_self:
            for i in range(num_q):
                logit[i][i] = -math.inf
        row = [[math.exp(logit[i][j]) / sum(math.exp(logit[i][k]) for k in range(num_b)) for j in range(num_b)]
               for i in range(num_q)]
        col = [[math.exp(logit[i][j]) / sum(math.exp(logit[k][j]) for k in range(num_q)) for j in range(num_b)]
               for i in range(num_q)]
        affinity = [[math.sqrt(row[i][j] * col[i][j]) * w[j] for j in range(num_b)] for i in range(num_q)]
        v = torch.zeros(num_q, d, dtype=torch.float64)
        for i in range(num_q):
            m_neg = sum(affinity[i][j] for j in range(len(neg)))
            m_pos = sum(affinity[i][j] for j in range(len(neg), num_b))
            for j in range(num_b):
                sign_mass = m_neg if j >= len(neg) else -m_pos
                v[i] += sign_mass * affinity[i][j] * supports[j] / s_z
        total += v / v.square().mean().sqrt()
    return total


def test_hand_computed_two_queries():
    # z = {0, 2}, B+ = {1}, B- = {3}, d = 1, one radius rho = 1, RBF kernel.
    # Delta = [[3, 1], [1, 1]] over B = [B-; B+]  ->  s = 1.5, s_z = 1.5, D = Delta / 1.5.
    z, pos, neg = (torch.tensor(x, dtype=torch.float64) for x in ([[0.0], [2.0]], [[1.0]], [[3.0]]))
    logit = [[-2.0, -2.0 / 9.0], [-2.0 / 9.0, -2.0 / 9.0]]  # -D^2 / 2
    e = [[math.exp(x) for x in r] for r in logit]
    row = [[e[i][j] / (e[i][0] + e[i][1]) for j in range(2)] for i in range(2)]
    col = [[e[i][j] / (e[0][j] + e[1][j]) for j in range(2)] for i in range(2)]
    a = [[math.sqrt(row[i][j] * col[i][j]) for j in range(2)] for i in range(2)]
    # V_i = m-_i * A+_i * b+/s_z - m+_i * A-_i * b-/s_z with m- = A[i][0], m+ = A[i][1]
    v = [a[i][0] * a[i][1] * (1.0 - 3.0) / 1.5 for i in range(2)]
    rms = math.sqrt((v[0] ** 2 + v[1] ** 2) / 2)
    expected = torch.tensor([[v[0] / rms], [v[1] / rms]], dtype=torch.float64)
    got = drift_field(z, pos, neg, [1.0])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)  # float64 on both sides: measured 6e-17
    assert got[0, 0] < 0 and got[1, 0] < 0  # both pulled toward B+ = 1 and away from B- = 3


def test_symmetric_dipole_is_exactly_one():
    # One query midway between one positive and one negative: V = 1 per radius after RMS (Eq. 25).
    got = drift_field(torch.zeros(1, 1), torch.ones(1, 1), -torch.ones(1, 1), [0.1, 0.5, 2.0])
    torch.testing.assert_close(got, torch.full((1, 1), 3.0))  # float32 log/exp rounding only: measured 0


@pytest.mark.parametrize("kernel", ["rbf", "laplacian"])
def test_matches_loop_reference_on_random_inputs(kernel):
    g = torch.Generator().manual_seed(0)
    z, pos, neg = (torch.randn(n, 5, generator=g, dtype=torch.float64) for n in (6, 4, 3))
    radii = [0.05, 0.2, 1.0]
    expected = reference_drift(z, pos, neg, radii, kernel)
    # float64 on both sides: measured 5e-15 (the default bound is 1e-7; a wrong formula moves V by O(1))
    torch.testing.assert_close(drift_field(z, pos, neg, radii, kernel=kernel), expected)


def test_support_weights_match_reference():
    g = torch.Generator().manual_seed(1)
    z, pos, neg = (torch.randn(n, 3, generator=g, dtype=torch.float64) for n in (5, 2, 2))
    weights = torch.tensor([1.0, 2.0, 1.0, 1.0], dtype=torch.float64)  # B = [B-; B+]
    expected = reference_drift(z, pos, neg, [0.3], weights=weights)
    got = drift_field(z, pos, neg, [0.3], neg_weight=weights[:2], pos_weight=weights[2:])
    torch.testing.assert_close(got, expected)  # float64: measured 1e-15 (default bound 1e-7)


def test_repeated_supports_count_repeatedly():
    g = torch.Generator().manual_seed(1)
    z, pos, neg = (torch.randn(n, 3, generator=g, dtype=torch.float64) for n in (5, 2, 2))
    repeated = torch.cat([neg, neg[1:]])  # a sample in two pairs stays in B- twice (Appendix A)
    # float64: measured 2e-15 (default bound 1e-7); counting the copy once instead moves V by 0.35 (measured)
    torch.testing.assert_close(drift_field(z, pos, repeated, [0.3]), reference_drift(z, pos, repeated, [0.3]))
    assert not torch.allclose(drift_field(z, pos, repeated, [0.3]), drift_field(z, pos, neg, [0.3]))


def test_each_radius_term_has_unit_rms():
    g = torch.Generator().manual_seed(2)
    z, pos, neg = torch.randn(8, 16, generator=g), torch.randn(4, 16, generator=g), torch.randn(4, 16, generator=g)
    for radius in (0.1, 0.2, 0.5, 1.0):
        v = drift_field(z, pos, neg, [radius])
        assert v.square().mean().sqrt().item() == pytest.approx(1.0, rel=1e-5)  # float32: measured 6e-8
    # At rho = 0.02 the true field is ~1e-14 (m+ m- ~ exp(-1250 D^2)): below sqrt(eps_v) Eq. 25 does
    # not amplify it to unit RMS, it stays numerically negligible (and finite).
    tiny = drift_field(z, pos, neg, [0.02])
    assert torch.isfinite(tiny).all() and tiny.square().mean().sqrt() < 0.1  # measured 0.012 (amplified: 1)


def test_reference_drift_is_zero_when_the_model_equals_the_base():
    """Leave-one-out V_ref = DriftField(Z, R, sg(Z)) vanishes at theta = theta_ref (Z = R)."""
    from drpo_utils import reference_field

    z = torch.randn(8, 5, generator=torch.Generator().manual_seed(3))
    # B+ = R and B- = sg(Z) are the same points: exactly 0 (measured); a residue would be scaled to unit RMS
    assert reference_field(z, z.clone(), DriftConfig(radii=(0.05, 0.2, 1.0))).abs().max() < 1e-6
    moved = reference_field(z + 0.3, z, DriftConfig(radii=(0.2, 1.0)))
    assert (moved.sum(0) < 0).all()  # shifted samples are pulled back toward the base distribution


@pytest.mark.parametrize("kernel", ["rbf", "laplacian", "exponential", "cosine"])
def test_invariant_to_global_rescaling(kernel):
    g = torch.Generator().manual_seed(3)
    z, pos, neg = (torch.randn(n, 8, generator=g, dtype=torch.float64) for n in (6, 3, 3))
    v = drift_field(z, pos, neg, [0.05, 0.2], kernel=kernel)
    v_scaled = drift_field(z * 1e3, pos * 1e3, neg * 1e3, [0.05, 0.2], kernel=kernel)
    torch.testing.assert_close(v, v_scaled)  # float64: measured 5e-15 (default bound 1e-7)
    # Scaling every support weight by the same factor leaves V unchanged too (float64: measured 2e-10, from the
    # log-space masses of RBF logits down to -384 at rho = 0.05; default bound 1e-7).
    torch.testing.assert_close(v, drift_field(z, pos, neg, [0.05, 0.2], kernel=kernel, pos_weight=7.0, neg_weight=7.0))


def test_permutation_equivariant_over_queries():
    g = torch.Generator().manual_seed(4)
    z, pos, neg = (torch.randn(n, 4, generator=g, dtype=torch.float64) for n in (7, 3, 3))
    perm = torch.randperm(7, generator=g)
    # float64: measured 2e-16 (in float32 the reordered rows differ by 2e-7)
    torch.testing.assert_close(drift_field(z[perm], pos, neg, [0.1, 0.5]), drift_field(z, pos, neg, [0.1, 0.5])[perm],
                               rtol=1e-10, atol=1e-10)


def test_locality_far_query_is_finite_and_small():
    pos = torch.tensor([[1.0, 0.0], [1.2, 0.1]])
    neg = torch.tensor([[-1.0, 0.0], [-1.2, -0.1]])
    z = torch.tensor([[0.0, 0.0], [0.1, 0.1], [1e4, 1e4]])
    v = drift_field(z, pos, neg, [0.02, 0.05, 0.2])
    assert torch.isfinite(v).all()
    assert v[2].norm() < 1e-3 * v[0].norm()  # far from the evidence: negligible update (Sec. 4.1; measured 0)
    assert v[0, 0] > 0 and v[1, 0] > 0  # near queries move from B- toward B+
    # A lone far query (no near competitor) still gets a finite drift along the dipole axis B- -> B+.
    lone = drift_field(torch.tensor([[1e4, 0.0]]), pos, neg, [0.02, 0.05, 0.2])
    assert torch.isfinite(lone).all() and lone[0, 0] > 0


def test_mask_self_removes_the_query_from_its_own_negatives():
    g = torch.Generator().manual_seed(5)
    z, pos = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    masked = drift_field(z, pos, z, [0.5], mask_self=True)
    # float64: measured 5e-16 (default bound 1e-7); without the mask V moves by 1.9 (measured)
    torch.testing.assert_close(masked, reference_drift(z, pos, z, [0.5], mask_self=True))
    assert not torch.allclose(masked, drift_field(z, pos, z, [0.5]))


def test_unknown_kernel_lists_choices():
    with pytest.raises(ValueError, match="rbf, laplacian, exponential, cosine"):
        drift_field(torch.zeros(1, 1), torch.ones(1, 1), -torch.ones(1, 1), [1.0], kernel="gaussian")


# ---------------------------------------------------------------------------------------------
# Pairs (Eq. 12)
# ---------------------------------------------------------------------------------------------


def test_pairs_are_reward_ordered_distinct_and_ties_dropped():
    rewards = torch.tensor([0.1, 0.5, 0.5, 0.9, -2.0, 0.1])
    winners, losers = sample_reward_pairs(rewards, max_pairs(6), torch.Generator().manual_seed(0))
    assert (rewards[winners] > rewards[losers]).all()
    assert len(winners) == max_pairs(6) - 2  # the two tied pairs (0,5) and (1,2) are dropped
    assert len({tuple(sorted(p)) for p in zip(winners.tolist(), losers.tolist())}) == len(winners)


def test_binary_rewards_still_give_m_pairs():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])  # 8 untied pairs among 15
    winners, losers = sample_reward_pairs(rewards, 6, torch.Generator().manual_seed(0))
    assert len(winners) == 6 and (rewards[winners] == 1).all() and (rewards[losers] == 0).all()


def test_all_equal_rewards_give_no_pairs():
    winners, losers = sample_reward_pairs(torch.ones(5), 4)
    assert len(winners) == len(losers) == 0


@pytest.mark.parametrize("k,m", [(1, 1), (4, 7), (4, 0)])
def test_pairs_reject_bad_k_and_m(k, m):
    with pytest.raises(ValueError):
        sample_reward_pairs(torch.arange(k, dtype=torch.float32), m)


# ---------------------------------------------------------------------------------------------
# The loss (Eqs. 15-17)
# ---------------------------------------------------------------------------------------------


def test_loss_gradient_is_minus_eta_v_times_jacobian():
    """dL/dtheta = -(eta / K) sum_i V_i dz~_i/dtheta (Eq. 3 with the 1/(2K) of Eq. 17)."""
    g = torch.Generator().manual_seed(6)
    noise = torch.randn(6, 3, generator=g, dtype=torch.float64)
    weight = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    z_ref = torch.randn(6, 4, generator=g, dtype=torch.float64)
    config = DriftConfig(radii=(0.1, 0.5), velocity_scale=3.0, ref_weight=0.5)
    rewards = torch.tensor([0.3, 0.1, 0.9, 0.4, 0.2, 0.8])
    winners, losers = sample_reward_pairs(rewards, 8, torch.Generator().manual_seed(0))
    z = noise @ weight
    loss, _ = drpo_loss(z, z_ref, winners, losers, config)
    loss.backward()

    from drpo_utils import coordinate_scale, preference_field, preference_supports, reference_field

    v = preference_field(z, z[winners], z[losers], config) + 0.5 * reference_field(z, z_ref, config)
    s_z = coordinate_scale(z, preference_supports(z, z[winners], z[losers], config), config)
    # z~ = noise @ weight / s_z, so dL/dweight = noise^T (-(eta / K) V / s_z).
    expected = noise.T @ (-(3.0 / 6) * v / s_z)
    torch.testing.assert_close(weight.grad, expected, rtol=1e-10, atol=1e-10)  # float64: measured 4e-16 (1e-15 rel)


def test_all_ties_leave_only_the_reference_drift():
    g = torch.Generator().manual_seed(7)
    z, z_ref = torch.randn(5, 3, generator=g, requires_grad=True), torch.randn(5, 3, generator=g)
    winners, losers = sample_reward_pairs(torch.zeros(5), 3)
    loss, stats = drpo_loss(z, z_ref, winners, losers, DriftConfig(ref_weight=0.2))
    assert stats["drift_norm_pref/features"] == 0.0
    assert loss.item() > 0  # the reference term still pulls toward the base samples
    no_ref, _ = drpo_loss(z, z_ref, winners, losers, DriftConfig(ref_weight=0.0))
    assert no_ref.item() == 0.0


def test_multi_tensor_features_sum_their_losses():
    g = torch.Generator().manual_seed(8)
    a, b = torch.randn(6, 4, generator=g), torch.randn(6, 2, 3, generator=g)
    a_ref, b_ref = torch.randn(6, 4, generator=g), torch.randn(6, 2, 3, generator=g)
    winners, losers = sample_reward_pairs(torch.arange(6.0), 5, torch.Generator().manual_seed(1))
    config = DriftConfig()
    both, _ = drpo_loss({"a": a, "b": b}, {"a": a_ref, "b": b_ref}, winners, losers, config)
    only_a, _ = drpo_loss(a, a_ref, winners, losers, config)
    only_b, _ = drpo_loss(b, b_ref, winners, losers, config)
    torch.testing.assert_close(both, only_a + only_b)  # float32, the same losses added: measured 0 (default 1.3e-6 rel)


def test_self_negatives_match_explicit_supports():
    g = torch.Generator().manual_seed(9)
    z = torch.randn(5, 3, generator=g)
    winners, losers = torch.tensor([0, 1]), torch.tensor([2, 3])
    from drpo_utils import preference_field

    config = DriftConfig(self_negatives=True, pair_weight=3000.0, radii=(0.2,))
    expected = drift_field(
        z, z[winners], torch.cat([z, z[losers]]), [0.2], pos_weight=3000.0,
        neg_weight=torch.tensor([1.0] * 5 + [3000.0] * 2), mask_self=True,
    )
    # float32, the same drift_field call: measured 0 (default bound 1.3e-6 rel)
    torch.testing.assert_close(preference_field(z, z[winners], z[losers], config), expected)
