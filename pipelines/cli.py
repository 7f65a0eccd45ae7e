"""The training scripts' command line: the flags by group (diffusers-examples names), their checks
before anything loads, and the typed configs built from them (``pipelines/config.py``). The entry points'
configuration builder: the only module of ``pipelines/`` that reads an argparse namespace.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os

import torch

import drpo_utils
from pipelines import (checkpoints, config, downloads, features, flags, generators, hub, lora_files, methods,
                       preference_data, rewards, runtime)
from pipelines.drift_flags import DRIFT_FIELDS


def add_model_flags(parser) -> None:
    model = parser.add_argument_group("model and output")
    model.add_argument("--pretrained_model_name_or_path", required=True,
                       help="Hub id or local folder of the one-step model.")
    model.add_argument("--revision", default=None, help="Hub revision of the model.")
    model.add_argument("--variant", default=None, help='Weights variant, e.g. "fp16".')
    model.add_argument("--cache_dir", default=None,
                       help="Where downloaded models are stored (default: the Hugging Face cache).")
    model.add_argument("--output_dir", default="drpo-output",
                       help="Where the LoRA, checkpoints, samples and logs go.")
    model.add_argument("--seed", type=flags.seed, default=None,
                       help="Seed for LoRA init, prompt/noise draws and pairs (a run is reproducible with it).")
    model.add_argument("--resolution", type=flags.positive_int, default=None,
                       help="Image size; default: the model's own (UNet sample_size x VAE scale factor; SD-Turbo 512).")
    model.add_argument("--rank", type=flags.positive_int, default=16, help="LoRA rank (paper: 16).")
    model.add_argument("--lora_alpha", type=flags.positive_int, default=None,
                       help="LoRA alpha (default: equal to --rank).")
    model.add_argument("--lora_dropout", type=flags.fraction, default=0.0, help="Dropout of the LoRA layers.")
    model.add_argument("--lora_target_modules", default=lora_files.LORA_TARGET_MODULES,
                       help="Comma-separated module names that get LoRA.")
    model.add_argument("--init_lora", default=None,
                       help="Start this new run from an existing LoRA (a folder, a .safetensors file or a Hub id): "
                            "its weights initialise the adapter; its rank and alpha must be --rank / --lora_alpha. "
                            "Not a resume: optimiser, schedule and step start afresh.")
    generators.add_generator_flags(parser)



def add_prompt_flags(parser) -> None:
    prompts = parser.add_argument_group("prompts")
    prompts.add_argument("--prompts_file", default=None,
                         help="A .txt file (one prompt per line) or .jsonl with the --prompt_column key.")
    prompts.add_argument("--dataset_name", default=None, help="A datasets name or local folder holding prompts.")
    prompts.add_argument("--dataset_split", default="train",
                         help="Split of --dataset_name (or of --preference_dataset).")
    prompts.add_argument("--prompt_column", default="prompt", help="Column (or .jsonl key) holding the prompt.")



def add_method_flags(parser, default_method: str, default_feature_extractor: str) -> None:
    drpo = parser.add_argument_group("the method, its reward and candidates (Algorithm 1, Eqs. 15-16, Appendix A)")
    drpo.add_argument("--method", default=default_method, choices=methods.names(),
                      help="; ".join(f"{name}: {method.summary}" for name, method in methods.registered().items()))
    drpo.add_argument("--reward", required=True, help=rewards.reward_help())
    drpo.add_argument("--max_tied_steps", type=flags.non_negative_int, default=10,
                      help="Stop the run when, for this many consecutive steps, every prompt's K candidates got the "
                           "same reward (it gives no ranking: nothing is learnt); 0: never stop.")
    drpo.add_argument("--reward_device", default=None,
                      help="Device of the named model rewards (--reward, --validation_rewards), e.g. cuda:1 for a "
                           "large reward on its own GPU (default: the process' accelerator device).")
    drpo.add_argument("--reward_timeout", type=flags.positive_float, default=60.0,
                      help="Seconds a remote reward (--reward http://...) has for a whole request, however slowly it "
                           "answers; a request past it is retried twice with backoff (each retry logged), then the "
                           "run stops naming the URL.")
    drpo.add_argument("--reward_weights", type=flags.list_of(flags.finite_float, "finite weights"), default=None,
                      help="Weights of a mixture's components (default: all 1); components are standardised "
                           "per prompt.")
    drpo.add_argument("--feature_extractor", default=default_feature_extractor,
                      help=f"phi, one of {', '.join(features.FEATURE_MAPS)} (see docs/feature-maps.md).")
    drpo.add_argument("--feature_extractor_path", default=None,
                      help="The feature network's weights: a local folder, a Hub id, or for latent_mae a Flax release "
                           "folder (local or 'owner/repo/folder' on the Hub) or a converted .safetensors file. "
                           "Default: the published weights.")
    drpo.add_argument("--num_candidates", type=flags.positive_int, default=24,
                      help="K candidates per prompt (paper: 24).")
    drpo.add_argument("--num_pairs", type=flags.positive_int, default=12,
                      help="M reward-ordered pairs per prompt with --pairing random (paper: 12; the default "
                           "top / bottom split takes K/2 a side instead); offline: at most M of the prompt's "
                           "dataset pairs.")


def add_optimisation_flags(parser) -> None:
    optimisation = parser.add_argument_group("optimisation")
    optimisation.add_argument("--train_batch_size", type=flags.positive_int, default=1,
                              help="Prompts per process per micro-step (K candidates each).")
    optimisation.add_argument("--gradient_accumulation_steps", type=flags.positive_int, default=1,
                              help="Micro-steps per optimisation step (paper: 8).")
    optimisation.add_argument("--gradient_checkpointing", action="store_true",
                              help="Trade UNet (and feature network, VAE decoder) compute for memory.")
    optimisation.add_argument("--candidate_chunk_size", type=flags.positive_int, default=None,
                              help="C: generate and score the K candidates without gradient, then recompute and "
                                   "backpropagate them C at a time (same gradient; memory flat in K; one more "
                                   "generator forward). Default: one pass with all K.")
    optimisation.add_argument("--overlap_reward", action=argparse.BooleanOptionalAction, default=True,
                              help="With --candidate_chunk_size: score the next prompt's candidates in a background "
                                   "thread while the current prompt trains (same results; needs more than one "
                                   "prompt per optimiser step).")
    optimisation.add_argument("--max_train_steps", type=flags.positive_int, default=1000, help="Optimisation steps.")
    optimisation.add_argument("--learning_rate", type=flags.positive_float, default=1e-4,
                              help="AdamW learning rate (paper: 1e-4; 3e-5 for HPSv3).")
    optimisation.add_argument("--lr_scheduler", default="constant",
                              type=flags.lazily_checked(flags.lr_scheduler_name, "diffusers scheduler name"),
                              help="diffusers scheduler name: constant, linear, cosine, constant_with_warmup, ...")
    optimisation.add_argument("--lr_warmup_steps", type=flags.non_negative_int, default=0,
                              help="Warm-up steps of the scheduler.")
    optimisation.add_argument("--lr_num_cycles", type=flags.positive_int, default=1,
                              help="Hard resets of the cosine_with_restarts scheduler.")
    optimisation.add_argument("--lr_power", type=flags.positive_float, default=1.0,
                              help="Power of the polynomial scheduler.")
    optimisation.add_argument("--scale_lr", action="store_true",
                              help="Multiply the learning rate by accumulation steps x batch size x processes.")
    optimisation.add_argument("--use_8bit_adam", action="store_true",
                              help="bitsandbytes' 8-bit AdamW (needs `pip install bitsandbytes` and a GPU).")
    optimisation.add_argument("--adam_beta1", type=flags.fraction, default=0.9, help="AdamW beta1.")
    optimisation.add_argument("--adam_beta2", type=flags.fraction, default=0.999, help="AdamW beta2.")
    optimisation.add_argument("--adam_weight_decay", type=flags.non_negative_float, default=1e-2,
                              help="AdamW weight decay.")
    optimisation.add_argument("--adam_epsilon", type=flags.positive_float, default=1e-8, help="AdamW epsilon.")
    optimisation.add_argument("--max_grad_norm", type=flags.positive_float, default=1.0, help="Gradient clipping.")
    optimisation.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
                              help="Frozen weights in that dtype, LoRA in fp32 (fp16 needs a GPU). "
                                   "Default: accelerate's configuration.")
    optimisation.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere+ GPUs.")



def add_run_flags(parser) -> None:
    run = parser.add_argument_group("checkpoints, logging, validation, Hub")
    run.add_argument("--checkpointing_steps", type=flags.positive_int, default=500,
                     help="Save checkpoint-N every N steps (and at the end).")
    run.add_argument("--checkpoints_total_limit", type=flags.positive_int, default=None,
                     help="Keep only the newest N checkpoints.")
    run.add_argument("--resume_from_checkpoint", default=None, help='"latest" or a path / name like checkpoint-500.')
    run.add_argument("--overwrite_output_dir", action="store_true",
                     help="Start a new run in an --output_dir that holds another run's checkpoints, deleting them "
                          "(without it such a run is refused, naming how the runs differ).")
    run.add_argument("--ddp_timeout", type=flags.positive_int, default=1800,
                     help="Seconds a collective operation may wait for the other processes before the run stops "
                          "with a message naming the rank and step (the process-group timeout).")
    run.add_argument("--report_to", default="tensorboard", help='"tensorboard", "wandb", "all" or "none".')
    run.add_argument("--logging_dir", default="logs", help="Tracker logs, under --output_dir.")
    run.add_argument("--tracker_project_name", default="drpo", help="Project name given to the trackers.")
    run.add_argument("--validation_prompts", type=flags.prompt_list, default=None,
                     help="'|'-separated prompts for sample grids, --validation_rewards and the final check (default: "
                          "with 100+ distinct prompts, the last 1 in 20 of them, 4 to 16, held out of training; "
                          "else the first 4).")
    run.add_argument("--validation_rewards", default=None, type=flags.names,
                     help="Comma-separated rewards (any --reward spec but a mixture) scored on the validation "
                          "prompts x seeds at every --validation_steps, base and LoRA, logged beside the training "
                          "reward: reward hacking shows while it happens.")
    run.add_argument("--validation_steps", type=flags.non_negative_int, default=100,
                     help="Base-vs-LoRA grid every N steps (0: never).")
    run.add_argument("--num_validation_seeds", type=flags.positive_int, default=4,
                     help="Seeds per validation prompt (held-out 10000+).")
    run.add_argument("--push_to_hub", action="store_true",
                     help="Create the repo at start (fails early without credentials), upload LoRA + model card "
                          "at the end.")
    run.add_argument("--output_kohya_format", action="store_true",
                     help=f"Also write the LoRA in kohya's key names ({lora_files.KOHYA_FILE}) for ComfyUI / A1111.")
    run.add_argument("--hub_model_id", default=None, help="Repo name on the Hub (default: the output folder name).")
    run.add_argument("--hub_token", default=None, help="Token (default: the stored login / HF_TOKEN).")


def check_reward_for_method(args) -> None:
    """A method that differentiates the reward (draft, vggflow) refuses, now, a named reward that cannot be
    differentiated (a rule, a remote service); a custom function is checked at its first call."""
    if not methods.registered()[args.method].reward_gradient:
        return
    differentiable = ", ".join(name for name, entry in rewards.REWARDS.items() if entry.differentiable)
    for part in rewards.mixture_parts(args.reward):
        entry = rewards.REWARDS.get(part)
        if rewards.is_url(part) or (entry is not None and not entry.differentiable):
            raise ValueError(f"--method {args.method} backpropagates through the reward, and {part!r} has no "
                             f"gradient (it only ranks); use --method {methods.ranking_only()} with it, or a "
                             f"differentiable reward ({differentiable}"
                             f", or a file.py:function returning a tensor computed from the images)")


def idle_flag_rules(args) -> list[tuple[list[str], bool, str]]:
    """(flags, whether they act in this run, when they do): a flag given where it does nothing is an error."""
    offline = args.preference_dataset is not None
    jsonl_or_dataset = args.dataset_name is not None or offline or str(args.prompts_file).endswith(".jsonl")
    rules = [
        ([*preference_data.LAYOUT, "streaming", "max_train_samples", "feature_cache_dir", "offline_neighbours"],
         offline, "with --preference_dataset"),
        (["prompt_column"], jsonl_or_dataset, "with a .jsonl --prompts_file or --dataset_name"),
        (["dataset_split"], args.dataset_name is not None or offline, "with --dataset_name or --preference_dataset"),
        (["lr_num_cycles"], args.lr_scheduler == "cosine_with_restarts", "with --lr_scheduler cosine_with_restarts"),
        (["lr_power"], args.lr_scheduler == "polynomial", "with --lr_scheduler polynomial"),
        (["lr_warmup_steps"], args.lr_scheduler != "constant", "with an --lr_scheduler that warms up (not constant)"),
        (["overlap_reward"], args.candidate_chunk_size is not None and not offline, "with --candidate_chunk_size"),
        (["hub_model_id", "hub_token"], args.push_to_hub, "with --push_to_hub"),
        (["tracker_project_name", "logging_dir"], args.report_to != "none", "with a tracker (--report_to)"),
    ]
    for method in methods.registered().values():
        rules.append((method.flags, args.method == method.name, f"with --method {method.name}"))
    ranking_online = not offline and not methods.registered()[args.method].reward_gradient
    rules.append((["max_tied_steps"], ranking_online, "when the reward ranks online candidates"))
    return rules


def warn_unused_pair_count(args, given: set[str], drift: drpo_utils.DriftConfig) -> None:
    """--num_pairs given to online DrPO with the top / bottom split (the default preset's) changes nothing: say so."""
    if "num_pairs" in given and args.method == "drpo" and args.preference_dataset is None and \
            drift.pairing == "top_bottom":
        logging.getLogger(__name__).warning(
            "--num_pairs %d has no effect: --pairing top_bottom (the --drift_preset authors default) takes the top "
            "and bottom K/2 candidates as A+ / A-; add --pairing=random for M random reward-ordered pairs (Eq. 12)",
            args.num_pairs)


def check_start_paths(args) -> None:
    """What the run starts from exists: the checkpoint to resume, the LoRA to start from (a local path, or
    any name when the Hub is offline)."""
    if args.resume_from_checkpoint not in (None, "latest"):
        path = checkpoints.resolve_checkpoint_path(args.output_dir, args.resume_from_checkpoint)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"--resume_from_checkpoint {args.resume_from_checkpoint!r}: {path} does not exist")
    if args.init_lora and not os.path.exists(args.init_lora) and (
            downloads.offline() or args.init_lora.endswith(".safetensors") or args.init_lora.startswith((".", "/"))):
        raise FileNotFoundError(f"--init_lora {args.init_lora!r}: no such file or folder")


