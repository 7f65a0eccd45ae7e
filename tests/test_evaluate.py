"""``python -m pipelines.evaluate`` on the tiny model: statistics recomputed from the cached images, the
cache reused, bootstrap errors, GenEval's summary, the pairwise judge, two processes, prompt sets."""

import hashlib
import json
import math
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from conftest import PROMPTS, ROOT, TINY_SD, build_tiny_clip, reset_accelerate_state, tiny_mask2former_config
from test_train import REWARDS, train, training_args

from pipelines import eval_cache, evaluate
from pipelines.eval_sets import PROMPT_SETS, geneval_summary, load_prompt_set
from pipelines.eval_stats import bootstrap_indices, bootstrap_se, outcome_rates, wilson_interval, win_rate
from pipelines.eval_tables import decimals
from pipelines.judge import (JUDGE_PROMPT, OpenAIJudge, judge_pair, judge_text, parse_verdict,
                             shows_candidate_second)
from pipelines.rewards.remote import decode_png
from pipelines.rewards import rules

PAPER = "/work/shared/reference/drpo-paper-arxiv-2606.02521v3.txt"  # the arXiv text, where available
BRIGHTNESS = f"{REWARDS}:brightness"
NUM_PROMPTS, SEEDS = 8, [0, 1, 2, 3]


def run_cli(*args):
    """``python -m pipelines.evaluate ...`` in this process (one process, no launcher)."""
    reset_accelerate_state()
    try:
        return evaluate.main([str(a) for a in args])
    finally:
        reset_accelerate_state()


def tiny_prompts(count=NUM_PROMPTS):
    with open(PROMPTS) as handle:
        return [line.strip() for line in handle if line.strip()][:count]


