"""The README's measured tables are generated, never typed: each benchmark saves its result as
``benchmarks/results/<name>.json`` (with the rendered ``markdown``) and, with ``--update_readme``,
writes that markdown between ``<!-- results:<name> -->`` and ``<!-- /results:<name> -->`` in the
README. ``tests/test_readme.py`` checks every block against its saved result.
"""

from __future__ import annotations

import json
import os
import re

from benchmarks.harness import ROOT

README = os.path.join(ROOT, "README.md")
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")


def block_pattern(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- results:{re.escape(name)} -->\n)(.*?)(<!-- /results:{re.escape(name)} -->)", re.S)


def readme_block(name: str, text: str | None = None) -> str | None:
    """The markdown between the markers of ``name`` in the README (None if it has no such block)."""
    text = open(README, encoding="utf-8").read() if text is None else text
    match = block_pattern(name).search(text)
    return match.group(2) if match else None


def save_result(name: str, result: dict, markdown: str, update_readme: bool = False) -> str:
    """Write ``benchmarks/results/<name>.json`` and, if asked, the README block; returns the path."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{name}.json")
    staging = path + ".tmp"
    with open(staging, "w", encoding="utf-8") as handle:
        json.dump({**result, "markdown": markdown}, handle, indent=2, allow_nan=False)
    os.replace(staging, path)
    if update_readme:
        text = open(README, encoding="utf-8").read()
        if readme_block(name, text) is None:
            raise KeyError(f"README.md has no <!-- results:{name} --> block to update")
        body = markdown.rstrip("\n") + "\n"
        text = block_pattern(name).sub(lambda m: m.group(1) + body + m.group(3), text)
        with open(README + ".tmp", "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(README + ".tmp", README)
    return path


def saved_results() -> dict[str, dict]:
    """Every saved result, by name."""
    if not os.path.isdir(RESULTS_DIR):
        return {}
    return {file[:-5]: json.load(open(os.path.join(RESULTS_DIR, file), encoding="utf-8"))
            for file in sorted(os.listdir(RESULTS_DIR)) if file.endswith(".json")}
