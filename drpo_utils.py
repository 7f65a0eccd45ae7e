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

This module imports torch only: feature maps, rewards and run plumbing live in ``pipelines/``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# 1. Drift field (Appendix A)
# ---------------------------------------------------------------------------------------------

DRIFT_KERNELS = ("rbf", "laplacian", "exponential", "cosine")

# Epsilons only guard divisions by zero; they never change a well-posed result.
_EPS_SCALE = 1e-12  # eps_s and eps_z of Eqs. 19-20
_EPS_RMS = 1e-24  # eps_v of Eq. 25 (on the mean of squares)


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


def feature_scales(delta: torch.Tensor, weights: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch scale s = Mean_ij(w_j Delta_ij) / Mean_j(w_j) (Eq. 19) and s_z = s / sqrt(d) (Eq. 20)."""
    scale = ((delta * weights).mean() / weights.mean()).clamp_min(_EPS_SCALE)
    return scale, (scale / math.sqrt(dim)).clamp_min(_EPS_SCALE)


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

    ``mask_self`` excludes support ``neg[i]`` from query ``i`` (for i < Q): use it when the first Q
    negatives are the queries themselves (the authors' self-negatives, or V_ref's sg(Z)).
    ``mask_paired_positive`` likewise excludes ``pos[i]`` from query ``i`` (V_ref's base sample r_i,
    which shares z_i's noise): with both, V_ref compares Z and R leave-one-out and is 0 when Z = R.
    ``pos_weight`` / ``neg_weight`` are scalars or per-support vectors (the authors weight pairs
    3000x relative to self-negatives). Since V is RMS-normalised per radius, a common rescaling of
    all weights leaves V unchanged.
    """
    if z.ndim != 2 or pos.ndim != 2 or neg.ndim != 2:
        raise ValueError(f"z, pos, neg must be 2-D [count, dim]; got {z.shape}, {pos.shape}, {neg.shape}")
    if not (z.shape[1] == pos.shape[1] == neg.shape[1]):
        raise ValueError(f"feature dims differ: {z.shape[1]}, {pos.shape[1]}, {neg.shape[1]}")
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("drift_field needs at least one positive and one negative support")
    if mask_self and len(neg) < len(z):
        raise ValueError("mask_self needs the first Q negatives to be the Q queries")
    if mask_paired_positive and len(pos) < len(z):
        raise ValueError("mask_paired_positive needs a positive per query")

    compute_dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    queries = z.detach().to(compute_dtype)
    supports = torch.cat([neg, pos]).detach().to(compute_dtype)  # B = [B-; B+]
    num_neg, dim = len(neg), z.shape[1]
    weights = torch.cat(
        [_support_weights(neg_weight, num_neg, supports), _support_weights(pos_weight, len(pos), supports)]
    )

    delta = torch.cdist(queries, supports)  # Eq. 18
    scale, coord_scale = feature_scales(delta, weights, dim)  # Eqs. 19-20
    supports_normalised = supports / coord_scale
    distances = delta / scale
    cosine = F.normalize(queries, dim=1) @ F.normalize(supports, dim=1).T if kernel == "cosine" else None

    self_mask = None
    if mask_self or mask_paired_positive:
        self_mask = torch.zeros_like(delta, dtype=torch.bool)
        eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
        if mask_self:
            self_mask[:, : len(z)] = eye
        if mask_paired_positive:
            self_mask[:, num_neg : num_neg + len(z)] |= eye

    log_weights = weights.log()
    field = torch.zeros_like(queries)
    for radius in radii:
        logits = kernel_logits(distances, cosine, float(radius), kernel)  # Eq. 21
        if self_mask is not None:
            logits = logits.masked_fill(self_mask, float("-inf"))
        field = field + cross_mass_drift(logits, log_weights, supports_normalised, num_neg)  # Eqs. 22-25
    return field.to(z.dtype)


def cross_mass_drift(logits: torch.Tensor, log_weights: torch.Tensor, supports: torch.Tensor, num_neg: int):
    """RMS-normalised cross-mass drift of one radius (Eqs. 22-25), computed in log space.

    With A_ij = sqrt(softmax_j(L) softmax_i(L)) w_j (Eq. 22), masses m+-_i (Eq. 23) and the
    affinity-weighted support means mu+-_i = sum_j A+-_ij b~_j / m+-_i, Eq. 24 is
        V_i = m-_i sum_j A+_ij b~+_j - m+_i sum_j A-_ij b~-_j = m+_i m-_i (mu+_i - mu-_i).
    For small radii the products m+_i m-_i underflow float32 (exp(-1250 D^2) at rho = 0.02), so
    they are kept as logarithms and the common factor c = max_i m+_i m-_i is divided out before
    exponentiating. Eq. 25 is then applied to the true field c * V': unit RMS where its mean square
    exceeds eps_v, and left (vanishingly) small where it does not, exactly as the formula says.
    """
    # Eq. 22 in log space; a support whose every query is masked has no affinity (NaN -> -inf).
    log_affinity = 0.5 * (logits.log_softmax(dim=1) + logits.log_softmax(dim=0)) + log_weights
    log_affinity = log_affinity.nan_to_num(nan=float("-inf"))
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
    log_norm = 0.5 * torch.maximum(log_mean_square, math.log(_EPS_RMS) - 2 * log_common)
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


# ---------------------------------------------------------------------------------------------
# 3. The DrPO loss (Eqs. 15-17)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DriftConfig:
    """Hyper-parameters of the DrPO field (Eqs. 15-16, Appendix A)."""

    radii: tuple[float, ...] = (0.1, 0.2, 0.5)
    kernel: str = "rbf"
    ref_weight: float = 0.2  # lambda, Eq. 15
    velocity_scale: float = 1.0  # eta, Eq. 16
    pair_weight: float = 1.0  # w_j of the preference supports (authors: 3000)
    self_negatives: bool = False  # add sg(Z) as self-masked negatives of V_pref (authors' code)
    # Leave-one-out reference drift: z_i does not see its own copy in sg(Z) nor its paired base
    # sample r_i in R (Eq. 14 wants independent sample sets; Appendix A is silent; the authors' code
    # masks the self copy). Unmasked, the copy at distance 0 dominates Eq. 22 and V_ref_i becomes a
    # unit-RMS pull of every sample onto its own reference, which freezes the generator (README).
    mask_self: bool = True

    def __post_init__(self):
        if self.kernel not in DRIFT_KERNELS:
            raise ValueError(f"Unknown drift kernel {self.kernel!r}; choose one of {', '.join(DRIFT_KERNELS)}.")
        if not self.radii or any(r <= 0 for r in self.radii):
            raise ValueError(f"drift radii must be positive, got {self.radii}")


def preference_supports(z: torch.Tensor, winners, losers, config: DriftConfig) -> dict:
    """Supports of V_pref: A+ = Z[winners], A- = Z[losers] (Eq. 12), plus sg(Z) as self-masked
    unit-weight negatives when ``config.self_negatives`` (the authors' code)."""
    queries = z.detach()
    pos, neg = queries[winners], queries[losers]
    pos_weight = neg_weight = config.pair_weight
    if not config.self_negatives:
        return dict(pos=pos, neg=neg, pos_weight=pos_weight, neg_weight=neg_weight, mask_self=False)
    neg_weight = torch.cat([queries.new_ones(len(queries)), queries.new_full((len(losers),), config.pair_weight)])
    return dict(pos=pos, neg=torch.cat([queries, neg]), pos_weight=pos_weight, neg_weight=neg_weight, mask_self=True)


def preference_field(z: torch.Tensor, winners, losers, config: DriftConfig) -> torch.Tensor:
    """V_pref = DriftField(Z, A+, A-) (Eq. 13); zero when all rewards tie (no pairs)."""
    if len(winners) == 0:
        return torch.zeros_like(z.detach())
    return drift_field(z, radii=config.radii, kernel=config.kernel, **preference_supports(z, winners, losers, config))


def reference_field(z: torch.Tensor, z_ref: torch.Tensor, config: DriftConfig) -> torch.Tensor:
    """V_ref = DriftField(Z, R, sg(Z)): attraction to the base model's samples (Eq. 14)."""
    queries = z.detach()
    return drift_field(queries, z_ref.detach(), queries, config.radii, kernel=config.kernel,
                       mask_self=config.mask_self, mask_paired_positive=config.mask_self)


def loss_coordinate_scale(z: torch.Tensor, z_ref: torch.Tensor, winners, losers, config: DriftConfig) -> torch.Tensor:
    """s_z (Eq. 20) of the preference call — the coordinates z~ = z / s_z in which Eq. 17 is taken.

    With no pairs (all rewards tied) the reference call's s_z is used instead.
    """
    queries = z.detach().float()
    if len(winners):
        supports = preference_supports(queries, winners, losers, config)
        pos, neg = supports["pos"], supports["neg"]
        weights = torch.cat([
            _support_weights(supports["neg_weight"], len(neg), queries),
            _support_weights(supports["pos_weight"], len(pos), queries),
        ])
        support_set = torch.cat([neg, pos])
    else:
        support_set, weights = torch.cat([queries, z_ref.detach().float()]), queries.new_ones(2 * len(queries))
    return feature_scales(torch.cdist(queries, support_set), weights, queries.shape[1])[1]


def drpo_loss(
    features: torch.Tensor | Mapping[str, torch.Tensor],
    ref_features: torch.Tensor | Mapping[str, torch.Tensor],
    winners: torch.Tensor,
    losers: torch.Tensor,
    config: DriftConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    """L_DrPO = 1/(2K) sum_i ||z~_i - sg(z~_i + eta V_i)||^2, V = V_pref + lambda V_ref (Eqs. 15-17).

    ``features`` are the current generator's features Z (with gradient), ``ref_features`` the frozen
    base model's features R for the same noises and prompt. Either may be one tensor [K, ...] or a
    dict of named tensors (multi-layer feature maps): each gets its own field and the losses add.
    z~ = z / s_z are the normalised coordinates of Eq. 20 (s_z from the preference call's supports).
    Since the target is detached, dL/dz~_i = -eta V_i / K (Eq. 3).
    """
    if isinstance(features, torch.Tensor):
        features, ref_features = {"features": features}, {"features": ref_features}
    total, stats = 0.0, {}
    for name, z in features.items():
        z = z.flatten(1)
        z_ref = ref_features[name].flatten(1)
        v_pref = preference_field(z, winners, losers, config)
        v_ref = reference_field(z, z_ref, config)
        velocity = v_pref + config.ref_weight * v_ref  # Eq. 15
        coord_scale = loss_coordinate_scale(z, z_ref, winners, losers, config)
        z_normalised = z.float() / coord_scale
        target = (z_normalised + config.velocity_scale * velocity.float()).detach()  # Eq. 16
        total = total + 0.5 * (z_normalised - target).square().sum(dim=1).mean()  # Eq. 17
        stats[f"drift_norm_pref/{name}"] = v_pref.norm(dim=1).mean().item()
        stats[f"drift_norm_ref/{name}"] = v_ref.norm(dim=1).mean().item()
    return total, stats


# ---------------------------------------------------------------------------------------------
# 4. The one-step generator (Algorithm 1, line 4)
# ---------------------------------------------------------------------------------------------


def unet_inputs(condition: dict) -> dict:
    """UNet keyword arguments from a flat condition dict (SDXL's pooled text and time ids -> added_cond_kwargs)."""
    inputs = {"encoder_hidden_states": condition["encoder_hidden_states"]}
    if "text_embeds" in condition:
        inputs["added_cond_kwargs"] = {"text_embeds": condition["text_embeds"], "time_ids": condition["time_ids"]}
    return inputs


def one_step_latents(unet, scheduler, noise: torch.Tensor, condition: dict) -> torch.Tensor:
    """x = g_theta(eps, c): the stock pipeline's single step at t = T, differentiable.

    Mirrors ``pipe(..., num_inference_steps=1, guidance_scale=0.0, output_type="latent")`` through
    the scheduler's own methods: the noise is scaled by ``init_noise_sigma``, the UNet sees
    ``scale_model_input(...)``, and ``scheduler.step`` returns the x0 prediction (epsilon or
    v_prediction). ``condition`` is a flat dict of per-sample tensors (``encode_prompts_sd`` /
    ``encode_prompts_sdxl``). ``scheduler`` should be a private copy: its step counter is reset here.
    """
    scheduler.set_timesteps(1, device=noise.device)
    timestep = scheduler.timesteps[0]
    latents = noise * scheduler.init_noise_sigma
    model_input = scheduler.scale_model_input(latents, timestep)
    model_output = unet(model_input, timestep, **unet_inputs(condition), return_dict=False)[0]
    # The last ancestral step has sigma_up = 0, so the generator only sets where its zero noise comes from.
    generator = torch.Generator(device=noise.device).manual_seed(0)
    return scheduler.step(model_output, timestep, latents, generator=generator, return_dict=False)[0]


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """VAE-decode latents to images in [0, 1], differentiably, in the VAE's own dtype (no autocast:
    an fp32-kept SDXL VAE must not be run in fp16)."""
    latents = latents.to(vae.dtype) / vae.config.scaling_factor
    if getattr(vae.config, "shift_factor", None):
        latents = latents + vae.config.shift_factor
    with torch.autocast(latents.device.type, enabled=False):
        images = vae.decode(latents, return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)


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



@contextlib.contextmanager
def lora_disabled(unet):
    """The frozen base model g_ref: the same UNet with its adapters disabled (no second copy)."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()