def cached(folder, label, prompt, seed):
    """A cached image by the documented layout: images/<label>-<hash>/<sha1(prompt)[:16]>-<seed>.png."""
    import numpy as np
    from PIL import Image

    (model_dir,) = [d for d in os.listdir(folder) if re.fullmatch(rf"{re.escape(label)}-[0-9a-f]{{10}}", d)]
    name = f"{hashlib.sha1(prompt.encode()).hexdigest()[:16]}-{seed}.png"
    array = np.asarray(Image.open(os.path.join(folder, model_dir, name)).convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255


def cached_table(folder, label, prompts, seeds):
    return torch.stack([torch.stack([cached(folder, label, p, s) for s in seeds]) for p in prompts])  # [P, S, 3, H, W]


HELPERS = '''
import json
from pipelines.rewards.models import ClipSimilarity


class TinyClip(ClipSimilarity):
    def score_batch(self, images, prompts):
        with open({log!r}, "a") as handle:
            handle.write(f"{{len(images)}}\\n")
        return super().score_batch(images, prompts)


tiny_clip = TinyClip({clip!r})


def brighter(image_a, image_b, text):
    """A scripted judge: the brighter image wins (tie within 1e-4); circle prompts get a non-JSON answer."""
    with open({texts!r}, "a") as handle:
        handle.write(json.dumps(text) + "\\n")
    if "circle" in text:
        return "Image A looks better to me."
    a, b = image_a.mean().item(), image_b.mean().item()
    if abs(a - b) < 1e-4:
        return '{{"winner": "tie", "confidence": 0.5, "reason": "same"}}'
    return json.dumps({{"winner": "A" if a > b else "B", "confidence": 0.9, "reason": "brighter"}})
'''


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A LoRA trained with a custom reward (brightness) and the helper module (metric, scripted judge)."""
    root = tmp_path_factory.mktemp("evaluate")
    lora = root / "bright-lora"
    train("train_drpo.py", *training_args(TINY_SD, lora, f"--reward={BRIGHTNESS}", "--max_train_steps=10",
                                          "--learning_rate=1e-3"))
    clip = build_tiny_clip(root / "tiny-clip")
    (root / "helpers.py").write_text(HELPERS.format(log=str(root / "batches.log"), clip=clip,
                                                    texts=str(root / "judge_texts.jsonl")))
    return root


@pytest.fixture(scope="module")
def first_run(work):
    out = work / "run"
    result = run_cli(f"--pretrained_model_name_or_path={TINY_SD}", f"--lora={work / 'bright-lora'}",
                     f"--prompts_file={PROMPTS}", f"--max_prompts={NUM_PROMPTS}", "--seeds=0-3",
                     f"--metrics={BRIGHTNESS},color_match,jpeg_compressibility", "--bootstrap=300",
                     f"--output_dir={out}")
    return out, result


def independent_bootstrap(values, num_samples, seed):
    """SE of the mean of a [P, S] table by resampling prompts with the documented draws, by hand."""
    indices = torch.randint(0, len(values), (num_samples, len(values)), generator=torch.Generator().manual_seed(seed))
    per_prompt = values.double().mean(1).tolist()
    means = [sum(per_prompt[i] for i in row) / len(row) for row in indices.tolist()]
    centre = sum(means) / len(means)
    return math.sqrt(sum((m - centre) ** 2 for m in means) / (len(means) - 1)), means


def test_means_ses_and_win_rates_are_recomputed_from_the_cached_images(first_run):
    out, result = first_run
    prompts = tiny_prompts()
    assert result["models"] == ["base", "bright-lora"] and result["num_prompts"] == 8 and result["seeds"] == SEEDS
    assert len(os.listdir(out / "images")) == 2
    per_pair = [p for p in prompts for _ in SEEDS]
    functions = {"brightness": lambda x: x.mean(dim=(1, 2, 3)).double(),
                 "color_match": lambda x: torch.as_tensor(rules.color_match(x, per_pair), dtype=torch.float64),
                 "jpeg_compressibility": lambda x: torch.as_tensor(rules.jpeg_compressibility(x, per_pair),
                                                                   dtype=torch.float64)}
    images = {label: cached_table(out / "images", label, prompts, SEEDS) for label in result["models"]}
    assert not torch.equal(images["base"], images["bright-lora"])  # the LoRA changes the images
    for metric, score in functions.items():
        tables = {label: score(x.flatten(0, 1)).view(8, 4) for label, x in images.items()}
        assert result["scale"][metric] == 1
        for label, table in tables.items():
            entry = result["metrics"][metric][label]
            se, _ = independent_bootstrap(table, 300, 0)
            # float32 rewards of the same pixels, float64 sums in another order: measured 0; 1e-6 allows a
            # reordered float32 mean
            assert entry["mean"] == pytest.approx(table.mean().item(), rel=1e-6)
            assert entry["se"] == pytest.approx(se, rel=1e-6, abs=1e-12)
        base, tuned = tables["base"], tables["bright-lora"]
        lora = result["metrics"][metric]["bright-lora"]
        delta_se, _ = independent_bootstrap(tuned - base, 300, 0)
        assert lora["delta"] == pytest.approx((tuned - base).mean().item(), abs=1e-12)  # float64: measured 0
        assert lora["delta_se"] == pytest.approx(delta_se, rel=1e-6, abs=1e-12)  # as the SE above: measured 0
        wins, ties = (tuned > base).sum().item(), (tuned == base).sum().item()
        rates = result["win_rates"][metric]["bright-lora"]
        assert rates["win"] == wins / 32 and rates["tie"] == ties / 32 and rates["loss"] == (32 - wins - ties) / 32
        assert rates["rate"] == (wins + ties / 2) / 32  # a multiple of 1/64: exact
        _, resampled = independent_bootstrap(((tuned > base).double() + 0.5 * (tuned == base).double()), 300, 0)
        low, high = torch.quantile(torch.tensor(resampled, dtype=torch.float64), torch.tensor(
            [0.025, 0.975], dtype=torch.float64)).tolist()
        # bootstrap means are multiples of 1/64, the same torch.quantile interpolates: measured 0
        assert rates["bootstrap_ci"] == pytest.approx([low, high], abs=1e-12) and low <= rates["rate"] <= high
        # Wilson over Kish's effective pairs, by hand: 32 pairs / (bootstrap variance / binomial variance)
        p, se = rates["rate"], torch.tensor(resampled, dtype=torch.float64).std().item()
        pairs = min(32.0, max(8.0, 32 * (p * (1 - p) / 32) / se**2)) if 0 < p < 1 else 32.0
        z = 1.959963984540054
        centre, half = (p + z * z / (2 * pairs)), z * math.sqrt(p * (1 - p) / pairs + z * z / (4 * pairs**2))
        wilson = [max(0, (centre - half) / (1 + z * z / pairs)), min(1, (centre + half) / (1 + z * z / pairs))]
        assert rates["effective_pairs"] == pytest.approx(pairs, rel=1e-9)  # float64 either way: measured 0
        assert rates["ci"] == pytest.approx(wilson, abs=1e-12) and wilson[0] <= p <= wilson[1]


def test_reports_table_grids_plot_and_per_image_scores(first_run):
    out, result = first_run
    table = (out / "metrics.md").read_text()
    assert table.splitlines()[0] == "| Model | `brightness` | `color_match` | `jpeg_compressibility` |"
    for metric in result["metrics"]:
        entries = result["metrics"][metric]
        best = max(entries, key=lambda label: entries[label]["mean"])
        row = next(line for line in table.splitlines() if line.startswith(f"| {best} |"))
        assert row.count("**") >= 2  # the best of each column is bold
    assert "Win rate against the base" in table
    assert sorted(os.listdir(out / "grids")) == [f"{i:04d}.png" for i in range(8)]
    from PIL import Image

    assert Image.open(out / "grids" / "0000.png").width >= 4 * 64 and Image.open(out / "metric_deltas.png").width > 0
    lines = (out / "scores.jsonl").read_text().splitlines()
    assert len(lines) == 2 * 8 * 4 and set(json.loads(lines[0])) >= {"model", "prompt", "seed", "brightness"}
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved) >= {"models", "num_prompts", "seeds", "metrics", "win_rates"}
    config = (out / "config.yaml").read_text()  # the resolved flags, reusable with --config
    assert "bootstrap: 300\n" in config and "--config config.yaml" in config and "seeds:\n- 0\n" in config


def test_a_second_call_adding_a_metric_generates_nothing(first_run, work, monkeypatch):
    out, first = first_run
    stamps = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}

    def no_generation(*args, **kwargs):
        raise AssertionError("generation ran although every image is cached")

    monkeypatch.setattr(evaluate, "generate_images", no_generation)
    monkeypatch.setattr(evaluate, "load_one_step_pipeline", no_generation)
    second = run_cli(f"--pretrained_model_name_or_path={TINY_SD}", f"--lora={work / 'bright-lora'}",
                     f"--prompts_file={PROMPTS}", f"--max_prompts={NUM_PROMPTS}", "--seeds=0-3",
                     f"--metrics={BRIGHTNESS},color_match,jpeg_compressibility,clip={work / 'helpers.py'}:tiny_clip",
                     "--bootstrap=300", "--metric_batch_size=5", f"--output_dir={out}")
    for metric in first["metrics"]:
        assert second["metrics"][metric] == first["metrics"][metric]
    assert set(second["metrics"]["clip"]) == {"base", "bright-lora"}
    assert second["scale"]["clip"] == 1  # a custom spec named "clip" is not CLIP ViT-L: no paper scale
    assert {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")} == stamps
    batches = [int(n) for n in (work / "batches.log").read_text().split()]
    assert sum(batches) == 2 * 32 and max(batches) == 5  # --metric_batch_size reaches the model metric


def test_bootstrap_se_is_seeded_and_matches_the_analytic_se():
    generator = torch.Generator().manual_seed(0)
    values = 1 + 3 * torch.randn(400, 1, generator=generator, dtype=torch.float64)
    first, again, other = bootstrap_se(values, 2000, seed=1), bootstrap_se(values, 2000, seed=1), bootstrap_se(
        values, 2000, seed=2)
    assert first == again and first != other
    assert torch.equal(bootstrap_indices(50, 10, 3), bootstrap_indices(50, 10, 3))
    analytic = values.std().item() / math.sqrt(400)
    assert abs(first / analytic - 1) < 0.1  # an SE from 2000 draws is noisy by ~1.6 %: measured 0.3 % (seeded)
    # Prompts x seeds with a per-prompt effect: the SE of the mean is that of the per-prompt means.
    table = torch.randn(300, 5, generator=generator, dtype=torch.float64) + 2 * torch.randn(
        300, 1, generator=generator, dtype=torch.float64)
    analytic = table.mean(1).std().item() / math.sqrt(300)
    assert abs(bootstrap_se(table, 2000, seed=0) / analytic - 1) < 0.1  # measured 0.1 % (<= 3.4 % for seeds 0-9)


def test_win_rate_counts_ties_half():
    base = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    tuned = torch.tensor([[2.0, 2.0], [1.0, 5.0]])  # win, tie, loss, win
    rates = win_rate(base, tuned, bootstrap_indices(2, 50, 0))
    assert (rates["win"], rates["tie"], rates["loss"], rates["rate"]) == (0.5, 0.25, 0.25, 0.625)
    with_unparsed = outcome_rates(torch.tensor([[1.0, float("nan")], [0.5, 0.0]]), bootstrap_indices(2, 50, 0))
    assert (with_unparsed["win"], with_unparsed["tie"], with_unparsed["loss"]) == (1 / 3, 1 / 3, 1 / 3)


def test_wilson_interval_matches_published_values_and_never_collapses():
    # Newcombe (1998), Table I: 0/10 -> [0, 0.2775], 1/10 -> [0.0179, 0.4042]; 15/148 -> [0.0624, 0.1605]
    assert wilson_interval(0 / 10, 10) == pytest.approx([0.0, 0.2775], abs=1e-4)
    assert wilson_interval(1 / 10, 10) == pytest.approx([0.0179, 0.4042], abs=1e-4)
    assert wilson_interval(15 / 148, 148) == pytest.approx([0.0624, 0.1605], abs=1e-4)
    # one prompt, outcomes that vary: the bootstrap cannot see the design effect, so one effective pair per prompt
    assert outcome_rates(torch.tensor([[1.0, 0.0, 1.0, 1.0]]), bootstrap_indices(1, 50, 0))["effective_pairs"] == 1
    # six prompts x five seeds all won: the bootstrap's percentile interval is a point, Wilson's is not
    rates = outcome_rates(torch.ones(6, 5), bootstrap_indices(6, 200, 0))
    assert rates["bootstrap_ci"] == [1.0, 1.0] and rates["ci"] == pytest.approx([0.8865, 1.0], abs=1e-4)
    # every seed of a prompt alike: the pairs count as one per prompt (design effect = seeds per prompt)
    alike = outcome_rates(torch.tensor([[1.0] * 4, [0.0] * 4] * 4), bootstrap_indices(8, 4000, 0))
    assert alike["effective_pairs"] == pytest.approx(8, rel=0.2) and alike["ci"][1] - alike["ci"][0] > 0.5


def test_tables_in_markdown_latex_and_csv(first_run):
    """One decimals count per column (from its smallest SE), best in bold, the paired-change table, the
    CSV's numbers equal to metrics.json's (the folder's latest: another test adds a metric to it)."""
    out, _ = first_run
    result = json.loads((out / "metrics.json").read_text())
    table = (out / "metrics.md").read_text().splitlines()
    rows = [line for line in table[2:4]]
    for column, metric in enumerate(result["metrics"], start=2):
        digits = {len(cell.split(" ± ")[0].strip("* ").split(".")[1]) for cell in (r.split("|")[column] for r in rows)}
        smallest = min(result["metrics"][metric][m]["se"] for m in result["models"])
        assert digits == {1 - math.floor(math.log10(smallest))}  # two significant figures of the smallest SE
    change = table.index("Paired change against the base (same prompt and seed) ± SE; largest in bold:")
    lora = result["metrics"]["brightness"]["bright-lora"]
    assert table[change + 4].startswith(f"| bright-lora | **{lora['delta']:+.{decimals([lora['delta_se']])}f} ± ")
    tex = (out / "metrics.tex").read_text()
    assert tex.count(r"\toprule") == 2 and tex.count(r"\bottomrule") == 2 and r"\_match" in tex
    assert r"\mathbf{" in tex and r"\pm" in tex and "±" not in tex
    import csv

    records = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(records) == 2 * len(result["metrics"])
    for record in records:
        entry = result["metrics"][record["metric"]][record["model"]]
        assert float(record["mean"]) == entry["mean"] and float(record["se"]) == entry["se"]
        if record["model"] != "base":
            assert float(record["win_rate_low"]) == result["win_rates"][record["metric"]][record["model"]]["ci"][0]


def test_a_judge_that_never_parses_says_so(first_run, work):
    out, _ = first_run
    (work / "mute.py").write_text("def mute(image_a, image_b, text):\n    return 'I cannot tell.'\n")
    run_cli(f"--pretrained_model_name_or_path={TINY_SD}", f"--lora={work / 'bright-lora'}", f"--prompts_file={PROMPTS}",
            "--max_prompts=2", "--seeds=0-1", "--metrics=none", f"--judge={work / 'mute.py'}:mute",
            f"--image_cache_dir={out / 'images'}", f"--output_dir={work / 'mute'}", "--bootstrap=20")
    table = (work / "mute" / "metrics.md").read_text()
    assert "| bright-lora | – | – | – | 4 / 4 | no verdict parsed |" in table
    assert "No answer of the judge parsed as a verdict for bright-lora" in table and "None" not in table


def test_geneval_summary_arithmetic_on_hand_built_verdicts():
    verdicts = {  # prompt index: (tag, verdict of each of its 4 images)
        0: ("single_object", [1, 1, 1, 0]), 1: ("single_object", [0, 0, 0, 0]), 2: ("two_object", [1, 0, 0, 0]),
        3: ("counting", [0, 0, 0, 0]), 4: ("colors", [1, 1, 1, 1]), 5: ("position", [0, 0, 0, 0]),
        6: ("color_attr", [1, 0, 1, 0])}
    results = [{"prompt_index": i, "tag": tag, "correct": bool(c)} for i, (tag, cs) in verdicts.items() for c in cs]
    summary = geneval_summary(results)
    assert list(summary) == ["single_object", "two_object", "counting", "colors", "position", "color_attr",
                             "overall", "images", "prompts"]
    assert summary["single_object"] == 3 / 8 and summary["two_object"] == 1 / 4 and summary["counting"] == 0
    assert summary["colors"] == 1 and summary["position"] == 0 and summary["color_attr"] == 0.5
    assert summary["overall"] == pytest.approx((3 / 8 + 1 / 4 + 0 + 1 + 0 + 0.5) / 6)  # mean over tasks: measured 0
    assert summary["images"] == 10 / 28 and summary["prompts"] == 4 / 7  # GenEval's "% correct images / prompts"


GENEVAL_PROMPTS = [  # (GenEval metadata, passes with the scene below)
    ({"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"}, True),
    ({"tag": "single_object", "include": [{"class": "bus", "count": 1}], "prompt": "a photo of a bus"}, False),
    ({"tag": "two_object", "include": [{"class": "dog", "count": 1}, {"class": "bus", "count": 1}],
      "prompt": "a photo of a dog and a bus"}, False),
    ({"tag": "counting", "include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dog", "count": 3}],
      "prompt": "a photo of two dogs"}, False),
    ({"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "red"}], "prompt": "a photo of a red dog"},
     True),
    ({"tag": "position", "include": [{"class": "person", "count": 1},
                                     {"class": "dog", "count": 1, "position": ["left of", 0]}],
      "prompt": "a photo of a dog left of a person"}, True),
    ({"tag": "color_attr", "include": [{"class": "dog", "count": 1, "color": "red"},
                                       {"class": "person", "count": 1, "color": "blue"}],
      "prompt": "a photo of a red dog and a blue person"}, False),
]


def test_geneval_mode_on_tiny_stand_ins_reproduces_the_summary(tmp_path, monkeypatch):
    """GenEval's metadata file, the geneval checker on a tiny Mask2Former + CLIP whose detections and
    colours are scripted (a dog on the left, a person on the right; the dog red, the person green)."""
    pytest.importorskip("scipy", reason="the GenEval checker is the optional geneval install: pip install -e .[geneval]")
    from transformers import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor

    from pipelines.rewards.geneval import GenEvalReward

    labels = dict(enumerate(["person", "dog", "bus"]))
    config = tiny_mask2former_config(list(labels.values()))
    detector, clip = tmp_path / "tiny-mask2former", build_tiny_clip(tmp_path / "tiny-clip")
    torch.manual_seed(0)
    Mask2FormerForUniversalSegmentation(config).save_pretrained(detector)
    Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 128}).save_pretrained(detector)
    scene = {"dog": [((0, 0, 20, 20), None)], "person": [((40, 0, 60, 20), None)]}
    monkeypatch.setattr(GenEvalReward, "detect", lambda self, images, thresholds: [scene] * len(images))
    monkeypatch.setattr(GenEvalReward, "colours",
                        lambda self, image, objects, name: [{"dog": "red", "person": "green"}[name]] * len(objects))
    metadata = tmp_path / "evaluation_metadata.jsonl"
    metadata.write_text("".join(json.dumps(record) + "\n" for record, _ in GENEVAL_PROMPTS))
    result = run_cli(f"--pretrained_model_name_or_path={TINY_SD}", f"--prompts_file={metadata}", "--geneval",
                     f"--geneval_detector={detector}", f"--geneval_clip={clip}", "--metrics=none", "--seeds=0-1",
                     f"--output_dir={tmp_path / 'out'}", "--metric_batch_size=4", "--num_grids=0")
    expected = {"single_object": 0.5, "two_object": 0.0, "counting": 0.0, "colors": 1.0, "position": 1.0,
                "color_attr": 0.0}
    summary = result["geneval"]["base"]
    assert {task: summary[task] for task in expected} == expected
    # float64 means of fractions: measured 0 (default bound 1e-6 rel)
    assert summary["overall"] == pytest.approx(2.5 / 6) and summary["images"] == pytest.approx(3 / 7)
    lines = [json.loads(line) for line in (tmp_path / "out" / "geneval" / "base.jsonl").read_text().splitlines()]
    assert len(lines) == 14 and [line["correct"] for line in lines[::2]] == [ok for _, ok in GENEVAL_PROMPTS]
    assert "GenEval" in (tmp_path / "out" / "metrics.md").read_text()
    args = evaluate.parse_args([f"--pretrained_model_name_or_path={TINY_SD}", "--geneval", f"--prompts_file={PROMPTS}",
                                "--metrics=none"])
    assert evaluate.default_seeds(args) == [0, 1, 2, 3]  # GenEval's 4 images per prompt, unless --seeds says
    assert evaluate.default_seeds(evaluate.parse_args([f"--pretrained_model_name_or_path={TINY_SD}",
                                                       "--metrics=none"])) == list(range(5))