def scheduler_overrides(args) -> dict:
    """--timestep_spacing / --prediction_type as given (pipelines/generators.py)."""
    return {key: getattr(args, key) for key in config.SCHEDULER_OVERRIDES if getattr(args, key) is not None}


def check_args(args, given: set[str] = frozenset()) -> None:
    """Fail on bad input before any model is loaded. ``given``: the flags on the command line (a flag
    that does nothing in this run is refused; flags left at their defaults are never refused)."""
    flags.refuse_idle_flags(given, idle_flag_rules(args))
    if args.num_candidates < 2:
        raise ValueError(f"--num_candidates (K) must be at least 2, got {args.num_candidates}")
    if not 1 <= args.num_pairs <= drpo_utils.max_pairs(args.num_candidates):
        raise ValueError(
            f"--num_pairs (M) must be in [1, {drpo_utils.max_pairs(args.num_candidates)}] = [1, K(K-1)/2] for "
            f"K={args.num_candidates}, got {args.num_pairs}"
        )
    if args.feature_extractor not in features.FEATURE_MAPS:
        raise ValueError(f"Unknown feature extractor {args.feature_extractor!r}; "
                         f"choose one of {', '.join(features.FEATURE_MAPS)}.")
    warn_unused_pair_count(args, given, drift_config(args))  # the preset with the given flags, validated
    rewards.check_reward_spec(args.reward, args.reward_weights)  # unknown names list the choices; files must exist
    for spec in args.validation_rewards or []:
        rewards.check_reward_spec(spec, None, flag="--validation_rewards")
    if args.reward_device is not None:
        try:
            torch.device(args.reward_device)
        except RuntimeError as error:
            raise ValueError(f"--reward_device {args.reward_device!r} is no torch device: {error}") from error
    check_reward_for_method(args)
    if args.candidate_chunk_size is not None and features.FEATURE_MAPS[args.feature_extractor].stochastic:
        raise ValueError(f"--feature_extractor {args.feature_extractor} draws new random features on every call, so "
                         "the features --candidate_chunk_size recomputes would not be those the targets were built "
                         "from; drop --candidate_chunk_size (or use vit_mae_released)")
    if args.candidate_chunk_size is not None and args.candidate_chunk_size > args.num_candidates:
        raise ValueError(f"--candidate_chunk_size must be in [1, K={args.num_candidates}], "
                         f"got {args.candidate_chunk_size}")
    if args.prompts_file is None and args.dataset_name is None and args.preference_dataset is None:
        raise ValueError("give prompts with --prompts_file or --dataset_name (or preference pairs with "
                         "--preference_dataset)")
    offline_methods = methods.names(lambda method: method.offline_update is not None)
    if args.preference_dataset is not None and args.method not in offline_methods:
        raise ValueError(f"--method {args.method} learns from the current generator's own samples; with "
                         f"--preference_dataset use --method {' or '.join(offline_methods)}")
    if args.preference_dataset is not None and features.FEATURE_MAPS[args.feature_extractor].needs_condition:
        raise ValueError(f"--feature_extractor {args.feature_extractor} depends on the prompt, which offline "
                         "encoding does not give it; choose another feature map with --preference_dataset")
    if args.overwrite_output_dir and args.resume_from_checkpoint is not None:
        raise ValueError("--overwrite_output_dir deletes the checkpoints --resume_from_checkpoint would resume from; "
                         "give only one of them")
    check_start_paths(args)
    generators.check_generator_flags(args.unet, args.scheduler, scheduler_overrides(args), args.timesteps)
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("--mixed_precision fp16 needs a GPU; on the CPU use --mixed_precision bf16 or no")
    if args.hub_token is not None and args.report_to in ("wandb", "all"):
        raise ValueError("--hub_token with --report_to=wandb would upload the token with the run's config; "
                         "log in with `hf auth login` or set HF_TOKEN instead")
    if args.use_8bit_adam:
        runtime.eight_bit_adamw()  # bitsandbytes present and usable, or a message now
    if args.push_to_hub and downloads.offline():
        raise ValueError("--push_to_hub uploads to the Hub, but HF_HUB_OFFLINE is set: unset it, or push the "
                         "output folder later with `hf upload`")
    if args.push_to_hub and hub.hub_token(from_namespace(config.HubConfig, args)) is None:
        raise ValueError("--push_to_hub needs Hub credentials: run `hf auth login`, set HF_TOKEN, or pass --hub_token")
    for spec in [args.reward, *(args.validation_rewards or [])]:
        rewards.probe_servers(spec)  # last: the only check that waits on the network




