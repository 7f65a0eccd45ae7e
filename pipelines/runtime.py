"""How a training step runs on the accelerator: the Accelerator itself, frozen models and dtypes, the
seeded draws of each prompt, the backward of a method's loss pieces (one DDP synchronisation per
optimiser step), the per-step logs, and what happens when a launcher or another rank fails."""

from __future__ import annotations

import contextlib
import hashlib
import os

import torch

from pipelines.config import OptimConfig, RunConfig


SHARDED_MODES = {"ACCELERATE_USE_DEEPSPEED": "DeepSpeed", "ACCELERATE_USE_FSDP": "FSDP"}


def refuse_sharded_training() -> None:
    """DDP (or one process) is the supported mode: the trainable part is a small LoRA that every process holds
    whole, while DeepSpeed and FSDP shard or wrap the UNet and break the LoRA hooks this trainer saves,
    checkpoints and reloads through; ``accelerate launch`` with such a config is refused before any model loads."""
    for variable, mode in SHARDED_MODES.items():
        if os.environ.get(variable, "false").lower() in ("1", "true", "yes"):
            raise ValueError(f"the accelerate configuration selects {mode}; this trainer supports DDP (or one "
                             "process): the LoRA is small enough for every process to hold whole, and "
                             f"{mode}'s sharding breaks the LoRA saving and resuming. Run `accelerate config` "
                             "and choose multi-GPU (DDP), without --use_deepspeed / --use_fsdp")


def setup_accelerator(run: RunConfig, optim: OptimConfig):
    """Accelerator with trackers, mixed precision, gradient accumulation and the process-group timeout
    (--ddp_timeout); fp16 on a CPU is refused whichever way it was asked for."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    refuse_sharded_training()
    if run.report_to == "wandb":
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ImportError("--report_to wandb needs `pip install wandb`")
    accelerator = Accelerator(
        gradient_accumulation_steps=optim.gradient_accumulation_steps, mixed_precision=run.mixed_precision,
        log_with=None if run.report_to == "none" else run.report_to,
        project_config=ProjectConfiguration(project_dir=run.output_dir,
                                            logging_dir=os.path.join(run.output_dir, run.logging_dir)),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=run.ddp_timeout))],
    )
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ValueError("fp16 mixed precision (from --mixed_precision or accelerate's launch configuration) needs a "
                         "GPU; on the CPU use --mixed_precision bf16 or no")
    if run.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    return accelerator


LAUNCHERS = ("accelerate", "torchrun", "torch.distributed.run", "torch.distributed.launch")


def launched_by(pid: int) -> bool:
    """Whether process ``pid`` is a launcher (accelerate launch, torchrun), from its command line."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            words = handle.read().decode(errors="replace").split("\0")
    except OSError:
        return False
    return any(os.path.basename(word) in LAUNCHERS or word in LAUNCHERS for word in words[:3])


def stop_when_launcher_dies() -> None:
    """Under a launcher (accelerate launch, torchrun), end this worker when the launcher dies instead of
    training on as an orphan that keeps writing the output folder (Linux: the parent-death signal).
    A script started directly (``nohup python train_drpo.py``) is left alone."""
    import ctypes
    import signal
    import sys

    parent = os.getppid()
    if not sys.platform.startswith("linux") or not launched_by(parent):
        return
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the launcher died before the signal was armed
        os.kill(os.getpid(), signal.SIGTERM)


BACKEND_FAILURES = ("imed out", "Timeout", "timeout", "gloo", "NCCL", "Connection closed", "Connection reset")


def is_collective_failure(error: RuntimeError) -> bool:
    """A timeout or lost peer reported by the process-group backend (gloo, NCCL), not one of our own errors
    (a reward's, a checkpoint's), which already say what happened."""
    from_the_backend = type(error) is RuntimeError or isinstance(error, torch.distributed.DistError)
    return from_the_backend and any(word in str(error) for word in BACKEND_FAILURES)