# ---------------------------------------------------------------------------------------------
# The judge
# ---------------------------------------------------------------------------------------------

PAPER_PROMPT_WORDS_SHA256 = "0029074eee6adc62587e0cee96888b646acd750c2b97c3bdcd2d2d7a88aef7b7"


def test_the_judge_prompt_is_appendix_b4_verbatim():
    words = " ".join(JUDGE_PROMPT.split())
    # sha256 of the paper's B.4 text, whitespace-collapsed, "{internallinenumbers*}" removed (computed once)
    assert hashlib.sha256(words.encode()).hexdigest() == PAPER_PROMPT_WORDS_SHA256
    lines = JUDGE_PROMPT.splitlines()
    assert lines[0] == "You are a strict text-to-image judge comparing two generated images."
    assert lines[lines.index("Text prompt:") + 1] == '"""{prompt}"""' and JUDGE_PROMPT.count("{prompt}") == 1
    assert [line[:3] for line in lines if re.match(r"\d\. ", line)] == ["1. ", "2. ", "3. ", "4. "]
    assert len([line for line in lines if line.startswith("- ")]) == 5
    assert lines[-2:] == ["Output schema:", '{"winner":"A"|"B"|"tie","confidence":0.0-1.0,"reason":"12 words or fewer"}']
    assert all(line == line.strip() for line in lines) and "internallinenumbers" not in JUDGE_PROMPT
    assert judge_text('a "red" {cat}') == JUDGE_PROMPT.replace("{prompt}", 'a "red" {cat}')


