"""Checkpoints that are never lost or mixed up: atomic ``checkpoint-N`` folders with checksums and the
run they belong to, exact resume, and one writer per output folder.

- Each checkpoint is written to ``checkpoint-N.tmp`` and renamed; a failed write (a full disk)
  removes the partial folder and says which checkpoint is still intact.
- Each holds ``run.json`` (what defines the run: every config field declared to change the result, the prompt
  encoding, the number of processes) and ``checksums.json`` (SHA-256 of its files): a resume checks
  both before loading, so another run's checkpoint or a corrupted file is refused with its name.
- A fresh run refuses an output folder holding checkpoints unless ``--overwrite_output_dir``; a run
  holds an exclusive lock on its output folder, so a second writer is refused at start-up.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import zipfile

from pipelines import files
from pipelines.config import RunConfig
from pipelines.lora_files import LORA_FILE, load_lora_into_adapter, save_lora

RUN_FILE, CHECKSUM_FILE, LOCK_FILE, HOLDER_FILE = "run.json", "checksums.json", ".drpo.lock", ".drpo.lock.pid"
STAGING, DELETING = ".tmp", ".deleting"  # suffixes of a checkpoint being written / being removed


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written, or should not or cannot be resumed from."""


# ---------------------------------------------------------------------------------------------
# What a run is
# ---------------------------------------------------------------------------------------------


