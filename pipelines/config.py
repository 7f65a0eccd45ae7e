"""Typed configuration: the flags, parsed once by an entry point, grouped into frozen per-concern configs.

``pipelines/cli.py`` checks the flags and builds these configs from them (resolved values, such as the
drift preset filled in, are built in, never written back into the namespace); every module takes the
config it needs, never the namespace (``tests/test_layout.py`` enforces it).

Each field declares whether it changes what the run computes (``result``): the run record a resume
compares (``run_record``) is made of those fields, so a new flag is fingerprinted by its declaration
(``tests/test_config.py`` fails on a flag that no config field classifies).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import drpo_utils
from pipelines.redact import public_text


def result(default=dataclasses.MISSING):
    """A field that changes what the run computes (part of the run record a resume checks)."""
    return field(default=default, metadata={"result": True})


def setting(default=dataclasses.MISSING):
    """A field that manages the run without changing its result (paths, budgets, logging, speed)."""
    return field(default=default, metadata={"result": False})


SCHEDULER_OVERRIDES = ("timestep_spacing", "prediction_type")  # scheduler config values settable by flag


@dataclass(frozen=True)
class AdapterConfig:
    """The trainable LoRA (paper: rank 16 on to_q, to_k, to_v, to_out.0)."""

    rank: int = result(16)
    lora_alpha: int = result(16)  # resolved: --lora_alpha, else --rank
    lora_dropout: float = result(0.0)
    lora_target_modules: tuple[str, ...] = result(("to_q", "to_k", "to_v", "to_out.0"))
    init_lora: str | None = result(None)  # a new run started from this LoRA's weights


@dataclass(frozen=True)
class ModelConfig:
    """The one-step model to finetune, as the stock pipeline loads it."""

    pretrained_model_name_or_path: str = result()
    revision: str | None = result(None)
    variant: str | None = result(None)
    pretrained_vae_model_name_or_path: str | None = result(None)  # SDXL: an fp16-safe VAE
    resolution: int | None = result(None)  # resolved at start-up: --resolution, else the model's own
    cache_dir: str | None = setting(None)
    unet: str | None = result(None)  # a distilled one-step UNet replacing the base's (pipelines/generators.py)
    scheduler: str | None = result(None)  # its scheduler class, its config overrides and its one timestep
    timestep_spacing: str | None = result(None)
    prediction_type: str | None = result(None)
    timesteps: tuple[int, ...] | None = result(None)
    max_sequence_length: int | None = result(None)  # FLUX: T5 tokens (train_drpo_flux.py)

    @property
    def scheduler_overrides(self) -> dict:
        """The scheduler config values given by flag (--timestep_spacing, --prediction_type)."""
        return {key: getattr(self, key) for key in SCHEDULER_OVERRIDES if getattr(self, key) is not None}


@dataclass(frozen=True)
class MethodConfig:
    """The per-prompt update: --method, K, M, the feature map, the drift field and the method's own options."""

    method: str = result()
    num_candidates: int = result()
    num_pairs: int = result()
    feature_extractor: str = result()
    drift_preset: str = result()
    drift: drpo_utils.DriftConfig = result()  # the preset with the drift flags given applied
    feature_extractor_path: str | None = result(None)
    options: Any = result(None)  # the method's own flags (a frozen dataclass of its module)


@dataclass(frozen=True)
class RewardConfig:
    """The reward that ranks (or, for draft / vggflow, is differentiated)."""

    reward: str = result()
    reward_weights: tuple[float, ...] | None = result(None)
    reward_device: str | None = setting(None)
    reward_timeout: float = setting(60.0)
    max_tied_steps: int = setting(10)


@dataclass(frozen=True)
class DataConfig:
    """Where the prompts (or, offline, the preference pairs) come from."""

    prompts_file: str | None = result(None)
    dataset_name: str | None = result(None)
    dataset_split: str = result("train")
    prompt_column: str = result("prompt")
    preference_dataset: str | None = result(None)
    caption_column: str = result("caption")
    image_0_column: str = result("jpg_0")
    image_1_column: str = result("jpg_1")
    label_0_column: str = result("label_0")
    max_train_samples: int | None = result(None)
    offline_neighbours: int = result(0)
    streaming: bool = setting(False)
    feature_cache_dir: str | None = setting(None)

    @property
    def offline(self) -> bool:
        return self.preference_dataset is not None


@dataclass(frozen=True)
class OptimConfig:
    """The optimiser, its schedule, and how a step is executed (the last three change memory and speed only)."""

    train_batch_size: int = result(1)
    gradient_accumulation_steps: int = result(1)
    learning_rate: float = result(1e-4)
    scale_lr: bool = result(False)
    lr_scheduler: str = result("constant")
    lr_warmup_steps: int = result(0)
    lr_num_cycles: int = result(1)
    lr_power: float = result(1.0)
    use_8bit_adam: bool = result(False)
    adam_beta1: float = result(0.9)
    adam_beta2: float = result(0.999)
    adam_weight_decay: float = result(1e-2)
    adam_epsilon: float = result(1e-8)
    max_grad_norm: float = result(1.0)
    gradient_checkpointing: bool = setting(False)
    candidate_chunk_size: int | None = setting(None)
    overlap_reward: bool = setting(True)