@pytest.mark.skipif(not os.path.isfile(PAPER), reason="the paper's text is not on this machine")
def test_the_judge_prompt_is_rebuilt_from_the_paper_text():
    """Wide gaps of the extraction (four no-break spaces) are blank lines, narrow ones (two) line breaks."""
    line = next(line for line in open(PAPER, encoding="utf-8") if "You are a strict text-to-image judge" in line)
    text = line.replace("{internallinenumbers*}", "")
    text = re.sub(r" *(?:\u00a0 *){4}", "\n\n", text)
    text = re.sub(r" *(?:\u00a0 *){2}", "\n", text)
    assert "\n".join(" ".join(part.split()) for part in text.strip().split("\n")) == JUDGE_PROMPT


@pytest.mark.parametrize("answer,expected", [
    ('{"winner":"A","confidence":0.8,"reason":"cleaner"}', ("A", 0.8, "cleaner")),
    ('```json\n{"winner": "b", "confidence": 1, "reason": "x"}\n```', ("B", 1.0, "x")),
    ('Verdict: {"winner": " TIE ", "confidence": 0.5, "reason": "same"} done', ("tie", 0.5, "same")),
    ('{"winner": "A", "confidence": 3, "reason": 7}', ("A", None, None)),  # bad extras dropped, winner kept
    ('{"winner": "A"} {"winner": "a"}', ("A", None, None)),  # repeated, consistent
])
def test_parse_verdict_reads_the_json_decision(answer, expected):
    verdict = parse_verdict(answer)
    assert (verdict.winner, verdict.confidence, verdict.reason) == expected


