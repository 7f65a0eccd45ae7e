"""The drift-field flags: each overrides one field of the ``--drift_preset``'s ``DriftConfig`` (Eqs. 15-26,
Appendix A), its help naming both presets' values. ``pipelines.cli.drift_config`` applies the given ones."""

from __future__ import annotations

import argparse
import dataclasses

import drpo_utils
from pipelines import flags

# Each drift flag overrides one field of the --drift_preset's DriftConfig (None: keep the preset's value).
DRIFT_FLAGS = {
    "drift_radii": ("radii", flags.list_of(flags.positive_float, "positive radii"),
                    "Comma-separated kernel radii rho (Appendix A)."),
    "drift_kernel": ("kernel", str, "rbf (Eq. 21), laplacian, exponential (alias of laplacian), cosine."),
    "ref_weight": ("ref_weight", flags.non_negative_float, "lambda: weight of the reference drift (Eq. 15)."),
    "velocity_scale": ("velocity_scale", flags.positive_float, "eta: target step z + eta V (Eq. 16)."),
    "pair_weight": ("pair_weight", flags.positive_float, "Support weight of A+/A- and of the reference drift's "
                                                         "supports, relative to the unit-weight self-negatives."),
    "self_negatives": ("self_negatives", None, "Add sg(Z) as unit-weight negatives of both fields, each query's own "
                                               "copy masked (the released code)."),
    "mask_self": ("mask_self", None, "Mask each sample's own copy in the reference drift's negatives sg(Z); "
                                     "--no-mask_self gives the literal, unmasked Eq. 22."),
    "mask_paired_reference": ("mask_paired_reference", None, "With --mask_self, also mask each sample's paired base "
                                                             "sample r_i (same noise): the leave-one-out V_ref."),
    "drift_loss_reduction": ("loss_reduction", str, "sum: 1/(2K) sum_i ||z~_i - z*_i||^2 (Eq. 17); mean: over "
                                                    "candidates and feature dimensions (the released code)."),
    "separate_branch_losses": ("separate_branch_losses", None, "Regress V_pref and lambda V_ref as two losses, each in "
                                                               "its own call's coordinates (the released code)."),
    "drift_scale_floor": ("scale_floor", flags.non_negative_float, "Floor of the batch scale s and of s_z "
                                                                   "(Eqs. 19-20)."),
    "drift_rms_floor": ("rms_floor", flags.non_negative_float, "Floor of each radius' mean square before the root "
                                                               "(Eq. 25)."),
    "affinity_floor": ("affinity_floor", flags.non_negative_float, "Floor of softmax_j * softmax_i before the root "
                                                                   "(Eq. 22)."),
    "self_penalty": ("self_penalty", flags.positive_float_or_inf, "Logit penalty / rho on a masked copy; inf removes "
                                                                  "it (Appendix A)."),
    "drift_distance_floor": ("distance_floor", flags.non_negative_float, "Floor of squared distances before the root "
                                                                         "(Eq. 18); 0: exact."),
    "feature_reduction": ("feature_reduction", str, "Several feature tensors: sum their losses (Drifting Models) or "
                                                    "mean (the released code)."),
    "negative_weight": ("negative_weight", flags.positive_float, "Support weight of A- (default: --pair_weight)."),
    "reference_weight": ("reference_weight", flags.positive_float, "Support weight of R in the reference drift "
                                                                   "(default: --pair_weight)."),
    "reference_negative_weight": ("reference_negative_weight", flags.positive_float, "Support weight of sg(Z) in the "
                                                                                     "reference drift (default: "
                                                                                     "--pair_weight)."),
    "reference_radii": ("reference_radii", flags.list_of(flags.positive_float, "positive radii"),
                        "Radii of the reference drift (default: --drift_radii)."),
    "pairing": ("pairing", str, "A+ / A-: random = M random reward-ordered pairs (Eq. 12); top_bottom = the top and "
                                "bottom K/2 by reward, each once (the released recipe; M unused)."),
}
DRIFT_FIELDS = {flag: field for flag, (field, _, _) in DRIFT_FLAGS.items()}  # flag -> DriftConfig field
NUMERICS_FIELDS = {field.name for field in dataclasses.fields(drpo_utils.DriftNumerics)}


# The shipped default: the estimator that raised every reward of ``python -m benchmarks.presets`` most.
DEFAULT_PRESET = "authors"


def preset_value(preset: str, field: str):
    """A preset's value of a DriftConfig field, as the flag holds it (a list for the radii)."""
    drift = drpo_utils.DRIFT_PRESETS[preset]
    value = getattr(drift.numerics if field in NUMERICS_FIELDS else drift, field)
    return list(value) if isinstance(value, tuple) else value


def shown(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def add_drift_flags(group) -> None:
    group.add_argument("--drift_preset", default=DEFAULT_PRESET, choices=sorted(drpo_utils.DRIFT_PRESETS),
                       help="authors (default): the released code's estimator (UGVly/DrPO), which gained most on "
                            "each of four rewards, scored on held-out seeds (docs/method.md); paper: Appendix A exactly "
                            "(leave-one-out reference drift).")
    for flag, (field, parse, text) in DRIFT_FLAGS.items():
        presets = f"(paper: {shown(preset_value('paper', field))}; authors: {shown(preset_value('authors', field))})"
        if parse is None:
            group.add_argument(f"--{flag}", action=argparse.BooleanOptionalAction, default=None,
                               help=f"{text} {presets}")
        else:
            choices = {"kernel": drpo_utils.DRIFT_KERNELS, "loss_reduction": drpo_utils.LOSS_REDUCTIONS,
                       "feature_reduction": drpo_utils.LOSS_REDUCTIONS, "pairing": drpo_utils.PAIRINGS}.get(field)
            group.add_argument(f"--{flag}", default=None, choices=choices, help=f"{text} {presets}",
                               type=None if choices else parse)