# ------------------------------------------------------------------------------------------------
# Flags -> configs
# ------------------------------------------------------------------------------------------------


def fields_of(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def from_namespace(cls, namespace, **overrides):
    """``cls`` from the namespace's attributes of the same names (absent ones keep their defaults)."""
    values = {name: getattr(namespace, name) for name in fields_of(cls) if hasattr(namespace, name)}
    values = {name: tuple(value) if isinstance(value, list) else value for name, value in values.items()}
    return cls(**{**values, **overrides})


def drift_config(namespace, drift_flags: dict[str, str] | None = None) -> drpo_utils.DriftConfig:
    """--drift_preset's DriftConfig with every drift flag that was given (not None) applied (Eqs. 15-17, App. A)."""
    drift_flags = DRIFT_FIELDS if drift_flags is None else drift_flags
    preset = drpo_utils.DRIFT_PRESETS[namespace.drift_preset]
    numerics_fields = fields_of(drpo_utils.DriftNumerics)
    top, numerics = {}, {}
    for flag, field_name in drift_flags.items():
        value = getattr(namespace, flag)
        if value is not None:
            (numerics if field_name in numerics_fields else top)[field_name] = \
                tuple(value) if isinstance(value, list) else value
    return dataclasses.replace(preset, numerics=dataclasses.replace(preset.numerics, **numerics), **top)


def build_training_configs(namespace) -> config.TrainingConfig:
    """The configs of a training run from its parsed, checked flags (the chosen method's options included)."""
    options_type = methods.registered()[namespace.method].options
    adapter = from_namespace(config.AdapterConfig, namespace, lora_alpha=namespace.lora_alpha or namespace.rank,
                             lora_target_modules=tuple(m.strip() for m in namespace.lora_target_modules.split(",")))
    options = from_namespace(options_type, namespace) if options_type is not None else None
    method = from_namespace(config.MethodConfig, namespace, drift=drift_config(namespace), options=options)
    return config.TrainingConfig(
        model=from_namespace(config.ModelConfig, namespace), adapter=adapter, method=method,
        reward=from_namespace(config.RewardConfig, namespace), data=from_namespace(config.DataConfig, namespace),
        optim=from_namespace(config.OptimConfig, namespace), run=from_namespace(config.RunConfig, namespace),
        validation=from_namespace(config.ValidationConfig, namespace,
                                  validation_rewards=tuple(namespace.validation_rewards or ())),
        hub=from_namespace(config.HubConfig, namespace))


def hub_needs(args) -> dict[str, list[str]]:
    """flag -> what the run will fetch from the Hub (``pipelines.downloads`` resources)."""
    from pipelines import downloads

    feature = features.FEATURE_MAPS[args.feature_extractor]
    weights = args.feature_extractor_path or getattr(feature, "DEFAULT_WEIGHTS", "")
    vae = getattr(args, "pretrained_vae_model_name_or_path", None)
    needs = {"--pretrained_model_name_or_path": [args.pretrained_model_name_or_path],
             "--pretrained_vae_model_name_or_path": [vae] if vae else [],
             "--unet": [args.unet] if args.unet else [],
             "--feature_extractor": [weights] if weights else [],
             "--reward": rewards.hub_resources(args.reward),
             "--validation_rewards": [r for spec in args.validation_rewards or [] for r in rewards.hub_resources(spec)]}
    return {flag: [r for r in resources if not downloads.is_local(r.partition(":")[0])]
            for flag, resources in needs.items()}


# What a run's config.yaml leaves out: how this run treated its folder, not the recipe (a switch set in a
# --config file cannot be turned off on the command line).
ONE_RUN_ONLY = ("overwrite_output_dir", "resume_from_checkpoint")
# What it always records, default or not: the drift preset and the run's method's own flags, whose defaults
# have changed between versions (``authors``; ``normalised`` reward gradients), so another version reruns the same.
ALWAYS_RECORDED = ("drift_preset",)


def parse_and_check(parser: argparse.ArgumentParser, input_args=None) -> argparse.Namespace:
    """Parse the flags (over a ``--config`` file's) and check them all (``check_args``) before anything loads."""
    args, given = flags.parse_with_config(parser, input_args)
    check_args(args, given)
    changed = {key: value for key, value in flags.changed_flags(parser, vars(args)).items() if key not in ONE_RUN_ONLY}
    for key in (*ALWAYS_RECORDED, *methods.registered()[args.method].flags):
        changed.setdefault(key, getattr(args, key))
    args.run_config = {"script": parser.prog, "flags": hub.public_flags(changed)}
    return args


# ------------------------------------------------------------------------------------------------
# Errors a user causes: one line
# ------------------------------------------------------------------------------------------------

TRACEBACK_SWITCH = "DRPO_TRACEBACK"  # set to 1 for the full traceback of a refused input


def user_error_types() -> tuple[type, ...]:
    """What a refused input or an unusable resource raises: each already says what to change."""
    from pipelines.checkpoints import CheckpointError
    from pipelines.eval_cache import CacheError as ImageCacheError
    from pipelines.preference_data import CacheError as FeatureCacheError

    return (ValueError, OSError, ImportError, FloatingPointError, rewards.RewardError, CheckpointError,
            ImageCacheError, FeatureCacheError)


def run_reporting_user_errors(entry_point) -> None:
    """Run ``entry_point()``; an input error ends the process with its message on one line and status 2
    (under ``accelerate launch --quiet``, the launcher adds nothing), a bug with its full traceback.
    ``DRPO_TRACEBACK=1`` shows the traceback of an input error too."""
    import sys

    try:
        entry_point()
    except user_error_types() as error:
        if os.environ.get(TRACEBACK_SWITCH, "0") not in ("", "0"):
            raise
        rank = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"error: {rank}{message} ({TRACEBACK_SWITCH}=1 shows the traceback)", file=sys.stderr, flush=True)
        sys.exit(2)