@pytest.mark.parametrize("answer", [
    "", "A", "Image A is better.", '{"winner": "C", "confidence": 0.9}', '{"winner": "A", "confidence": 0.9',
    '{"winner": ["A"]}', '{"confidence": 0.5, "reason": "no winner"}', '["A"]', '{"winner": "A"} {"winner": "B"}',
    '{"winner": "A or B"}', None, '{"winner": null}',
])
def test_malformed_answers_are_unparsed_never_guessed(answer):
    assert parse_verdict(answer) is None


def test_ab_order_is_randomised_per_pair_seeded_and_mapped_back():
    orders = [shows_candidate_second(0, "lora", f"prompt {i}", s) for i in range(100) for s in range(4)]
    assert orders == [shows_candidate_second(0, "lora", f"prompt {i}", s) for i in range(100) for s in range(4)]
    assert orders != [shows_candidate_second(1, "lora", f"prompt {i}", s) for i in range(100) for s in range(4)]
    assert 150 < sum(orders) < 250  # a fair coin per pair
    candidate, base = torch.ones(3, 4, 4), torch.zeros(3, 4, 4)
    seen = []

    def always_a(image_a, image_b, text):
        seen.append((image_a.mean().item(), text))
        return '{"winner": "A", "confidence": 0.7, "reason": "first"}'

    first = judge_pair(always_a, candidate, base, "a cat", candidate_second=False)
    second = judge_pair(always_a, candidate, base, "a cat", candidate_second=True)
    assert (first["candidate_is"], first["outcome"]) == ("A", "win")
    assert (second["candidate_is"], second["outcome"]) == ("B", "loss")
    assert seen == [(1.0, judge_text("a cat")), (0.0, judge_text("a cat"))]
    assert judge_pair(lambda a, b, t: "no idea", candidate, base, "a cat", True)["outcome"] is None


