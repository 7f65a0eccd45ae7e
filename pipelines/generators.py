"""Which one-step generator a run trains: the base pipeline's own UNet and scheduler (SD-Turbo, SDXL-Turbo),
or a distilled one-step UNet on an SD/SDXL base with the scheduler and timestep its model card gives
(DMD2, SDXL-Lightning, Hyper-SD): ``--unet``, ``--scheduler``, ``--timestep_spacing``, ``--prediction_type``,
``--timesteps``. The flags are checked before any weights load; the run's model card records them.

    --unet tianweiy/DMD2:dmd2_sdxl_1step_unet_fp16.bin --scheduler LCMScheduler --timesteps 399
"""

from __future__ import annotations

import inspect
import logging
import os

from pipelines import flags
from pipelines.config import ModelConfig

# The schedulers the one-step distilled UNets name in their model cards (others of diffusers work too).
ONE_STEP_SCHEDULERS = ("EulerAncestralDiscreteScheduler", "EulerDiscreteScheduler", "LCMScheduler", "TCDScheduler",
                       "DDIMScheduler")
UNET_FILE_SUFFIXES = (".safetensors", ".bin")


def add_generator_flags(parser, unet_flag: str = "--unet") -> None:
    """The flags; ``unet_flag``: --unet in training, --base_unet in the evaluation (whose --unet compares
    finetuned UNets)."""
    generator = parser.add_argument_group(
        "one-step generator: a distilled UNet on an SD/SDXL base and its scheduler (default: the base's own)")
    generator.add_argument(unet_flag, default=None,
                           help="A one-step UNet replacing the base's (before the LoRA is added): a diffusers UNet "
                                "folder or Hub repo, or one weights file in diffusers keys (.safetensors / .bin), "
                                "local or owner/repo:file (e.g. tianweiy/DMD2:dmd2_sdxl_1step_unet_fp16.bin).")
    generator.add_argument("--scheduler", default=None,
                           help="The diffusers scheduler class the one step runs through, built from the base's "
                                f"scheduler config (e.g. {', '.join(ONE_STEP_SCHEDULERS[1:4])}).")
    generator.add_argument("--timestep_spacing", default=None, choices=("leading", "linspace", "trailing"),
                           help="Scheduler config override (SDXL-Lightning: trailing).")
    generator.add_argument("--prediction_type", default=None, choices=("epsilon", "v_prediction", "sample"),
                           help="Scheduler config override: what the UNet predicts (SDXL-Lightning 1-step: sample).")
    generator.add_argument("--timesteps", type=flags.list_of(flags.non_negative_int, "timesteps"), default=None,
                           help="The one step's timestep, as pipe(timesteps=[t]) takes it (DMD2: 399, Hyper-SD "
                                "1-step UNet: 800); default: the scheduler's own single step.")


def scheduler_class(name: str):
    """The diffusers scheduler class called ``name`` (a clear error listing the usual ones otherwise)."""
    import diffusers

    found = getattr(diffusers, name, None)
    if not (inspect.isclass(found) and issubclass(found, diffusers.SchedulerMixin)):
        raise ValueError(f"--scheduler {name!r} is not a diffusers scheduler class; one-step models use "
                         f"{', '.join(ONE_STEP_SCHEDULERS)}")
    return found


def check_generator_flags(unet: str | None, name: str | None, overrides: dict, timesteps) -> None:
    """What can be checked without the model: a local --unet exists; the scheduler class exists, takes the
    config overrides given and, with --timesteps, explicit timesteps; one step means one timestep."""
    local = unet is not None and (unet.startswith((".", "/", "~")) or ":" not in unet and
                                  unet.endswith(UNET_FILE_SUFFIXES))  # a path, not a Hub id or owner/repo:file
    if local and not os.path.exists(unet):
        raise FileNotFoundError(f"the one-step UNet {unet!r}: no such file or folder")
    if timesteps is not None and len(timesteps) != 1:
        raise ValueError(f"--timesteps {','.join(map(str, timesteps))}: a one-step generator takes one timestep "
                         "(e.g. --timesteps 399 for DMD2)")
    if name is None:
        return
    cls = scheduler_class(name)
    accepted = inspect.signature(cls.__init__).parameters
    for key in overrides:
        if key not in accepted:
            raise ValueError(f"--{key} does not apply to --scheduler {name}: its config has no {key!r}")
    if timesteps is not None and "timesteps" not in inspect.signature(cls.set_timesteps).parameters:
        raise ValueError(f"--timesteps needs a scheduler that takes explicit timesteps (EulerDiscreteScheduler, "
                         f"LCMScheduler, TCDScheduler, ...); {name} does not")


