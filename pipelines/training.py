"""Run plumbing shared by ``train_drpo.py`` and ``train_drpo_sdxl.py``: the accelerator, the LoRA,
checkpoints and exact resume, per-step logs and history, validation grids, the final check, the
model card and the Hub. Nothing here is the method (that is ``drpo_utils.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile

import torch

from drpo_utils import lora_disabled
from pipelines import files
from pipelines.evaluate import describe_change, reward_table, summarize
from pipelines.inference import generate_images, load_lora
from pipelines.rewards import score_candidates

logger = logging.getLogger(__name__)

LORA_TARGET_MODULES = "to_q,to_k,to_v,to_out.0"
HISTORY_FILE = "reward_history.jsonl"
VALIDATION_SEED = 10_000  # held-out: training noises come from step_generator


# ---------------------------------------------------------------------------------------------
# Accelerator and models
# ---------------------------------------------------------------------------------------------


def setup_accelerator(args):
    """Accelerator with trackers, mixed precision, gradient accumulation and the process-group timeout
    (--ddp_timeout) from the flags; fp16 on a CPU is refused whichever way it was asked for."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    if args.report_to == "wandb":
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ImportError("--report_to wandb needs `pip install wandb`")
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
        ),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=args.ddp_timeout))],
    )
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ValueError("fp16 mixed precision (from --mixed_precision or accelerate's launch configuration) needs a "
                         "GPU; on the CPU use --mixed_precision bf16 or no")
    if args.allow_tf32 and torch.cuda.is_available():
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
def named_collective_failures(accelerator, args, step: int):
    """A collective that failed or timed out (--ddp_timeout) becomes a message naming this rank and the
    step: another process is stuck (in a reward call that never returns, say) or died."""
    try:
        yield
    except RuntimeError as error:
        if accelerator.num_processes == 1 or not is_collective_failure(error):
            raise
        raise RuntimeError(
            f"rank {accelerator.process_index} of {accelerator.num_processes}: a collective operation at step {step} "
            f"failed or did not complete within --ddp_timeout={args.ddp_timeout:g} s; another process is stuck (for "
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


def add_lora(unet, args) -> None:
    """Attach the trainable LoRA adapter ("default") to the frozen UNet (paper: rank 16, attention)."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=args.rank, lora_alpha=args.lora_alpha or args.rank, lora_dropout=args.lora_dropout,
            init_lora_weights="gaussian",
            target_modules=[m.strip() for m in args.lora_target_modules.split(",")],
        )
    )


def save_lora(directory: str, unet, pipeline_cls) -> None:
    """``pytorch_lora_weights.safetensors`` (keys ``unet.*``) with the adapter metadata (alpha, rank)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state_dict = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".drpo-lora-") as staging:  # a whole file or none
        pipeline_cls.save_lora_weights(
            staging, unet_lora_layers=state_dict, unet_lora_adapter_metadata=unet.peft_config["default"].to_dict()
        )
        for name in os.listdir(staging):
            os.replace(os.path.join(staging, name), os.path.join(directory, name))


KOHYA_FILE = "pytorch_lora_weights_kohya.safetensors"


def save_kohya_lora(directory: str, alpha: float) -> str:
    """The saved LoRA in kohya's key names (``lora_unet_...``, ``.lora_down``/``.lora_up``, ``.alpha``),
    which ComfyUI and A1111 load; converted by diffusers' ``convert_state_dict_to_kohya``, whose ``.alpha``
    entries are the rank, so they are set to the run's alpha (the scale alpha / rank must survive)."""
    from diffusers.utils import convert_all_state_dict_to_peft, convert_state_dict_to_kohya
    from safetensors.torch import load_file, save_file

    diffusers_keys = load_file(os.path.join(directory, "pytorch_lora_weights.safetensors"))
    kohya = convert_state_dict_to_kohya(convert_all_state_dict_to_peft(diffusers_keys))
    kohya.update({key: torch.tensor(float(alpha)) for key in kohya if key.endswith(".alpha")})
    path = os.path.join(directory, KOHYA_FILE)
    with files.atomic_path(path) as staging:
        save_file(kohya, staging)
    return path


