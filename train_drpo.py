#!/usr/bin/env python
"""Online Drifting Preference Optimization (DrPO, arXiv 2606.02521) for SD-Turbo-family one-step models.

    accelerate launch train_drpo.py --pretrained_model_name_or_path=stabilityai/sd-turbo \
        --prompts_file=prompts.txt --reward=my_reward.py:score --output_dir=drpo-sd-turbo

For each prompt: sample K candidates from the current generator, rank them with the reward, build the
preference drift from M reward-ordered pairs plus the reference drift toward the frozen base model
(same UNet, LoRA disabled), and regress the generator's features onto the detached target
z + eta * V (Algorithm 1). The reward only ranks, so any reward works; inference stays one step.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import time

import torch
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from diffusers import AutoPipelineForText2Image
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params
from tqdm.auto import tqdm

import drpo_utils
from pipelines import candidates, checkpoints, features, flags, memory, offline, preference_data, rewards, training
from pipelines.baselines import dpo, draft, grpo, vggflow
from pipelines.prompts import load_prompts

logger = get_logger(__name__)
METHOD_NAMES = ("drpo", "draft", "vggflow", "dpo", "grpo")


# ------------------------------------------------------------------------------------------------
# Flags (diffusers-examples names; train_drpo_sdxl.py extends this parser)
# ------------------------------------------------------------------------------------------------


# Each drift flag overrides one field of the --drift_preset's DriftConfig (None: keep the preset's value).
DRIFT_FLAGS = {
    "drift_radii": ("radii", flags.list_of(flags.positive_float, "positive radii"),
                    "Comma-separated kernel radii rho (Appendix A)."),
    "drift_kernel": ("kernel", str, "rbf (Eq. 21), laplacian, exponential (alias of laplacian), cosine."),
    "ref_weight": ("ref_weight", flags.non_negative_float, "lambda: weight of the reference drift (Eq. 15)."),
    "velocity_scale": ("velocity_scale", flags.positive_float, "eta: target step z + eta V (Eq. 16)."),
    "pair_weight": ("pair_weight", flags.positive_float, "Support weight of A+/A- and of the reference drift's "
                                                         "supports, relative to the unit-weight self-negatives."),
    "self_negatives": ("self_negatives", None, "Add sg(Z) as unit-weight negatives of both fields, each query's own "
                                               "copy masked (the released code)."),
    "mask_self": ("mask_self", None, "Mask each sample's own copy in the reference drift's negatives sg(Z); "
                                     "--no-mask_self gives the literal, unmasked Eq. 22."),
    "mask_paired_reference": ("mask_paired_reference", None, "With --mask_self, also mask each sample's paired base "
                                                             "sample r_i (same noise): the leave-one-out V_ref."),
    "drift_loss_reduction": ("loss_reduction", str, "sum: 1/(2K) sum_i ||z~_i - z*_i||^2 (Eq. 17); mean: over "
                                                    "candidates and feature dimensions (the released code)."),
    "separate_branch_losses": ("separate_branch_losses", None, "Regress V_pref and lambda V_ref as two losses, each in "
                                                               "its own call's coordinates (the released code)."),
    "drift_scale_floor": ("scale_floor", flags.non_negative_float, "Floor of the batch scale s and of s_z "
                                                                   "(Eqs. 19-20)."),
    "drift_rms_floor": ("rms_floor", flags.non_negative_float, "Floor of each radius' mean square before the root "
                                                               "(Eq. 25)."),
    "affinity_floor": ("affinity_floor", flags.non_negative_float, "Floor of softmax_j * softmax_i before the root "
                                                                   "(Eq. 22)."),
    "self_penalty": ("self_penalty", flags.positive_float_or_inf, "Logit penalty / rho on a masked copy; inf removes "
                                                                  "it (Appendix A)."),
}
NUMERICS_FIELDS = {field.name for field in dataclasses.fields(drpo_utils.DriftNumerics)}


def preset_value(preset: str, field: str):
    """A preset's value of a DriftConfig field, as the flag holds it (a list for the radii)."""
    config = drpo_utils.DRIFT_PRESETS[preset]
    value = getattr(config.numerics if field in NUMERICS_FIELDS else config, field)
    return list(value) if isinstance(value, tuple) else value