def flattened(record: dict, prefix: str = "") -> dict:
    """Nested parts of a record (the drift field's config) as ``drift.radii``-style keys."""
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update(flattened(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def record_differences(recorded: dict, current: dict) -> list[str]:
    """Human-readable differences between two run records (``--flag: then -> now``; ``drift.radii: ...``
    for a field of the drift field's config)."""
    recorded, current = flattened(recorded), flattened(current)
    keys = sorted(set(recorded) | set(current))
    return [f"{'' if '.' in key else '--'}{key}: {recorded.get(key)!r} -> {current.get(key)!r}" for key in keys
            if recorded.get(key) != current.get(key)]


def read_checkpoint_json(checkpoint: str, name: str) -> dict | None:
    """``run.json`` / ``checksums.json`` of a checkpoint (None if absent); a damaged one is a
    ``CheckpointError`` naming the checkpoint and the file."""
    path = os.path.join(checkpoint, name)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{os.path.basename(os.path.normpath(checkpoint))} is damaged: {name} is not valid "
                              f"JSON ({error}){fallback_hint(checkpoint)}") from error


def read_run(checkpoint: str) -> dict | None:
    return read_checkpoint_json(checkpoint, RUN_FILE)


# ---------------------------------------------------------------------------------------------
# Finding checkpoints
# ---------------------------------------------------------------------------------------------


def resolve_checkpoint_path(output_dir: str, name: str) -> str:
    return name if os.path.isabs(name) or os.path.dirname(name) else os.path.join(output_dir, name)


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints ``checkpoint-N`` in ``output_dir``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    names = [d for d in os.listdir(output_dir) if re.fullmatch(r"checkpoint-\d+", d)]
    return sorted(names, key=lambda d: int(d.split("-")[1]))


def find_resume_checkpoint(run: RunConfig) -> str | None:
    """The checkpoint to resume from: ``latest`` may find none (fresh start), a named one must exist."""
    if run.resume_from_checkpoint is None:
        return None
    if run.resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(run.output_dir)
        return os.path.join(run.output_dir, checkpoints[-1]) if checkpoints else None
    return resolve_checkpoint_path(run.output_dir, run.resume_from_checkpoint)


def previous_checkpoint(output_dir: str, before: str | None = None) -> str | None:
    """The newest complete checkpoint older than ``before`` (or the newest), as a name."""
    names = list_checkpoints(output_dir)
    if before is not None:
        names = names[: names.index(os.path.basename(before))] if os.path.basename(before) in names else names
    return names[-1] if names else None


# ---------------------------------------------------------------------------------------------
# Before anything is loaded: the output folder
# ---------------------------------------------------------------------------------------------


def check_output_dir(run: RunConfig, record: dict) -> None:
    """Writable; and a fresh run does not silently share its folder with another run's checkpoints."""
    try:
        os.makedirs(run.output_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run.output_dir, prefix=".drpo-write-test-"):
            pass  # every process probes its own file
    except OSError as error:
        raise ValueError(f"--output_dir {run.output_dir!r} is not writable: {error}") from error
    if (resumed := find_resume_checkpoint(run)) is not None:
        check_resume_step(resumed, run.max_train_steps)
        return
    existing = list_checkpoints(run.output_dir)
    if not existing or run.overwrite_output_dir:
        return
    recorded = read_run(os.path.join(run.output_dir, existing[-1]))
    whose = "a run with no record" if recorded is None else (
        "another run" if record_differences(recorded, record) else "this same run")
    differing = "" if recorded is None else "".join(f"\n  {d}" for d in record_differences(recorded, record))
    raise ValueError(
        f"--output_dir {run.output_dir!r} already holds {', '.join(existing)} of {whose}{differing}\n"
        "A new run there would mix its checkpoints with them. Continue that run with --resume_from_checkpoint=latest, "
        "start over with --overwrite_output_dir (deletes them), or choose another --output_dir.")


def check_resume_step(path: str, max_train_steps: int) -> None:
    """A checkpoint past --max_train_steps is refused: resuming it could only write a LoRA of its own step
    under a model card of fewer."""
    match = re.fullmatch(r"checkpoint-(\d+)", os.path.basename(os.path.normpath(path)))
    if match and int(match.group(1)) > max_train_steps:
        raise ValueError(f"{os.path.basename(os.path.normpath(path))} is at step {match.group(1)}, past "
                         f"--max_train_steps={max_train_steps}: give --max_train_steps above {match.group(1)} to "
                         "train on, or resume an earlier checkpoint (its own LoRA is "
                         f"{os.path.join(path, LORA_FILE)})")


def clear_previous_run(output_dir: str) -> None:
    """--overwrite_output_dir: remove earlier checkpoints (complete and partial) and their history."""
    for name in os.listdir(output_dir):
        if re.fullmatch(rf"checkpoint-\d+({re.escape(STAGING)}|{re.escape(DELETING)})?", name):
            shutil.rmtree(os.path.join(output_dir, name))
    for name in ("reward_history.jsonl",):
        if os.path.isfile(os.path.join(output_dir, name)):
            os.remove(os.path.join(output_dir, name))


class OutputLock:
    """An exclusive lock on the output folder for the run's lifetime (released when the process ends,
    however it ends), so two runs never write one folder: ``filelock`` (flock on POSIX, msvcrt on Windows);
    the holder's process id is written beside it for the refusal message."""

    def __init__(self, output_dir: str):
        from filelock import FileLock, Timeout

        self.lock, holder_file = FileLock(os.path.join(output_dir, LOCK_FILE)), os.path.join(output_dir, HOLDER_FILE)
        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            holder = open(holder_file, encoding="utf-8").read().strip() if os.path.isfile(holder_file) else ""
            raise ValueError(f"--output_dir {output_dir!r} is being written by another run (process "
                             f"{holder or 'unknown'}); wait for it to finish, or choose another --output_dir") from None
        with open(holder_file, "w", encoding="utf-8") as handle:
            handle.write(str(os.getpid()))

    def release(self) -> None:
        self.lock.release()


@contextlib.contextmanager
def claimed_output_dir(accelerator, run: RunConfig, record: dict):
    """Check the output folder (every process), lock it for the run (the main process; every process
    learns whether it was refused), clear it with --overwrite_output_dir; release the lock at the end."""
    from accelerate.utils import broadcast_object_list

    check_output_dir(run, record)
    lock, refusal = None, None
    if accelerator.is_main_process:
        try:
            lock = OutputLock(run.output_dir)
        except ValueError as error:
            refusal = str(error)
    refusal = broadcast_object_list([refusal])[0] if accelerator.num_processes > 1 else refusal
    if refusal is not None:
        raise ValueError(refusal)
    try:
        if run.overwrite_output_dir and accelerator.is_main_process:
            clear_previous_run(run.output_dir)
        accelerator.wait_for_everyone()
        yield
    finally:
        if lock is not None:
            lock.release()


# ---------------------------------------------------------------------------------------------
# Writing and resuming
# ---------------------------------------------------------------------------------------------


def register_lora_checkpoint_hooks(accelerator, unet, pipeline_cls) -> None:
    """Make ``accelerator.save_state`` store only the LoRA (loadable by ``load_lora_weights``)."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            save_lora(output_dir, accelerator.unwrap_model(unet), pipeline_cls)
        weights.clear()

    def load_hook(models, input_dir):
        load_lora_into_adapter(input_dir, accelerator.unwrap_model(unet), pipeline_cls)
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def file_digests(folder: str) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` (but the checksum file itself), by relative path."""
    digests = {}
    for root, _, names in os.walk(folder):
        for name in sorted(names):
            path = os.path.join(root, name)
            relative = os.path.relpath(path, folder)
            if relative == CHECKSUM_FILE:
                continue
            with open(path, "rb") as handle:
                digests[relative] = hashlib.file_digest(handle, "sha256").hexdigest()
    return digests


WRITE_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                errno.EACCES: "permission denied", errno.EPERM: "the operation is not permitted",
                errno.EROFS: "the file system is read-only"}


