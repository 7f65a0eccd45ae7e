"""The released code's estimator (``--drift_preset authors``): its floor, finite self penalty, clamps and
loss, checked against hand-computed values and against the documented formulas written out as loops."""

import math

import pytest
import torch

from drpo_utils import (
    DRIFT_PRESETS,
    RELEASED_NUMERICS,
    DriftConfig,
    DriftNumerics,
    coordinate_scale,
    drift_field,
    drpo_loss,
    preference_field,
    preference_supports,
    reference_field,
    reference_supports,
    pairwise_distances,
    preference_pairs,
    sample_reward_pairs,
    top_bottom_split,
)


def softmax(values):
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def released_drift(z, pos, neg, radii, kernel="laplacian", weights=None, self_copies=0, paired=False,
                   numerics=RELEASED_NUMERICS):
    """The documented formulas, one query and one support at a time (float64):

    Delta_ij = sqrt(max(floor_d, ||z_i - b_j||^2)); s = max(floor_s, Mean_ij(w_j Delta_ij) / Mean_j(w_j)); s_z = max(floor_s, s / sqrt(d));
    L_ij = kernel(Delta_ij / s, rho) - (penalty / rho) [j is a masked copy of i];
    A_ij = sqrt(max(floor_a, softmax_j(L)_ij softmax_i(L)_ij)) w_j;
    V_i = m-_i sum_{j in B+} A_ij b_j / s_z - m+_i sum_{j in B-} A_ij b_j / s_z;
    V += V / sqrt(max(floor_v, mean(V^2))) per radius.
    """
    z, pos, neg = z.double(), pos.double(), neg.double()
    supports = torch.cat([neg, pos])
    q, b, d = len(z), len(supports), z.shape[1]
    w = torch.ones(b, dtype=torch.float64) if weights is None else weights.double()
    floor = math.sqrt(numerics.distance_floor)
    delta = [[max(floor, math.dist(z[i].tolist(), supports[j].tolist())) for j in range(b)] for i in range(q)]
    s = max(numerics.scale_floor, sum(w[j] * delta[i][j] for i in range(q) for j in range(b)) / (q * b) / (w.sum() / b))
    s_z = max(numerics.scale_floor, s / math.sqrt(d))

    def masked(i, j):
        return any(j == copy * q + i for copy in range(self_copies)) or (paired and j == len(neg) + i)

    total = torch.zeros(q, d, dtype=torch.float64)
    for rho in radii:
        logit = [[(-(delta[i][j] / s) / rho if kernel == "laplacian" else -(delta[i][j] / s) ** 2 / (2 * rho**2))
                  - (numerics.self_penalty / rho if masked(i, j) else 0.0) for j in range(b)] for i in range(q)]
        row = [softmax(logit[i]) for i in range(q)]
        col = list(zip(*[softmax([logit[i][j] for i in range(q)]) for j in range(b)]))
        a = [[math.sqrt(max(numerics.affinity_floor, row[i][j] * col[i][j])) * w[j] for j in range(b)] for i in range(q)]
        v = torch.zeros(q, d, dtype=torch.float64)
        for i in range(q):
            m_neg, m_pos = sum(a[i][: len(neg)]), sum(a[i][len(neg):])
            for j in range(b):
                v[i] += (m_neg if j >= len(neg) else -m_pos) * a[i][j] * supports[j] / s_z
        total += v / math.sqrt(max(numerics.rms_floor, v.square().mean().item()))
    return total