def test_scripted_judge_aggregation(first_run, work):
    """Each LoRA image against the base image of its (prompt, seed): outcomes recomputed from the cache."""
    out, _ = first_run
    (work / "judge_texts.jsonl").unlink(missing_ok=True)
    result = run_cli(f"--pretrained_model_name_or_path={TINY_SD}", f"--lora={work / 'bright-lora'}",
                     f"--prompts_file={PROMPTS}", f"--max_prompts={NUM_PROMPTS}", "--seeds=0-3", "--metrics=none",
                     f"--judge={work / 'helpers.py'}:brighter", f"--image_cache_dir={out / 'images'}", "--seed=3",
                     f"--output_dir={work / 'judged'}", "--bootstrap=200")
    prompts, counts = tiny_prompts(), {"win": 0, "tie": 0, "loss": 0, None: 0}
    # The helper judge's tie rule (1e-4); no pair is near it: the smallest |lora - base| is 0.013 (measured).
    for prompt in prompts:
        for seed in SEEDS:
            lora = cached(out / "images", "bright-lora", prompt, seed).mean().item()
            base = cached(out / "images", "base", prompt, seed).mean().item()
            outcome = None if "circle" in prompt else "tie" if abs(lora - base) < 1e-4 else (
                "win" if lora > base else "loss")
            counts[outcome] += 1
    parsed = 32 - counts[None]
    entry = result["judge"]["bright-lora"]
    assert entry["unparsed"] == counts[None] == 20 and entry["parsed"] == parsed
    for key in ("win", "tie", "loss"):  # k / 12 in float64: measured 0 (default bound 1e-6 rel)
        assert entry[key] == pytest.approx(counts[key] / parsed)
    assert entry["rate"] == pytest.approx((counts["win"] + counts["tie"] / 2) / parsed)
    assert entry["ci"][0] <= entry["rate"] <= entry["ci"][1]
    records = [json.loads(line) for line in (work / "judged" / "judge" / "bright-lora.jsonl").read_text().splitlines()]
    assert {record["candidate_is"] for record in records} == {"A", "B"}  # both orders occurred
    texts = [json.loads(line) for line in (work / "judge_texts.jsonl").read_text().splitlines()]
    assert sorted(texts) == sorted(judge_text(p) for p in prompts for _ in SEEDS)  # B.4 sent verbatim
    assert "unparsed" in (work / "judged" / "metrics.md").read_text()


class FakeOpenAIJudge(ThreadingHTTPServer):
    """A local OpenAI-compatible chat-completions server: GET /v1/models lists ``fake-vlm``; POST
    /v1/chat/completions answers the brighter image as the winner (``brighter``'s rule). /html/v1 answers an
    HTML page, /busy/v1 answers 503 to the first request, /silent/v1 accepts the request and never answers. Every request body is kept."""

    def __init__(self):
        self.requests, self.release = [], threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server API)
                self.reply(200, {"object": "list", "data": [{"id": "fake-vlm", "object": "model"}]})

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append((self.path, self.headers.get("Authorization"), body))
                if self.path.startswith("/silent/"):
                    server.release.wait(30)
                    return
                if self.path.startswith("/html/"):
                    return self.reply(200, "<html><body>502 Bad Gateway</body></html>", raw=True)
                if self.path.startswith("/busy/") and len(server.requests) == 1:
                    return self.reply(503, {"error": "loading"})
                images = [decode_png(part["image_url"]["url"].removeprefix("data:image/png;base64,"))
                          for part in body["messages"][0]["content"][:2]]
                a, b = images[0].mean().item(), images[1].mean().item()
                verdict = json.dumps({"winner": "A" if a > b else "B", "confidence": 0.9, "reason": "brighter"})
                self.reply(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": verdict}}]})

            def reply(self, status, payload, raw=False):
                data = (payload if raw else json.dumps(payload)).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def url(self, prefix=""):
        return f"http://127.0.0.1:{self.server_port}{prefix}/v1"

    def close(self):
        self.release.set()
        self.shutdown()
        self.server_close()


@pytest.fixture
def fake_judge():
    server = FakeOpenAIJudge()
    yield server
    server.close()


def test_openai_compatible_judge_end_to_end(first_run, work, fake_judge, monkeypatch):
    """--judge openai:<url>: the B.4 prompt and both images sent as image_url parts, the key from the
    environment, verdicts mapped back through the A/B order (recomputed from the cached images)."""
    out, _ = first_run
    monkeypatch.setenv("OPENAI_API_KEY", "sk-local")
    result = run_cli(f"--pretrained_model_name_or_path={TINY_SD}", f"--lora={work / 'bright-lora'}",
                     f"--prompts_file={PROMPTS}", "--max_prompts=3", "--seeds=0-1", "--metrics=none",
                     f"--judge=openai:{fake_judge.url()}", "--judge_model=fake-vlm", "--judge_max_new_tokens=40",
                     f"--image_cache_dir={out / 'images'}", f"--output_dir={work / 'openai'}", "--bootstrap=50")
    prompts, wins = tiny_prompts(3), 0
    for prompt in prompts:
        for seed in (0, 1):
            lora = cached(out / "images", "bright-lora", prompt, seed).mean().item()
            wins += lora > cached(out / "images", "base", prompt, seed).mean().item()
    entry = result["judge"]["bright-lora"]
    assert entry["parsed"] == 6 and entry["unparsed"] == 0 and entry["win"] == pytest.approx(wins / 6)
    assert len(fake_judge.requests) == 6
    for path, authorization, body in fake_judge.requests:
        assert path == "/v1/chat/completions" and authorization == "Bearer sk-local"
        assert (body["model"], body["temperature"], body["max_tokens"]) == ("fake-vlm", 0, 40)
        content = body["messages"][0]["content"]
        assert [part["type"] for part in content] == ["image_url", "image_url", "text"]
    assert sorted(body["messages"][0]["content"][2]["text"] for _, _, body in fake_judge.requests) == \
        sorted(judge_text(prompt) for prompt in prompts for _ in (0, 1))
    assert result["judge_model"] == f"fake-vlm at openai:{fake_judge.url()}"


def test_openai_judge_names_its_url_and_keeps_a_total_deadline(fake_judge):
    image = torch.rand(3, 8, 8)
    judge = OpenAIJudge(fake_judge.url(), "fake-vlm")
    assert judge.answer_of(200, b'{"choices": [{"message": {"content": null}}]}') == ""  # no text: unparsed
    assert parse_verdict(OpenAIJudge(fake_judge.url("/busy"), "fake-vlm", backoff=0.05)(image, image, "text"))
    assert len(fake_judge.requests) == 2  # the 503 was retried
    with pytest.raises(RuntimeError, match=r"judge .*/html/v1/chat/completions did not answer JSON .*<html>"):
        OpenAIJudge(fake_judge.url("/html"), "fake-vlm")(image, image, "text")
    # accepted, never answered: retried until the whole judgement's deadline, then a clear error
    with pytest.raises(RuntimeError, match=r"gave no answer within 1.5 s \(--judge_timeout; 1 attempt, last: "
                                           r"TimeoutError"):
        OpenAIJudge(fake_judge.url("/silent"), "fake-vlm", deadline=1.5, backoff=0.2)(image, image, "text")


@pytest.mark.parametrize("judge,model,message", [
    ("openai:{url}", None, r"needs an http\(s\) base URL .* and --judge_model"),
    ("openai:{url}", "other", "does not serve --judge_model 'other'; it serves: fake-vlm"),
    ("openai:http://127.0.0.1:9/v1", "m", "not reachable as an OpenAI-compatible API"),
    ("http://127.0.0.1:8001/judge", None, "serve the judge behind an OpenAI-compatible API"),
    (None, "m", "--judge_model names the served model"),
])
def test_judge_flags_are_checked_before_anything_loads(fake_judge, capsys, judge, model, message):
    given = ([f"--judge={judge.format(url=fake_judge.url())}"] if judge else []) + \
        ([f"--judge_model={model}"] if model else [])
    with pytest.raises(SystemExit):
        evaluate.parse_args([f"--pretrained_model_name_or_path={TINY_SD}", "--metrics=none", *given])
    assert re.search(message, capsys.readouterr().err)


TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for part in message['content'] %}"
            "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ part['text'] }}"
            "{% endif %}{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
            "{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>"]