def shown(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def add_drift_flags(group) -> None:
    group.add_argument("--drift_preset", default="paper", choices=sorted(drpo_utils.DRIFT_PRESETS),
                       help="paper: Appendix A exactly (leave-one-out reference drift); authors: the released "
                            "code's estimator (UGVly/DrPO).")
    for flag, (field, parse, text) in DRIFT_FLAGS.items():
        presets = f"(paper: {shown(preset_value('paper', field))}; authors: {shown(preset_value('authors', field))})"
        if parse is None:
            group.add_argument(f"--{flag}", action=argparse.BooleanOptionalAction, default=None,
                               help=f"{text} {presets}")
        else:
            choices = {"kernel": drpo_utils.DRIFT_KERNELS, "loss_reduction": drpo_utils.LOSS_REDUCTIONS}.get(field)
            group.add_argument(f"--{flag}", default=None, choices=choices, help=f"{text} {presets}",
                               type=None if choices else parse)


def build_parser(description: str = "DrPO for SD-Turbo-family one-step models.",
                 default_feature_extractor: str = "latent_mae") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    model.add_argument("--lora_alpha", type=flags.positive_int, default=None, help="LoRA alpha (default: equal to --rank).")
    model.add_argument("--lora_dropout", type=flags.fraction, default=0.0, help="Dropout of the LoRA layers.")
    model.add_argument("--lora_target_modules", default=training.LORA_TARGET_MODULES,
                       help="Comma-separated module names that get LoRA.")

    prompts = parser.add_argument_group("prompts")
    prompts.add_argument("--prompts_file", default=None,
                         help="A .txt file (one prompt per line) or .jsonl with the --prompt_column key.")
    prompts.add_argument("--dataset_name", default=None, help="A datasets name or local folder holding prompts.")
    prompts.add_argument("--dataset_split", default="train",
                         help="Split of --dataset_name (or of --preference_dataset).")
    prompts.add_argument("--prompt_column", default="prompt", help="Column (or .jsonl key) holding the prompt.")

    drpo = parser.add_argument_group("DrPO (Algorithm 1, Eqs. 15-16, Appendix A)")
    drpo.add_argument("--method", default="drpo", choices=METHOD_NAMES,
                      help="drpo (Algorithm 1) or one of the paper's baselines (Appendix C, pipelines/baselines/): "
                           "draft and vggflow backpropagate a differentiable reward, dpo and grpo only rank.")
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
                      help=f"phi, one of {', '.join(features.FEATURE_MAPS)} (see the README's Feature maps).")
    drpo.add_argument("--feature_extractor_path", default=None,
                      help="The feature network's weights: a local folder, a Hub id, or for latent_mae a Flax release "
                           "folder (local or 'owner/repo/folder' on the Hub) or a converted .safetensors file. "
                           "Default: the published weights.")
    drpo.add_argument("--num_candidates", type=flags.positive_int, default=24, help="K candidates per prompt (paper: 24).")
    drpo.add_argument("--num_pairs", type=flags.positive_int, default=12,
                      help="M reward-ordered pairs per prompt (paper: 12); offline: at most M of the prompt's "
                           "dataset pairs.")
    add_drift_flags(parser.add_argument_group(
        "drift field and loss: --drift_preset sets them all; a flag given overrides its preset value"))
    for baseline in (draft, vggflow, dpo, grpo):
        baseline.add_flags(parser)
    preference_data.add_flags(parser)
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
    optimisation.add_argument("--lr_warmup_steps", type=flags.non_negative_int, default=0, help="Warm-up steps of the scheduler.")
    optimisation.add_argument("--lr_num_cycles", type=flags.positive_int, default=1,
                              help="Hard resets of the cosine_with_restarts scheduler.")
    optimisation.add_argument("--lr_power", type=flags.positive_float, default=1.0, help="Power of the polynomial scheduler.")
    optimisation.add_argument("--scale_lr", action="store_true",
                              help="Multiply the learning rate by accumulation steps x batch size x processes.")
    optimisation.add_argument("--use_8bit_adam", action="store_true",
                              help="bitsandbytes' 8-bit AdamW (needs `pip install bitsandbytes` and a GPU).")
    optimisation.add_argument("--adam_beta1", type=flags.fraction, default=0.9, help="AdamW beta1.")
    optimisation.add_argument("--adam_beta2", type=flags.fraction, default=0.999, help="AdamW beta2.")
    optimisation.add_argument("--adam_weight_decay", type=flags.non_negative_float, default=1e-2, help="AdamW weight decay.")
    optimisation.add_argument("--adam_epsilon", type=flags.positive_float, default=1e-8, help="AdamW epsilon.")
    optimisation.add_argument("--max_grad_norm", type=flags.positive_float, default=1.0, help="Gradient clipping.")
    optimisation.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
                              help="Frozen weights in that dtype, LoRA in fp32 (fp16 needs a GPU). "
                                   "Default: accelerate's configuration.")
    optimisation.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere+ GPUs.")

    run = parser.add_argument_group("checkpoints, logging, validation, Hub")
    run.add_argument("--checkpointing_steps", type=flags.positive_int, default=500,
                     help="Save checkpoint-N every N steps (and at the end).")
    run.add_argument("--checkpoints_total_limit", type=flags.positive_int, default=None, help="Keep only the newest N checkpoints.")
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
                     help="'|'-separated prompts for sample grids and --validation_rewards (default: the last 4 "
                          "prompts, held out of training, when there are 100+; else the first 4).")
    run.add_argument("--validation_rewards", default=None, type=flags.names,
                     help="Comma-separated rewards (any --reward spec but a mixture) scored on the validation "
                          "prompts x seeds at every --validation_steps, base and LoRA, logged beside the training "
                          "reward: reward hacking shows while it happens.")
    run.add_argument("--validation_steps", type=flags.non_negative_int, default=100, help="Base-vs-LoRA grid every N steps (0: never).")
    run.add_argument("--num_validation_seeds", type=flags.positive_int, default=4,
                     help="Seeds per validation prompt (held-out 10000+).")
    run.add_argument("--push_to_hub", action="store_true",
                     help="Create the repo at start (fails early without credentials), upload LoRA + model card "
                          "at the end.")
    run.add_argument("--output_kohya_format", action="store_true",
                     help=f"Also write the LoRA in kohya's key names ({training.KOHYA_FILE}) for ComfyUI / A1111.")
    run.add_argument("--hub_model_id", default=None, help="Repo name on the Hub (default: the output folder name).")
    run.add_argument("--hub_token", default=None, help="Token (default: the stored login / HF_TOKEN).")
    return parser