def test_affinity_floor_by_hand():
    """Two queries far from a positive and a negative at rho = 0.01: every product softmax_j softmax_i
    but the nearest is ~exp(-100 D) < 1e-6, so the affinities are the floor sqrt(1e-6) = 1e-3."""
    z = torch.tensor([[0.0], [10.0]], dtype=torch.float64)
    pos, neg = torch.tensor([[1.0]], dtype=torch.float64), torch.tensor([[9.0]], dtype=torch.float64)
    # Delta = [[9, 1], [1, 9]] over B = [neg, pos]; s = 5, s_z = 5; D = Delta / 5.
    # Laplacian logits -D / 0.01: for query 0, neg at -180, pos at -20: softmax_j = (e^-160, 1); column
    # softmaxes: neg column -> query 1 dominates, pos column -> query 0 dominates. So query 0 has
    # A(pos) = sqrt(1 * 1) = 1 and A(neg) = sqrt(e^-160 * e^-160) floored to 1e-3; query 1 mirrored.
    v = drift_field(z, pos, neg, [0.01], kernel="laplacian", numerics=RELEASED_NUMERICS)
    m_pos, m_neg = 1.0, 1e-3  # query 0
    v0 = m_neg * 1.0 * (1.0 / 5) - m_pos * 1e-3 * (9.0 / 5)  # m-_0 A+ b+ / s_z - m+_0 A- b- / s_z
    v1 = 1.0 * 1e-3 * (1.0 / 5) - 1e-3 * 1.0 * (9.0 / 5)  # query 1: A(neg) = 1, A(pos) = 1e-3
    rms = math.sqrt((v0**2 + v1**2) / 2)
    # float64; the terms the hand values drop are ~e^-160: measured 0, bound 1e-6 rel (no floor: 1 apart)
    torch.testing.assert_close(v, torch.tensor([[v0 / rms], [v1 / rms]], dtype=torch.float64), rtol=1e-6, atol=1e-9)
    exact = drift_field(z, pos, neg, [0.01], kernel="laplacian")
    assert not torch.allclose(v, exact, atol=1e-3)  # without the floor the far support has no pull at all (1 apart)