def load_lora_into_adapter(directory: str, unet, pipeline_cls) -> None:
    """Load saved LoRA weights into the *existing* "default" adapter (never a new ``default_1``)."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    state_dict = pipeline_cls.lora_state_dict(directory)[0]
    unet_state = {k.removeprefix("unet."): v for k, v in state_dict.items() if k.startswith("unet.")}
    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(unet_state), adapter_name="default")
    if getattr(result, "unexpected_keys", None):
        raise RuntimeError(f"checkpoint LoRA does not match the model: {result.unexpected_keys[:5]}")


# ---------------------------------------------------------------------------------------------
# Exact resume (the checkpoints themselves are pipelines/checkpoints.py)
# ---------------------------------------------------------------------------------------------


def step_generator(base_seed: int, step: int, micro_step: int, index: int, rank: int) -> torch.Generator:
    """RNG for one prompt of one micro-step: prompt draw, noises and pairs.

    Derived from (seed, step, micro-step, index, rank) alone, so ranks draw different prompts and
    noises, and a resumed run replays exactly the draws of an uninterrupted one.
    """
    digest = hashlib.sha256(f"{base_seed}/{step}/{micro_step}/{index}/{rank}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


# ---------------------------------------------------------------------------------------------
# Logs and history
# ---------------------------------------------------------------------------------------------


SECRET_NAME = re.compile(r"token|secret|password|api_?key", re.I)


def redact_url(text: str) -> str:
    """A URL without its credentials: the user:password part and secret-named query values masked."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    parts = urlsplit(text)
    netloc = parts.netloc.rsplit("@", 1)[-1] if "@" in parts.netloc else parts.netloc
    query = urlencode([(k, "***" if SECRET_NAME.search(k) else v) for k, v in parse_qsl(parts.query)], safe="*")
    return urlunsplit((parts.scheme, ("***@" if "@" in parts.netloc else "") + netloc, parts.path, query, ""))


def public_config(args) -> dict:
    """The run's flags for the trackers, without secrets: no token-like flag, no credential in a URL
    (TensorBoard writes the config into its event files, wandb uploads it)."""
    config = {}
    for key, value in vars(args).items():
        if SECRET_NAME.search(key) or not isinstance(value, (int, float, str, bool)):
            continue
        if isinstance(value, str) and "://" in value:
            value = ",".join(redact_url(part) if "://" in part else part for part in value.split(","))
        config[key] = value
    return config


def init_trackers(accelerator, args) -> None:
    if accelerator.is_main_process and args.report_to != "none":
        accelerator.init_trackers(args.tracker_project_name, config=public_config(args))


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


def load_history(output_dir: str, up_to_step: int) -> list[dict]:
    """Per-step logs of an earlier run (for the reward curve of a resumed run)."""
    path = os.path.join(output_dir, HISTORY_FILE)
    if up_to_step == 0 or not os.path.isfile(path):
        return []
    with open(path) as handle:
        return [row for row in map(json.loads, handle) if row["step"] <= up_to_step]


def save_history(accelerator, output_dir: str, history: list[dict]) -> None:
    if accelerator.is_main_process:
        rows = (json.dumps(files.finite_or_none(row), allow_nan=False) + "\n" for row in history)  # undefined: null
        files.write_text(os.path.join(output_dir, HISTORY_FILE), "".join(rows))


# ---------------------------------------------------------------------------------------------
# Pictures: reward curve, labelled base-vs-LoRA grids
# ---------------------------------------------------------------------------------------------