def check_reward_for_method(args) -> None:
    """draft and vggflow differentiate the reward: a named reward that cannot be differentiated (a rule,
    a remote service) is refused now; a custom function is checked at its first call."""
    if not METHODS[args.method].reward_gradient:
        return
    for part in rewards.mixture_parts(args.reward):
        entry = rewards.REWARDS.get(part)
        if rewards.is_url(part) or (entry is not None and not entry.differentiable):
            raise ValueError(f"--method {args.method} backpropagates through the reward, and {part!r} has no "
                             f"gradient (it only ranks); use --method drpo, dpo or grpo with it, or a differentiable "
                             f"reward ({', '.join(n for n, e in rewards.REWARDS.items() if e.differentiable)}, "
                             f"or a file.py:function returning a tensor computed from the images)")


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
    for method in METHODS.values():
        rules.append((method.flags, args.method == method.name, f"with --method {method.name}"))
    return rules


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
    resolve_drift_flags(args)
    drift_config(args)  # validates kernel, radii, reduction and numerics
    rewards.check_reward_spec(args.reward, args.reward_weights)  # unknown names list the choices; files must exist
    for spec in args.validation_rewards or []:
        rewards.check_reward_spec(spec, None, flag="--validation_rewards")
    if args.reward_device is not None:
        try:
            torch.device(args.reward_device)
        except RuntimeError as error:
            raise ValueError(f"--reward_device {args.reward_device!r} is no torch device: {error}") from error
    check_reward_for_method(args)
    if args.candidate_chunk_size is not None and args.candidate_chunk_size > args.num_candidates:
        raise ValueError(f"--candidate_chunk_size must be in [1, K={args.num_candidates}], "
                         f"got {args.candidate_chunk_size}")
    if args.prompts_file is None and args.dataset_name is None and args.preference_dataset is None:
        raise ValueError("give prompts with --prompts_file or --dataset_name (or preference pairs with "
                         "--preference_dataset)")
    if args.preference_dataset is not None and args.method not in offline.OFFLINE_METHODS:
        raise ValueError(f"--method {args.method} learns from the current generator's own samples; with "
                         f"--preference_dataset use --method {' or '.join(offline.OFFLINE_METHODS)}")
    if args.preference_dataset is not None and features.FEATURE_MAPS[args.feature_extractor].needs_condition:
        raise ValueError(f"--feature_extractor {args.feature_extractor} depends on the prompt, which offline "
                         "encoding does not give it; choose another feature map with --preference_dataset")
    if args.overwrite_output_dir and args.resume_from_checkpoint is not None:
        raise ValueError("--overwrite_output_dir deletes the checkpoints --resume_from_checkpoint would resume from; "
                         "give only one of them")
    if args.resume_from_checkpoint not in (None, "latest"):
        path = checkpoints.resolve_checkpoint_path(args.output_dir, args.resume_from_checkpoint)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"--resume_from_checkpoint {args.resume_from_checkpoint!r}: {path} does not exist")
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("--mixed_precision fp16 needs a GPU; on the CPU use --mixed_precision bf16 or no")
    if args.hub_token is not None and args.report_to in ("wandb", "all"):
        raise ValueError("--hub_token with --report_to=wandb would upload the token with the run's config; "
                         "log in with `hf auth login` or set HF_TOKEN instead")
    if args.use_8bit_adam:
        training.eight_bit_adamw()  # bitsandbytes present and usable, or a message now
    if args.push_to_hub and training.hub_token(args) is None:
        raise ValueError("--push_to_hub needs Hub credentials: run `hf auth login`, set HF_TOKEN, or pass --hub_token")


