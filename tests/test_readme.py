"""The README's flag table and commands stay true to the code."""

import argparse
import re

import pytest
from conftest import ROOT

import train_drpo
import train_drpo_sdxl

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
