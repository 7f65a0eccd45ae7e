"""What both benchmarks share: one fresh subprocess per measured variant, and printing/saving results."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def public_flags(args) -> list[str]:
    """The command line that reproduces ``args`` (private ``_*`` options left out)."""
    return [f"--{k}={v}" for k, v in vars(args).items() if not k.startswith("_") and v is not None]


def run_isolated(module: str, option: str, variants, args) -> dict[str, dict]:
    """Run ``python -m module --option=variant <flags>`` for each variant in a fresh process (so peak
    memory is the variant's own) and read the JSON it prints last."""
    results = {}
    for variant in variants:
        command = [sys.executable, "-m", module, f"--{option}={variant}", *public_flags(args)]
        out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{out.stderr[-3000:]}")
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    return results


def publish(result: dict, table: str, output_json: str | None) -> dict:
    print(table)
    if output_json:
        with open(output_json, "w") as handle:
            json.dump(result, handle, indent=2)
    return result