def write_failure(error: BaseException) -> tuple[str, str | None] | None:
    """(cause, file) of a failed write anywhere in the exception chain, or None if it was no write failure."""
    while error is not None:
        code = getattr(error, "errno", None)
        if code in WRITE_ERRNOS:
            return WRITE_ERRNOS[code], getattr(error, "filename", None)
        if "unexpected pos" in str(error) or "No space left" in str(error):  # torch's zip writer, safetensors
            return "the disk is full", None
        error = error.__cause__ or error.__context__
    return None


def intact_checkpoint_note(run: RunConfig) -> str:
    intact = previous_checkpoint(run.output_dir)
    return (f"{os.path.join(run.output_dir, intact)} is intact: fix the folder, then resume with "
            "--resume_from_checkpoint=latest") if intact else "no checkpoint was written before it"


@contextlib.contextmanager
def writing_checkpoint(run: RunConfig, global_step: int, staging: str):
    """Any failure while writing a checkpoint (a full disk, a folder made read-only, a library's own write
    error) removes the partial checkpoint and names the file, the cause and the intact checkpoint."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 - safetensors raises its own type; all end the same way
        shutil.rmtree(staging, ignore_errors=True)
        cause, path = write_failure(error) or (f"{type(error).__name__}: {error}", None)
        raise CheckpointError(f"could not write checkpoint-{global_step}{f' ({path})' if path else ''}: {cause}. "
                              f"The partial checkpoint was removed; {intact_checkpoint_note(run)}") from error


@contextlib.contextmanager
def writing_outputs(run: RunConfig):
    """Around the whole run: a write that fails for lack of space or permission (the history, a validation
    grid, the final LoRA) ends in one message naming the file, the cause and the intact checkpoint."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as error:
        failure = write_failure(error)
        if failure is None:
            raise
        cause, path = failure
        raise CheckpointError(f"could not write {path or f'into {run.output_dir}'}: {cause}; "
                              f"{intact_checkpoint_note(run)}") from error


def save_checkpoint(accelerator, run: RunConfig, global_step: int, record: dict) -> None:
    """Atomically write ``checkpoint-N`` (state, LoRA, run record, checksums), then prune to
    ``--checkpoints_total_limit``; older checkpoints are removed only after the new one exists."""
    final = os.path.join(run.output_dir, f"checkpoint-{global_step}")
    staging = final + STAGING
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    with writing_checkpoint(run, global_step, staging):
        accelerator.save_state(staging)
    accelerator.wait_for_everyone()  # every process' files are written before they are checksummed
    if accelerator.is_main_process:
        with writing_checkpoint(run, global_step, staging):
            files.write_json(os.path.join(staging, RUN_FILE), record)
            files.write_json(os.path.join(staging, CHECKSUM_FILE), file_digests(staging))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        prune_checkpoints(run.output_dir, run.checkpoints_total_limit)
    accelerator.wait_for_everyone()


