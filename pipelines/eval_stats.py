"""Statistics of an evaluation: bootstrap over prompts, paired differences, win rates.

Every quantity is a ratio of per-prompt sums (a mean over (prompt, seed) pairs is the sum of each
prompt's scores over the sum of its seeds), so one resampling of prompts serves them all:
``bootstrap_indices`` draws it once (seeded), every metric and model reuses it, and a paired
difference is resampled with its two arms together. Standard errors are the standard deviation of
the resampled statistic. Win rates get a Wilson score interval (it never collapses to a point, unlike
the percentile interval of a bootstrap when every pair is won) over Kish's effective number of pairs:
the pairs of one prompt are not independent, and the bootstrap's variance against the binomial one
says by how much.
"""

from __future__ import annotations

import math
import statistics

import torch

CONFIDENCE = 0.95


def bootstrap_indices(num_prompts: int, num_samples: int, seed: int) -> torch.Tensor:
    """[num_samples, num_prompts] prompt indices drawn with replacement; the same for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_prompts, (num_samples, num_prompts), generator=generator)


def resampled_ratio(numerator: torch.Tensor, denominator: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The statistic sum(numerator) / sum(denominator) over each resampling of prompts ([B]); a
    resampling whose denominator is zero gives NaN."""
    numerator, denominator = numerator.double(), denominator.double()
    top, bottom = numerator[indices].sum(1), denominator[indices].sum(1)
    return torch.where(bottom > 0, top / bottom.clamp_min(1e-300), torch.full_like(top, float("nan")))


def spread(samples: torch.Tensor) -> float:
    """Standard deviation (ddof 1) of the finite resampled values."""
    finite = samples[torch.isfinite(samples)]
    return finite.std().item() if len(finite) > 1 else float("nan")


def interval(samples: torch.Tensor, confidence: float = CONFIDENCE) -> list[float]:
    """Percentile interval of the finite resampled values."""
    finite = samples[torch.isfinite(samples)]
    if len(finite) == 0:
        return [float("nan"), float("nan")]
    tail = (1 - confidence) / 2
    return torch.quantile(finite, torch.tensor([tail, 1 - tail], dtype=finite.dtype)).tolist()


def mean_and_se(values: torch.Tensor, indices: torch.Tensor) -> dict[str, float]:
    """Mean of a [prompts, seeds] table and its standard error by bootstrapping prompts."""
    values = values.double()
    counts = torch.full((values.shape[0],), float(values.shape[1]), dtype=torch.float64)
    se = spread(resampled_ratio(values.sum(1), counts, indices)) if values.shape[0] > 1 else float("nan")
    if math.isfinite(se):
        return {"mean": values.mean().item(), "se": se}
    return {"mean": values.mean().item(), "se": None, "se_undefined": "fewer than two prompts to resample"}


def bootstrap_se(values: torch.Tensor, num_samples: int = 1000, seed: int = 0) -> float:
    """Bootstrap standard error (over prompts, the rows) of the mean of a [prompts, seeds] table."""
    values = values.double().reshape(len(values), -1)
    return mean_and_se(values, bootstrap_indices(len(values), num_samples, seed))["se"]


def paired_difference(base: torch.Tensor, tuned: torch.Tensor, indices: torch.Tensor) -> dict[str, float]:
    """Mean of tuned - base over matched (prompt, seed) pairs and its bootstrap standard error."""
    result = mean_and_se(tuned.double() - base.double(), indices)
    return {"delta": result["mean"], "delta_se": result["se"]}


def wilson_interval(rate: float, trials: float, confidence: float = CONFIDENCE) -> list[float]:
    """Wilson score interval of a proportion ``rate`` observed over ``trials`` (possibly effective) trials."""
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    shrink = 1 + z * z / trials
    centre = (rate + z * z / (2 * trials)) / shrink
    half = z * math.sqrt(rate * (1 - rate) / trials + z * z / (4 * trials * trials)) / shrink
    return [max(0.0, centre - half), min(1.0, centre + half)]


def effective_trials(rate: float, trials: int, prompts: int, se: float) -> float:
    """Kish's effective sample size, trials / design effect, where the design effect is the bootstrap
    variance over the binomial one; kept between ``prompts`` (every seed of a prompt alike) and ``trials``
    (independent pairs). All outcomes equal (binomial variance 0): ``trials``, no design effect to
    estimate; outcomes that vary but a bootstrap that cannot see it (one prompt): ``prompts``, the
    cautious end."""
    binomial = rate * (1 - rate) / trials
    if binomial <= 0:
        return float(trials)
    if not math.isfinite(se) or se <= 0:
        return float(prompts)
    return min(float(trials), max(float(prompts), trials * binomial / se**2))


def outcome_rates(outcomes: torch.Tensor, indices: torch.Tensor) -> dict:
    """Win / tie / loss fractions of a [prompts, seeds] table of outcomes (1 win, 0.5 tie, 0 loss, NaN
    not counted), the win rate with ties counted half (``rate``), its Wilson interval over the effective
    number of pairs (``ci``, ``effective_pairs``) and its bootstrap SE and percentile interval."""
    outcomes = outcomes.double()
    counted = torch.isfinite(outcomes)
    total = int(counted.sum())
    if not total:
        return {"win": None, "tie": None, "loss": None, "rate": None, "ci": None,
                "undefined": "no outcome was counted (every judgement unparsed)"}
    fraction = (lambda value: (outcomes == value).sum().item() / total)
    scores = torch.where(counted, outcomes, torch.zeros_like(outcomes))
    resampled = resampled_ratio(scores.sum(1), counted.double().sum(1), indices)
    rate, se = scores.sum().item() / total, spread(resampled)
    pairs = effective_trials(rate, total, int(counted.any(1).sum()), se)
    return {"win": fraction(1.0), "tie": fraction(0.5), "loss": fraction(0.0), "rate": rate,
            "ci": wilson_interval(rate, pairs), "effective_pairs": pairs, "pairs": total,
            "se": se if math.isfinite(se) else None, "bootstrap_ci": interval(resampled)}


def win_outcomes(base: torch.Tensor, tuned: torch.Tensor) -> torch.Tensor:
    """1 where tuned scores higher than base, 0.5 on an exact tie, 0 below (matched pairs)."""
    tuned, base = tuned.double(), base.double()
    return (tuned > base).double() + 0.5 * (tuned == base).double()


def win_rate(base: torch.Tensor, tuned: torch.Tensor, indices: torch.Tensor) -> dict:
    """Fraction of (prompt, seed) pairs where tuned beats base, ties counted half, with an interval."""
    return outcome_rates(win_outcomes(base, tuned), indices)
