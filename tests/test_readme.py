"""The README and the docs/ pages stay true to the code: generated flag tables, commands, snippets,
measured blocks and every code reference."""

import glob
import json
import os
import re

import pytest
from conftest import ROOT

from pipelines import drift_flags

README = open(f"{ROOT}/README.md").read()
FLAGS_PAGE = open(f"{ROOT}/docs/flags.md").read()
FLAG_ROWS = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(--[a-z0-9_]+)` \| (.*?) \|", FLAGS_PAGE, re.M)}


@pytest.mark.parametrize("page", ["training", "evaluation"])
def test_the_flag_pages_are_generated_from_the_parsers(page):
    """docs/flags.md and docs/evaluation.md hold exactly what ``python -m benchmarks.flags_page --write`` writes."""
    from benchmarks.flags_page import RENDER, page_block

    assert page_block(page) == RENDER[page](), f"run python -m benchmarks.flags_page --write ({page} is out of date)"


def test_the_readme_is_a_map():
    """The front door stays short: the two commands, the paper map, the layout, links to docs/."""
    assert README.count("\n") <= 300
    links = set(re.findall(r"\]\((docs/[\w.-]+\.md)\)", README))
    assert links == {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md"))}


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
    snippet = snippet.replace('"stabilityai/sd-turbo"', repr(TINY_SD))
    snippet = snippet.replace('"drpo-sd-turbo"', repr(str(tmp_path / "lora")))
    snippet += "\nassert image.size == (64, 64)\nprint('ok')\n"
    out = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, cwd=tmp_path,
                         env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
    noise = [line for line in out.stderr.splitlines() if "warn" in line.lower() or "deprecat" in line.lower()
             or "No LoRA keys" in line]
    assert noise == [], noise


def test_measured_blocks_are_the_saved_benchmark_results():
    """Every saved benchmark result is shown, unedited, in the one document that holds its block."""
    from benchmarks.readme import document_with, documents, readme_block, saved_results

    results = saved_results()
    assert "quickstart" in results and readme_block("quickstart", README) is not None
    for name, result in results.items():
        holders = [path for path in documents() if readme_block(name, open(path, encoding="utf-8").read())]
        assert len(holders) == 1, f"<!-- results:{name} --> is in {holders} (one document should hold it)"
        assert readme_block(name) == result["markdown"].rstrip("\n") + "\n", f"{document_with(name)}: {name!r}"


def test_drift_flag_rows_state_both_presets():
    for flag, (field, _, _) in drift_flags.DRIFT_FLAGS.items():
        cell = FLAG_ROWS[f"--{flag}"]  # "the preset's (paper: `...`, authors: `...`)"
        for preset in ("paper", "authors"):
            assert f"{preset}: `{drift_flags.shown(drift_flags.preset_value(preset, field))}`" in cell, (flag, cell)


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


FEWER_STEPS = {  # the README's step counts, cut so that every command runs in seconds
    "--max_train_steps=100": "--max_train_steps=2", "--max_train_steps=200": "--max_train_steps=3",
    "--checkpointing_steps=50": "--checkpointing_steps=1", "--validation_steps=50": "--validation_steps=2"}
CHECKOUT = ["assets", "pipelines", "drpo_utils.py", "train_drpo.py", "train_drpo_sdxl.py", "train_drpo_flux.py"]


def shell_commands(block: str) -> list[list[str]]:
    """The commands of a bash block (comments dropped, continuation lines joined), with FEWER_STEPS applied;
    fails if a step count is left that FEWER_STEPS does not cut."""
    import shlex

    text = re.sub(r"\\\n\s*", " ", "\n".join(line for line in block.splitlines() if not line.lstrip().startswith("#")))
    for readme_value, test_value in FEWER_STEPS.items():
        text = text.replace(readme_value, test_value)
    commands = [shlex.split(line, comments=True) for line in text.splitlines() if line.strip()]
    steps = {arg for argv in commands for arg in argv if arg.startswith(("--max_train_steps", "--checkpointing_steps"))}
    assert steps <= set(FEWER_STEPS.values()), f"a README step count FEWER_STEPS does not cut: {steps}"
    return commands


def run_as_user(argv: list[str], cwd) -> None:
    """One README command in a folder laid out like a clone, offline, with this environment's programs."""
    import subprocess
    import sys

    programs = {"python": sys.executable, "accelerate": os.path.join(os.path.dirname(sys.executable), "accelerate")}
    argv = [programs.get(argv[0], argv[0]), *argv[1:]]
    out = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, (argv, out.stdout[-1500:], out.stderr[-3000:])


def test_next_steps_with_the_tiny_model_run_as_written(tmp_path):
    """The quickstart (2 steps), then every command of "Next steps with the tiny model" and its Python
    snippet, in a folder that holds the repository's files the way a clone does."""
    from PIL import Image
    from safetensors.torch import load_file

    for name in CHECKOUT:
        os.symlink(os.path.join(ROOT, name), tmp_path / name)
    quickstart = README.split("**1. Install and run the main job**")[1].split("```bash\n")[1].split("```")[0]
    run_as_user(next(argv for argv in map(shell_commands, quickstart.split(" && ")) if argv[0][0] == "accelerate")[0],
                tmp_path)
    from benchmarks.quickstart import render, run_metrics

    first_run = run_metrics(tmp_path / "drpo-tiny")  # the README's table is rendered from this very file
    assert (first_run["prompts"], first_run["seeds"]) == (12, 4) and first_run["z_paired"] is not None
    assert "the 12 prompts it held out of training x 4 held-out seeds" in render(
        {"runs": {"quickstart command": {"train_seconds": 0.0, **first_run}}})
    next_steps = README.split("## Next steps with the tiny model", 1)[1].split("## ", 1)[0]
    commands = shell_commands(next_steps.split("```bash\n", 1)[1].split("```", 1)[0])
    assert [argv[:4] for argv in commands] == [
        ["python", "-m", "pipelines.evaluate", "--pretrained_model_name_or_path=assets/tiny-sd-turbo"],
        ["accelerate", "launch", "--quiet", "--cpu"],
        ["accelerate", "launch", "--quiet", "--cpu"],
        ["accelerate", "launch", "--quiet", "--cpu"],
        ["accelerate", "launch", "--quiet", "--cpu"]]
    for argv in commands:
        run_as_user(argv, tmp_path)

    metrics = json.loads((tmp_path / "drpo-tiny-eval" / "metrics.json").read_text())
    assert metrics["models"] == ["base", "drpo-tiny"]
    assert set(metrics["metrics"]) == {"color_match", "jpeg_compressibility"}
    history = (tmp_path / "drpo-tiny" / "reward_history.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in history] == [1, 2, 3], "resumed at step 2, trained to 3"
    assert load_file(tmp_path / "drpo-tiny-sdxl" / "pytorch_lora_weights.safetensors")
    assert "timesteps=[399]" in (tmp_path / "drpo-tiny-dmd2" / "README.md").read_text()  # the card's call
    assert all(key.startswith("transformer.") for key in load_file(tmp_path / "drpo-tiny-flux" /
                                                                    "pytorch_lora_weights.safetensors"))
    run_as_user(["python", "-c", python_block_after("## Next steps with the tiny model")], tmp_path)
    assert Image.open(tmp_path / "red-circle.png").size == (64, 64)
