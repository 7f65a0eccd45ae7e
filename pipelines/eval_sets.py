"""Evaluation prompt sets (the paper's, as presets) and GenEval's protocol and summary.

A preset names where a set lives: a Hub dataset (loaded through ``datasets``), or one of the prompt
files shipped in ``assets/prompts/`` (GenEval's metadata, the authors' Pick-a-Pic test split).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from pipelines.prompts import read_prompts_file


@dataclass(frozen=True)
class PromptSetPreset:
    source: str  # a Hub dataset id, or a prompt file shipped in assets/prompts/
    split: str | None
    column: str
    unique: bool = False  # drop repeated prompts (first occurrence kept)
    about: str = ""


SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "prompts")
PROMPT_SETS = {
    "pickapic_v2_test": PromptSetPreset("yuvalkirstain/pickapic_v2_no_images", "test_unique", "caption", unique=True,
                                        about="Pick-a-Pic v2 test split, unique captions (paper: 424 prompts)"),
    "parti_prompts": PromptSetPreset("nateraw/parti-prompts", "train", "Prompt", about="PartiPrompts (1,632)"),
    "hpdv2_test": PromptSetPreset("zhwang/HPDv2", "test", "prompt", about="HPD v2 test prompts"),
    "geneval": PromptSetPreset(os.path.join(SHIPPED, "geneval_evaluation_metadata.jsonl"), None, "prompt",
                               about="GenEval evaluation_metadata.jsonl (553 prompts; 4 images per prompt), shipped"),
    "pickscore_test": PromptSetPreset(os.path.join(SHIPPED, "pickscore_test.txt"), None, "prompt",
                                      about="the authors' / flow_grpo's Pick-a-Pic test split (2,048), shipped"),
}
GENEVAL_IMAGES_PER_PROMPT = 4  # GenEval's protocol (its generation script's default n_samples)


@dataclass
class PromptSet:
    prompts: list[str]
    records: list[dict | None] = field(default_factory=list)  # the .jsonl record of each prompt (GenEval metadata)
    source: str = ""


def read_records(path: str) -> list[dict]:
    """The JSON objects of a .jsonl file, one per non-blank line."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def read_dataset(name: str, split: str, column: str) -> list[str]:
    """The ``column`` of a Hub dataset, a local data folder (parquet/json/csv) or a folder written by
    ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    import datasets

    if os.path.isdir(name) and any(os.path.isfile(os.path.join(name, f)) for f in ("state.json", "dataset_dict.json")):
        dataset = datasets.load_from_disk(name)
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise ValueError(f"split {split!r} not in {list(dataset)} of {name!r}")
            dataset = dataset[split]
    else:
        dataset = datasets.load_dataset(name, split=split)
    if column not in dataset.column_names:
        raise ValueError(f"prompt column {column!r} not in {dataset.column_names} of {name!r} (set --prompt_column)")
    return [p.strip() for p in dataset[column] if isinstance(p, str) and p.strip()]


def load_prompt_set(prompts_file: str | None = None, dataset_name: str | None = None, split: str = "test",
                    column: str = "prompt", preset: str | None = None, max_prompts: int | None = None,
                    unique: bool = False) -> PromptSet:
    """Prompts from a preset, a .txt/.jsonl file or a dataset, optionally deduplicated and cut to the
    first ``max_prompts``. A .jsonl file keeps each prompt's record (GenEval's tag, include, exclude)."""
    if sum(x is not None for x in (prompts_file, dataset_name, preset)) != 1:
        raise ValueError("give exactly one of --prompt_set, --prompts_file and --dataset_name")
    if preset is not None:
        chosen = PROMPT_SETS[preset]
        unique = unique or chosen.unique
        if os.path.isfile(chosen.source):  # a shipped file
            prompts_file, column = chosen.source, chosen.column
        else:
            dataset_name, split, column = chosen.source, chosen.split, chosen.column
    if prompts_file is not None:
        prompts, source = read_prompts_file(prompts_file, column), prompts_file
        records = read_records(prompts_file) if prompts_file.endswith(".jsonl") else [None] * len(prompts)
    else:
        prompts, source = read_dataset(dataset_name, split, column), f"{dataset_name} ({split})"
        records = [None] * len(prompts)
    if unique:
        first = {}
        for index, prompt in enumerate(prompts):
            first.setdefault(prompt, index)
        keep = sorted(first.values())
        prompts, records = [prompts[i] for i in keep], [records[i] for i in keep]
    if max_prompts is not None:
        prompts, records = prompts[:max_prompts], records[:max_prompts]
    if not prompts:
        raise ValueError(f"no prompts found in {source!r}")
    return PromptSet(prompts, records, source)


# ---------------------------------------------------------------------------------------------
# GenEval
# ---------------------------------------------------------------------------------------------

GENEVAL_TASKS = {"single_object": "Single", "two_object": "Two", "counting": "Count", "colors": "Colors",
                 "position": "Position", "color_attr": "Color Attr."}  # GenEval's tags -> the paper's labels


def geneval_tag(record: dict | None, prompt: str, checker) -> str:
    """A prompt's GenEval task: its metadata's ``tag``, else read back from the prompt's template."""
    if record and "tag" in record:
        return record["tag"]
    return checker.metadata(prompt)["tag"]


def geneval_summary(results: list[dict]) -> dict[str, float]:
    """GenEval's ``summary_scores.py`` arithmetic on per-image results ``{"prompt_index", "tag", "correct"}``:
    each task's score is the fraction of its images judged correct; ``overall`` is the mean of the task
    scores (not of the images); ``images`` is the fraction of correct images, ``prompts`` the fraction
    of prompts with at least one correct image. Tasks in GenEval's order, then any other tag seen."""
    by_task: dict[str, list[bool]] = {}
    by_prompt: dict[int, bool] = {}
    for result in results:
        by_task.setdefault(result["tag"], []).append(bool(result["correct"]))
        by_prompt[result["prompt_index"]] = by_prompt.get(result["prompt_index"], False) or bool(result["correct"])
    order = [tag for tag in GENEVAL_TASKS if tag in by_task] + [tag for tag in by_task if tag not in GENEVAL_TASKS]
    summary = {tag: sum(by_task[tag]) / len(by_task[tag]) for tag in order}
    summary["overall"] = sum(summary.values()) / len(summary) if summary else float("nan")
    summary["images"] = sum(map(sum, by_task.values())) / max(1, sum(map(len, by_task.values())))
    summary["prompts"] = sum(by_prompt.values()) / max(1, len(by_prompt))
    return summary
