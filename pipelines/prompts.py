"""Prompt sets for training and evaluation: a .txt / .jsonl file or a ``datasets`` dataset.

Every prompt is checked when the set is loaded (before any model), so a bad line is reported with
its file and line number instead of crashing the run when it is drawn.
"""

from __future__ import annotations

import json
import logging
import os

logger = logging.getLogger(__name__)


MAX_PROMPT_CHARACTERS = 2000  # CLIP reads 77 tokens (a few hundred characters); longer text is never seen


def read_prompts_file(path: str, key: str = "prompt") -> list[str]:
    """``.txt``: one prompt per non-blank line. ``.jsonl``: one JSON object per line, prompt under ``key``.
    A file that is not UTF-8 is refused naming the line; a prompt longer than MAX_PROMPT_CHARACTERS is cut
    there, with a warning naming the line (the text encoders keep 77 tokens, far fewer characters)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--prompts_file {path!r} does not exist")
    prompts = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"--prompts_file {path}, line {number}: not UTF-8 text ({error.reason} at byte "
                                 f"{error.start}); save the prompts file as UTF-8") from None
            if not line.strip():
                continue
            prompt = _jsonl_prompt(line, key, path, number) if path.endswith(".jsonl") else line.strip()
            prompts.append(_capped(prompt, f"{path}, line {number}"))
    return prompts


def _capped(prompt: str, where: str) -> str:
    if len(prompt) <= MAX_PROMPT_CHARACTERS:
        return prompt
    logger.warning(f"{where}: a prompt of {len(prompt):,} characters, cut to {MAX_PROMPT_CHARACTERS:,} (the text "
                   "encoder reads 77 tokens, a few hundred characters)")
    return prompt[:MAX_PROMPT_CHARACTERS]


def _jsonl_prompt(line: str, key: str, path: str, number: int) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}, line {number}: not valid JSON ({error.msg})") from error
    if not isinstance(record, dict) or key not in record:
        raise ValueError(f"{path}, line {number}: no {key!r} key (set it with --prompt_column)")
    prompt = record[key]
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{path}, line {number}: the prompt must be a non-empty string, got {prompt!r}")
    return prompt.strip()


def read_prompts_dataset(name: str, split: str = "train", column: str = "prompt") -> list[str]:
    """The ``column`` of a ``datasets`` dataset (Hub id or local folder); rows without a string prompt are skipped."""
    from datasets import load_dataset

    dataset = load_dataset(name, split=split)
    if column not in dataset.column_names:
        raise ValueError(f"prompt column {column!r} not in {dataset.column_names} of {name!r}")
    return [_capped(p.strip(), f"{name} row {row}") for row, p in enumerate(dataset[column])
            if isinstance(p, str) and p.strip()]


def load_prompts(prompts_file: str | None = None, dataset_name: str | None = None, split: str = "train",
                 column: str = "prompt") -> list[str]:
    """Prompts from a file or a dataset; never empty."""
    if prompts_file is not None:
        prompts, source = read_prompts_file(prompts_file, column), prompts_file
    elif dataset_name is not None:
        prompts, source = read_prompts_dataset(dataset_name, split, column), dataset_name
    else:
        raise ValueError("give prompts with --prompts_file or --dataset_name")
    if not prompts:
        raise ValueError(f"no prompts found in {source!r}")
    return prompts