def build_tiny_qwen25_vl(path) -> str:
    """A random Qwen2.5-VL (one text and one vision layer, width 32) with a byte-level BPE tokenizer
    trained on the judge prompt and Qwen's special tokens, saved with save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                              Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator([JUDGE_PROMPT], trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL,
                                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL}
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=56 * 56),
                                    tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(),
                                    chat_template=TEMPLATE)
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"],
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[0]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def test_tiny_qwen25_vl_judges_end_to_end(first_run, work, monkeypatch):
    pytest.importorskip("torchvision", reason="Qwen-VL's processors need torchvision: the judge extra, "
                                              "pip install -e .[judge]")
    from transformers import Qwen2_5_VLProcessor

    out, _ = first_run
    vlm = build_tiny_qwen25_vl(work / "tiny-qwen2.5-vl")
    sent = []
    original = Qwen2_5_VLProcessor.apply_chat_template
    monkeypatch.setattr(Qwen2_5_VLProcessor, "apply_chat_template",
                        lambda self, messages, **kwargs: sent.append(messages) or original(self, messages, **kwargs))
    result = run_cli(f"--pretrained_model_name_or_path={TINY_SD}", f"--lora={work / 'bright-lora'}",
                     f"--prompts_file={PROMPTS}", "--max_prompts=2", "--seeds=0-1", "--metrics=none",
                     f"--judge={vlm}", "--judge_max_new_tokens=12", f"--image_cache_dir={out / 'images'}",
                     f"--output_dir={work / 'vlm'}", "--bootstrap=50")
    entry = result["judge"]["bright-lora"]
    assert entry["parsed"] + entry["unparsed"] == 4  # random weights: mostly unparsed, every answer counted
    records = [json.loads(line) for line in (work / "vlm" / "judge" / "bright-lora.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(isinstance(record["answer"], str) for record in records)
    assert sum(record["outcome"] is None for record in records) == entry["unparsed"]
    prompts = tiny_prompts(2)
    texts = [message[0]["content"][2]["text"] for message in sent]
    assert [part["type"] for part in sent[0][0]["content"]] == ["image", "image", "text"]
    assert texts == [judge_text(prompts[i]) for i in (0, 0, 1, 1)]


# ---------------------------------------------------------------------------------------------
# Two processes, prompt sets, sampling modes, flags
# ---------------------------------------------------------------------------------------------


def test_two_processes_give_the_same_metrics_json_as_one(work, tmp_path):
    common = [f"--pretrained_model_name_or_path={TINY_SD}", f"--lora={work / 'bright-lora'}",
              f"--prompts_file={PROMPTS}", "--max_prompts=5", "--seeds=0-1", f"--metrics={BRIGHTNESS},color_match",
              f"--judge={work / 'helpers.py'}:brighter", "--bootstrap=200", "--metric_batch_size=3"]
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    out = subprocess.run([torchrun, "--nproc_per_node=2", "--master_port=29531", "-m", "pipelines.evaluate", *common,
                          f"--output_dir={tmp_path / 'two'}"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "ACCELERATE_USE_CPU": "true", "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1",
                              "OMP_NUM_THREADS": "1"})  # torchrun keeps a caller's OMP_NUM_THREADS=2
    assert out.returncode == 0, out.stderr[-3000:]
    shares = sorted(re.findall(r"process (\d)/(\d): generated (\d+) images", out.stderr))
    assert shares == [("1", "2", "12"), ("2", "2", "8")], shares  # 3 + 2 prompts x 2 seeds x 2 models, not 20 each
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process: same pixels, bit for bit
    try:
        run_cli(*common, f"--output_dir={tmp_path / 'one'}")
    finally:
        torch.set_num_threads(threads)
    two, one = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("two", "one"))
    assert two == one and two["num_prompts"] == 5
    assert (tmp_path / "two" / "metrics.md").read_text() == (tmp_path / "one" / "metrics.md").read_text()
    assert len(list((tmp_path / "two" / "images").rglob("*.png"))) == 2 * 5 * 2  # every image, once


def test_prompt_sets_from_datasets_and_presets(tmp_path):
    from datasets import Dataset, DatasetDict

    prompts = tiny_prompts(4)
    Dataset.from_dict({"caption": prompts + prompts[:2]}).save_to_disk(str(tmp_path / "flat"))
    DatasetDict({"test": Dataset.from_dict({"text": prompts})}).save_to_disk(str(tmp_path / "splits"))
    Dataset.from_dict({"Prompt": prompts}).to_parquet(str(tmp_path / "parquet" / "train.parquet"))
    assert load_prompt_set(dataset_name=str(tmp_path / "flat"), column="caption").prompts == prompts + prompts[:2]
    assert load_prompt_set(dataset_name=str(tmp_path / "flat"), column="caption", unique=True).prompts == prompts
    assert load_prompt_set(dataset_name=str(tmp_path / "splits"), split="test", column="text",
                           max_prompts=3).prompts == prompts[:3]
    assert load_prompt_set(dataset_name=str(tmp_path / "parquet"), split="train", column="Prompt").prompts == prompts
    with pytest.raises(ValueError, match="prompt column 'prompt' not in"):
        load_prompt_set(dataset_name=str(tmp_path / "flat"))
    with pytest.raises(ValueError, match="exactly one"):
        load_prompt_set(prompts_file=PROMPTS, dataset_name=str(tmp_path / "flat"))
    assert set(PROMPT_SETS) == {"pickapic_v2_test", "parti_prompts", "hpdv2_test", "geneval", "pickscore_test"}
    assert (PROMPT_SETS["pickapic_v2_test"].split, PROMPT_SETS["pickapic_v2_test"].column) == ("test_unique", "caption")
    geneval = load_prompt_set(preset="geneval")  # shipped: nothing to download
    assert len(geneval.prompts) == 553 and geneval.records[0]["tag"] == "single_object"
    assert len(load_prompt_set(preset="pickscore_test").prompts) == 2048


def test_a_finetuned_unet_folder_and_a_dataset_prompt_set(first_run, tmp_path):
    """The third sampling mode: the base model's own UNet folder, swapped in, reproduces the base images."""
    from datasets import Dataset

    out, _ = first_run
    prompts = tiny_prompts(2)
    Dataset.from_dict({"caption": prompts + prompts}).save_to_disk(str(tmp_path / "set"))
    result = run_cli(f"--pretrained_model_name_or_path={TINY_SD}", f"--unet=same-unet={os.path.join(TINY_SD, 'unet')}",
                     f"--dataset_name={tmp_path / 'set'}", "--prompt_column=caption", "--unique_prompts",
                     "--seeds=0-1", "--metrics=color_match", f"--image_cache_dir={out / 'images'}",
                     f"--output_dir={tmp_path / 'out'}", "--bootstrap=50")
    assert result["models"] == ["base", "same-unet"] and result["num_prompts"] == 2
    assert result["model_sources"]["same-unet"]["kind"] == "unet"
    for prompt in prompts:
        for seed in (0, 1):
            torch.testing.assert_close(cached(out / "images", "same-unet", prompt, seed),
                                       cached(out / "images", "base", prompt, seed), atol=1 / 255, rtol=0)
    # Scores follow the images: each cached pixel differs by at most 1/255 per channel (PNG rounding of
    # float-kernel noise; which pixels round differently depends on the CPU), and color_match is Lipschitz
    # in a pixel with constant max ||grad|| = e^(-1/2) / width = 2.43, so a score moves at most
    # 2.43 * sqrt(3) / 255 = 0.0165. (Exact ties are not guaranteed: they were 100 % on one machine, 50 % on another.)
    rows = [json.loads(line) for line in (tmp_path / "out" / "scores.jsonl").read_text().splitlines()]
    score = {(row["model"], row["prompt"], row["seed"]): row["color_match"] for row in rows}
    bound = math.exp(-0.5) / 0.25 * math.sqrt(3) / 255
    for prompt in prompts:
        for seed in (0, 1):
            assert abs(score["same-unet", prompt, seed] - score["base", prompt, seed]) <= bound


