"""The flag tables of docs/flags.md and docs/evaluation.md, generated from the parsers themselves (their
help texts and defaults), so the pages cannot drift from the code; ``tests/test_readme.py`` fails when a
page is out of date.

    python -m benchmarks.flags_page --write
"""

from __future__ import annotations

import argparse
import os
import re

from benchmarks.harness import ROOT

PAGES = {"training": "docs/flags.md", "evaluation": "docs/evaluation.md"}


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def default_cell(action: argparse.Action, others: dict[str, argparse.Action], drift_presets: dict | None) -> str:
    """required, `default`, the drift presets' values, or a default another script (SDXL, FLUX) sets differently."""
    if action.required:
        return "required"
    if drift_presets is not None and action.dest in drift_presets:
        paper, authors = drift_presets[action.dest]
        return f"the preset's (paper: `{paper}`, authors: `{authors}`)"
    text = f"`{action.default}`"
    for name, other in others.items():
        if other is not None and other.default != action.default:
            text += f" ({name} script: `{other.default}`)"
    return text


def flag_rows(parser, others: dict | None = None, drift_presets=None, only_in_others=()) -> list[str]:
    """One table per argument group: | flag | default | meaning |; ``others``: script name -> its parser."""
    by_script = {name: {action.dest: action for action in other._actions} for name, other in (others or {}).items()}
    lines = []
    for group in parser._action_groups:
        actions = [action for action in group._group_actions if action.option_strings and action.dest != "help"]
        extra = [item for item in only_in_others if group.title == "model and output"]
        if not actions:
            continue
        lines += ["", f"**{group.title}**", "", "| flag | default | meaning |", "|---|---|---|"]
        for action in actions:
            default = default_cell(action, {name: dests.get(action.dest) for name, dests in by_script.items()},
                                   drift_presets)
            lines.append(f"| `{action.option_strings[0]}` | {default} | {cell(action.help or '')} |")
        for name, action in extra:
            lines.append(f"| `{action.option_strings[0]}` | `{action.default}` | {name} script only: "
                         f"{cell(action.help)} |")
    return lines[1:]


def render_training() -> str:
    import train_drpo
    import train_drpo_flux
    import train_drpo_sdxl
    from pipelines import drift_flags

    parser = train_drpo.build_parser()
    others = {"SDXL": train_drpo_sdxl.build_parser(), "FLUX": train_drpo_flux.build_parser()}
    presets = {flag: tuple(drift_flags.shown(drift_flags.preset_value(preset, field)) for preset in ("paper", "authors"))
               for flag, (field, _, _) in drift_flags.DRIFT_FLAGS.items()}
    ours = {action.dest for action in parser._actions}
    only_in_others = [(name, action) for name, other in others.items() for action in other._actions
                      if action.dest not in ours]
    return "\n".join(flag_rows(parser, others, presets, only_in_others)) + "\n"


def render_evaluation() -> str:
    from pipelines import evaluate

    return "\n".join(flag_rows(evaluate.build_parser())) + "\n"


RENDER = {"training": render_training, "evaluation": render_evaluation}


def block_pattern(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- flags:{name} -->\n)(.*?)(<!-- /flags:{name} -->)", re.S)


def page_block(name: str) -> str | None:
    """The generated block of ``name`` as the page holds it now."""
    match = block_pattern(name).search(open(os.path.join(ROOT, PAGES[name]), encoding="utf-8").read())
    return match.group(2) if match else None


def write(name: str) -> None:
    path = os.path.join(ROOT, PAGES[name])
    text = open(path, encoding="utf-8").read()
    if block_pattern(name).search(text) is None:
        raise KeyError(f"{PAGES[name]} has no <!-- flags:{name} --> block")
    text = block_pattern(name).sub(lambda match: match.group(1) + RENDER[name]() + match.group(3), text)
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(path + ".tmp", path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="Rewrite the pages' generated blocks.")
    args = parser.parse_args(argv)
    for name in RENDER:
        if args.write:
            write(name)
        state = "written" if args.write else "up to date" if page_block(name) == RENDER[name]() else "OUT OF DATE"
        print(f"{PAGES[name]}: {state}")


if __name__ == "__main__":
    main()