def load_scheduler(model: ModelConfig):
    """The run's scheduler: --scheduler (default: the base's own class) from the base's scheduler config with
    the overrides given; --timesteps is tried on it now, so a timestep it refuses fails before any weights."""
    from diffusers import EulerDiscreteScheduler

    location = dict(pretrained_model_name_or_path=model.pretrained_model_name_or_path, subfolder="scheduler",
                    revision=model.revision, cache_dir=model.cache_dir)
    config = EulerDiscreteScheduler.load_config(**location)  # any scheduler class reads scheduler_config.json
    cls = scheduler_class(model.scheduler or config["_class_name"])
    scheduler = cls.from_config(config, **model.scheduler_overrides)
    if model.timesteps is not None:
        drop_custom_timestep_warning()
        if not 0 <= model.timesteps[0] < scheduler.config.num_train_timesteps:
            raise ValueError(f"--timesteps {model.timesteps[0]} is outside the scheduler's training timesteps "
                             f"[0, {scheduler.config.num_train_timesteps})")
        trial = cls.from_config(scheduler.config)
        try:
            trial.set_timesteps(timesteps=list(model.timesteps))
        except (ValueError, AssertionError, TypeError) as error:
            raise ValueError(f"--timesteps {model.timesteps[0]} is refused by {cls.__name__}: {error}") from error
        if [int(t) for t in trial.timesteps] != list(model.timesteps):
            raise ValueError(f"--timesteps {model.timesteps[0]}: {cls.__name__} turned it into "
                             f"{[int(t) for t in trial.timesteps]}")
    return scheduler


CUSTOM_TIMESTEP_WARNING = "The first timestep on the custom timestep schedule"


