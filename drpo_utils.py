"""Drifting Preference Optimization (DrPO, arXiv 2606.02521) — the method and shared plumbing.

Equation numbers refer to the paper. The file reads top to bottom like Section 4 + Appendix A:

1. ``drift_field``        — the finite-batch drift estimator (Appendix A, Eqs. 18-26).
2. ``sample_reward_pairs`` — reward-ordered pairs from K candidates (Section 4.2, Eq. 12).
3. ``drpo_loss``          — V = V_pref + lambda V_ref, detached target, regression (Eqs. 15-17).
4. one-step generation, feature maps and rewards (Algorithm 1, lines 4-6).
5. training plumbing shared by ``train_drpo.py`` and ``train_drpo_sdxl.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import shutil
import urllib.error
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from pipelines import latent_mae

logger = logging.getLogger(__name__)

# Named colours (RGB in [0, 1]) shared by the tiny models' captions and the ``color_match`` reward.
COLORS = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.75, 0.2),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.85, 0.1),
    "purple": (0.6, 0.15, 0.8),
    "cyan": (0.1, 0.85, 0.9),
    "orange": (1.0, 0.5, 0.05),
    "white": (0.97, 0.97, 0.97),
}

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
# 4. One-step generation (Algorithm 1, line 4)
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


# ---------------------------------------------------------------------------------------------
# 5. Feature maps phi (Section 4.1): frozen, differentiable, returning named tensors
# ---------------------------------------------------------------------------------------------


class FeatureMap(torch.nn.Module):
    """phi: ``forward(latents, images) -> {name: [N, ...]}``; ``images`` is None unless ``needs_images``."""

    needs_images = False

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the feature network's activations in backward (no-op for weight-free maps)."""

    def check_vae(self, vae) -> None:
        """Warn when phi was trained for another latent space than this generator's VAE (default: any fits)."""


