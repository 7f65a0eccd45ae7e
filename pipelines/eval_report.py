"""What an evaluation writes besides ``metrics.json``: ``metrics.md`` (laid out like the paper's Table 1),
per-prompt labelled image grids and the plot of metric changes against the base model.

Reported scale (``--raw_scores`` turns it off): the paper's tables print CLIP and HPS v2 cosines x 100
(Table A5: "entries except AES and ImageReward are multiplied by 100"); PickScore's "x 100" is already
in the ``pickscore`` metric, which is PickScore_v1's logit-scaled score (100 x cosine); AES is printed
as is; ImageReward is printed x 10 (Tables 1-2 say so, and Table A5's SD-Turbo ImageReward, 5.75, is the
same number as Table 2's, so its caption's "except ImageReward" cannot mean the raw score).
"""

from __future__ import annotations

import json
import math
import os

from pipelines import files
from pipelines.config import EvalConfig
from pipelines.eval_cache import BASE, slug
from pipelines.eval_sets import GENEVAL_TASKS, geneval_summary
from pipelines.eval_stats import bootstrap_indices, mean_and_se, outcome_rates, paired_difference, win_rate
from pipelines.images import labelled_grid
from pipelines.redact import public_text

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


# ---------------------------------------------------------------------------------------------
# Results and reports
# ---------------------------------------------------------------------------------------------


def nonfinite_paths(value, path: str = "") -> list[str]:
    """Dotted paths of the non-finite floats in a nested result."""
    if isinstance(value, float):
        return [] if math.isfinite(value) else [path]
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    return [found for key, item in items for found in nonfinite_paths(item, f"{path}.{key}" if path else str(key))]


def with_reasons_for_nonfinite(result: dict) -> dict:
    """Strict JSON: the known undefined figures carry their own reasons (``*_undefined``); any other
    non-finite value becomes null and is listed under ``undefined``, so none is dropped silently."""
    paths = nonfinite_paths(result)
    if not paths:
        return result
    return {**files.finite_or_none(result), "undefined": {path: "not a finite number" for path in paths}}


def summarize_run(evaluation: EvalConfig, models, prompt_set, seeds, specs, scores, geneval, judged) -> dict:
    from pipelines.judge import outcome_table

    labels = [model.label for model in models]
    indices = bootstrap_indices(len(prompt_set.prompts), evaluation.bootstrap, evaluation.seed)
    result = {"models": labels, "model_sources": {m.label: {"kind": m.kind, "path": m.path} for m in models},
              "pretrained_model_name_or_path": evaluation.pretrained_model_name_or_path,
              "prompt_source": prompt_set.source,
              "num_prompts": len(prompt_set.prompts), "seeds": seeds, "resolution": evaluation.resolution,
              "mixed_precision": evaluation.mixed_precision, "bootstrap": evaluation.bootstrap, "seed": evaluation.seed,
              "metric_specs": {metric: public_text(spec) for metric, spec in specs.items()},
              "scale": {}, "metrics": {}, "win_rates": {}}
    for metric, tables in scores.items():
        scale = scale_of(metric, specs[metric], evaluation.raw_scores)
        result["scale"][metric] = scale
        scaled = {label: table * scale for label, table in tables.items()}
        base = scaled[BASE]
        result["metrics"][metric] = {label: mean_and_se(table, indices) for label, table in scaled.items()}
        for label in labels[1:]:
            result["metrics"][metric][label].update(paired_difference(base, scaled[label], indices))
        result["win_rates"][metric] = {label: win_rate(base, scaled[label], indices) for label in labels[1:]}
    if geneval is not None:
        result["geneval"] = {label: geneval_summary(records) for label, records in geneval.items()}
    if judged is not None:
        result["judge_model"] = evaluation.judge
        result["judge"] = {}
        for label, records in judged.items():
            rates = outcome_rates(outcome_table(records, len(prompt_set.prompts), len(seeds)), indices)
            unparsed = sum(record["outcome"] is None for record in records)
            result["judge"][label] = {**rates, "unparsed": unparsed, "parsed": len(records) - unparsed}
    return with_reasons_for_nonfinite(result)


def write_jsonl(path: str, records) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    files.write_text(path, "".join(json.dumps(files.finite_or_none(record), ensure_ascii=False, allow_nan=False) + "\n"
                                   for record in records))


def write_reports(evaluation: EvalConfig, result, models, prompts, seeds, scores, geneval, judged, cache) -> None:
    """Every report file is written whole or not at all (``pipelines.files``)."""
    out = evaluation.output_dir
    files.write_json(os.path.join(out, "metrics.json"), result)
    files.write_text(os.path.join(out, "metrics.md"), render_markdown(result))
    if scores:
        write_jsonl(os.path.join(out, "scores.jsonl"), (
            {"model": model.label, "prompt_index": i, "prompt": prompt, "seed": seed,
             **{metric: tables[model.label][i, j].item() for metric, tables in scores.items()}}
            for model in models for i, prompt in enumerate(prompts) for j, seed in enumerate(seeds)))
    for label, records in (geneval or {}).items():
        write_jsonl(os.path.join(out, "geneval", f"{slug(label)}.jsonl"), records)
    for label, records in (judged or {}).items():
        write_jsonl(os.path.join(out, "judge", f"{slug(label)}.jsonl"), records)
    count = len(prompts) if evaluation.num_grids < 0 else min(evaluation.num_grids, len(prompts))
    for index in range(count):
        rows = {model.label: cache.load(model, [(prompts[index], seed) for seed in seeds]) for model in models}
        os.makedirs(os.path.join(out, "grids"), exist_ok=True)
        files.save_image(labelled_grid([prompts[index]], rows, len(seeds)),
                         os.path.join(out, "grids", f"{index:04d}.png"))
    save_delta_plot(result, os.path.join(out, "metric_deltas.png"))
