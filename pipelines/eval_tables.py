"""The evaluation's tables in three formats: ``metrics.md`` (laid out like the paper's Table 1),
``metrics.tex`` (booktabs, for a paper) and ``metrics.csv`` (one row per model and metric, for a
spreadsheet or pandas), all rendered from the ``metrics.json`` content.

Every number of one column has the same decimals, chosen from that column's standard errors: enough
to show the smallest of them to two significant figures. The best model of a column is in bold.
"""

from __future__ import annotations

import csv
import io
import math

from pipelines.eval_sets import GENEVAL_TASKS

NAMES = {"pickscore": "PickScore", "clip": "CLIP", "aesthetic": "AES", "imagereward": "ImageReward", "hpsv2": "HPSv2",
         "hpsv21": "HPSv2.1", "hpsv3": "HPSv3"}


def header(metric: str, scale: float, markdown: bool = True) -> str:
    name = NAMES.get(metric, f"`{metric}`" if markdown else metric)
    return f"{name} ×{scale:g}" if scale != 1 else name


def decimals(errors) -> int:
    """Digits after the point that show the smallest finite positive error to two significant figures."""
    finite = [e for e in errors if e is not None and math.isfinite(e) and e > 0]
    return max(0, min(6, 1 - math.floor(math.log10(min(finite))))) if finite else 3


def percent(value: float | None) -> str:
    """A rate in %, or n/a when it is undefined (None in metrics.json: e.g. no judge answer parsed)."""
    return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:.1f}"


def rate_cell(entry: dict) -> str:
    if entry.get("ci") is None:
        return f"{percent(entry['rate'])} [n/a]"
    low, high = entry["ci"]
    return f"{percent(entry['rate'])} [{percent(low)}, {percent(high)}]"


# ---------------------------------------------------------------------------------------------
# One grid of cells, two renderings
# ---------------------------------------------------------------------------------------------


def estimate_grid(result: dict, models: list[str], value: str, error: str) -> tuple[list[str], list[list]]:
    """Columns (metric headers) and, per model, (value, error, is_best) cells of ``value`` ± ``error``."""
    metrics = result["metrics"]
    headers, rows = [], [[] for _ in models]
    for metric, entries in metrics.items():
        headers.append(metric)
        digits = decimals(entries[model].get(error) for model in models)
        best = max((entries[model][value] for model in models if entries[model][value] is not None), default=None)
        for row, model in zip(rows, models):
            row.append((entries[model][value], entries[model].get(error), digits, entries[model][value] == best))
    return headers, rows


def estimate_text(cell, plus_minus: str = "±", signed: bool = False) -> str:
    value, error, digits, _ = cell
    if value is None:  # undefined (metrics.json says why)
        return "n/a"
    sign = "+" if signed else ""
    shown = f"{value:{sign}.{digits}f}"
    return f"{shown} {plus_minus} {error:.{digits}f}" if error is not None else f"{shown} {plus_minus} n/a"


def markdown_grid(result: dict, models: list[str], value: str, error: str, signed: bool = False) -> list[str]:
    headers, rows = estimate_grid(result, models, value, error)
    lines = ["| Model | " + " | ".join(header(m, result["scale"][m]) for m in headers) + " |",
             "|---|" + "---:|" * len(headers)]
    for model, row in zip(models, rows):
        cells = [f"**{estimate_text(c, signed=signed)}**" if c[3] else estimate_text(c, signed=signed) for c in row]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return lines


def latex_escape(text: str) -> str:
    return "".join("\\" + char if char in "&%$#_{}" else char for char in text).replace("×", r"$\times$")


def latex_grid(result: dict, models: list[str], value: str, error: str, caption: str, signed: bool = False) -> str:
    headers, rows = estimate_grid(result, models, value, error)
    columns = " & ".join(latex_escape(header(m, result["scale"][m], markdown=False)) for m in headers)
    body, plus_minus = [], r"\pm"
    for model, row in zip(models, rows):
        texts = [(estimate_text(cell, plus_minus, signed), cell[3]) for cell in row]
        cells = [f"$\\mathbf{{{text}}}$" if best else f"${text}$" for text, best in texts]
        body.append(f"{latex_escape(model)} & " + " & ".join(cells) + r" \\")
    return "\n".join([f"% {caption}", r"\begin{tabular}{l" + "r" * len(headers) + "}", r"\toprule",
                      f"Model & {columns} \\\\", r"\midrule", *body, r"\bottomrule", r"\end{tabular}", ""])


# ---------------------------------------------------------------------------------------------
# The three files
# ---------------------------------------------------------------------------------------------


