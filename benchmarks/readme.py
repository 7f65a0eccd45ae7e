"""The documents' measured tables are generated, never typed: each benchmark saves its result as
``benchmarks/results/<name>.json`` (with the rendered ``markdown``) and, with ``--update_readme``,
writes that markdown between ``<!-- results:<name> -->`` and ``<!-- /results:<name> -->`` in the
document that holds the block (README.md or a page of docs/). ``tests/test_readme.py`` checks every
block against its saved result.
"""

from __future__ import annotations

import json
import os
import re

from benchmarks.harness import ROOT

README = os.path.join(ROOT, "README.md")
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")


def documents() -> list[str]:
    """README.md and every page of docs/."""
    folder = os.path.join(ROOT, "docs")
    pages = sorted(os.path.join(folder, name) for name in os.listdir(folder) if name.endswith(".md"))
    return [README, *pages]


def document_with(name: str) -> str | None:
    """The document that holds the block of ``name``."""
    for path in documents():
        if block_pattern(name).search(open(path, encoding="utf-8").read()):
            return path
    return None


def block_pattern(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- results:{re.escape(name)} -->\n)(.*?)(<!-- /results:{re.escape(name)} -->)", re.S)


def readme_block(name: str, text: str | None = None) -> str | None:
    """The markdown between the markers of ``name`` in ``text`` or, without it, in the document that holds
    them (None if none does)."""
    if text is None:
        path = document_with(name)
        text = "" if path is None else open(path, encoding="utf-8").read()
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
        document = document_with(name)
        if document is None:
            raise KeyError(f"no document has a <!-- results:{name} --> block to update")
        body = markdown.rstrip("\n") + "\n"
        text = open(document, encoding="utf-8").read()
        text = block_pattern(name).sub(lambda m: m.group(1) + body + m.group(3), text)
        with open(document + ".tmp", "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(document + ".tmp", document)
    return path


def saved_results() -> dict[str, dict]:
    """Every saved result, by name."""
    if not os.path.isdir(RESULTS_DIR):
        return {}
    return {file[:-5]: json.load(open(os.path.join(RESULTS_DIR, file), encoding="utf-8"))
            for file in sorted(os.listdir(RESULTS_DIR)) if file.endswith(".json")}