def prune_checkpoints(output_dir: str, limit: int | None) -> None:
    """Keep the newest ``limit`` checkpoints; each old one is renamed before it is deleted, so an
    interrupted removal never leaves a partial ``checkpoint-N``."""
    doomed = list_checkpoints(output_dir)[:-limit] if limit is not None else []
    for name in doomed:
        os.replace(os.path.join(output_dir, name), os.path.join(output_dir, name + DELETING))
    for name in os.listdir(output_dir):
        if re.fullmatch(rf"checkpoint-\d+{re.escape(DELETING)}", name):
            shutil.rmtree(os.path.join(output_dir, name))


def verify_checkpoint(path: str, record: dict) -> None:
    """The checkpoint is this run's (``run.json``) and its files are whole (``checksums.json``)."""
    name, fallback = os.path.basename(os.path.normpath(path)), fallback_hint(path)
    recorded = read_run(path)
    if recorded is not None and (differing := record_differences(recorded, record)):
        raise CheckpointError(f"{name} belongs to another run; it differs in\n  " + "\n  ".join(differing) +
                              "\nResume it with the flags it was trained with, or start a new run with "
                              "--overwrite_output_dir or another --output_dir.")
    expected = read_checkpoint_json(path, CHECKSUM_FILE)
    if expected is None:
        return  # written before checksums existed
    actual = file_digests(path)
    for relative, digest in expected.items():
        if relative not in actual:
            raise CheckpointError(f"{name} is incomplete: {relative} is missing{fallback}")
        if actual[relative] != digest:
            raise CheckpointError(f"{name} is corrupted: {relative} does not match its checksum{fallback}")


def maybe_resume(accelerator, run: RunConfig, record: dict) -> int:
    """Load the checkpoint named by --resume_from_checkpoint (LoRA, optimiser, scheduler, RNG) after
    checking it is this run's and whole; return its step (0: a fresh start)."""
    path = find_resume_checkpoint(run)
    if path is None:
        if run.resume_from_checkpoint:
            accelerator.print(f"No checkpoint in {run.output_dir}; starting a new run.")
        return 0
    match = re.fullmatch(r"checkpoint-(\d+)", os.path.basename(os.path.normpath(path)))
    if match is None:
        raise ValueError(f"--resume_from_checkpoint must name a checkpoint-N folder, got {path}")
    verify_checkpoint(path, record)
    accelerator.print(f"Resuming from {path}")
    try:
        accelerator.load_state(path)
    except Exception as error:  # name the checkpoint and the file, whatever failed inside it
        culprit = unreadable_file(path)
        which = f"{culprit} is missing or damaged" if culprit else f"its files: {', '.join(sorted(os.listdir(path)))}"
        raise CheckpointError(f"{os.path.basename(path)} could not be loaded: {which} ({type(error).__name__}: "
                              f"{str(error)[:200]}){fallback_hint(path)}") from error
    return int(match.group(1))


def fallback_hint(path: str) -> str:
    previous = previous_checkpoint(os.path.dirname(os.path.normpath(path)), path)
    return f"; resume from the previous one with --resume_from_checkpoint={previous}" if previous else ""


def unreadable_file(checkpoint: str) -> str | None:
    """The first file of a checkpoint (written before checksums existed) that is missing or cut short:
    the LoRA must be there and open; torch-saved states are zip archives (their end record is checked)."""
    if not os.path.isfile(os.path.join(checkpoint, LORA_FILE)):
        return LORA_FILE
    for name in sorted(os.listdir(checkpoint)):
        path = os.path.join(checkpoint, name)
        if name.endswith(".safetensors"):
            from safetensors import safe_open

            try:
                with safe_open(path, "pt"):
                    pass
            except Exception:  # noqa: BLE001 - any failure to open is damage
                return name
        elif name.endswith((".bin", ".pkl", ".pt")) and not zipfile.is_zipfile(path):
            return name
    return None