class LatentFeatures(FeatureMap):
    """phi(x) = the raw x0 latent (Table 3b "Latent")."""

    def forward(self, latents: torch.Tensor, images: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return {"latent": latents.float().flatten(1)}


class ImageFeatures(FeatureMap):
    """phi(x) on the VAE-decoded image: multi-scale average-pooled RGB plus colour moments.

    Three tensors (one drift each, Contract 1): the image pooled to ``fine`` and ``coarse`` grids,
    and per-channel mean / std. A weight-free pixel-space map for small models and tests; the
    paper's learned maps (latent-MAE, DINOv2, MAE) plug into the same registry.
    """

    needs_images = True

    def __init__(self, fine: int = 16, coarse: int = 4):
        super().__init__()
        self.fine, self.coarse = fine, coarse

    def forward(self, latents: torch.Tensor, images: torch.Tensor) -> dict[str, torch.Tensor]:
        images = images.float()
        return {
            "image_fine": F.adaptive_avg_pool2d(images, self.fine).flatten(1),
            "image_coarse": F.adaptive_avg_pool2d(images, self.coarse).flatten(1),
            "color_moments": torch.cat([images.mean((2, 3)), images.std((2, 3))], dim=1),
        }


class ImageTransformerFeatures(FeatureMap):
    """A frozen ViT on the VAE-decoded image (transformers weights), pooled into four feature tensors.

    The image is resized to ``input_size`` (bicubic, antialiased) and normalised with ImageNet
    statistics; from the last hidden states come the CLS token, the mean and std of the patch tokens,
    and the patch tokens average-pooled to a 2x2 grid: four tensors, one drift each.
    """

    needs_images = True
    DEFAULT_WEIGHTS = ""
    IMAGENET_MEAN = (0.485, 0.456, 0.406)
    IMAGENET_STD = (0.229, 0.224, 0.225)

    def __init__(self, path: str | None = None):
        super().__init__()
        self.model = self.load(path or self.DEFAULT_WEIGHTS)
        self.register_buffer("mean", torch.tensor(self.IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def load(self, path: str):
        raise NotImplementedError

    @property
    def input_size(self) -> int:
        return self.model.config.image_size

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Last hidden states [N, 1 + patches, width], patches in row-major order."""
        raise NotImplementedError

    def enable_gradient_checkpointing(self) -> None:
        """transformers only checkpoints in train mode; with zero dropout that changes nothing else."""
        config = self.model.config
        if config.hidden_dropout_prob or config.attention_probs_dropout_prob:
            raise ValueError(f"gradient checkpointing of {type(self).__name__} needs a config without dropout")
        self.model.gradient_checkpointing_enable()
        self.model.train()

    def forward(self, latents: torch.Tensor, images: torch.Tensor) -> dict[str, torch.Tensor]:
        size = self.input_size
        pixels = F.interpolate(images.float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        pixels = ((pixels - self.mean) / self.std).to(self.model.dtype)
        hidden = self.encode(pixels).float()
        grid = size // self.model.config.patch_size
        patches = hidden[:, 1 : 1 + grid * grid]
        patch_grid = patches.transpose(1, 2).reshape(len(pixels), -1, grid, grid)
        return {
            "cls": hidden[:, 0],
            "patch_mean": patches.mean(1),
            "patch_std": patches.std(1),
            "patch_2x2": F.adaptive_avg_pool2d(patch_grid, 2).flatten(1),
        }


class ViTMAEFeatures(ImageTransformerFeatures):
    """Pixel-space MAE (the paper's map for SDXL-Turbo): ``ViTMAEModel`` with masking off and the
    identity patch shuffle, at its 224 px input."""

    DEFAULT_WEIGHTS = "facebook/vit-mae-base"

    def load(self, path: str):
        from transformers import ViTMAEModel

        return ViTMAEModel.from_pretrained(path, mask_ratio=0.0)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = (self.input_size // self.model.config.patch_size) ** 2
        keep_order = torch.arange(patches, device=pixels.device, dtype=torch.float32).expand(len(pixels), -1)
        return self.model(pixel_values=pixels, noise=keep_order).last_hidden_state


class DINOv2Features(ImageTransformerFeatures):
    """VAE-decode + DINOv2 (Table 3b "VAE-dec.+DINOv2"): ``Dinov2Model`` at 224 px, as its processor crops."""

    DEFAULT_WEIGHTS = "facebook/dinov2-base"

    def load(self, path: str):
        from transformers import Dinov2Model

        return Dinov2Model.from_pretrained(path)

    @property
    def input_size(self) -> int:
        return 224 // self.model.config.patch_size * self.model.config.patch_size

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels).last_hidden_state


def activation_statistics(name: str, activation: torch.Tensor, patch_sizes=(2, 4)) -> dict[str, torch.Tensor]:
    """The drifting models' pooled features of one activation [N, C, H, W], in float32.

    ``{name}_mean`` / ``{name}_std``: per-channel mean and std over space, [N, C]; ``{name}_mean_{p}`` /
    ``{name}_std_{p}``: the same inside each p x p patch, row-major patches flattened to [N, H*W/p^2 * C]
    (only when p divides H and W). std = sqrt(var + 1e-6), as in the release, so it stays differentiable
    where an activation is constant.
    """
    x = activation.float()
    n, c, h, w = x.shape

    def mean_and_std(values: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        variance = values.var(dim=dim, unbiased=False)
        return values.mean(dim=dim), (variance + 1e-6).sqrt()

    stats = dict(zip((f"{name}_mean", f"{name}_std"), mean_and_std(x.flatten(2), dim=2)))
    for size in patch_sizes:
        if h % size or w % size:
            continue
        patches = x.view(n, c, h // size, size, w // size, size).permute(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(n, (h // size) * (w // size), c, size * size)
        patch_mean, patch_std = mean_and_std(patches, dim=3)
        stats.update({f"{name}_mean_{size}": patch_mean.flatten(1), f"{name}_std_{size}": patch_std.flatten(1)})
    return stats


class LatentMAEFeatures(FeatureMap):
    """latent-MAE1 (Table 3b, the paper's SD-Turbo default): the drifting models' latent-MAE encoder on the
    x0 latent (SD-VAE latents times the scaling factor, as the encoder was trained), multi-layer.

    Sources: every stage output ``layer{s}`` and every second block inside a stage ``layer{s}_blk{b}``;
    each gives ``activation_statistics`` (mean/std globally and over 2x2 / 4x4 patches), one drift each.
    """

    DEFAULT_WEIGHTS = latent_mae.DEFAULT_WEIGHTS

    def __init__(self, path: str | None = None):
        super().__init__()
        self.encoder = latent_mae.load_latent_mae(path or self.DEFAULT_WEIGHTS)
        self.sources = self.source_names(self.encoder.config["layers"])

    @staticmethod
    def source_names(layers) -> list[str]:
        names = []
        for stage, depth in enumerate(layers, start=1):
            names += [f"layer{stage}_blk{block}" for block in range(2, depth, 2)] + [f"layer{stage}"]
        return names

    def enable_gradient_checkpointing(self) -> None:
        self.encoder.gradient_checkpointing = True

    def check_vae(self, vae) -> None:
        if vae.config.scaling_factor != latent_mae.SD_VAE_SCALING_FACTOR or vae.config.latent_channels != 4:
            logger.warning(
                "the latent-MAE was trained on SD-VAE latents (4 channels, scaling factor %s); this VAE has %s "
                "channels and scaling factor %s, so its features may mean little (SDXL: use vit_mae)",
                latent_mae.SD_VAE_SCALING_FACTOR, vae.config.latent_channels, vae.config.scaling_factor)

    def forward(self, latents: torch.Tensor, images: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        activations = self.encoder(latents.to(self.encoder.conv1.weight.dtype))
        features = {}
        for name in self.sources:
            features.update(activation_statistics(name, activations[name]))
        return features


class LatentMAELastThreeFeatures(LatentMAEFeatures):
    """latent-MAE2 (Table 3b): the last three stage outputs only."""

    @staticmethod
    def source_names(layers) -> list[str]:
        return [f"layer{stage}" for stage in range(len(layers) - 2, len(layers) + 1)]


class LatentMAEFinalFeatures(LatentMAEFeatures):
    """latent-MAE3 (Table 3b): the final stage output only."""

    @staticmethod
    def source_names(layers) -> list[str]:
        return [f"layer{len(layers)}"]


FEATURE_MAPS: dict[str, Callable[..., FeatureMap]] = {
    "latent_mae": LatentMAEFeatures, "latent_mae1": LatentMAEFeatures, "latent_mae2": LatentMAELastThreeFeatures,
    "latent_mae3": LatentMAEFinalFeatures,
    "latent": LatentFeatures, "image": ImageFeatures, "vit_mae": ViTMAEFeatures, "dinov2": DINOv2Features,
}
WEIGHTED_FEATURE_MAPS = {name for name, cls in FEATURE_MAPS.items() if getattr(cls, "DEFAULT_WEIGHTS", "")}  # take a path


def build_feature_map(name: str, path: str | None = None) -> FeatureMap:
    """A frozen feature map from the registry, in eval mode, with a clear error for missing weights."""
    if name not in FEATURE_MAPS:
        raise ValueError(f"Unknown feature extractor {name!r}; choose one of {', '.join(FEATURE_MAPS)}.")
    if name not in WEIGHTED_FEATURE_MAPS:
        return FEATURE_MAPS[name]().eval().requires_grad_(False)
    try:
        feature_map = FEATURE_MAPS[name](path)
    except OSError as error:
        weights = path or FEATURE_MAPS[name].DEFAULT_WEIGHTS
        raise OSError(
            f"feature extractor {name!r} needs the weights {weights!r} (downloaded from the Hub, or a local folder "
            f"given with --feature_extractor_path); loading failed: {error}"
        ) from error
    return feature_map.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# 6. Rewards (used only to rank candidates, always under no_grad on detached CPU images)
# ---------------------------------------------------------------------------------------------

RewardFn = Callable[[torch.Tensor, list[str]], object]


class RewardError(RuntimeError):
    """A reward returned something DrPO cannot rank with (wrong count, NaN, non-numbers)."""


def _jpeg_kilobytes(images: torch.Tensor) -> torch.Tensor:
    import io

    from PIL import Image

    sizes = []
    for image in (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy():
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=95)
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes)


def jpeg_compressibility(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Negative JPEG size in kB (DDPO's compressibility reward): smoother images score higher."""
    return -_jpeg_kilobytes(images)


def jpeg_incompressibility(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """JPEG size in kB (DDPO's incompressibility reward): more detailed images score higher."""
    return _jpeg_kilobytes(images)


def color_match(images: torch.Tensor, prompts: list[str], width: float = 0.25) -> torch.Tensor:
    """Share of the image painted in the colour the prompt names (0 if it names none of COLORS).

    Fits the embedded tiny models' captions ("a small red circle ..."): it rewards larger, more
    saturated objects of the requested colour.
    """
    scores = []
    for image, prompt in zip(images, prompts):
        named = [word for word in prompt.lower().replace(",", " ").split() if word in COLORS]
        if not named:
            scores.append(0.0)
            continue
        target = torch.tensor(COLORS[named[0]], dtype=image.dtype).view(3, 1, 1)
        closeness = torch.exp(-(image - target).square().sum(0) / (2 * width**2))
        scores.append(closeness.mean().item())
    return torch.tensor(scores)


REWARDS: dict[str, RewardFn] = {
    "color_match": color_match,
    "jpeg_compressibility": jpeg_compressibility,
    "jpeg_incompressibility": jpeg_incompressibility,
}


def reward_choices() -> list[str]:
    from pipelines.rewards import MODEL_REWARDS

    return [*REWARDS, *MODEL_REWARDS]


def _custom_reward(spec: str) -> RewardFn:
    """``path/to/file.py:function`` or ``package.module:function``."""
    import importlib
    import importlib.util

    location, function_name = spec.rsplit(":", 1)
    if location.endswith(".py"):
        if not os.path.isfile(location):
            raise FileNotFoundError(f"reward file {location!r} does not exist")
        module_spec = importlib.util.spec_from_file_location(f"drpo_custom_reward_{abs(hash(location))}", location)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(location)
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ValueError(f"{location!r} has no callable {function_name!r} to use as a reward")
    return function


def load_reward(spec: str, device="cpu", weights: Sequence[float] | None = None) -> RewardFn:
    """A reward from its spec (Contract 4):

    - a built-in name (``color_match``, ``jpeg_compressibility``, ...) or a model reward
      (``pickscore``, ``clip``; loaded on ``device``, with a clear error naming missing weights);
    - ``path/to/file.py:function`` or ``package.module:function``;
    - ``http://host:port/score``: a reward server (``pipelines/reward_server.py``);
    - ``a,b,...``: a mixture, each component standardised per prompt, weighted by ``weights``.
    """
    from pipelines import rewards as model_rewards

    parts = [part.strip() for part in spec.split(",")] if "," in spec and "://" not in spec else [spec]
    if len(parts) > 1:
        components = {part: load_reward(part, device) for part in parts}
        return model_rewards.MixtureReward(components, list(weights) if weights else [1.0] * len(parts))
    if spec.startswith(("http://", "https://")):
        return model_rewards.RemoteReward(spec)
    if spec in REWARDS:
        return REWARDS[spec]
    if spec in model_rewards.MODEL_REWARDS:
        factory, downloads = model_rewards.MODEL_REWARDS[spec]
        try:
            return factory(device=device)
        except (OSError, urllib.error.URLError) as error:
            raise OSError(f"reward {spec!r} needs the weights {downloads}; loading failed: {error}") from error
    if ":" in spec:
        return _custom_reward(spec)
    raise ValueError(
        f"Unknown reward {spec!r}; choose one of {', '.join(reward_choices())}, a mixture like "
        "pickscore,clip, a server URL http://host:port/score, or path/to/file.py:function / module:function."
    )


def check_reward_spec(spec: str, weights: Sequence[float] | None) -> None:
    """Cheap validation of --reward / --reward_weights (no model loading): names, files, weight count."""
    parts = [part.strip() for part in spec.split(",")] if "," in spec and "://" not in spec else [spec]
    if weights is not None and len(weights) != len(parts):
        raise ValueError(f"--reward_weights has {len(weights)} values for {len(parts)} rewards in {spec!r}")
    for part in parts:
        if part in reward_choices() or part.startswith(("http://", "https://")):
            continue
        load_reward(part)  # custom functions: the file / module must exist; unknown names list the choices


@torch.no_grad()
def score_candidates(reward_fn: RewardFn, images: torch.Tensor, prompts: list[str], name: str) -> torch.Tensor:
    """Rank-only reward call (Contract 4): float32 [N, 3, H, W] in [0, 1] on the CPU -> N finite floats."""
    images = images.detach().float().clamp(0, 1).cpu()
    raw = reward_fn(images, list(prompts))
    try:
        scores = torch.as_tensor(raw, dtype=torch.float64).flatten()
    except (TypeError, ValueError, RuntimeError) as error:
        raise RewardError(f"reward {name!r} did not return numbers: {str(raw)[:200]}") from error
    if len(scores) != len(images):
        raise RewardError(f"reward {name!r} returned {len(scores)} scores for {len(images)} images")
    if not torch.isfinite(scores).all():
        raise RewardError(f"reward {name!r} returned non-finite scores: {scores.tolist()}")
    return scores  # float64: a float32 cast would create artificial ties


# ---------------------------------------------------------------------------------------------
# 7. Training plumbing shared by train_drpo.py and train_drpo_sdxl.py
# ---------------------------------------------------------------------------------------------

LORA_TARGET_MODULES = "to_q,to_k,to_v,to_out.0"


def add_training_args(parser, default_resolution: int = 512, default_feature_extractor: str = "latent_mae"):
    """The diffusers-examples flags plus DrPO's own; both scripts call this, then add their extras."""
    add = parser.add_argument
    # Model and output (diffusers conventions)
    add("--pretrained_model_name_or_path", required=True, help="Hub id or local folder of the one-step model.")
    add("--revision", default=None)
    add("--variant", default=None, help='Weights variant, e.g. "fp16".')
    add("--output_dir", default="drpo-output")
    add("--seed", type=int, default=None)
    add("--resolution", type=int, default=default_resolution)
    add("--rank", type=int, default=16, help="LoRA rank (paper: 16).")
    add("--lora_alpha", type=int, default=None, help="LoRA alpha (default: equal to --rank).")
    add("--lora_target_modules", default=LORA_TARGET_MODULES)
    # Prompts
    add("--prompts_file", default=None, help="A .txt file (one prompt per line) or .jsonl with a 'prompt' key.")
    add("--dataset_name", default=None, help="A datasets name or local folder holding prompts.")
    add("--dataset_split", default="train")
    add("--prompt_column", default="prompt")
    # DrPO (Algorithm 1, Eqs. 15-16, Appendix A)
    add("--reward", default="color_match",
        help="A name (color_match, jpeg_compressibility, jpeg_incompressibility, pickscore, clip, aesthetic, "
             "hpsv2, hpsv21, imagereward, hpsv3, geneval), file.py:function, module:function, a server URL "
             "http://host:port/score, or a comma-separated mixture.")
    add("--reward_weights", type=lambda v: [float(x) for x in v.split(",")], default=None,
        help="Weights of a mixture's components (default: all 1); components are standardised per prompt.")
    add("--feature_extractor", default=default_feature_extractor, help=f"One of {', '.join(FEATURE_MAPS)}.")
    add("--feature_extractor_path", default=None,
        help="The feature network's weights: a local folder, a Hub id, or for latent_mae a Flax release "
             "folder (local or 'owner/repo/folder' on the Hub) or a converted .safetensors file. "
             "Default: the published weights.")
    add("--num_candidates", type=int, default=24, help="K candidates per prompt (paper: 24).")
    add("--num_pairs", type=int, default=12, help="M reward-ordered pairs per prompt (paper: 12).")
    add("--ref_weight", type=float, default=0.2, help="lambda: weight of the reference drift (Eq. 15).")
    add("--velocity_scale", type=float, default=1.0, help="eta: target step z + eta V (Eq. 16).")
    add("--drift_radii", default="0.1,0.2,0.5",
        help="Comma-separated kernel radii rho (Appendix A; the authors' code: 0.02,0.05,0.2 with an affinity floor).")
    add("--drift_kernel", default="rbf", choices=DRIFT_KERNELS)
    add("--pair_weight", type=float, default=1.0, help="Support weight of A+/A- (authors' code: 3000).")
    add("--self_negatives", action="store_true", help="Add sg(Z) as self-masked negatives (authors' code).")
    add("--mask_self", action=argparse.BooleanOptionalAction, default=True,
        help="Mask each sample's own copy among the reference drift's negatives sg(Z) (authors' code). "
             "--no-mask_self gives the literal, unmasked Eq. 22.")
    # Optimisation (diffusers conventions)
    add("--train_batch_size", type=int, default=1, help="Prompts per process per micro-step (K candidates each).")
    add("--gradient_accumulation_steps", type=int, default=1)
    add("--gradient_checkpointing", action="store_true")
    add("--max_train_steps", type=int, default=1000)
    add("--learning_rate", type=float, default=1e-4)
    add("--lr_scheduler", default="constant")
    add("--lr_warmup_steps", type=int, default=0)
    add("--adam_beta1", type=float, default=0.9)
    add("--adam_beta2", type=float, default=0.999)
    add("--adam_weight_decay", type=float, default=1e-2)
    add("--adam_epsilon", type=float, default=1e-8)
    add("--max_grad_norm", type=float, default=1.0)
    add("--mixed_precision", default=None, choices=["no", "fp16", "bf16"])
    add("--allow_tf32", action="store_true")
    # Checkpoints, logging, validation, Hub
    add("--checkpointing_steps", type=int, default=500)
    add("--checkpoints_total_limit", type=int, default=None)
    add("--resume_from_checkpoint", default=None, help='"latest" or a path / name like checkpoint-500.')
    add("--report_to", default="tensorboard", help='"tensorboard", "wandb", "all" or "none".')
    add("--logging_dir", default="logs")
    add("--validation_prompts", default=None, help="'|'-separated prompts for sample grids (default: first 4 prompts).")
    add("--validation_steps", type=int, default=100)
    add("--num_validation_seeds", type=int, default=4)
    add("--push_to_hub", action="store_true")
    add("--hub_model_id", default=None)
    add("--hub_token", default=None)
    return parser


def drift_config_from_args(args) -> DriftConfig:
    return DriftConfig(
        radii=tuple(float(r) for r in str(args.drift_radii).split(",")), kernel=args.drift_kernel,
        ref_weight=args.ref_weight, velocity_scale=args.velocity_scale, pair_weight=args.pair_weight,
        self_negatives=args.self_negatives, mask_self=args.mask_self,
    )


def check_args(args) -> None:
    """Fail on bad input before any model is loaded."""
    if args.num_candidates < 2:
        raise ValueError(f"--num_candidates (K) must be at least 2, got {args.num_candidates}")
    if not 1 <= args.num_pairs <= max_pairs(args.num_candidates):
        raise ValueError(
            f"--num_pairs (M) must be in [1, {max_pairs(args.num_candidates)}] = [1, K(K-1)/2] for "
            f"K={args.num_candidates}, got {args.num_pairs}"
        )
    if args.feature_extractor not in FEATURE_MAPS:
        raise ValueError(f"Unknown feature extractor {args.feature_extractor!r}; choose one of {', '.join(FEATURE_MAPS)}.")
    drift_config_from_args(args)  # validates kernel and radii
    check_reward_spec(args.reward, args.reward_weights)  # unknown names list the choices; files must exist
    for flag in ("checkpointing_steps", "max_train_steps", "gradient_accumulation_steps", "train_batch_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.prompts_file is None and args.dataset_name is None:
        raise ValueError("give prompts with --prompts_file or --dataset_name")
    if args.resume_from_checkpoint not in (None, "latest"):
        path = resolve_checkpoint_path(args.output_dir, args.resume_from_checkpoint)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"--resume_from_checkpoint {args.resume_from_checkpoint!r}: {path} does not exist")
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("--mixed_precision fp16 needs a GPU; on the CPU use --mixed_precision bf16 or no")
    if args.push_to_hub and hub_token(args) is None:
        raise ValueError("--push_to_hub needs Hub credentials: run `hf auth login`, set HF_TOKEN, or pass --hub_token")


def load_prompts(args) -> list[str]:
    """Training prompts from a .txt / .jsonl file or a ``datasets`` dataset; never empty."""
    if args.prompts_file is not None:
        if not os.path.isfile(args.prompts_file):
            raise FileNotFoundError(f"--prompts_file {args.prompts_file!r} does not exist")
        with open(args.prompts_file, encoding="utf-8") as handle:
            lines = [line.strip() for line in handle if line.strip()]
        if args.prompts_file.endswith(".jsonl"):
            lines = [json.loads(line)[args.prompt_column] for line in lines]
        prompts = lines
        source = args.prompts_file
    else:
        from datasets import load_dataset

        dataset = load_dataset(args.dataset_name, split=args.dataset_split)
        if args.prompt_column not in dataset.column_names:
            raise ValueError(f"--prompt_column {args.prompt_column!r} not in {dataset.column_names}")
        prompts = [p.strip() for p in dataset[args.prompt_column] if p and p.strip()]
        source = args.dataset_name
    if not prompts:
        raise ValueError(f"no prompts found in {source!r}")
    return prompts


def hub_token(args) -> str | None:
    from huggingface_hub import get_token

    return args.hub_token or get_token()


def add_lora(unet, args) -> None:
    """Attach the trainable LoRA adapter ("default") to the frozen UNet (paper: rank 16, attention)."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=args.rank, lora_alpha=args.lora_alpha or args.rank, init_lora_weights="gaussian",
            target_modules=[m.strip() for m in args.lora_target_modules.split(",")],
        )
    )


def save_lora(directory: str, unet, pipeline_cls) -> None:
    """``pytorch_lora_weights.safetensors`` (keys ``unet.*``) with the adapter metadata (alpha, rank)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state_dict = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    pipeline_cls.save_lora_weights(
        directory, unet_lora_layers=state_dict, unet_lora_adapter_metadata=unet.peft_config["default"].to_dict()
    )


def load_lora_into_adapter(directory: str, unet, pipeline_cls) -> None:
    """Load saved LoRA weights into the *existing* "default" adapter (never a new ``default_1``)."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    state_dict = pipeline_cls.lora_state_dict(directory)[0]
    unet_state = {k.removeprefix("unet."): v for k, v in state_dict.items() if k.startswith("unet.")}
    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(unet_state), adapter_name="default")
    if getattr(result, "unexpected_keys", None):
        raise RuntimeError(f"checkpoint LoRA does not match the model: {result.unexpected_keys[:5]}")


def register_lora_checkpoint_hooks(accelerator, unet, pipeline_cls) -> None:
    """Make ``accelerator.save_state`` store only the LoRA (loadable by ``load_lora_weights``)."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            save_lora(output_dir, accelerator.unwrap_model(unet), pipeline_cls)
        weights.clear()

    def load_hook(models, input_dir):
        load_lora_into_adapter(input_dir, accelerator.unwrap_model(unet), pipeline_cls)
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def resolve_checkpoint_path(output_dir: str, name: str) -> str:
    return name if os.path.isabs(name) or os.path.dirname(name) else os.path.join(output_dir, name)


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints ``checkpoint-N`` in ``output_dir``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    names = [d for d in os.listdir(output_dir) if re.fullmatch(r"checkpoint-\d+", d)]
    return sorted(names, key=lambda d: int(d.split("-")[1]))


def find_resume_checkpoint(args) -> str | None:
    """The checkpoint to resume from: ``latest`` may find none (fresh start), a named one must exist."""
    if args.resume_from_checkpoint is None:
        return None
    if args.resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(args.output_dir)
        return os.path.join(args.output_dir, checkpoints[-1]) if checkpoints else None
    return resolve_checkpoint_path(args.output_dir, args.resume_from_checkpoint)


def save_checkpoint(accelerator, args, global_step: int) -> None:
    """Atomically write ``checkpoint-N`` (state + LoRA), then prune to ``--checkpoints_total_limit``.

    The state is written to ``checkpoint-N.tmp`` and renamed, so an interrupted save never leaves a
    half-written checkpoint; older checkpoints are removed only after the new one exists.
    """
    final = os.path.join(args.output_dir, f"checkpoint-{global_step}")
    staging = final + ".tmp"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(staging)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        if args.checkpoints_total_limit is not None:
            for old in list_checkpoints(args.output_dir)[: -args.checkpoints_total_limit]:
                shutil.rmtree(os.path.join(args.output_dir, old))
    accelerator.wait_for_everyone()


def plot_reward_curve(history: list[dict], path: str) -> None:
    """reward_curve.png: candidate reward mean (+- std across candidates) per optimisation step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    mean = torch.tensor([h["reward_mean"] for h in history])
    std = torch.tensor([h["reward_std"] for h in history])
    window = max(1, len(history) // 20)
    smooth = torch.nn.functional.avg_pool1d(mean.view(1, 1, -1), window, 1, padding=0).flatten()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.fill_between(steps, mean - std, mean + std, alpha=0.15, label="candidate spread (std)")
    ax.plot(steps, mean, alpha=0.4, label="candidate mean")
    ax.plot(steps[window - 1:], smooth, linewidth=2, label=f"moving mean ({window})")
    ax.set(xlabel="optimisation step", ylabel="reward", title="DrPO: reward of the K candidates")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def image_grid(rows: list[torch.Tensor]):
    """Stack rows of images [N, 3, H, W] in [0, 1] into one PIL image."""
    from PIL import Image

    grid = torch.cat([torch.cat(list(row), dim=2) for row in rows], dim=1)
    return Image.fromarray((grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy())


def write_model_card(args, output_dir: str, sample_file: str | None, metrics: dict) -> None:
    """``README.md`` model card (huggingface_hub.ModelCard) with the samples and the DrPO setup."""
    from huggingface_hub import ModelCard, ModelCardData

    repo_id = args.hub_model_id or os.path.basename(os.path.abspath(output_dir))
    samples = f"![before / after]({sample_file})\n\nTop row: base model. Bottom row: with this LoRA.\n" if sample_file else ""
    lines = "\n".join(f"- {k}: {v}" for k, v in metrics.items())
    content = f"""---
{ModelCardData(base_model=args.pretrained_model_name_or_path, library_name="diffusers", license="other",
               tags=["text-to-image", "diffusers", "lora", "drpo", "one-step"]).to_yaml()}
---

# DrPO LoRA for {args.pretrained_model_name_or_path}

LoRA weights trained with Drifting Preference Optimization (arXiv 2606.02521): reward `{args.reward}`,
feature map `{args.feature_extractor}`, K = {args.num_candidates}, M = {args.num_pairs},
lambda = {args.ref_weight}, eta = {args.velocity_scale}, radii {args.drift_radii}, kernel {args.drift_kernel},
{args.max_train_steps} steps at learning rate {args.learning_rate}, rank {args.rank}.

{samples}
{lines}

```python
import torch
from diffusers import AutoPipelineForText2Image

pipe = AutoPipelineForText2Image.from_pretrained("{args.pretrained_model_name_or_path}")
pipe.load_lora_weights("{repo_id}")
image = pipe("a prompt", num_inference_steps=1, guidance_scale=0.0).images[0]
```
"""
    ModelCard(content).save(os.path.join(output_dir, "README.md"))


def create_hub_repo(args) -> str:
    """Create (or reuse) the Hub repository at start-up, so auth problems fail before training."""
    from huggingface_hub import create_repo

    name = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
    return create_repo(name, exist_ok=True, token=hub_token(args)).repo_id


def push_to_hub(args, repo_id: str) -> None:
    from huggingface_hub import upload_folder

    upload_folder(
        repo_id=repo_id, folder_path=args.output_dir, commit_message="DrPO LoRA",
        ignore_patterns=["checkpoint-*", "checkpoint-*/**", "logs/**", "*.tmp"], token=hub_token(args),
    )


def setup_accelerator(args):
    """Accelerator with trackers, mixed precision and gradient accumulation from the flags."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    if args.report_to == "wandb":
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ImportError("--report_to wandb needs `pip install wandb`")
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
        ),
    )
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    return accelerator


def weight_dtype(accelerator) -> torch.dtype:
    """dtype of the frozen weights: fp16 / bf16 under mixed precision (LoRA stays fp32)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def prepare_frozen_models(pipe, device) -> None:
    """Freeze every pipeline module (eval mode) and move the pipeline to ``device``."""
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False).eval()
    pipe.to(device)


@contextlib.contextmanager
def lora_disabled(unet):
    """The frozen base model g_ref: the same UNet with its adapters disabled (no second copy)."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def step_generator(base_seed: int, step: int, micro_step: int, index: int, rank: int) -> torch.Generator:
    """RNG for one prompt of one micro-step: prompt draw, noises and pairs.

    Derived from (seed, step, micro-step, index, rank) alone, so ranks draw different prompts and
    noises, and a resumed run replays exactly the draws of an uninterrupted one.
    """
    import hashlib

    digest = hashlib.sha256(f"{base_seed}/{step}/{micro_step}/{index}/{rank}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def maybe_resume(accelerator, args) -> int:
    """Load the checkpoint named by --resume_from_checkpoint (LoRA, optimiser, scheduler, RNG); return its step."""
    path = find_resume_checkpoint(args)
    if path is None:
        if args.resume_from_checkpoint:
            accelerator.print(f"No checkpoint in {args.output_dir}; starting a new run.")
        return 0
    accelerator.print(f"Resuming from {path}")
    accelerator.load_state(path)
    match = re.fullmatch(r"checkpoint-(\d+)", os.path.basename(os.path.normpath(path)))
    if match is None:
        raise ValueError(f"--resume_from_checkpoint must name a checkpoint-N folder, got {path}")
    return int(match.group(1))


def init_trackers(accelerator, args) -> None:
    if accelerator.is_main_process and args.report_to != "none":
        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("drpo", config=config)


def step_logs(accelerator, step_stats: list[dict], lr_scheduler, seconds: float) -> dict[str, float]:
    """Average the per-prompt stats of one optimisation step over micro-steps and processes."""
    keys = sorted(step_stats[0])
    local = torch.tensor([[s[k] for k in keys] for s in step_stats], dtype=torch.float64).mean(0)
    averaged = accelerator.gather(local.to(accelerator.device)[None]).mean(0).tolist()
    logs = dict(zip(keys, averaged))
    logs.update(lr=lr_scheduler.get_last_lr()[0], step_time=seconds)
    return logs


def check_finite_loss(accelerator, loss: torch.Tensor, step: int) -> None:
    """Stop (on every rank together) before a NaN/inf loss reaches the optimiser and the LoRA."""
    finite = torch.isfinite(loss.detach()).float().reshape(1).to(accelerator.device)
    if accelerator.gather(finite).min() < 1:
        raise FloatingPointError(f"non-finite DrPO loss at step {step}; the last checkpoint is intact")


HISTORY_FILE = "reward_history.jsonl"


def load_history(output_dir: str, up_to_step: int) -> list[dict]:
    """Per-step logs of an earlier run (for the reward curve of a resumed run)."""
    path = os.path.join(output_dir, HISTORY_FILE)
    if up_to_step == 0 or not os.path.isfile(path):
        return []
    with open(path) as handle:
        return [row for row in map(json.loads, handle) if row["step"] <= up_to_step]


def save_history(accelerator, output_dir: str, history: list[dict]) -> None:
    if accelerator.is_main_process:
        staging = os.path.join(output_dir, HISTORY_FILE + ".tmp")
        with open(staging, "w") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in history)
        os.replace(staging, os.path.join(output_dir, HISTORY_FILE))


def validation_prompts(args, prompts: list[str]) -> list[str]:
    if args.validation_prompts:
        return [p.strip() for p in args.validation_prompts.split("|") if p.strip()]
    return list(dict.fromkeys(prompts))[:4]


VALIDATION_SEED = 10_000  # held-out: training noises come from step_generator


def log_images(accelerator, name: str, image, step: int) -> None:
    """Send a PIL image to every active tracker (tensorboard / wandb)."""
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(name, np.asarray(image), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({name: wandb.Image(image)}, step=step)


def before_after_images(pipe, prompts: list[str], seeds: list[int], resolution: int):
    """One-step samples of the base model (LoRA disabled) and of the current LoRA, same seeds."""
    from pipelines.one_step import generate_images

    # No autocast: the pipeline runs each module in its own dtype (an fp32-kept SDXL VAE stays fp32),
    # and peft casts the LoRA branch itself.
    with lora_disabled(pipe.unet):
        base = generate_images(pipe, prompts, seeds, resolution)
    tuned = generate_images(pipe, prompts, seeds, resolution)
    return base, tuned


def log_validation(accelerator, pipe, prompts: list[str], args, step: int) -> None:
    """Validation grid: per prompt, base row above LoRA row, the same held-out seeds."""
    if not accelerator.is_main_process:
        return
    seeds = list(range(VALIDATION_SEED, VALIDATION_SEED + args.num_validation_seeds))
    base, tuned = before_after_images(pipe, prompts, seeds, args.resolution)
    grid = image_grid(interleave_rows(base, tuned, len(seeds)))
    os.makedirs(os.path.join(args.output_dir, "validation"), exist_ok=True)
    grid.save(os.path.join(args.output_dir, "validation", f"step-{step:06d}.png"))
    log_images(accelerator, "validation/base_vs_lora", grid, step)


def interleave_rows(base: torch.Tensor, tuned: torch.Tensor, per_row: int) -> list[torch.Tensor]:
    """Rows: prompt 1 base, prompt 1 LoRA, prompt 2 base, ..."""
    rows = []
    for b, t in zip(base.split(per_row), tuned.split(per_row)):
        rows += [b, t]
    return rows


def finish_training(accelerator, args, pipe, history, prompts, reward_fn, repo_id, fresh_pipeline) -> dict:
    """Save the LoRA, reload it into a fresh stock pipeline, score it, plot, write the card, push.

    ``fresh_pipeline()`` loads the base model again exactly as the script does (e.g. SDXL's VAE).
    """
    if not accelerator.is_main_process:
        return {}
    from pipelines.evaluate import reward_table, summarize

    save_lora(args.output_dir, accelerator.unwrap_model(pipe.unet), type(pipe))
    save_history(accelerator, args.output_dir, history)
    if history:
        plot_reward_curve(history, os.path.join(args.output_dir, "reward_curve.png"))

    # Final check on a fresh pipeline: exactly what a user gets from load_lora_weights.
    fresh = fresh_pipeline().to(accelerator.device)
    seeds = list(range(VALIDATION_SEED, VALIDATION_SEED + args.num_validation_seeds))
    base, base_images = reward_table(fresh, reward_fn, args.reward, prompts, seeds, args.resolution)
    fresh.load_lora_weights(args.output_dir)
    tuned, tuned_images = reward_table(fresh, reward_fn, args.reward, prompts, seeds, args.resolution)
    metrics = summarize(base, tuned)
    with open(os.path.join(args.output_dir, "final_metrics.json"), "w") as handle:
        json.dump(metrics, handle, indent=2)
    image_grid(interleave_rows(base_images, tuned_images, len(seeds))).save(
        os.path.join(args.output_dir, "samples_before_after.png")
    )
    accelerator.print(
        f"held-out {args.reward}: base {metrics['base_mean']:.4f} -> LoRA {metrics['lora_mean']:.4f} "
        f"(effect size {metrics['effect_size']:.2f}, paired z {metrics['z_paired']:.1f})"
    )
    write_model_card(args, args.output_dir, "samples_before_after.png", {
        f"held-out {args.reward} (base -> LoRA)": f"{metrics['base_mean']:.4f} -> {metrics['lora_mean']:.4f}",
        "effect size (change / across-seed std)": f"{metrics['effect_size']:.2f}",
    })
    if repo_id is not None:
        push_to_hub(args, repo_id)
    return metrics
