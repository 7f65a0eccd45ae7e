"""Drifting Preference Optimization (DrPO, arXiv 2606.02521): the method, and nothing else.

Equation numbers refer to the paper. The file reads top to bottom like Section 4 + Appendix A:

1. ``drift_field``         - the finite-batch drift estimator (Appendix A, Eqs. 18-26).
2. ``sample_reward_pairs`` - reward-ordered pairs from K candidates (Section 4.2, Eq. 12).
3. ``drpo_loss``           - V = V_pref + lambda V_ref, detached target, regression (Eqs. 15-17).
4. the differentiable one-step generator g_theta and its frozen reference g_ref (Algorithm 1, line 4).

The contracts other code relies on, stated where they are implemented:

- ``drift_field(z, pos, neg, radii, *, kernel, pos_weight, neg_weight, mask_self) -> V``: queries
  ``z`` [Q, d], supports ``pos`` [P, d] / ``neg`` [N, d]; V [Q, d] in the normalised coordinates of
  Eq. 20; with the defaults exactly Eqs. 18-26. Feature maps that return several tensors get one
  field per tensor and their losses add (``drpo_loss``).
- ``drpo_loss``: V_pref = DriftField(Z, A+, A-), V_ref = DriftField(Z, R, sg(Z)) with R the frozen base
  model's features for the same noises and prompt; the target sg(z~ + eta V) is regressed in the same
  normalised coordinates; gradients reach the generator through the features only, never the reward.
- ``sample_reward_pairs``: M reward-ordered pairs among the K candidates of one prompt; tied pairs carry
  no preference and are dropped; all-equal rewards give no pairs (the preference term is then zero).

This module imports torch only (and, inside the FLUX sampler, diffusers' own latent packing): feature maps,
rewards and run plumbing live in ``pipelines/``.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# 1. Drift field (Appendix A)
# ---------------------------------------------------------------------------------------------

DRIFT_KERNELS = ("rbf", "laplacian", "exponential", "cosine")



@dataclass(frozen=True)
class DriftNumerics:
    """How the estimator guards divisions and treats a query's own copy among its supports.

    The defaults are Appendix A exactly: epsilons that only guard divisions by zero, no affinity
    floor, and masked copies removed (logit -inf). ``RELEASED_NUMERICS`` is the authors' released
    estimator (``UGVly/DrPO``, ``drift_loss``), which differs in all four.
    """

    scale_floor: float = 1e-12  # s >= floor and s_z >= floor (eps_s, eps_z of Eqs. 19-20)
    rms_floor: float = 1e-24  # RMS = sqrt(max(mean square, floor)) (eps_v of Eq. 25)
    affinity_floor: float = 0.0  # A = sqrt(max(softmax_j * softmax_i, floor)) w_j (Eq. 22)
    self_penalty: float = math.inf  # logit - penalty / rho on a masked copy; inf removes it
    distance_floor: float = 0.0  # Delta_ij = sqrt(max(||z_i - b_j||^2, floor)) (Eq. 18); 0: exact

    def __post_init__(self):
        if self.scale_floor <= 0 or self.rms_floor <= 0 or self.affinity_floor < 0 or self.self_penalty <= 0 \
                or self.distance_floor < 0:
            raise ValueError(f"drift numerics: the floors of s and RMS and the self penalty must be positive, the "
                             f"affinity and distance floors non-negative; got {self}")


EXACT_NUMERICS = DriftNumerics()
RELEASED_NUMERICS = DriftNumerics(scale_floor=1e-3, rms_floor=1e-8, affinity_floor=1e-6, self_penalty=100.0,
                                  distance_floor=1e-8)


def pairwise_distances(queries: torch.Tensor, supports: torch.Tensor, floor: float = 0.0) -> torch.Tensor:
    """Delta_ij = ||z_i - b_j|| (Eq. 18), or sqrt(max(||z_i - b_j||^2, floor)) with a distance floor."""
    delta = torch.cdist(queries, supports)
    return delta.clamp_min(math.sqrt(floor)) if floor > 0 else delta


def kernel_logits(distances: torch.Tensor, cosine: torch.Tensor | None, radius: float, kernel: str) -> torch.Tensor:
    """Log-kernel L_ij for one radius rho; larger means closer (Eq. 21 and Table 3c).

    ``distances`` is D = Delta / s (Eq. 21), ``cosine`` the cosine similarity of query and support.
    - ``rbf``:         -D^2 / (2 rho^2)   (Eq. 21, the paper's default)
    - ``laplacian``:   -D / rho           (the authors' public code)
    - ``exponential``: -D / rho           (the authors' code treats it as an alias of ``laplacian``)
    - ``cosine``:      cos(z, b) / rho
    """
    if kernel == "rbf":
        return -distances.square() / (2.0 * radius**2)
    if kernel in ("laplacian", "exponential"):
        return -distances / radius
    if kernel == "cosine":
        return cosine / radius
    raise ValueError(f"Unknown drift kernel {kernel!r}; choose one of {', '.join(DRIFT_KERNELS)}.")


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (exact comparisons in tests); every other dtype (bf16, fp16, fp32) computes in fp32."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _support_weights(weight: float | torch.Tensor, count: int, like: torch.Tensor) -> torch.Tensor:
    """Per-support weights w_j (Eq. 19/22): a scalar for every support, or one value per support."""
    weight = torch.as_tensor(weight, dtype=like.dtype, device=like.device)
    if (weight < 0).any():
        raise ValueError("support weights must be non-negative")
    if weight.ndim == 0:
        return weight.expand(count)
    if weight.shape != (count,):
        raise ValueError(f"support weights must be a scalar or have shape ({count},), got {tuple(weight.shape)}")
    return weight


def feature_scales(delta: torch.Tensor, weights: torch.Tensor, dim: int,
                   floor: float = EXACT_NUMERICS.scale_floor) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch scale s = Mean_ij(w_j Delta_ij) / Mean_j(w_j) (Eq. 19) and s_z = s / sqrt(d) (Eq. 20)."""
    scale = ((delta * weights).mean() / weights.mean()).clamp_min(floor)
    return scale, (scale / math.sqrt(dim)).clamp_min(floor)


def drift_field(
    z: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor,
    radii: Sequence[float],
    *,
    kernel: str = "rbf",
    pos_weight: float | torch.Tensor = 1.0,
    neg_weight: float | torch.Tensor = 1.0,
    mask_self: bool = False,
    mask_paired_positive: bool = False,
    self_copies: int = 1,
    numerics: DriftNumerics = EXACT_NUMERICS,
) -> torch.Tensor:
    """Multi-radius cross-mass drift V(z) of Algorithm A2, in the normalised coordinates of Eq. 20.

    Shapes: ``z`` [Q, d] queries, ``pos`` [P, d] positive supports B+, ``neg`` [N, d] negative
    supports B-; returns V [Q, d]. Nothing here carries gradient: distances use sg(z) (Eq. 18).

    Steps (with the defaults this is exactly Eqs. 18-26):
      1. B = [B-; B+] with weights w_j; repeated supports count repeatedly.
      2. Delta_ij = ||sg(z_i) - b_j||                                  (Eq. 18)
      3. s = Mean_ij(w_j Delta_ij) / Mean_j(w_j);  s_z = s / sqrt(d)   (Eqs. 19-20)
      4. per radius rho: L_ij from D = Delta / s                        (Eq. 21)
         A_ij = sqrt(softmax_j(L) softmax_i(L)) w_j over the joint B    (Eq. 22)
         m+_i, m-_i = sum of A over B+, B-                              (Eq. 23)
         V_i = m-_i sum_j A+_ij b~+_j - m+_i sum_j A-_ij b~-_j          (Eq. 24)
         V <- V + V_rho / RMS(V_rho)                                    (Eqs. 25-26)

    ``mask_self`` excludes ``neg[i]`` from query ``i`` (i < Q) when the first Q negatives are the queries
    themselves (self-negatives, V_ref's sg(Z); ``self_copies = c``: c stacked copies, each masked);
    ``mask_paired_positive`` excludes ``pos[i]`` (V_ref's r_i, same noise as z_i): with both, V_ref is
    leave-one-out and 0 when Z = R. ``pos_weight`` / ``neg_weight``: scalars or per-support vectors; V
    is RMS-normalised per radius, so a common rescaling of all weights leaves it unchanged (without an
    affinity floor). ``numerics``: epsilons, affinity floor, masked copies removed or pushed away.
    """
    _check_supports(z, pos, neg, mask_self, mask_paired_positive, self_copies)
    dtype = compute_dtype(z)
    queries = z.detach().to(dtype)
    supports = torch.cat([neg, pos]).detach().to(dtype)  # B = [B-; B+]
    num_neg, dim = len(neg), z.shape[1]
    weights = torch.cat(
        [_support_weights(neg_weight, num_neg, supports), _support_weights(pos_weight, len(pos), supports)]
    )

    delta = pairwise_distances(queries, supports, numerics.distance_floor)  # Eq. 18
    scale, coord_scale = feature_scales(delta, weights, dim, numerics.scale_floor)  # Eqs. 19-20
    supports_normalised = supports / coord_scale
    distances = delta / scale
    cosine = F.normalize(queries, dim=1) @ F.normalize(supports, dim=1).T if kernel == "cosine" else None

    self_mask = _self_mask(delta, num_neg, mask_self, mask_paired_positive, self_copies)
    log_weights, field = weights.log(), torch.zeros_like(queries)
    for radius in radii:
        logits = kernel_logits(distances, cosine, float(radius), kernel)  # Eq. 21
        if self_mask is not None:
            logits = logits - self_mask * (numerics.self_penalty / float(radius)) if math.isfinite(
                numerics.self_penalty) else logits.masked_fill(self_mask, float("-inf"))
        field = field + cross_mass_drift(logits, log_weights, supports_normalised, num_neg, numerics)  # Eqs. 22-25
    return field.to(z.dtype)


def _check_supports(z, pos, neg, mask_self: bool, mask_paired_positive: bool, self_copies: int) -> None:
    if z.ndim != 2 or pos.ndim != 2 or neg.ndim != 2:
        raise ValueError(f"z, pos, neg must be 2-D [count, dim]; got {z.shape}, {pos.shape}, {neg.shape}")
    if not (z.shape[1] == pos.shape[1] == neg.shape[1]):
        raise ValueError(f"feature dims differ: {z.shape[1]}, {pos.shape[1]}, {neg.shape[1]}")
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("drift_field needs at least one positive and one negative support")
    if mask_self and len(neg) < self_copies * len(z):
        raise ValueError(f"mask_self needs the first {self_copies} x Q negatives to be copies of the Q queries")
    if mask_paired_positive and len(pos) < len(z):
        raise ValueError("mask_paired_positive needs a positive per query")


def _self_mask(delta: torch.Tensor, num_neg: int, mask_self: bool, mask_paired_positive: bool,
               self_copies: int) -> torch.Tensor | None:
    """[Q, N + P]: True where query i meets its own copy among the negatives (``mask_self``, each of the
    ``self_copies`` stacked copies) or its paired base sample among the positives (``mask_paired_positive``)."""
    if not (mask_self or mask_paired_positive):
        return None
    queries = delta.shape[0]
    mask = torch.zeros_like(delta, dtype=torch.bool)
    eye = torch.eye(queries, dtype=torch.bool, device=delta.device)
    for copy in range(self_copies if mask_self else 0):
        mask[:, copy * queries:(copy + 1) * queries] = eye
    if mask_paired_positive:
        mask[:, num_neg:num_neg + queries] |= eye
    return mask


def cross_mass_drift(logits: torch.Tensor, log_weights: torch.Tensor, supports: torch.Tensor, num_neg: int,
                     numerics: DriftNumerics = EXACT_NUMERICS):
    """RMS-normalised cross-mass drift of one radius (Eqs. 22-25), computed in log space.

    With A_ij = sqrt(softmax_j(L) softmax_i(L)) w_j (Eq. 22), masses m+-_i (Eq. 23) and the
    affinity-weighted support means mu+-_i = sum_j A+-_ij b~_j / m+-_i, Eq. 24 is
        V_i = m-_i sum_j A+_ij b~+_j - m+_i sum_j A-_ij b~-_j = m+_i m-_i (mu+_i - mu-_i).
    For small radii the products m+_i m-_i underflow float32 (exp(-1250 D^2) at rho = 0.02), so
    they are kept as logarithms and the common factor c = max_i m+_i m-_i is divided out before
    exponentiating. Eq. 25 is then applied to the true field c * V': unit RMS where its mean square
    exceeds eps_v, and left (vanishingly) small where it does not, exactly as the formula says.
    An affinity floor f (``numerics``) raises softmax_j * softmax_i to at least f before the root,
    except where a support is removed (logit -inf).
    """
    # Eq. 22 in log space; a support whose every query is masked has no affinity (NaN -> -inf).
    log_product = (logits.log_softmax(dim=1) + logits.log_softmax(dim=0)).nan_to_num(nan=float("-inf"))
    if numerics.affinity_floor > 0:
        floored = log_product.clamp_min(math.log(numerics.affinity_floor))
        log_product = torch.where(torch.isneginf(logits), log_product, floored)
    log_affinity = 0.5 * log_product + log_weights
    log_neg, log_pos = log_affinity[:, :num_neg], log_affinity[:, num_neg:]
    log_mass = log_pos.logsumexp(dim=1) + log_neg.logsumexp(dim=1)  # log m+_i + log m-_i (Eq. 23)
    log_common = log_mass.max()
    if not torch.isfinite(log_common):  # no query sees both a positive and a negative
        return torch.zeros(len(logits), supports.shape[1], dtype=supports.dtype, device=supports.device)
    mean_pos = log_pos.softmax(dim=1).nan_to_num(0.0) @ supports[num_neg:]
    mean_neg = log_neg.softmax(dim=1).nan_to_num(0.0) @ supports[:num_neg]
    drift = (log_mass - log_common).exp().unsqueeze(1) * (mean_pos - mean_neg)  # Eq. 24 divided by c
    # Eq. 25 on c * drift: sqrt(max(c^2 ms, eps_v)) = c * sqrt(max(ms, eps_v / c^2)), all in log space.
    log_mean_square = drift.square().mean().log()
    log_norm = 0.5 * torch.maximum(log_mean_square, math.log(numerics.rms_floor) - 2 * log_common)
    return drift * (-log_norm).exp()


# ---------------------------------------------------------------------------------------------
# 2. Reward-ordered pairs (Section 4.2, Eq. 12)
# ---------------------------------------------------------------------------------------------


def max_pairs(num_candidates: int) -> int:
    """Number of distinct unordered pairs among K candidates, K(K-1)/2."""
    return num_candidates * (num_candidates - 1) // 2


def sample_reward_pairs(
    rewards: torch.Tensor, num_pairs: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample M distinct candidate pairs and order each by reward (Eq. 12).

    Returns index tensors ``(winners, losers)`` into the K candidates, with
    ``rewards[winners] > rewards[losers]``. Tied pairs carry no preference and are dropped before
    sampling, so a discrete reward still yields M pairs when that many untied pairs exist; if every
    reward is equal none come back (the preference term is then zero).
    """
    rewards = torch.as_tensor(rewards).flatten().cpu()
    num_candidates = len(rewards)
    if num_candidates < 2:
        raise ValueError(f"need at least 2 candidates to form pairs, got {num_candidates}")
    if not 1 <= num_pairs <= max_pairs(num_candidates):
        raise ValueError(f"num_pairs must be in [1, {max_pairs(num_candidates)}] for K={num_candidates}, got {num_pairs}")
    first, second = torch.triu_indices(num_candidates, num_candidates, offset=1)
    untied = rewards[first] != rewards[second]
    first, second = first[untied], second[untied]
    chosen = torch.randperm(len(first), generator=generator)[:num_pairs]
    first, second = first[chosen], second[chosen]
    first_wins = rewards[first] > rewards[second]
    return torch.where(first_wins, first, second), torch.where(first_wins, second, first)


def top_bottom_split(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A+ / A- as the released recipe builds them: the top floor(K/2) candidates by reward and the bottom
    floor(K/2), each candidate used once (for an odd K the median is left out; ties are broken by a stable
    sort, the earlier candidate first). A constant reward ranks nothing: no pairs, as Eq. 12's sampler.

    Returns ``(winners, losers)`` of equal length, winners best first, losers worst last.
    """
    rewards = torch.as_tensor(rewards).flatten().cpu()
    if len(rewards) < 2:
        raise ValueError(f"need at least 2 candidates to form pairs, got {len(rewards)}")
    if rewards.max() == rewards.min():
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty
    order, half = torch.sort(rewards, descending=True, stable=True).indices, len(rewards) // 2
    return order[:half], order[len(rewards) - half:]


PAIRINGS = ("random", "top_bottom")


def preference_pairs(rewards: torch.Tensor, num_pairs: int, pairing: str = "random",
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A+ / A- of one prompt: M random reward-ordered pairs (Eq. 12, the paper) or the top / bottom split
    of the released recipe (``num_pairs`` unused: K/2 a side)."""
    if pairing == "top_bottom":
        return top_bottom_split(rewards)
    return sample_reward_pairs(rewards, num_pairs, generator)


# ---------------------------------------------------------------------------------------------
# 3. The DrPO loss (Eqs. 15-17)
# ---------------------------------------------------------------------------------------------


LOSS_REDUCTIONS = ("sum", "mean")


@dataclass(frozen=True)
class DriftConfig:
    """Hyper-parameters of the DrPO field and loss (Eqs. 15-17, Appendix A); ``DRIFT_PRESETS`` names two."""

    radii: tuple[float, ...] = (0.1, 0.2, 0.5)
    kernel: str = "rbf"
    ref_weight: float = 0.2  # lambda, Eq. 15
    velocity_scale: float = 1.0  # eta, Eq. 16
    pair_weight: float = 1.0  # w_j of the preference pairs and of V_ref's supports (authors: 3000)
    self_negatives: bool = False  # sg(Z) as extra unit-weight negatives of both fields, own copy masked (authors)
    # Leave-one-out reference drift: z_i does not see its own copy in sg(Z) (mask_self) nor its paired
    # base sample r_i in R (mask_paired_reference). Eq. 14 wants independent sample sets; Appendix A is
    # silent; the authors' code masks the copy only. Unmasked, the copy at distance 0 dominates Eq. 22
    # and V_ref_i becomes a unit-RMS pull of every sample onto its own reference (README).
    mask_self: bool = True
    mask_paired_reference: bool = True
    numerics: DriftNumerics = EXACT_NUMERICS
    loss_reduction: str = "sum"  # "sum": 1/(2K) sum_i ||.||^2 (Eq. 17); "mean": over candidates and dims
    # Several feature tensors (a multi-layer phi): "sum" adds their losses (as Drifting Models, which
    # Appendix A follows; the paper does not say), "mean" averages them (the released code).
    feature_reduction: str = "sum"
    pairing: str = "random"  # A+ / A-: M random reward-ordered pairs (Eq. 12) or "top_bottom" (released recipe)
    # Each branch its own support weights and radii (the released trainer: pos / neg / ref / ref-neg weights,
    # preference and reference radius lists); None: pair_weight and radii, Appendix A's single w_j and rho set.
    negative_weight: float | None = None  # A- in V_pref
    reference_weight: float | None = None  # R in V_ref
    reference_negative_weight: float | None = None  # sg(Z) in V_ref
    reference_radii: tuple[float, ...] | None = None
    # False: one target z~ + eta (V_pref + lambda V_ref) in the preference call's coordinates (Eqs. 15-17).
    # True: two regressions, each field in its own call's coordinates, the reference one weighted by lambda.
    separate_branch_losses: bool = False

    def __post_init__(self):
        if self.kernel not in DRIFT_KERNELS:
            raise ValueError(f"Unknown drift kernel {self.kernel!r}; choose one of {', '.join(DRIFT_KERNELS)}.")
        if not self.radii or any(r <= 0 for r in self.radii):
            raise ValueError(f"drift radii must be positive, got {self.radii}")
        if self.loss_reduction not in LOSS_REDUCTIONS or self.feature_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss and feature reductions must be one of {LOSS_REDUCTIONS}, got "
                             f"{self.loss_reduction!r} / {self.feature_reduction!r}")
        if self.pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {PAIRINGS}, got {self.pairing!r}")
        weights = (self.pair_weight, self.negative_weight, self.reference_weight, self.reference_negative_weight)
        if any(weight is not None and weight <= 0 for weight in weights):
            raise ValueError(f"support weights must be positive, got {weights}")
        if self.reference_radii is not None and (not self.reference_radii or min(self.reference_radii) <= 0):
            raise ValueError(f"reference radii must be positive, got {self.reference_radii}")

    def branch_weight(self, support: str) -> float:
        """w_j of one kind of support: "positive" (A+), "negative" (A-), "reference" (R), "reference_negative"
        (sg(Z) in V_ref); each defaults to ``pair_weight``."""
        own = {"positive": None, "negative": self.negative_weight, "reference": self.reference_weight,
               "reference_negative": self.reference_negative_weight}[support]
        return self.pair_weight if own is None else own


DRIFT_PRESETS = {
    "paper": DriftConfig(),  # Appendix A exactly, with the leave-one-out reference drift
    # The released code's estimator (UGVly/DrPO, drift_loss and its callers).
    "authors": DriftConfig(radii=(0.02, 0.05, 0.2), kernel="laplacian", pair_weight=3000.0, self_negatives=True,
                           mask_paired_reference=False, numerics=RELEASED_NUMERICS, loss_reduction="mean",
                           separate_branch_losses=True, feature_reduction="mean", pairing="top_bottom"),
}


def _with_self_negatives(queries: torch.Tensor, neg: torch.Tensor, neg_weight: float) -> tuple:
    """[sg(Z); neg] with unit weights on sg(Z): the generated samples as supports of their own field."""
    weights = torch.cat([queries.new_ones(len(queries)), queries.new_full((len(neg),), neg_weight)])
    return torch.cat([queries, neg]), weights


def preference_supports(z: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, config: DriftConfig) -> dict:
    """Supports of V_pref: A+ and A- (Eq. 12; online Z[winners] / Z[losers], offline the dataset's chosen /
    rejected features), weighted ``pair_weight`` (A- ``negative_weight`` when set); with ``self_negatives``
    also sg(Z) as unit-weight negatives, each query's own copy masked."""
    queries = z.detach()
    pos, neg = pos.detach().to(queries.dtype), neg.detach().to(queries.dtype)
    negative_weight = config.branch_weight("negative")
    supports = dict(pos=pos, neg=neg, pos_weight=config.pair_weight, neg_weight=negative_weight)
    if config.self_negatives:
        supports["neg"], supports["neg_weight"] = _with_self_negatives(queries, neg, negative_weight)
        supports["mask_self"] = True
    return supports


def reference_supports(z: torch.Tensor, z_ref: torch.Tensor, config: DriftConfig) -> dict:
    """Supports of V_ref: R (positives) and sg(Z) (negatives) (Eq. 14), weighted ``pair_weight`` unless
    ``reference_weight`` / ``reference_negative_weight`` are set."""
    queries, ref = z.detach(), z_ref.detach()
    negative_weight = config.branch_weight("reference_negative")
    supports = dict(pos=ref, neg=queries, pos_weight=config.branch_weight("reference"), neg_weight=negative_weight,
                    mask_self=config.mask_self, mask_paired_positive=config.mask_self and config.mask_paired_reference)
    if config.self_negatives:  # [sg(Z) (unit weight); sg(Z)]: the first copy always masked, the second with mask_self
        supports["neg"], supports["neg_weight"] = _with_self_negatives(queries, queries, negative_weight)
        supports.update(mask_self=True, self_copies=2 if config.mask_self else 1)
    return supports


def preference_field(z: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, config: DriftConfig) -> torch.Tensor:
    """V_pref = DriftField(Z, A+, A-) (Eq. 13); zero without pairs (all rewards tie)."""
    if len(pos) == 0:
        return torch.zeros_like(z.detach())
    return drift_field(z, radii=config.radii, kernel=config.kernel, numerics=config.numerics,
                       **preference_supports(z, pos, neg, config))


def reference_field(z: torch.Tensor, z_ref: torch.Tensor, config: DriftConfig) -> torch.Tensor:
    """V_ref = DriftField(Z, R, sg(Z)): attraction to the base model's samples (Eq. 14), at
    ``reference_radii`` when set."""
    radii = config.radii if config.reference_radii is None else config.reference_radii
    return drift_field(z, radii=radii, kernel=config.kernel, numerics=config.numerics,
                       **reference_supports(z, z_ref, config))


def coordinate_scale(z: torch.Tensor, supports: dict, config: DriftConfig) -> torch.Tensor:
    """s_z (Eq. 20) of a drift_field call with these supports: its normalised coordinates are z / s_z."""
    queries = z.detach().to(compute_dtype(z))
    pos, neg = supports["pos"].to(queries.dtype), supports["neg"].to(queries.dtype)
    weights = torch.cat([_support_weights(supports["neg_weight"], len(neg), queries),
                         _support_weights(supports["pos_weight"], len(pos), queries)])
    delta = pairwise_distances(queries, torch.cat([neg, pos]), config.numerics.distance_floor)
    return feature_scales(delta, weights, queries.shape[1], config.numerics.scale_floor)[1]


@dataclass(frozen=True)
class RegressionTerm:
    """One detached target of Eq. 16 for one feature tensor: z~ = z / coord_scale, target z~ + eta V."""

    coord_scale: torch.Tensor  # s_z, a scalar
    velocity: torch.Tensor  # V [K, d] in those coordinates, float32 (float64 for float64 z), no gradient
    weight: float = 1.0


def drift_targets(features, ref_features, winners: torch.Tensor, losers: torch.Tensor,
                  config: DriftConfig) -> tuple[dict[str, list[RegressionTerm]], dict[str, float]]:
    """The fields of Eqs. 13-15 for every feature tensor, as regression terms (no gradient anywhere).

    ``features`` are the current generator's features Z, ``ref_features`` the frozen base model's
    features R for the same noises and prompt: one tensor [K, ...] or a dict of named tensors
    (multi-layer feature maps), each of which gets its own fields. ``winners`` / ``losers`` index the
    reward-ordered pairs among the K candidates: A+ = Z[winners], A- = Z[losers] (Eq. 12). By default
    one term per tensor: V = V_pref + lambda V_ref in the preference call's coordinates (the reference
    call's when all rewards tie); with ``separate_branch_losses``, one term per field, each in its own
    coordinates.
    """
    features = _named(features)
    pair_sets = {name: (z.detach()[winners], z.detach()[losers]) for name, z in features.items()}
    return _field_targets(features, _named(ref_features), pair_sets, config)


def offline_drift_targets(features, ref_features, chosen, rejected, config: DriftConfig):
    """The offline variant (Section 4, "Offline variant"; Appendix B): A+ / A- are the features of a
    preference dataset's chosen / rejected images [P, ...] for the prompt, in place of reward-ranked
    candidates; the queries Z, the reference drift and the regression are those of ``drift_targets``."""
    chosen, rejected = _named(chosen), _named(rejected)
    pair_sets = {name: (chosen[name], rejected[name]) for name in chosen}
    return _field_targets(_named(features), _named(ref_features), pair_sets, config)


def _named(features: torch.Tensor | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    return {"features": features} if isinstance(features, torch.Tensor) else features


def _field_targets(features: Mapping[str, torch.Tensor], ref_features: Mapping[str, torch.Tensor],
                   pair_sets: Mapping[str, tuple[torch.Tensor, torch.Tensor]], config: DriftConfig):
    """V = V_pref + lambda V_ref per feature tensor (Eq. 15), with A+ / A- = ``pair_sets[name]``."""
    targets, stats = {}, {}
    for name, z in features.items():
        z, z_ref = z.detach().flatten(1), ref_features[name].detach().flatten(1)
        pos, neg = (supports.flatten(1) for supports in pair_sets[name])
        v_pref = preference_field(z, pos, neg, config).to(compute_dtype(z))
        v_ref = reference_field(z, z_ref, config).to(compute_dtype(z))
        ref_scale = coordinate_scale(z, reference_supports(z, z_ref, config), config)
        pref_scale = coordinate_scale(z, preference_supports(z, pos, neg, config), config) if len(pos) \
            else ref_scale
        if config.separate_branch_losses:
            terms = [RegressionTerm(ref_scale, v_ref, config.ref_weight)]
            if len(pos):
                terms.insert(0, RegressionTerm(pref_scale, v_pref))
        else:
            terms = [RegressionTerm(pref_scale, v_pref + config.ref_weight * v_ref)]  # Eq. 15
        targets[name] = terms
        stats[f"drift_norm_pref/{name}"] = v_pref.norm(dim=1).mean().item()
        stats[f"drift_norm_ref/{name}"] = v_ref.norm(dim=1).mean().item()
    return targets, stats


def regression_loss(
    features: torch.Tensor | Mapping[str, torch.Tensor],
    targets: dict[str, list[RegressionTerm]],
    config: DriftConfig,
    rows: torch.Tensor | slice = slice(None),
    num_candidates: int | None = None,
) -> torch.Tensor:
    """Eq. 17 against detached targets: 1/(2K) sum_i ||z~_i - sg(z~_i + eta V_i)||^2 per term, summed.

    Its gradient is dL/dz~_i = -eta V_i / K (with ``loss_reduction="mean"``: -2 eta V_i / (K d)).
    ``features`` may be the candidates ``rows`` only (of ``num_candidates`` K in all): the loss is
    then that part of the full sum, so the chunks of a candidate set add up to the full loss and
    its gradient exactly.
    """
    if isinstance(features, torch.Tensor):
        features = {"features": features}
    total = 0.0
    for name, z in features.items():
        z = z.flatten(1).to(compute_dtype(z))
        count = num_candidates or len(z)
        for term in targets[name]:
            z_normalised = z / term.coord_scale
            target = (z_normalised + config.velocity_scale * term.velocity[rows]).detach()  # Eq. 16
            squared = (z_normalised - target).square().sum()
            scale = 0.5 / count if config.loss_reduction == "sum" else 1.0 / (count * z.shape[1])
            total = total + term.weight * scale * squared  # Eq. 17
    return total / len(features) if config.feature_reduction == "mean" else total


def drpo_loss(
    features: torch.Tensor | Mapping[str, torch.Tensor],
    ref_features: torch.Tensor | Mapping[str, torch.Tensor],
    winners: torch.Tensor,
    losers: torch.Tensor,
    config: DriftConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    """L_DrPO = 1/(2K) sum_i ||z~_i - sg(z~_i + eta V_i)||^2, V = V_pref + lambda V_ref (Eqs. 15-17).

    ``features`` carry gradient (Z), ``ref_features`` not (R); one tensor or a dict of named tensors,
    whose losses add. z~ = z / s_z are the normalised coordinates of Eq. 20 (s_z from the preference
    call's supports). Since the target is detached, dL/dz~_i = -eta V_i / K (Eq. 3).
    """
    targets, stats = drift_targets(features, ref_features, winners, losers, config)
    return regression_loss(features, targets, config), stats


# ---------------------------------------------------------------------------------------------
# 4. The one-step generator (Algorithm 1, line 4)
# ---------------------------------------------------------------------------------------------


def unet_inputs(condition: dict) -> dict:
    """UNet keyword arguments from a flat condition dict (SDXL's pooled text and time ids -> added_cond_kwargs)."""
    inputs = {"encoder_hidden_states": condition["encoder_hidden_states"]}
    if "text_embeds" in condition:
        inputs["added_cond_kwargs"] = {"text_embeds": condition["text_embeds"], "time_ids": condition["time_ids"]}
    return inputs


def one_step_latents(unet, scheduler, noise: torch.Tensor, condition: dict,
                     timesteps: Sequence[int] | None = None) -> torch.Tensor:
    """x = g_theta(eps, c): the stock pipeline's single step, differentiable (Algorithm 1, line 4).

    Mirrors ``pipe(..., num_inference_steps=1, guidance_scale=0.0, output_type="latent")`` (with
    ``timesteps=[t]`` when given: a distilled UNet's own step, e.g. DMD2's 399) through the scheduler's
    own methods: the noise is scaled by ``init_noise_sigma``, the UNet sees ``scale_model_input(...)``,
    and ``scheduler.step`` returns the x0 prediction (epsilon, v_prediction or sample; Euler, Euler
    ancestral, LCM, TCD). ``condition`` is a flat dict of per-sample tensors (``encode_prompts_sd`` /
    ``encode_prompts_sdxl``). ``scheduler`` should be a private copy: its step counter is reset here.
    """
    if timesteps is None:
        scheduler.set_timesteps(1, device=noise.device)
    else:
        scheduler.set_timesteps(timesteps=list(timesteps), device=noise.device)
    timestep = scheduler.timesteps[0]
    latents = noise * scheduler.init_noise_sigma
    model_input = scheduler.scale_model_input(latents, timestep)
    model_output = unet(model_input, timestep, **unet_inputs(condition), return_dict=False)[0]
    # The last ancestral step has sigma_up = 0, so the generator only sets where its zero noise comes from;
    # eta is the pipeline's default (0) for the schedulers that take one (DDIM, TCD).
    extra = {"eta": 0.0} if "eta" in inspect.signature(scheduler.step).parameters else {}
    generator = torch.Generator(device=noise.device).manual_seed(0)
    return scheduler.step(model_output, timestep, latents, generator=generator, return_dict=False, **extra)[0]


def one_step_latents_flow(transformer, scheduler, noise: torch.Tensor, condition: dict,
                          timesteps: Sequence[int] | None = None) -> torch.Tensor:
    """x = g_theta(eps, c) for a flow-matching transformer (FLUX.1-schnell): one Euler step from sigma = 1,
    x0 = eps - v, differentiable (Algorithm 1, line 4).

    Mirrors ``FluxPipeline(..., num_inference_steps=1, guidance_scale=0.0, output_type="latent")``: the
    noise is packed into 2x2 patches, the scheduler gets the pipeline's sigmas and shift ``mu``, the
    transformer sees ``t / 1000`` with zero text ids and the latent grid's image ids, and
    ``scheduler.step`` takes the Euler step. ``noise`` and the result are unpacked ``[B, C, h, w]``
    latents (as the VAE and the feature maps read them). ``timesteps`` must be None (flow matching's one
    step is sigma = 1); ``condition``: ``encode_prompts_flux``.
    """
    from diffusers import FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    if timesteps is not None:
        raise ValueError("a flow-matching one-step sample starts at sigma = 1; explicit timesteps do not apply")
    batch, channels, height, width = noise.shape
    latents = FluxPipeline._pack_latents(noise, batch, channels, height, width)
    config = scheduler.config
    mu = calculate_shift(latents.shape[1], config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                         config.get("base_shift", 0.5), config.get("max_shift", 1.15))
    scheduler.set_timesteps(sigmas=[1.0], device=noise.device, mu=mu)
    scheduler.set_begin_index(0)
    timestep = scheduler.timesteps[0]
    text = condition["encoder_hidden_states"]
    velocity = transformer(
        hidden_states=latents, timestep=timestep.expand(batch).to(latents.dtype) / 1000, guidance=None,
        pooled_projections=condition["pooled_projections"], encoder_hidden_states=text,
        txt_ids=torch.zeros(text.shape[1], 3, device=text.device, dtype=text.dtype),
        img_ids=FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, noise.device, text.dtype),
        return_dict=False)[0]
    latents = scheduler.step(velocity, timestep, latents, return_dict=False)[0]
    return FluxPipeline._unpack_latents(latents, height, width, vae_scale_factor=1)


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """VAE-decode latents to images in [0, 1] (fp32; fp64 from an fp64 VAE), differentiably, in the VAE's
    own dtype (no autocast: an fp32-kept SDXL VAE must not be run in fp16)."""
    latents = latents.to(vae.dtype) / vae.config.scaling_factor
    if getattr(vae.config, "shift_factor", None):
        latents = latents + vae.config.shift_factor
    with torch.autocast(latents.device.type, enabled=False):
        images = vae.decode(latents, return_dict=False)[0]
    return (images.to(compute_dtype(images)) / 2 + 0.5).clamp(0, 1)


def encode_prompts_sd(pipe, prompts: list[str], device, resolution: int | None = None) -> dict:
    """SD / SD-Turbo condition c: CLIP hidden states, via the pipeline's own ``encode_prompt`` (no CFG)."""
    prompt_embeds, _ = pipe.encode_prompt(prompts, device, 1, do_classifier_free_guidance=False)
    return {"encoder_hidden_states": prompt_embeds}


def encode_prompts_sdxl(pipe, prompts: list[str], device, resolution: int) -> dict:
    """SDXL / SDXL-Turbo condition c: both encoders' penultimate states (concatenated), the second's
    pooled output, and ``add_time_ids`` = (original size, crop top-left, target size) = (R, R, 0, 0, R, R)."""
    prompt_embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                                     do_classifier_free_guidance=False)
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=prompt_embeds.dtype)
    return {"encoder_hidden_states": prompt_embeds, "text_embeds": pooled,
            "time_ids": time_ids.to(device).expand(len(prompts), -1)}


def encode_prompts_flux(pipe, prompts: list[str], device, resolution: int | None = None) -> dict:
    """FLUX condition c: T5 hidden states and CLIP's pooled output, via the pipeline's own ``encode_prompt``,
    padded to the ``max_sequence_length`` its one-step call uses (``pipe.one_step_arguments``; FLUX.1-schnell
    allows at most 256; the pipeline's default is 512)."""
    length = (getattr(pipe, "one_step_arguments", None) or {}).get("max_sequence_length", 512)
    prompt_embeds, pooled, _ = pipe.encode_prompt(prompts, prompt_2=None, device=device, max_sequence_length=length)
    return {"encoder_hidden_states": prompt_embeds, "pooled_projections": pooled}


@contextlib.contextmanager
def lora_disabled(unet):
    """The frozen base model g_ref: the same UNet with its adapters disabled (no second copy); nests."""
    depth = getattr(unet, "_lora_disabled_depth", 0)
    if depth == 0:
        unet.disable_adapters()
    unet._lora_disabled_depth = depth + 1
    try:
        yield unet
    finally:
        unet._lora_disabled_depth = depth
        if depth == 0:
            unet.enable_adapters()