@dataclass(frozen=True)
class RunConfig:
    """The run itself: its seed and precision, its length, checkpoints and logs."""

    output_dir: str = setting("drpo-output")
    seed: int | None = result(None)
    mixed_precision: str | None = result(None)  # resolved at start-up: the flag or accelerate's configuration
    allow_tf32: bool = result(False)
    max_train_steps: int = setting(1000)  # a resume may extend the budget
    checkpointing_steps: int = setting(500)
    checkpoints_total_limit: int | None = setting(None)
    resume_from_checkpoint: str | None = setting(None)
    overwrite_output_dir: bool = setting(False)
    ddp_timeout: int = setting(1800)
    report_to: str = setting("tensorboard")
    logging_dir: str = setting("logs")
    tracker_project_name: str = setting("drpo")  # the project's name
    output_kohya_format: bool = setting(False)


@dataclass(frozen=True)
class ValidationConfig:
    """Held-out prompts, seeds and rewards watched during training and scored at the end."""

    validation_prompts: tuple[str, ...] | None = result(None)  # given: no prompt is held out of training
    validation_rewards: tuple[str, ...] = setting(())
    validation_steps: int = setting(100)
    num_validation_seeds: int = setting(4)


@dataclass(frozen=True)
class HubConfig:
    push_to_hub: bool = setting(False)
    hub_model_id: str | None = setting(None)
    hub_token: str | None = setting(None)


@dataclass(frozen=True)
class TrainingConfig:
    """Every config of one training run."""

    model: ModelConfig
    adapter: AdapterConfig
    method: MethodConfig
    reward: RewardConfig
    data: DataConfig
    optim: OptimConfig
    run: RunConfig
    validation: ValidationConfig
    hub: HubConfig

    def resolved(self, **changes) -> TrainingConfig:
        """A copy with start-up values filled in: ``resolved(model={"resolution": 512})``."""
        return dataclasses.replace(self, **{part: dataclasses.replace(getattr(self, part), **values)
                                            for part, values in changes.items()})


@dataclass(frozen=True)
class EvalConfig:
    """``python -m pipelines.evaluate``: the models, prompts and seeds, the metrics and judge, the outputs."""

    pretrained_model_name_or_path: str
    revision: str | None = None
    variant: str | None = None
    lora: tuple[str, ...] = ()
    unet: tuple[str, ...] = ()
    base_unet: str | None = None  # a distilled one-step UNet for the base and its scheduler (pipelines/generators.py)
    scheduler: str | None = None
    timestep_spacing: str | None = None
    prediction_type: str | None = None
    timesteps: tuple[int, ...] | None = None
    max_sequence_length: int | None = None  # FLUX: T5 tokens (default: schnell's 256)
    prompt_set: str | None = None
    prompts_file: str | None = None
    dataset_name: str | None = None
    dataset_split: str = "test"
    prompt_column: str = "prompt"
    max_prompts: int | None = None
    unique_prompts: bool = False
    seeds: tuple[int, ...] | None = None
    resolution: int | None = None
    mixed_precision: str = "no"
    metrics: str = ""
    metric_batch_size: int = 16
    bootstrap: int = 1000
    seed: int = 0
    raw_scores: bool = False
    geneval: bool = False
    geneval_detector: str = ""
    geneval_clip: str = ""
    judge: str | None = None
    judge_model: str | None = None
    judge_timeout: float = 300.0
    judge_max_new_tokens: int = 64
    output_dir: str = "evaluation"
    image_cache_dir: str | None = None
    num_grids: int = 16


def json_value(value):
    """A value as standard JSON holds it: tuples as lists, an infinite float (``--self_penalty inf``) as "inf",
    dataclasses (the drift field's config, a method's options) as objects."""
    if dataclasses.is_dataclass(value):
        return {f.name: json_value(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, float) and math.isinf(value):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [json_value(item) for item in value]
    return value


def run_record(config: TrainingConfig, **facts) -> dict:
    """The run a checkpoint belongs to: every field declared ``result``, plus ``facts`` the flags do not say
    (the prompt encoding, the number of processes)."""
    record = {}
    for part in dataclasses.fields(config):
        values = getattr(config, part.name)
        for item in dataclasses.fields(values):
            if item.metadata["result"]:
                value = json_value(getattr(values, item.name))
                record[item.name] = public_text(value) if isinstance(value, str) else value  # no credential
    options = record.pop("options") or {}  # the method's own flags, under their flag names
    return {**dict(sorted({**record, **options}.items())), **facts}