def parse_args(input_args=None, parser: argparse.ArgumentParser | None = None):
    """Parse and check the flags (``parser``: the SDXL script's, which extends this one)."""
    parser = parser or build_parser()
    args = parser.parse_args(input_args)
    check_args(args, flags.explicit_flags(parser, input_args))
    return args


def resolve_drift_flags(args) -> None:
    """Fill every drift flag not given with its --drift_preset value, so logs and the model card show
    the values the run uses."""
    for flag, (field, _, _) in DRIFT_FLAGS.items():
        if getattr(args, flag) is None:
            setattr(args, flag, preset_value(args.drift_preset, field))


def drift_config(args) -> drpo_utils.DriftConfig:
    """The DriftConfig of the (resolved) drift flags: Eqs. 15-17 and Appendix A's estimator options."""
    fields, numerics = {}, {}
    for flag, (field, _, _) in DRIFT_FLAGS.items():
        value = getattr(args, flag)
        value = tuple(value) if isinstance(value, list) else value
        (numerics if field in NUMERICS_FIELDS else fields)[field] = value
    return drpo_utils.DriftConfig(numerics=drpo_utils.DriftNumerics(**numerics), **fields)


# ------------------------------------------------------------------------------------------------
# What SD-Turbo needs (train_drpo_sdxl.py overrides exactly these)
# ------------------------------------------------------------------------------------------------