class _DropCustomTimestepWarning(logging.Filter):
    """LCM and TCD warn on every ``set_timesteps`` whose first timestep is not T - 1; a distilled UNet's own
    step (DMD2: 399) is meant, and the trainer sets it once per sample."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(CUSTOM_TIMESTEP_WARNING)


def drop_custom_timestep_warning() -> None:
    for name in ("diffusers.schedulers.scheduling_lcm", "diffusers.schedulers.scheduling_tcd"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropCustomTimestepWarning) for f in logger.filters):
            logger.addFilter(_DropCustomTimestepWarning())


def check_denoiser_config(config: dict, source: str) -> None:
    """Refuse the networks whose stock pipeline call feeds more than the trainer's one step does: a
    guidance-distilled FLUX (FLUX.1-dev: a guidance embedding, not a one-step model) and an LCM-distilled
    UNet (``time_cond_proj_dim``: the pipeline adds a guidance-scale embedding)."""
    if config.get("guidance_embeds"):
        raise ValueError(f"{source} is guidance-distilled (guidance_embeds, e.g. FLUX.1-dev), not a one-step model; "
                         "use FLUX.1-schnell")
    if config.get("time_cond_proj_dim") is not None:
        raise ValueError(f"{source} takes a guidance-scale embedding (time_cond_proj_dim, an LCM-distilled UNet), "
                         "which the one-step sample does not feed; use a one-step UNet (DMD2, SDXL-Lightning, "
                         "Hyper-SD)")


def check_scheduler(model: ModelConfig) -> None:
    """Build the run's scheduler from the base's config alone (no weights): a class, override or timestep it
    refuses fails at start-up."""
    if model.scheduler is not None or model.scheduler_overrides or model.timesteps is not None:
        load_scheduler(model)


def is_unet_file(unet: str) -> bool:
    """A single weights file (local, or ``owner/repo:file`` on the Hub) rather than a diffusers UNet folder."""
    return ":" in unet and not os.path.exists(unet) or unet.endswith(UNET_FILE_SUFFIXES)


def load_unet(model: ModelConfig, dtype):
    """--unet: a diffusers UNet folder or Hub repo (``from_pretrained``), or one state-dict file in diffusers
    keys (``.safetensors`` / ``.bin``, local or ``owner/repo:file``) loaded into the base's UNet architecture,
    as the DMD2, SDXL-Lightning and Hyper-SD model cards load theirs. Missing or extra keys are an error."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.model_loading_utils import load_state_dict

    from accelerate import init_empty_weights

    if not is_unet_file(model.unet):
        subfolder = "unet" if os.path.isdir(os.path.join(model.unet, "unet")) else None
        config = UNet2DConditionModel.load_config(model.unet, subfolder=subfolder, cache_dir=model.cache_dir)
        check_denoiser_config(config, f"--unet {model.unet!r}")
        return UNet2DConditionModel.from_pretrained(model.unet, subfolder=subfolder, dtype=dtype,
                                                    cache_dir=model.cache_dir)
    path = model.unet
    if not os.path.exists(path):
        from huggingface_hub import hf_hub_download

        repo_id, _, filename = path.partition(":")
        path = hf_hub_download(repo_id, filename, cache_dir=model.cache_dir)
    config = UNet2DConditionModel.load_config(model.pretrained_model_name_or_path, subfolder="unet",
                                              revision=model.revision, cache_dir=model.cache_dir)
    with init_empty_weights():  # no second full-size UNet allocated before the file's tensors arrive
        unet = UNet2DConditionModel.from_config(config)
    mismatch = f"--unet {model.unet!r} does not fit the base's UNet ({model.pretrained_model_name_or_path})"
    try:
        missing, unexpected = unet.load_state_dict(load_state_dict(path), strict=False, assign=True)
    except RuntimeError as error:  # a tensor of another shape
        raise ValueError(f"{mismatch}: {str(error)[:400]}") from error
    if missing or unexpected:
        raise ValueError(f"{mismatch}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return unet.to(dtype)


def pipeline_components(model: ModelConfig, dtype) -> dict:
    """What replaces the base pipeline's own components: the --unet and the --scheduler (with its overrides)."""
    components = {}
    if model.scheduler is not None or model.scheduler_overrides:
        components["scheduler"] = load_scheduler(model)  # first: a timestep it refuses fails before the weights
    if model.unet is not None:
        components["unet"] = load_unet(model, dtype)
    return components


def loading_snippet(model: ModelConfig, base: str) -> str:
    """Python lines that build the pipeline the way the run did (for the model card); the call's extra
    keyword arguments are returned by ``call_arguments``."""
    lines = []
    if model.unet is not None:
        lines.append("from diffusers import UNet2DConditionModel")
        if is_unet_file(model.unet):
            repo_id, _, filename = model.unet.partition(":")
            source = f'hf_hub_download("{repo_id}", "{filename}")' if filename and not os.path.exists(model.unet) \
                else f'"{model.unet}"'
            lines += ["from diffusers.models.model_loading_utils import load_state_dict",
                      *(["from huggingface_hub import hf_hub_download"] if "hf_hub_download" in source else []),
                      f'unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config("{base}", '
                      'subfolder="unet"))', f"unet.load_state_dict(load_state_dict({source}))"]
        else:
            lines.append(f'unet = UNet2DConditionModel.from_pretrained("{model.unet}")')
    components = ", unet=unet" if model.unet is not None else ""
    lines.append(f'pipe = AutoPipelineForText2Image.from_pretrained("{base}"{components})')
    if model.scheduler is not None or model.scheduler_overrides:
        overrides = "".join(f', {key}="{value}"' for key, value in model.scheduler_overrides.items())
        name = model.scheduler or "type(pipe.scheduler)"
        if model.scheduler is not None:
            lines.insert(0, f"from diffusers import {model.scheduler}")
        lines.append(f"pipe.scheduler = {name}.from_config(pipe.scheduler.config{overrides})")
    return "\n".join(lines)


def call_arguments(model: ModelConfig) -> dict:
    """The one-step call's arguments beyond steps and guidance: a distilled UNet's ``timesteps`` (DMD2: [399]),
    FLUX's ``max_sequence_length``."""
    arguments = {"timesteps": list(model.timesteps)} if model.timesteps is not None else {}
    if model.max_sequence_length is not None:
        arguments["max_sequence_length"] = model.max_sequence_length
    return arguments


def call_text(model: ModelConfig) -> str:
    """``call_arguments`` as the model card's call writes them (``, timesteps=[399]``)."""
    return "".join(f", {key}={value!r}" for key, value in call_arguments(model).items())


def cache_key(model: ModelConfig) -> dict:
    """What the generator adds to what a model's images depend on (empty for the base's own): the UNet by
    content, the scheduler and its settings."""
    from pipelines.content import source_key

    if model.max_sequence_length is not None:  # FLUX: the T5 tokens of the one-step call
        return {"max_sequence_length": model.max_sequence_length}
    if model.unet is None and model.scheduler is None and not model.scheduler_overrides and model.timesteps is None:
        return {}
    unet = None if model.unet is None else source_key(model.unet if not is_unet_file(model.unet)
                                                      or os.path.exists(model.unet) else model.unet.partition(":")[0])
    return {"generator": {"unet": unet, "unet_name": model.unet, "scheduler": model.scheduler,
                          **model.scheduler_overrides, "timesteps": model.timesteps}}


def describe(model: ModelConfig) -> str:
    """The model card's sentence on the generator, when it is not the base pipeline's own."""
    parts = [f"the one-step UNet `{model.unet}`" if model.unet is not None else None,
             f"scheduler `{model.scheduler}`" if model.scheduler is not None else None,
             ", ".join(f"{key} `{value}`" for key, value in model.scheduler_overrides.items()) or None,
             f"timestep {model.timesteps[0]}" if model.timesteps is not None else None]
    parts = [part for part in parts if part]
    return f" Generator: {', '.join(parts)} (the snippet below loads it the same way)." if parts else ""