def validation_curves(history: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """--validation_rewards in the history: {"validation/<reward>[_base]": [(step, mean), ...]}."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for row in history:
        for key, value in row.items():
            if key.startswith("validation/"):
                curves.setdefault(key, []).append((row["step"], value))
    return curves


def plot_reward_curve(history: list[dict], path: str) -> None:
    """reward_curve.png: the candidates' reward mean (+- std across candidates) per optimisation step and,
    beside it, every --validation_rewards curve of the LoRA against the base model's level (nothing
    when the history holds neither)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    validation = validation_curves(history)
    trained = [h for h in history if "reward_mean" in h]
    panels = (1 if trained else 0) + (1 if validation else 0)
    if not panels:  # offline DrPO without --validation_rewards: no reward was called while training
        return
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 3.5), dpi=120, squeeze=False)
    axes = list(axes[0])
    if trained:
        ax = axes.pop(0)
        steps = [h["step"] for h in trained]
        mean = torch.tensor([h["reward_mean"] for h in trained])
        std = torch.tensor([h["reward_std"] for h in trained])
        window = max(1, len(trained) // 20)
        smooth = torch.nn.functional.avg_pool1d(mean.view(1, 1, -1), window, 1, padding=0).flatten()
        ax.fill_between(steps, mean - std, mean + std, alpha=0.15, label="candidate spread (std)")
        ax.plot(steps, mean, alpha=0.4, label="candidate mean")
        ax.plot(steps[window - 1:], smooth, linewidth=2, label=f"moving mean ({window})")
        ax.set(xlabel="optimisation step", ylabel="reward", title="DrPO: reward of the K candidates")
        ax.legend(loc="best", fontsize=8)
    if validation:
        ax = axes.pop(0)
        for key, points in validation.items():
            if key.endswith("_base"):
                continue
            line, = ax.plot(*zip(*points), marker="o", label=f"{key.removeprefix('validation/')} (LoRA)")
            if f"{key}_base" in validation:
                ax.plot(*zip(*validation[f"{key}_base"]), linestyle="--", color=line.get_color(), label="base")
        ax.set(xlabel="optimisation step", ylabel="held-out reward", title="validation prompts x seeds")
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    files.save_image(fig, path)
    plt.close(fig)


def to_pil(images: torch.Tensor):
    """[N, 3, H, W] in [0, 1] -> one PIL image, the N images side by side."""
    from PIL import Image

    row = torch.cat(list(images), dim=2)
    return Image.fromarray((row.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy())


def labelled_grid(prompts: list[str], rows: dict[str, torch.Tensor], per_prompt: int):
    """Per prompt: a caption line with the prompt, then one labelled row per entry of ``rows``
    (e.g. ``{"base": ..., "LoRA": ...}``, each [len(prompts) * per_prompt, 3, H, W], prompt-major)."""
    from PIL import Image, ImageDraw, ImageFont

    first = next(iter(rows.values()))
    height, width = first.shape[-2:]
    font = ImageFont.load_default(size=max(10, min(16, height // 5)))
    label_width, caption_height = 8 * max(len(label) for label in rows) + 12, font.size + 8
    grid = Image.new("RGB", (label_width + per_prompt * width, len(prompts) * (caption_height + len(rows) * height)),
                     "white")
    draw, top = ImageDraw.Draw(grid), 0
    for index, prompt in enumerate(prompts):
        draw.text((4, top + 3), prompt, fill="black", font=font)
        top += caption_height
        for label, images in rows.items():
            draw.text((4, top + height // 2 - font.size // 2), label, fill="black", font=font)
            grid.paste(to_pil(images[index * per_prompt : (index + 1) * per_prompt]), (label_width, top))
            top += height
    return grid


# ---------------------------------------------------------------------------------------------
# Validation during training
# ---------------------------------------------------------------------------------------------


HELD_OUT_PROMPTS = 4  # validation prompts held out of a large enough prompt set
MIN_PROMPTS_TO_HOLD_OUT = 100


def split_validation_prompts(args, prompts: list[str]) -> tuple[list[str], list[str]]:
    """(training prompts, validation prompts). --validation_prompts if given; otherwise the set's last
    4 distinct prompts, held out of training, when it has at least 100 (a smaller set validates on its
    first 4 training prompts, with a warning)."""
    if args.validation_prompts:
        return prompts, list(args.validation_prompts)
    distinct = list(dict.fromkeys(prompts))
    if len(distinct) < MIN_PROMPTS_TO_HOLD_OUT:
        logger.warning(f"{len(distinct)} prompts: too few to hold {HELD_OUT_PROMPTS} out, so validation uses the "
                       f"first {HELD_OUT_PROMPTS} training prompts (give held-out ones with --validation_prompts)")
        return prompts, distinct[:HELD_OUT_PROMPTS]
    held_out = distinct[-HELD_OUT_PROMPTS:]
    return [p for p in prompts if p not in held_out], held_out  # 4 items: a list is as fast as a set


def validation_seeds(args) -> list[int]:
    return list(range(VALIDATION_SEED, VALIDATION_SEED + args.num_validation_seeds))


def log_images(accelerator, name: str, image, step: int) -> None:
    """Send a PIL image to every active tracker (tensorboard / wandb)."""
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(name, np.asarray(image), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({name: wandb.Image(image)}, step=step)


class Validation:
    """Every --validation_steps, on the main process: the grid (per prompt, the base model's row above the
    LoRA's, same held-out seeds) and the --validation_rewards of both. The base's images and scores are
    computed once. No autocast: each module runs in its own dtype (an fp32 SDXL VAE stays fp32)."""

    def __init__(self, accelerator, pipe, prompts: list[str], args, rewards: dict):
        self.accelerator, self.pipe, self.prompts, self.args = accelerator, pipe, prompts, args
        self.rewards, self.seeds, self.base_images, self.base_scores = rewards, validation_seeds(args), None, {}

    def scores(self, images: torch.Tensor, suffix: str) -> dict[str, float]:
        per_image = [p for p in self.prompts for _ in self.seeds]
        return {f"validation/{name}{suffix}": score_candidates(fn, images, per_image, name).reported.mean().item()
                for name, fn in self.rewards.items()}

    def __call__(self, step: int) -> dict[str, float]:
        """Writes and logs the grid of ``step``; returns the validation rewards' means to log."""
        if not self.accelerator.is_main_process:
            return {}
        if self.base_images is None:
            with lora_disabled(self.pipe.unet):
                self.base_images = generate_images(self.pipe, self.prompts, self.seeds, self.args.resolution)
            self.base_scores = self.scores(self.base_images, "_base")
        tuned = generate_images(self.pipe, self.prompts, self.seeds, self.args.resolution)
        grid = labelled_grid(self.prompts, {"base": self.base_images, "LoRA": tuned}, len(self.seeds))
        os.makedirs(os.path.join(self.args.output_dir, "validation"), exist_ok=True)
        files.save_image(grid, os.path.join(self.args.output_dir, "validation", f"step-{step:06d}.png"))
        log_images(self.accelerator, "validation/base_vs_lora", grid, step)
        return {**self.scores(tuned, ""), **self.base_scores}


# ---------------------------------------------------------------------------------------------
# Model card and the Hub
# ---------------------------------------------------------------------------------------------


def hub_token(args) -> str | None:
    from huggingface_hub import get_token

    return args.hub_token or get_token()


def hub_base_model(name_or_path: str) -> str | None:
    """The base model's Hub id for the card's ``base_model``: the id itself, the repo of a Hub cache
    snapshot folder, or None for a model that only exists on this disk."""
    if not os.path.exists(name_or_path):
        return name_or_path
    match = re.search(r"models--([^/\\]+?)--([^/\\]+)[/\\]snapshots", os.path.abspath(name_or_path))
    return f"{match.group(1)}/{match.group(2)}" if match else None


# The base models' own card metadata, for runs without Hub access.
KNOWN_LICENCES = dict.fromkeys(["stabilityai/sd-turbo", "stabilityai/sdxl-turbo"], ("other", "sai-nc-community"))


def base_model_licence(base_model: str | None) -> tuple[str, str | None]:
    """(license, license_name) of the base model's Hub card, else of KNOWN_LICENCES, else ("other", None)."""
    try:  # a local model (None) fails here too
        from huggingface_hub import ModelCard

        data = ModelCard.load(base_model).data
        if data.license:
            return data.license, data.get("license_name")
    except Exception:  # noqa: BLE001 - offline, private or missing card: the table below, then "other"
        pass
    return KNOWN_LICENCES.get(base_model, ("other", None))


def save_widget_samples(output_dir: str, prompts: list[str], images: torch.Tensor, per_prompt: int) -> list[dict]:
    """The LoRA's first sample of every prompt as samples/prompt_<i>.png: the card's widget gallery."""
    os.makedirs(os.path.join(output_dir, "samples"), exist_ok=True)
    widget = []
    for index, prompt in enumerate(prompts):
        path = f"samples/prompt_{index}.png"
        files.save_image(to_pil(images[index * per_prompt:index * per_prompt + 1]), os.path.join(output_dir, path))
        widget.append({"text": prompt, "output": {"url": path}})
    return widget


def write_model_card(args, output_dir: str, sample_file: str | None, metrics: dict,
                     widget: list[dict] | None = None) -> None:
    """``README.md`` model card (huggingface_hub.ModelCard) with the samples, a widget gallery, the base
    model's licence and the DrPO setup."""
    from huggingface_hub import ModelCard, ModelCardData

    repo_id = args.hub_model_id or os.path.basename(os.path.abspath(output_dir))
    base_model = hub_base_model(args.pretrained_model_name_or_path)
    licence, licence_name = base_model_licence(base_model)
    samples = (f"![base vs LoRA]({sample_file})\n\nPer prompt (named above its rows): the base model, then the "
               f"same seeds with this LoRA.\n" if sample_file else "")
    lines = "\n".join(f"- {k}: {v}" for k, v in metrics.items())
    reward = public_config(args)["reward"]  # a server URL without its credentials
    offline = f" offline, on the preference pairs of `{args.preference_dataset}`" if args.preference_dataset else ""
    card_data = ModelCardData(base_model=base_model, library_name="diffusers", license=licence,
                              license_name=licence_name, widget=widget or None,
                              tags=["text-to-image", "diffusers", "diffusers-training", "lora", "template:sd-lora",
                                    "drpo", "one-step"])
    content = f"""---
{card_data.to_yaml()}
---

# DrPO LoRA for {base_model or args.pretrained_model_name_or_path}

LoRA weights trained with method `{args.method}`{offline} of the DrPO project (Drifting Preference Optimization,
arXiv 2606.02521; `draft`, `vggflow`, `dpo` and `grpo` are its Appendix C baselines): reward `{reward}`,
feature map `{args.feature_extractor}`, K = {args.num_candidates}, M = {args.num_pairs},
drift preset `{args.drift_preset}`: lambda = {args.ref_weight}, eta = {args.velocity_scale}, radii {args.drift_radii},
kernel {args.drift_kernel},
{args.max_train_steps} steps at learning rate {args.learning_rate}, rank {args.rank}.

{samples}
{lines}

```python
from diffusers import AutoPipelineForText2Image
from diffusers.utils import logging

logging.set_verbosity_error()  # a DrPO LoRA is UNet-only: hides "No LoRA keys associated to CLIPTextModel"
pipe = AutoPipelineForText2Image.from_pretrained("{base_model or args.pretrained_model_name_or_path}")
pipe.load_lora_weights("{repo_id}")
image = pipe("a prompt", num_inference_steps=1, guidance_scale=0.0).images[0]
```
"""
    files.write_text(os.path.join(output_dir, "README.md"), str(ModelCard(content)))


def create_hub_repo(args) -> str:
    """Create (or reuse) the Hub repository at start-up, so auth problems fail before training."""
    from huggingface_hub import create_repo

    name = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
    return create_repo(name, exist_ok=True, token=hub_token(args)).repo_id


def push_to_hub(args, repo_id: str) -> None:
    from huggingface_hub import upload_folder

    upload_folder(
        repo_id=repo_id, folder_path=args.output_dir, commit_message="DrPO LoRA",
        ignore_patterns=["checkpoint-*", "checkpoint-*/**", "logs/**", "*.tmp", ".drpo*"], token=hub_token(args),
    )


# ---------------------------------------------------------------------------------------------
# The end of a run
# ---------------------------------------------------------------------------------------------


def finish_training(accelerator, args, pipe, history, prompts, reward_fn, repo_id, fresh_pipeline) -> dict:
    """Save the LoRA, reload it into a fresh stock pipeline, score it, plot, write the card, push.

    ``fresh_pipeline()`` loads the base model again exactly as the script does (e.g. SDXL's VAE).
    """
    if not accelerator.is_main_process:
        return {}
    save_lora(args.output_dir, accelerator.unwrap_model(pipe.unet), type(pipe))
    if args.output_kohya_format:
        save_kohya_lora(args.output_dir, args.lora_alpha or args.rank)
    save_history(accelerator, args.output_dir, history)
    plot_reward_curve(history, os.path.join(args.output_dir, "reward_curve.png"))

    # Final check on a fresh pipeline: exactly what a user gets from load_lora_weights.
    fresh = fresh_pipeline().to(accelerator.device)
    seeds = validation_seeds(args)
    base, base_images = reward_table(fresh, reward_fn, args.reward, prompts, seeds, args.resolution, progress=True,
                                     description="final check: base")
    load_lora(fresh, args.output_dir)
    tuned, tuned_images = reward_table(fresh, reward_fn, args.reward, prompts, seeds, args.resolution, progress=True,
                                       description="final check: LoRA")
    metrics = summarize(base, tuned)
    files.write_json(os.path.join(args.output_dir, "final_metrics.json"), metrics)
    files.save_image(labelled_grid(prompts, {"base": base_images, "LoRA": tuned_images}, len(seeds)),
                     os.path.join(args.output_dir, "samples_before_after.png"))
    accelerator.print(f"held-out {args.reward}: base {metrics['base_mean']:.4f} -> LoRA {metrics['lora_mean']:.4f} "
                      f"({describe_change(metrics)})")
    widget = save_widget_samples(args.output_dir, prompts, tuned_images, len(seeds))
    write_model_card(args, args.output_dir, "samples_before_after.png", {
        f"held-out {args.reward} (base -> LoRA)": f"{metrics['base_mean']:.4f} -> {metrics['lora_mean']:.4f}",
        "effect size (change / across-seed std)": (f"{metrics['effect_size']:.2f}" if metrics["effect_size"] is not None
                                                   else f"undefined: {metrics['effect_size_undefined']}"),
    }, widget)
    if repo_id is not None:
        push_to_hub(args, repo_id)
    return metrics
