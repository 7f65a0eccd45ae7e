"""Kill -9 loop: a tiny run checkpointing every step is SIGKILLed at random moments and resumed with
``--resume_from_checkpoint=latest``, again and again; after every kill each ``checkpoint-N`` left must
pass its checksums, and the final LoRA must equal an uninterrupted run's bit for bit.

    python -m benchmarks.kill_loop --kills 10 [--update_readme]

Each kill waits until the resumed run has written one new checkpoint (so every life makes progress)
and a random delay of up to --max_delay seconds, then strikes: every other kill at once (in a step,
a checkpoint, the pruning of an old one, the final save), the others at the first moment after the
delay that a checkpoint is being written (``checkpoint-N.tmp`` exists).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from benchmarks.harness import ROOT
from benchmarks.readme import save_result

RUN_FLAGS = [
    "--pretrained_model_name_or_path=assets/tiny-sd-turbo", "--prompts_file=assets/tiny_prompts.txt",
    "--reward=color_match", "--feature_extractor=image", "--resolution=64", "--num_candidates=4", "--num_pairs=2",
    "--learning_rate=1e-3", "--seed=0", "--checkpointing_steps=1", "--checkpoints_total_limit=2",
    "--validation_steps=0", "--num_validation_seeds=1", "--report_to=none",
    "--drift_preset=paper",  # as when docs/reliability.md's table was measured
]


def start_run(output_dir: str, steps: int, log) -> subprocess.Popen:
    """``python train_drpo.py`` resuming the latest checkpoint of ``output_dir`` (none: a fresh start)."""
    command = [sys.executable, "train_drpo.py", *RUN_FLAGS, f"--output_dir={output_dir}",
               f"--max_train_steps={steps}", "--resume_from_checkpoint=latest"]
    return subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=log, start_new_session=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})


def latest_step(output_dir: str) -> int:
    from pipelines.checkpoints import list_checkpoints

    names = list_checkpoints(output_dir)
    return int(names[-1].split("-")[1]) if names else 0


def staging_folders(output_dir: str) -> list[str]:
    """Partial checkpoints being written or removed (ignored by resume, cleared by the next save)."""
    if not os.path.isdir(output_dir):
        return []
    return [name for name in os.listdir(output_dir) if re.fullmatch(r"checkpoint-\d+\.(tmp|deleting)", name)]


def damaged_checkpoints(output_dir: str) -> list[str]:
    """Every complete-named ``checkpoint-N`` without its run record and checksums, or failing them."""
    from pipelines.checkpoints import CHECKSUM_FILE, CheckpointError, list_checkpoints, read_run, verify_checkpoint

    damaged = []
    for name in list_checkpoints(output_dir):
        path = os.path.join(output_dir, name)
        try:
            recorded = read_run(path)
            if recorded is None or not os.path.isfile(os.path.join(path, CHECKSUM_FILE)):
                raise CheckpointError(f"{name} lacks its run record or checksums")
            verify_checkpoint(path, recorded)
        except (CheckpointError, OSError, ValueError) as error:
            damaged.append(str(error))
    return damaged


def one_life(output_dir: str, steps: int, max_delay: float, rng: random.Random, log, in_a_write: bool) -> dict | None:
    """Start (resuming), wait for one new checkpoint and a random delay, then SIGKILL (``in_a_write``:
    at the first moment after it that a checkpoint is being written); None if the run finished first."""
    before = latest_step(output_dir)
    process = start_run(output_dir, steps, log)
    while latest_step(output_dir) <= before and process.poll() is None:
        time.sleep(0.05)
    time.sleep(rng.uniform(0, max_delay))
    while in_a_write and not staging_folders(output_dir) and process.poll() is None:
        time.sleep(0.001)
    if process.poll() is not None:
        return None
    writing = staging_folders(output_dir)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return {"after_step": latest_step(output_dir), "while_writing": bool(writing),
            "damaged": damaged_checkpoints(output_dir)}


def same_lora(first: str, second: str) -> tuple[bool, float]:
    """Bit-identical LoRA files (and the largest absolute difference, 0 when identical)."""
    from safetensors.torch import load_file

    a, b = (load_file(os.path.join(d, "pytorch_lora_weights.safetensors")) for d in (first, second))
    if a.keys() != b.keys():
        return False, float("inf")
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    return all(a[k].equal(b[k]) for k in a), worst


def run(kills: int, steps: int, max_delay: float, seed: int) -> dict:
    work = tempfile.mkdtemp(prefix="drpo-kill-loop-")
    reference, killed = os.path.join(work, "uninterrupted"), os.path.join(work, "killed")
    with open(os.path.join(work, "log.txt"), "w") as log:
        start = time.time()
        subprocess.run([sys.executable, "train_drpo.py", *RUN_FLAGS, f"--output_dir={reference}",
                        f"--max_train_steps={steps}"], cwd=ROOT, stdout=log, stderr=log, check=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
        reference_seconds = time.time() - start
        rng, lives = random.Random(seed), []
        while len(lives) < kills and (life := one_life(killed, steps, max_delay, rng, log,
                                                       in_a_write=len(lives) % 2 == 1)) is not None:
            lives.append(life)
            print(f"kill {len(lives)}: after checkpoint-{life['after_step']}"
                  f"{' while a checkpoint was being written' if life['while_writing'] else ''}; "
                  f"damaged checkpoints: {len(life['damaged'])}", flush=True)
        final = start_run(killed, steps, log)
        if final.wait() != 0:
            raise RuntimeError(f"the last resume failed; see {work}/log.txt")
    identical, worst = same_lora(reference, killed)
    result = {"kills": len(lives), "steps": steps, "max_delay_seconds": max_delay, "seed": seed,
              "kills_while_writing_a_checkpoint": sum(life["while_writing"] for life in lives),
              "damaged_checkpoints": sum(len(life["damaged"]) for life in lives),
              "damage": [d for life in lives for d in life["damaged"]],
              "final_lora_identical": identical, "max_abs_difference": worst,
              "uninterrupted_seconds": round(reference_seconds, 1), "seconds": round(time.time() - start, 1)}
    if identical and not result["damaged_checkpoints"]:
        shutil.rmtree(work)
    else:
        print(f"kept {work} for inspection")
    return result


def render(result: dict) -> str:
    header = ("| SIGKILLs | ... while a checkpoint was being written | damaged `checkpoint-N` found | final LoRA vs "
              "uninterrupted run |")
    final = "bit-identical" if result["final_lora_identical"] else f"differs by {result['max_abs_difference']:.3g}"
    row = (f"| {result['kills']} | {result['kills_while_writing_a_checkpoint']} | {result['damaged_checkpoints']} "
           f"| {final} |")
    note = (f"{result['steps']} steps of the tiny model checkpointing every step (keeping 2); each life is killed "
            f"a random 0-{result['max_delay_seconds']:g} s after its first new checkpoint (every other one at the "
            "next moment a `checkpoint-N.tmp` is being written), then resumed with `--resume_from_checkpoint=latest`; "
            "after every kill each checkpoint left was verified against its checksums. "
            f"{result['seconds']:.0f} s in all. Regenerate with `python -m benchmarks.kill_loop --kills 8 "
            "--update_readme`.")
    return f"{header}\n|---|---|---|---|\n{row}\n\n{note}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10, help="SIGKILLs before the last, uninterrupted resume.")
    parser.add_argument("--steps", type=int, default=None, help="Training steps (default: 2 x kills + 2).")
    parser.add_argument("--max_delay", type=float, default=1.5,
                        help="Longest wait (s) after a life's first new checkpoint before the kill.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the kill moments.")
    parser.add_argument("--update_readme", action="store_true", help="Rewrite the README's kill_loop block.")
    args = parser.parse_args(argv)
    result = run(args.kills, args.steps or 2 * args.kills + 2, args.max_delay, args.seed)
    markdown = render(result)
    print(markdown)
    save_result("kill_loop", result, markdown, update_readme=args.update_readme)
    if not result["final_lora_identical"] or result["damaged_checkpoints"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