def test_model_and_metric_names():
    models = eval_cache.parse_models([TINY_SD, "mine=org/some-lora"], ["tuned=/nowhere/unet"])
    assert [(m.label, m.kind) for m in models] == [("base", "base"), ("tiny-sd-turbo", "lora"), ("mine", "lora"),
                                                   ("tuned", "unet")]
    assert eval_cache.parse_models(["org/some-lora"], [])[1].label == "org/some-lora"  # a Hub id names itself
    with pytest.raises(ValueError, match="repeat"):
        eval_cache.parse_models(["a=x", "a=y"], [])
    assert evaluate.metric_label("pickscore") == ("pickscore", "pickscore")
    assert evaluate.metric_label(f"{REWARDS}:darkness") == ("darkness", f"{REWARDS}:darkness")
    assert evaluate.metric_label("http://127.0.0.1:8000/score?a=b") == ("http://127.0.0.1:8000/score?a=b",) * 2
    assert evaluate.parse_args(["--pretrained_model_name_or_path=m", "--seeds=0-4", "--metrics=none"]).seeds == tuple(
        range(5))
    assert evaluate.parse_args(["--pretrained_model_name_or_path=m", "--seeds=3,1", "--metrics=none"]).seeds == (3, 1)


def test_every_flag_is_documented_in_the_evaluation_page():
    section = open(os.path.join(ROOT, "docs", "evaluation.md"), encoding="utf-8").read()
    rows = dict(re.findall(r"^\| `(--[a-z0-9_]+)` \| (.*?) \|", section, re.M))
    actions = [a for a in evaluate.build_parser()._actions if a.option_strings[0] != "-h"]
    assert set(rows) == {a.option_strings[0] for a in actions}
    assert all(action.help for action in actions)
    for action in actions:
        expected = "required" if action.required else f"`{action.default}`"
        assert rows[action.option_strings[0]].startswith(expected), (action.option_strings[0], expected)
    assert "<!-- results:evaluation -->" in section and "--prompt_set pickapic_v2_test" in section