def test_finite_self_penalty_by_hand():
    """A query and its own copy among the negatives: the copy's logit drops by 100 / rho, it is not removed."""
    z = torch.tensor([[0.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    pos = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    numerics = DriftNumerics(self_penalty=100.0)
    v = drift_field(z, pos, z, [50.0], kernel="laplacian", mask_self=True, numerics=numerics)
    # B = [z0, z1, pos]; Delta = [[0, 2, r2], [2, 0, r2]] (r2 = sqrt 2); s = (4 + 2 r2) / 6, s_z = s / sqrt 2;
    # logits = -(Delta / s) / 50, minus 100 / 50 = 2 on each query's own copy.
    r2 = math.sqrt(2.0)
    s = (4 + 2 * r2) / 6
    delta = torch.tensor([[0.0, 2.0, r2], [2.0, 0.0, r2]], dtype=torch.float64)
    logits = -(delta / s) / 50 - 2.0 * torch.tensor([[1.0, 0, 0], [0, 1.0, 0]], dtype=torch.float64)
    a = (logits.softmax(1) * logits.softmax(0)).sqrt()
    b = torch.cat([z, pos]) / (s / r2)
    field = torch.stack([a[i, :2].sum() * a[i, 2] * b[2] - a[i, 2] * (a[i, :2, None] * b[:2]).sum(0) for i in range(2)])
    expected = field / field.square().mean().sqrt()
    torch.testing.assert_close(v, expected, rtol=1e-9, atol=1e-12)  # float64 by hand: measured 2e-16
    removed = drift_field(z, pos, z, [50.0], kernel="laplacian", mask_self=True)
    assert not torch.allclose(v, removed, atol=1e-3)  # the exact estimator drops the copy instead (0.15 apart)


def test_clamps_keep_a_collapsed_batch_finite():
    """All points within 1e-7: s and s_z are clamped at 1e-3 (exact: 1e-12), the RMS at sqrt(1e-8)."""
    z = torch.tensor([[0.0, 0.0], [1e-7, 0.0]], dtype=torch.float64)
    pos, neg = torch.tensor([[2e-7, 0.0]], dtype=torch.float64), torch.tensor([[-1e-7, 0.0]], dtype=torch.float64)
    supports = dict(pos=pos, neg=neg, pos_weight=1.0, neg_weight=1.0)
    assert coordinate_scale(z, supports, DriftConfig(numerics=RELEASED_NUMERICS)).item() == 1e-3  # the clamp: exact
    v = drift_field(z, pos, neg, [0.5], kernel="laplacian", numerics=RELEASED_NUMERICS)
    # With s = 1e-3 the distances D ~ 1e-4 are ~0: uniform affinities 1/2, masses 1/2, and
    # V_i = 1/4 (b+ - b-) / s_z = 1/4 * 3e-7 / 1e-3 = 7.5e-5 along x, below the RMS floor 1e-4: not amplified.
    # Taking D ~ 1e-4 as 0 costs 1e-8 rel (measured, float64); bound 1e-6 (amplified to unit RMS it would be 1.33x).
    torch.testing.assert_close(v[:, 0], torch.full((2,), 7.5e-5 / 1e-4, dtype=torch.float64), rtol=1e-6, atol=0)
    assert v[:, 1].abs().max() == 0


@pytest.mark.parametrize("kernel", ["laplacian", "rbf"])
def test_released_numerics_match_the_documented_formulas_on_random_inputs(kernel):
    g = torch.Generator().manual_seed(11)
    z, pos, neg = (torch.randn(n, 6, generator=g, dtype=torch.float64) for n in (5, 3, 4))
    weights = torch.tensor([1.0] * 5 + [3000.0] * 4 + [3000.0] * 3, dtype=torch.float64)
    negatives = torch.cat([z, neg])
    got = drift_field(z, pos, negatives, [0.02, 0.05, 0.2], kernel=kernel, pos_weight=weights[9:],
                      neg_weight=weights[:9], mask_self=True, numerics=RELEASED_NUMERICS)
    expected = released_drift(z, pos, negatives, [0.02, 0.05, 0.2], kernel, weights, self_copies=1)
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-9)  # float64 vs the loops: measured 1e-14 rel


@pytest.mark.parametrize("kernel", ["laplacian", "rbf"])
@pytest.mark.parametrize("seed", [11, 12, 13])
def test_released_numerics_in_float32_stay_within_float32_rounding(kernel, seed):
    """The same field in float32 against the float64 loops. Any float32 code of these formulas (the released
    one runs them in float32) carries rounding of a few ulps of the field's largest entry: rounding the inputs
    alone to float32 moves the float64 loops by 3e-7 to 6e-7 here (|V| up to 13). Bound: 16 float32 ulps of
    max |V| (2.5e-5 at |V| = 13); measured 2e-6 to 4.5e-6."""
    g = torch.Generator().manual_seed(seed)
    z, pos, neg = (torch.randn(n, 6, generator=g, dtype=torch.float64) for n in (5, 3, 4))
    weights = torch.tensor([1.0] * 5 + [3000.0] * 4 + [3000.0] * 3, dtype=torch.float64)
    negatives = torch.cat([z, neg])
    expected = released_drift(z, pos, negatives, [0.02, 0.05, 0.2], kernel, weights, self_copies=1)
    got = drift_field(z.float(), pos.float(), negatives.float(), [0.02, 0.05, 0.2], kernel=kernel,
                      pos_weight=weights[9:].float(), neg_weight=weights[:9].float(), mask_self=True,
                      numerics=RELEASED_NUMERICS)
    assert got.dtype == torch.float32
    ulp = torch.finfo(torch.float32).eps * expected.abs().max().item()
    assert (got.double() - expected).abs().max().item() <= 16 * ulp


def test_authors_reference_field_matches_the_formulas():
    """V_ref of the released code: supports [sg(Z) (w 1); sg(Z) (w 3000); R (w 3000)], both copies of z_i
    pushed away by the finite penalty, r_i not masked."""
    g = torch.Generator().manual_seed(12)
    z, z_ref = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g, dtype=torch.float64)
    config = DRIFT_PRESETS["authors"]
    weights = torch.tensor([1.0] * 4 + [3000.0] * 4 + [3000.0] * 4, dtype=torch.float64)
    expected = released_drift(z, z_ref, torch.cat([z, z]), config.radii, "laplacian", weights, self_copies=2)
    # float64 vs the loops: measured 3e-15 rel, bound 1e-7
    torch.testing.assert_close(reference_field(z, z_ref, config), expected, rtol=1e-7, atol=1e-9)
    assert reference_supports(z, z_ref, config).get("mask_paired_positive") is False


def test_small_radii_live_with_the_floor_and_underflow_without_it():
    """rho = 0.02 (RBF) on 512-dim features: exactly, m+ m- ~ exp(-1250 D^2) underflows for all but the
    one or two queries nearest a support, so the unit-RMS field sits on those alone; with the released
    code's affinity floor every query gets a drift from B- toward B+."""
    g = torch.Generator().manual_seed(13)
    z, pos, neg = torch.randn(16, 512, generator=g), torch.randn(8, 512, generator=g) + 0.1, torch.randn(8, 512, generator=g)

    def moved(field):  # queries whose drift is not negligible next to the largest one
        norms = field.norm(dim=1)
        return int((norms > 1e-3 * norms.max()).sum())  # measured: exact 1, 2e-5, 2e-6, ...; floored >= 3.8e-3

    exact = drift_field(z, pos, neg, [0.02], kernel="rbf")
    floored = drift_field(z, pos, neg, [0.02], kernel="rbf", numerics=RELEASED_NUMERICS)
    assert moved(exact) <= 2 and moved(floored) == 16
    assert floored.square().mean().sqrt().item() == pytest.approx(1.0, rel=1e-4)  # float32: measured 0 (noise 1e-7)
    toward = ((pos.mean(0) - neg.mean(0)) * floored).sum(1)
    assert (toward > 0).all()


def test_authors_loss_is_two_mean_regressions_in_their_own_coordinates():
    """L = mean((z~p - sg(z~p + V_pref))^2) + lambda mean((z~r - sg(z~r + V_ref))^2): the gradient is
    -(2 / (K d)) (V_pref / s_p + lambda V_ref / s_r)."""
    g = torch.Generator().manual_seed(14)
    z = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    z_ref = torch.randn(6, 4, generator=g, dtype=torch.float64)
    config = DRIFT_PRESETS["authors"]
    winners, losers = sample_reward_pairs(torch.arange(6.0), 6, torch.Generator().manual_seed(0))
    loss, _ = drpo_loss(z, z_ref, winners, losers, config)
    loss.backward()
    s_p = coordinate_scale(z, preference_supports(z, z[winners], z[losers], config), config)
    s_r = coordinate_scale(z, reference_supports(z, z_ref, config), config)
    v_pref, v_ref = preference_field(z, z[winners], z[losers], config), reference_field(z, z_ref, config)
    expected = -(2.0 / (6 * 4)) * (v_pref / s_p + config.ref_weight * v_ref / s_r)
    # float64: measured 6e-17 (4e-16 rel) for the gradient, 0 for the loss
    torch.testing.assert_close(z.grad, expected, rtol=1e-10, atol=1e-10)
    assert loss.item() == pytest.approx(((v_pref.square().mean() + 0.2 * v_ref.square().mean())).item(), rel=1e-10)


def test_presets_differ_only_where_documented():
    paper, authors = DRIFT_PRESETS["paper"], DRIFT_PRESETS["authors"]
    assert paper == DriftConfig()
    changed = {f for f in DriftConfig.__dataclass_fields__ if getattr(paper, f) != getattr(authors, f)}
    assert changed == {"radii", "kernel", "pair_weight", "self_negatives", "mask_paired_reference", "numerics",
                       "loss_reduction", "separate_branch_losses", "feature_reduction", "pairing"}
    assert authors.numerics == DriftNumerics(scale_floor=1e-3, rms_floor=1e-8, affinity_floor=1e-6, self_penalty=100,
                                             distance_floor=1e-8)
    assert (authors.feature_reduction, authors.pairing) == ("mean", "top_bottom")


def test_top_bottom_split_by_hand():
    """The released recipe's A+ / A-: a stable descending sort, the top and bottom floor(K/2), each once."""
    rewards = torch.tensor([0.3, 0.9, 0.1, 0.9, 0.5])
    winners, losers = top_bottom_split(rewards)
    assert winners.tolist() == [1, 3] and losers.tolist() == [0, 2]  # the median (0.5, index 4) is left out
    winners, losers = top_bottom_split(torch.tensor([2.0, 1.0, 4.0, 3.0]))
    assert winners.tolist() == [2, 3] and losers.tolist() == [0, 1]
    assert [len(side) for side in top_bottom_split(torch.ones(6))] == [0, 0]  # a constant reward ranks nothing
    # z-scoring (their first step) changes no order; the pairing only reads the order
    assert [t.tolist() for t in top_bottom_split(100 * rewards + 5)] == [[1, 3], [0, 2]]
    assert [t.tolist() for t in preference_pairs(rewards, 3, "top_bottom")] == [[1, 3], [0, 2]]
    random_pairs = preference_pairs(rewards, 3, "random", torch.Generator().manual_seed(0))
    assert len(random_pairs[0]) == 3 and (rewards[random_pairs[0]] > rewards[random_pairs[1]]).all()


def test_distance_floor_by_hand():
    """sqrt(max(d^2, 1e-8)): a support on the query is 1e-4 away, and the batch scale s counts it so."""
    z = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    pos, neg = torch.tensor([[0.0]], dtype=torch.float64), torch.tensor([[3.0]], dtype=torch.float64)
    assert pairwise_distances(z, pos, 1e-8).tolist() == [[1e-4], [1.0]]
    assert pairwise_distances(z, pos).tolist() == [[0.0], [1.0]]
    numerics = DriftNumerics(distance_floor=1e-8)
    supports = dict(pos=pos, neg=neg, pos_weight=1.0, neg_weight=1.0)
    # s = mean(Delta) over [B-; B+] = (3 + 1e-4 + 2 + 1) / 4; s_z = s / sqrt(1)
    expected = (3 + 1e-4 + 2 + 1) / 4
    assert coordinate_scale(z, supports, DriftConfig(numerics=numerics)).item() == pytest.approx(expected, rel=1e-12)
    got = drift_field(z, pos, neg, [0.5], kernel="laplacian", numerics=numerics)
    torch.testing.assert_close(got, released_drift(z, pos, neg, [0.5], numerics=numerics), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="distance floors non-negative"):
        DriftNumerics(distance_floor=-1.0)


def test_feature_reduction_mean_is_the_mean_of_the_per_tensor_losses():
    g = torch.Generator().manual_seed(15)
    features = {name: torch.randn(6, dim, generator=g, dtype=torch.float64) for name, dim in (("a", 4), ("b", 3))}
    refs = {name: torch.randn_like(value) for name, value in features.items()}
    winners, losers = torch.tensor([0, 1]), torch.tensor([4, 5])
    per_tensor = [drpo_loss(features[n], refs[n], winners, losers, DriftConfig())[0].item() for n in ("a", "b")]
    summed = drpo_loss(features, refs, winners, losers, DriftConfig())[0].item()
    mean = drpo_loss(features, refs, winners, losers, DriftConfig(feature_reduction="mean"))[0].item()
    assert summed == pytest.approx(sum(per_tensor), rel=1e-12) and mean == pytest.approx(sum(per_tensor) / 2, rel=1e-12)


def test_each_branch_takes_its_own_weights_and_radii():
    """The released trainer's four support weights and two radius lists: V_pref with A- at its own weight,
    V_ref with R and sg(Z) at theirs and its own radii, each equal to the drift field called with exactly
    those supports; unset, they fall back to pair_weight and radii (the presets are unchanged)."""
    g = torch.Generator().manual_seed(16)
    z, z_ref = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g, dtype=torch.float64)
    pos, neg = z[:2], z[4:]
    config = DriftConfig(pair_weight=3.0, negative_weight=2.0, reference_weight=5.0, reference_negative_weight=7.0,
                         reference_radii=(0.3, 0.9), mask_self=False)
    expected_pref = drift_field(z, pos, neg, config.radii, pos_weight=3.0, neg_weight=2.0)
    torch.testing.assert_close(preference_field(z, pos, neg, config), expected_pref, rtol=0, atol=0)
    expected_ref = drift_field(z, z_ref, z, (0.3, 0.9), pos_weight=5.0, neg_weight=7.0)
    torch.testing.assert_close(reference_field(z, z_ref, config), expected_ref, rtol=0, atol=0)
    # the weights are no common factor now: a different A- weight changes V_pref
    assert not torch.allclose(preference_field(z, pos, neg, DriftConfig(pair_weight=3.0)), expected_pref)
    plain = DriftConfig(pair_weight=3.0, mask_self=False)
    assert [plain.branch_weight(kind) for kind in ("positive", "negative", "reference", "reference_negative")] == [3.0] * 4
    with pytest.raises(ValueError, match="support weights must be positive"):
        DriftConfig(negative_weight=0.0)
    with pytest.raises(ValueError, match="reference radii must be positive"):
        DriftConfig(reference_radii=(0.1, -1.0))