def render_latex(result: dict) -> str:
    """metrics.tex: the metrics table and the paired changes against the base (booktabs tabulars)."""
    if not result.get("metrics"):
        return "% no metric was scored\n"
    models = result["models"]
    parts = [latex_grid(result, models, "mean", "se", "Mean $\\pm$ SE (bootstrap over prompts); best in bold.")]
    if len(models) > 1:
        parts.append(latex_grid(result, models[1:], "delta", "delta_se",
                                "Paired change against the base $\\pm$ SE; largest in bold.", signed=True))
    return "\n".join(parts)


CSV_COLUMNS = ["model", "metric", "scale", "mean", "se", "delta", "delta_se", "win_rate", "win_rate_low",
               "win_rate_high"]


def render_csv(result: dict) -> str:
    """metrics.csv: one row per (model, metric), reported scale, win rates with their Wilson interval."""
    out = io.StringIO()
    writer = csv.DictWriter(out, CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for metric, entries in result.get("metrics", {}).items():
        for model, entry in entries.items():
            rates = result.get("win_rates", {}).get(metric, {}).get(model, {})
            low, high = rates.get("ci") or (None, None)
            writer.writerow({"model": model, "metric": metric, "scale": result["scale"][metric],
                             "mean": entry["mean"], "se": entry["se"], "delta": entry.get("delta"),
                             "delta_se": entry.get("delta_se"), "win_rate": rates.get("rate"),
                             "win_rate_low": low, "win_rate_high": high})
    return out.getvalue()


def judge_lines(result: dict) -> list[str]:
    lines = ["", f"Pairwise judge (`{result['judge_model']}`, Appendix B.4 prompt, A/B order randomised), "
                 "% of parsed answers [95% Wilson interval]:", "",
             "| Model vs base | win | tie | loss | unparsed | win rate (ties half) [95% CI] |",
             "|---|---:|---:|---:|---:|---:|"]
    silent = []
    for model, entry in result["judge"].items():
        answered = f"{entry['unparsed']} / {entry['unparsed'] + entry['parsed']}"
        if entry["parsed"] == 0:
            silent.append(model)
            lines.append(f"| {model} | – | – | – | {answered} | no verdict parsed |")
            continue
        lines.append(f"| {model} | {percent(entry['win'])} | {percent(entry['tie'])} | {percent(entry['loss'])} | "
                     f"{answered} | {rate_cell(entry)} |")
    if silent:
        lines += ["", f"No answer of the judge parsed as a verdict for {', '.join(silent)}: its raw answers are in "
                      "judge/<model>.jsonl (`answer`)."]
    return lines


def geneval_lines(result: dict) -> list[str]:
    tasks = [t for t in GENEVAL_TASKS if any(t in row for row in result["geneval"].values())]
    columns = tasks + ["overall"]
    best = {c: max(row.get(c, float("nan")) for row in result["geneval"].values()) for c in columns}
    lines = ["", "GenEval (% correct images per task; overall = mean over tasks):", "",
             "| Model | " + " | ".join([GENEVAL_TASKS[t] for t in tasks] + ["Overall"]) + " |",
             "|---|" + "---:|" * len(columns)]
    for model, row in result["geneval"].items():
        cells = [f"**{percent(row[c])}**" if row[c] == best[c] else percent(row[c]) for c in columns]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return lines


def render_markdown(result: dict) -> str:
    """metrics.md: metrics (rows = models, mean ± SE, best of each column in bold), paired changes and win
    rates against the base, the judge's decisions, GenEval's summary."""
    models, lines = result["models"], []
    if result.get("metrics"):
        lines += markdown_grid(result, models, "mean", "se")
        lines += ["", f"Mean ± standard error over {result['num_prompts']} prompts × {len(result['seeds'])} seeds "
                      f"(bootstrap over prompts, {result['bootstrap']} resamples); best in bold."]
    if result.get("metrics") and len(models) > 1:
        lines += ["", "Paired change against the base (same prompt and seed) ± SE; largest in bold:", ""]
        lines += markdown_grid(result, models[1:], "delta", "delta_se", signed=True)
    if result.get("win_rates") and len(models) > 1:
        lines += ["", "Win rate against the base, % of matched (prompt, seed) pairs with a higher score (ties count "
                      "half) [95% Wilson interval over the effective number of pairs]:", "",
                  "| Model | " + " | ".join(header(m, 1) for m in result["win_rates"]) + " |",
                  "|---|" + "---:|" * len(result["win_rates"])]
        for model in models[1:]:
            lines.append(f"| {model} | " + " | ".join(rate_cell(result["win_rates"][m][model])
                                                       for m in result["win_rates"]) + " |")
    if result.get("judge"):
        lines += judge_lines(result)
    if result.get("geneval"):
        lines += geneval_lines(result)
    return "\n".join(lines) + "\n"