def load_pipeline(args, weight_dtype, **components):
    """The stock one-step pipeline; its UNet becomes g_theta (LoRA) and g_ref (LoRA disabled)."""
    pipe = AutoPipelineForText2Image.from_pretrained(
        args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant, dtype=weight_dtype,
        cache_dir=args.cache_dir, **components,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


encode_prompts = drpo_utils.encode_prompts_sd  # condition c: CLIP hidden states (SD 2.x)


# ------------------------------------------------------------------------------------------------
# Algorithm 1
# ------------------------------------------------------------------------------------------------


def drpo_step(ctx: candidates.StepContext, cand: candidates.Candidates):
    """Lines 6-12 of Algorithm 1 for one prompt whose candidates (lines 3-5) are ``cand``: yields the
    loss to backpropagate (chunk by chunk with --candidate_chunk_size) and returns what to log."""
    args, device = ctx.args, ctx.accelerator.device
    # 6-7: the reward's ranking (maybe scored while the previous prompt trained) and the pairs A+ / A-
    scores, waited = ctx.scorer.result(cand.scores)
    winners, losers = drpo_utils.sample_reward_pairs(scores.ranking, args.num_pairs, cand.rng)
    # 8-11: V = V_pref + lambda V_ref and the detached targets sg(z~ + eta V)
    targets, stats = drpo_utils.drift_targets(cand.features, cand.ref_features, winners.to(device),
                                              losers.to(device), ctx.config)
    # 12: the regression of Eq. 17 (in pieces of C candidates, recomputed with gradient, when chunking)
    loss = yield from candidates.regression_pieces(ctx, cand, targets)
    stats.update(loss=loss, reward_mean=scores.reported.mean().item(), reward_std=scores.reported.std().item(),
                 num_pairs=len(winners), reward_wait=waited)
    stats.update({f"reward/{name}": value.mean().item() for name, value in scores.components.items()})
    return stats


def optimisation_step(ctx: candidates.StepContext, prompts: list[str], base_seed: int, global_step: int,
                      optimizer, lr_scheduler, params) -> list[dict]:
    """One optimiser step: --gradient_accumulation_steps micro-steps of --train_batch_size prompts, each
    through the method's propose and update (DrPO: lines 3-12), then clipping and AdamW.

    With overlapped scoring the next prompt's candidates are generated and sent to the reward before
    the current prompt's update (the LoRA does not change inside the window, and every prompt's draws
    come from its own generator, so nothing else changes)."""
    args, accelerator = ctx.args, ctx.accelerator

    def propose(micro_step: int, index: int) -> candidates.Candidates:
        rng = training.step_generator(base_seed, global_step, micro_step, index, accelerator.process_index)
        prompt = prompts[torch.randint(len(prompts), (), generator=rng).item()]
        return ctx.method.propose(ctx, prompt, rng)

    window = [(m, i) for m in range(args.gradient_accumulation_steps) for i in range(args.train_batch_size)]
    step_stats, upcoming = [], iter(window[1:])
    current = propose(*window[0])
    for micro_step in range(args.gradient_accumulation_steps):
        with accelerator.accumulate(ctx.unet):
            for index in range(args.train_batch_size):
                following = next(upcoming, None)
                ahead = propose(*following) if following and ctx.scorer.background else None
                sync = accelerator.sync_gradients and index == args.train_batch_size - 1
                stats = training.backpropagate(accelerator, ctx.unet, ctx.method.update(ctx, current),
                                               1 / args.train_batch_size, sync, global_step)
                if (tied := ctx.scorer.take_tie_flag()) is not None:
                    stats["tied"] = tied  # all K candidates scored the same: no preference (Contract 3)
                step_stats.append(stats)
                current = ahead or (propose(*following) if following else None)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(params, args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
    return step_stats


METHODS = {"drpo": candidates.Method("drpo", candidates.candidates, drpo_step),
           **{baseline.METHOD.name: baseline.METHOD for baseline in (draft, vggflow, dpo, grpo)}}


def activation_bytes_per_candidate(ctx: candidates.StepContext, prompt: str) -> int:
    """What one candidate keeps alive for backward: one differentiable sample of ``prompt``, measured."""
    condition = candidates.prompt_condition(ctx, prompt, 1)
    size = ctx.args.resolution // ctx.pipe.vae_scale_factor
    noise = torch.zeros(1, ctx.pipe.unet.config.in_channels, size, size, device=ctx.accelerator.device)
    probe = dataclasses.replace(ctx, unet=ctx.pipe.unet)  # the unwrapped UNet: no DDP bookkeeping for a probe
    with ctx.accelerator.autocast():
        return memory.saved_activation_bytes(lambda: candidates.current_samples(probe, condition, noise))


def main(args, encode_prompts=encode_prompts, load_pipeline=load_pipeline):
    """Check everything that needs no model and claim the output folder, then train."""
    training.stop_when_launcher_dies()
    accelerator = training.setup_accelerator(args)  # refuses fp16 on a CPU, however it was asked for
    prompts = None  # offline: the preference pairs' captions, known once they are encoded
    if args.preference_dataset is None:
        prompts = load_prompts(args.prompts_file, args.dataset_name, args.dataset_split, args.prompt_column)
    else:
        preference_data.open_dataset(args, streaming=True)  # its layout columns checked now, nothing downloaded
    unet_config, vae_config = memory.model_configs(args)
    args.resolution = memory.resolve_resolution(args, unet_config, vae_config)
    args.mixed_precision = accelerator.mixed_precision  # as resolved: the flag or accelerate's configuration
    record = checkpoints.run_record(args, f"{encode_prompts.__module__}.{encode_prompts.__name__}",
                                    accelerator.num_processes)
    with checkpoints.claimed_output_dir(accelerator, args, record):  # writable, not another run's, locked
        train(accelerator, args, record, prompts, memory.own_resolution(unet_config, vae_config), encode_prompts,
              load_pipeline)
    accelerator.end_training()


def train(accelerator, args, record: dict, prompts: list[str] | None, own_resolution: int, encode_prompts,
          load_pipeline):
    """Load the models, run the steps from --resume_from_checkpoint (or 0) to --max_train_steps with
    checkpoints, then save, check and publish the LoRA. ``prompts`` is None for offline DrPO: the
    preference dataset's captions, once encoded."""
    reward_device = args.reward_device or accelerator.device
    reward_fn = rewards.load_reward(args.reward, reward_device, args.reward_weights,
                                    remote_timeout=args.reward_timeout)
    feature_map = features.build_feature_map(args.feature_extractor, args.feature_extractor_path)
    feature_map.to(accelerator.device, training.weight_dtype(accelerator))
    repo_id = training.create_hub_repo(args) if args.push_to_hub and accelerator.is_main_process else None
    if args.seed is not None:
        set_seed(args.seed)
    base_seed = args.seed if args.seed is not None else int(torch.randint(0, 2**31, ()).item())

    weight_dtype = training.weight_dtype(accelerator)
    pipe = load_pipeline(args, weight_dtype)
    feature_map.check_vae(pipe.vae)
    training.prepare_frozen_models(pipe, accelerator.device)
    method = METHODS[args.method]
    if args.preference_dataset is not None:  # offline: A+ / A- from the dataset, encoded (or read from the cache)
        store = offline.load_store(args, pipe, feature_map, encode_prompts, accelerator)
        prompts, method = store.captions, offline.method(args.method, store)
    training.add_lora(pipe.unet, args)
    feature_map.bind(pipe)  # teacher_unet reads the generator's own UNet (LoRA disabled)
    if accelerator.mixed_precision != "no":
        cast_training_params(pipe.unet, dtype=torch.float32)
    if args.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        pipe.vae.enable_gradient_checkpointing()  # image feature maps backpropagate through the decoder
        feature_map.enable_gradient_checkpointing()

    params = [p for p in pipe.unet.parameters() if p.requires_grad]
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    adamw = training.eight_bit_adamw() if args.use_8bit_adam else torch.optim.AdamW
    optimizer = adamw(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                      weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes, num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )
    unet, optimizer, lr_scheduler = accelerator.prepare(pipe.unet, optimizer, lr_scheduler)
    checkpoints.register_lora_checkpoint_hooks(accelerator, unet, type(pipe))
    global_step = checkpoints.maybe_resume(accelerator, args, record)
    training.init_trackers(accelerator, args)

    overlap = args.overlap_reward and args.candidate_chunk_size is not None and \
        args.gradient_accumulation_steps * args.train_batch_size > 1
    ctx = candidates.StepContext(
        args=args, accelerator=accelerator, pipe=pipe, unet=unet,
        scheduler=type(pipe.scheduler).from_config(pipe.scheduler.config),
        feature_map=feature_map,
        scorer=candidates.RewardScorer(reward_fn, args.reward, background=overlap), config=drift_config(args),
        encode_prompts=encode_prompts, method=method,
    )
    tie_watch = candidates.TieWatch(args.max_tied_steps, args.reward)
    prompts, validation_prompts = training.split_validation_prompts(args, prompts)
    validation = training.Validation(accelerator, pipe, validation_prompts, args, {  # main process only
        spec: rewards.load_reward(spec, reward_device, remote_timeout=args.reward_timeout)
        for spec in (args.validation_rewards or []) if accelerator.is_main_process})
    memory.check_step_memory(args, activation_bytes_per_candidate(ctx, prompts[0]), accelerator.device,
                             own_resolution)
    history = training.load_history(args.output_dir, global_step)
    logger.info(f"DrPO: {len(prompts)} prompts, K={args.num_candidates}, M={args.num_pairs}, {args.resolution} px, "
                f"{args.max_train_steps} steps, resuming at {global_step}")

    progress = tqdm(range(global_step, args.max_train_steps), disable=not accelerator.is_local_main_process,
                    desc="DrPO steps")
    for _ in progress:
        with training.named_collective_failures(accelerator, args, global_step + 1):  # a stuck rank: name it
            start = time.time()
            step_stats = optimisation_step(ctx, prompts, base_seed, global_step, optimizer, lr_scheduler, params)
            global_step += 1
            logs = training.step_logs(accelerator, step_stats, lr_scheduler, time.time() - start)
            history.append({"step": global_step, **logs})
            accelerator.log(logs, step=global_step)
            tie_watch.after_step(logs, ctx.scorer, args.num_candidates)
            progress.set_postfix({"loss": f"{logs['loss']:.3g}", **({"reward": f"{logs['reward_mean']:.4g}"}
                                                                     if "reward_mean" in logs else {})})

            if args.validation_steps and global_step % args.validation_steps == 0:
                scores = validation(global_step)
                history[-1].update(scores)
                accelerator.log(scores, step=global_step)
            if global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps:
                training.save_history(accelerator, args.output_dir, history)
                checkpoints.save_checkpoint(accelerator, args, global_step, record)

    accelerator.wait_for_everyone()
    ctx.scorer.close()
    del optimizer, lr_scheduler, unet, ctx
    accelerator.free_memory()  # room for the fresh pipeline of the final check
    training.finish_training(accelerator, args, pipe, history, validation_prompts, reward_fn, repo_id,
                             fresh_pipeline=lambda: load_pipeline(args, weight_dtype))


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    main(parse_args())
