"""What an evaluation writes: ``metrics.json``, its tables (``metrics.md`` / ``.tex`` / ``.csv``, rendered by
``pipelines.eval_tables``), per-image scores, per-prompt labelled image grids and the plot of metric
changes against the base model.

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
from pipelines.eval_sets import geneval_summary
from pipelines.eval_stats import bootstrap_indices, mean_and_se, outcome_rates, paired_difference, win_rate
from pipelines.eval_tables import header, render_csv, render_latex, render_markdown
from pipelines.images import labelled_grid
from pipelines.redact import public_text

PAPER_SCALE = {"clip": 100.0, "hpsv2": 100.0, "hpsv21": 100.0, "imagereward": 10.0}


def scale_of(metric: str, spec: str, raw: bool) -> float:
    return 1.0 if raw else PAPER_SCALE.get(spec, 1.0)


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
        result["judge_model"] = public_text(" at ".join(filter(None, (evaluation.judge_model, evaluation.judge))))
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
    files.write_text(os.path.join(out, "metrics.tex"), render_latex(result))
    files.write_text(os.path.join(out, "metrics.csv"), render_csv(result))
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
