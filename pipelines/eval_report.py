"""What an evaluation writes besides ``metrics.json``: ``metrics.md`` (laid out like the paper's Table 1),
per-prompt labelled image grids and the plot of metric changes against the base model.

Reported scale (``--raw_scores`` turns it off): the paper's tables print CLIP and HPS v2 cosines x 100
(Table A5: "entries except AES and ImageReward are multiplied by 100"); PickScore's "x 100" is already
in the ``pickscore`` metric, which is PickScore_v1's logit-scaled score (100 x cosine); AES is printed
as is; ImageReward is printed x 10 (Tables 1-2 say so, and Table A5's SD-Turbo ImageReward, 5.75, is the
same number as Table 2's, so its caption's "except ImageReward" cannot mean the raw score).
"""

from __future__ import annotations

import math
import os

from pipelines.eval_sets import GENEVAL_TASKS

PAPER_SCALE = {"clip": 100.0, "hpsv2": 100.0, "hpsv21": 100.0, "imagereward": 10.0}
NAMES = {"pickscore": "PickScore", "clip": "CLIP", "aesthetic": "AES", "imagereward": "ImageReward", "hpsv2": "HPSv2",
         "hpsv21": "HPSv2.1", "hpsv3": "HPSv3"}


def scale_of(metric: str, spec: str, raw: bool) -> float:
    return 1.0 if raw else PAPER_SCALE.get(spec, 1.0)


def header(metric: str, scale: float, markdown: bool = True) -> str:
    name = NAMES.get(metric, f"`{metric}`" if markdown else metric)
    return f"{name} ×{scale:g}" if scale != 1 else name


def decimals(se: float | None) -> int:
    """Digits after the point that show a standard error to two significant figures."""
    if se is None or not math.isfinite(se) or se <= 0:
        return 3
    return max(0, min(6, 1 - math.floor(math.log10(se))))


def mean_se(entry: dict, bold: bool) -> str:
    digits = decimals(entry["se"])
    spread = f"{entry['se']:.{digits}f}" if entry["se"] is not None else "n/a"  # one prompt: no SE
    text = f"{entry['mean']:.{digits}f} ± {spread}"
    return f"**{text}**" if bold else text


def percent(value: float | None) -> str:
    """A rate in %, or n/a when it is undefined (None in metrics.json: e.g. no judge answer parsed)."""
    return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:.1f}"


def rate_cell(entry: dict) -> str:
    if entry.get("ci") is None:
        return f"{percent(entry['rate'])} [n/a]"
    low, high = entry["ci"]
    return f"{percent(entry['rate'])} [{percent(low)}, {percent(high)}]"


def render_markdown(result: dict) -> str:
    """Tables: metrics (rows = models, mean ± SE, best of each column in bold), win rates against the
    base, the judge's decisions, GenEval's summary."""
    models, lines = result["models"], []
    metrics = result.get("metrics", {})
    if metrics:
        lines += ["| Model | " + " | ".join(header(m, result["scale"][m]) for m in metrics) + " |",
                  "|---|" + "---:|" * len(metrics)]
        best = {m: max(metrics[m][model]["mean"] for model in models) for m in metrics}
        for model in models:
            cells = [mean_se(metrics[m][model], metrics[m][model]["mean"] == best[m]) for m in metrics]
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
        lines += ["", f"Mean ± standard error over {result['num_prompts']} prompts × {len(result['seeds'])} seeds "
                      f"(bootstrap over prompts, {result['bootstrap']} resamples); best in bold."]
    if result.get("win_rates") and len(models) > 1:
        lines += ["", "Win rate against the base, % of matched (prompt, seed) pairs with a higher score (ties count "
                      "half) [95% bootstrap interval]:", "",
                  "| Model | " + " | ".join(header(m, 1) for m in result["win_rates"]) + " |",
                  "|---|" + "---:|" * len(result["win_rates"])]
        for model in models[1:]:
            lines.append(f"| {model} | " + " | ".join(rate_cell(result["win_rates"][m][model])
                                                       for m in result["win_rates"]) + " |")
    if result.get("judge"):
        lines += ["", f"Pairwise judge (`{result['judge_model']}`, Appendix B.4 prompt, A/B order randomised), "
                      "% of parsed answers:", "",
                  "| Model vs base | win | tie | loss | unparsed | win rate (ties half) [95% CI] |",
                  "|---|---:|---:|---:|---:|---:|"]
        for model, entry in result["judge"].items():
            lines.append(f"| {model} | {percent(entry['win'])} | {percent(entry['tie'])} | {percent(entry['loss'])} | "
                         f"{entry['unparsed']} / {entry['unparsed'] + entry['parsed']} | {rate_cell(entry)} |")
    if result.get("geneval"):
        tasks = [t for t in GENEVAL_TASKS if any(t in row for row in result["geneval"].values())]
        columns = tasks + ["overall"]
        best = {c: max(row.get(c, float("nan")) for row in result["geneval"].values()) for c in columns}
        lines += ["", "GenEval (% correct images per task; overall = mean over tasks):", "",
                  "| Model | " + " | ".join([GENEVAL_TASKS[t] for t in tasks] + ["Overall"]) + " |",
                  "|---|" + "---:|" * len(columns)]
        for model, row in result["geneval"].items():
            cells = [f"**{percent(row[c])}**" if row[c] == best[c] else percent(row[c]) for c in columns]
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def save_delta_plot(result: dict, path: str) -> str | None:
    """One figure: per metric, each model's mean change against the base (reported scale) with ±1 SE bars."""
    models = result["models"][1:]
    metrics = result.get("metrics", {})
    if not models or not metrics:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(metrics), figsize=(2.2 + 1.2 * len(models) * len(metrics), 3.2), squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        deltas = [metrics[metric][model]["delta"] for model in models]
        errors = [metrics[metric][model]["delta_se"] for model in models]
        axis.bar(range(len(models)), deltas, yerr=errors, capsize=4, color="tab:red")
        axis.axhline(0, color="black", linewidth=0.8)
        axis.set_xticks(range(len(models)), models, rotation=30, ha="right", fontsize=8)
        axis.set_title(header(metric, result["scale"][metric], markdown=False), fontsize=9)
    axes[0][0].set_ylabel("change vs base (±1 SE)")
    figure.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
