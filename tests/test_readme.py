"""The README's flag table and commands stay true to the code."""

import argparse
import glob
import os
import re

import pytest
from conftest import ROOT

import train_drpo
import train_drpo_sdxl
from pipelines import cli

README = open(f"{ROOT}/README.md").read()
FLAG_ROWS = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(--[a-z0-9_]+)` \| (.*?) \|", README, re.M)}


def options(parse_args, monkeypatch):
    """(flag, default, required) of every option a script's ``parse_args`` defines."""
    parsers = []

    def capture(parser, args=None, namespace=None):
        parsers.append(parser)
        raise SystemExit

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(SystemExit):
        parse_args([])
    monkeypatch.undo()
    return [(a.option_strings[0], a.default, a.required) for a in parsers[0]._actions if a.option_strings[0] != "-h"]


@pytest.mark.parametrize("parse_args", [train_drpo.parse_args, train_drpo_sdxl.parse_args])
def test_every_flag_is_in_the_flag_table_with_its_default(parse_args, monkeypatch):
    for flag, default, required in options(parse_args, monkeypatch):
        assert flag in FLAG_ROWS, f"{flag} missing from the README's flag table"
        cell = FLAG_ROWS[flag]
        if parse_args is train_drpo.parse_args:
            assert cell.startswith("required" if required else f"`{default}`"), (flag, cell, default)
        else:  # the SDXL script's own defaults are named in the same cell
            assert f"`{default}`" in cell or required, (flag, cell, default)


def test_quickstart_flags_exist():
    quickstart = README.split("**1. Install and run the main job**")[1].split("```")[1]
    flags = set(re.findall(r"(--[a-z0-9_]+)=", quickstart))
    assert flags and flags <= set(FLAG_ROWS), flags - set(FLAG_ROWS)


def test_the_quickstart_benchmark_measures_the_readme_command():
    from benchmarks.quickstart import LAUNCHER, QUICKSTART_FLAGS

    quickstart = README.split("**1. Install and run the main job**")[1].split("```")[1]
    assert re.findall(r"--[a-z0-9_]+=[^\s\\]+", quickstart) == QUICKSTART_FLAGS
    assert "accelerate launch " + " ".join(LAUNCHER[2:]) + " train_drpo.py" in quickstart


def python_block_after(heading: str) -> str:
    return README.split(heading, 1)[1].split("```python\n", 1)[1].split("```", 1)[0]


def test_loading_snippet_runs_on_the_tiny_model_without_warnings(tmp_path):
    """The README's "Load the result anywhere" code, with the tiny model and a LoRA in place of the real ones."""
    import subprocess
    import sys

    from conftest import TINY_SD

    from pipelines import lora_files
    from pipelines.config import AdapterConfig
    from pipelines.inference import load_one_step_pipeline

    pipe = load_one_step_pipeline(TINY_SD)
    lora_files.add_lora(pipe.unet, AdapterConfig(rank=4, lora_alpha=4))
    lora_files.save_lora(str(tmp_path / "lora"), pipe.unet, type(pipe))
    snippet = python_block_after("Load the result anywhere")
    assert '"stabilityai/sd-turbo"' in snippet and '"drpo-sd-turbo"' in snippet
    snippet = snippet.replace('"stabilityai/sd-turbo"', repr(TINY_SD)).replace('"drpo-sd-turbo"', repr(str(tmp_path / "lora")))
    snippet += "\nassert image.size == (64, 64)\nprint('ok')\n"
    out = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, cwd=tmp_path,
                         env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
    noise = [line for line in out.stderr.splitlines() if "warn" in line.lower() or "deprecat" in line.lower()
             or "No LoRA keys" in line]
    assert noise == [], noise


def test_readme_result_blocks_are_the_saved_benchmark_results():
    from benchmarks.readme import readme_block, saved_results

    results = saved_results()
    assert "quickstart" in results
    for name, result in results.items():
        block = readme_block(name, README)
        assert block is not None, f"README has no <!-- results:{name} --> block"
        assert block == result["markdown"].rstrip("\n") + "\n", f"README block {name!r} differs from its saved result"


def test_drift_flag_rows_state_both_presets():
    for flag, (field, _, _) in cli.DRIFT_FLAGS.items():
        cell = FLAG_ROWS[f"--{flag}"]
        for preset in ("paper", "authors"):
            assert f"{preset}: `{cli.shown(cli.preset_value(preset, field))}`" in cell, (flag, cell)


DOCUMENTS = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
CODE_NAME = re.compile(r"`((?:pipelines|drpo_utils|train_drpo|train_drpo_sdxl|benchmarks)(?:\.[A-Za-z_]\w*)+)`")
FILE_NAME = re.compile(r"`((?:pipelines|benchmarks|tests|assets|docs|configs)/[\w./-]+\.(?:py|md|json|txt|png|jsonl))`")


def resolves(dotted: str) -> bool:
    """Whether ``a.b.c`` names a module, or an attribute reached from the longest importable module prefix."""
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if not hasattr(target, name):
                return False
            target = getattr(target, name)
        return True
    return False


def test_every_code_reference_in_the_documents_exists():
    """`module.function` and `folder/file.py` references in the README and docs/ point at code that exists."""
    missing = []
    for document in DOCUMENTS:
        text = open(document, encoding="utf-8").read()
        missing += [f"{os.path.basename(document)}: {name}" for name in CODE_NAME.findall(text)
                    if not name.endswith((".py", ".md")) and not resolves(name)]
        missing += [f"{os.path.basename(document)}: {path}" for path in FILE_NAME.findall(text)
                    if not glob.glob(os.path.join(ROOT, path))]
    assert missing == []


def test_the_reference_check_finds_a_moved_function():
    assert resolves("drpo_utils.drift_field") and resolves("pipelines.rewards.REWARDS")
    assert not resolves("train_drpo.reference_features_that_moved") and not resolves("pipelines.nowhere.thing")