@contextlib.contextmanager
def named_collective_failures(accelerator, ddp_timeout: float, step: int):
    """A collective that failed or timed out (--ddp_timeout) becomes a message naming this rank and the
    step: another process is stuck (in a reward call that never returns, say) or died."""
    try:
        yield
    except RuntimeError as error:
        if accelerator.num_processes == 1 or not is_collective_failure(error):
            raise
        raise RuntimeError(
            f"rank {accelerator.process_index} of {accelerator.num_processes}: a collective operation at step {step} "
            f"failed or did not complete within --ddp_timeout={ddp_timeout:g} s; another process is stuck (for "
            f"example in a reward call that never returns) or died. The last checkpoint is intact. "
            f"({type(error).__name__}: {str(error)[:300]})") from error


def weight_dtype(accelerator) -> torch.dtype:
    """dtype of the frozen weights: fp16 / bf16 under mixed precision (LoRA stays fp32)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def prepare_frozen_models(pipe, device) -> None:
    """Freeze every pipeline module (eval mode) and move the pipeline to ``device``."""
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False).eval()
    pipe.to(device)


def eight_bit_adamw():
    """bitsandbytes' AdamW8bit, or a clear error where it cannot run (not installed, or no GPU)."""
    try:
        import bitsandbytes
    except ImportError as error:
        raise ImportError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from error
    if not torch.cuda.is_available():
        raise ValueError("--use_8bit_adam needs a GPU (bitsandbytes' 8-bit optimisers are CUDA kernels)")
    return bitsandbytes.optim.AdamW8bit


def step_generator(base_seed: int, step: int, micro_step: int, index: int, rank: int) -> torch.Generator:
    """RNG for one prompt of one micro-step: prompt draw, noises and pairs.

    Derived from (seed, step, micro-step, index, rank) alone, so ranks draw different prompts and
    noises, and a resumed run replays exactly the draws of an uninterrupted one.
    """
    digest = hashlib.sha256(f"{base_seed}/{step}/{micro_step}/{index}/{rank}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def step_logs(accelerator, step_stats: list[dict], lr_scheduler, seconds: float) -> dict[str, float]:
    """Average the per-prompt stats of one optimisation step over micro-steps and processes."""
    keys = sorted(step_stats[0])
    local = torch.tensor([[s[k] for k in keys] for s in step_stats], dtype=torch.float64).mean(0)
    averaged = accelerator.gather(local.to(accelerator.device)[None]).mean(0).tolist()
    logs = dict(zip(keys, averaged))
    logs.update(lr=lr_scheduler.get_last_lr()[0], step_time=seconds)
    return logs


def backpropagate(accelerator, model, pieces, scale: float, sync: bool, step: int) -> dict:
    """Backward every (loss, is_last) piece a per-prompt step yields, times ``scale``; returns the
    step's stats (the generator's return value).

    Only the last piece of a prompt with ``sync`` (the last prompt of the accumulation window)
    DDP-synchronises the gradients; every other backward runs under ``no_sync``, so gradients are
    exchanged once per optimiser step however many pieces there are (ranks may differ in pieces).
    Finiteness is checked on every rank together once the prompt is done, before any optimiser step.
    """
    finite = True
    while True:
        try:
            loss, last = next(pieces)
        except StopIteration as finished:
            check_finite_loss(accelerator, torch.tensor(0.0 if finite else float("nan")), step)
            return finished.value
        finite = finite and bool(torch.isfinite(loss.detach()))
        with contextlib.nullcontext() if sync and last else accelerator.no_sync(model):
            accelerator.backward(loss * scale)


def check_finite_loss(accelerator, loss: torch.Tensor, step: int) -> None:
    """Stop (on every rank together) before a NaN/inf loss reaches the optimiser and the LoRA."""
    finite = torch.isfinite(loss.detach()).float().reshape(1).to(accelerator.device)
    if accelerator.gather(finite).min() < 1:
        raise FloatingPointError(f"non-finite loss at step {step}; the last checkpoint is intact")
