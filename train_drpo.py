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
from tqdm.auto import tqdm

import drpo_utils
from pipelines import (candidates, checkpoints, cli, config, content, downloads, drift_flags, features, flags,
                       generators, hub, lora_files, memory, methods, offline, preference_data, report, rewards,
                       runtime, validation)
from pipelines.inference import denoiser, latent_channels, load_one_step_pipeline
from pipelines.prompts import load_prompts

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# Flags (diffusers-examples names, by group in pipelines/cli.py; train_drpo_sdxl.py extends this parser)
# ------------------------------------------------------------------------------------------------


def build_parser(description: str = "DrPO for SD-Turbo-family one-step models.",
                 default_feature_extractor: str = "latent_mae", prog: str = "train_drpo.py") -> argparse.ArgumentParser:
    """The flags, group by group; train_drpo_sdxl.py extends this parser."""
    parser = flags.Parser(prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    flags.add_config_flag(parser)
    cli.add_model_flags(parser)
    cli.add_prompt_flags(parser)
    cli.add_method_flags(parser, DRPO.name, default_feature_extractor)
    drift_flags.add_drift_flags(parser.add_argument_group(
        "drift field and loss: --drift_preset sets them all; a flag given overrides its preset value"))
    for method in methods.registered().values():
        if method.options is not None:
            flags.add_options(parser.add_argument_group(f"--method {method.name}: {method.summary}"), method.options)
    preference_data.add_flags(parser)
    cli.add_optimisation_flags(parser)
    cli.add_run_flags(parser)
    return parser


def parse_args(input_args=None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Parse and check the flags before anything loads (``parser``: the SDXL script's, which extends this one)."""
    return cli.parse_and_check(parser or build_parser(), input_args)


# ------------------------------------------------------------------------------------------------
# What SD-Turbo needs (train_drpo_sdxl.py overrides exactly these)
# ------------------------------------------------------------------------------------------------


def load_pipeline(model: config.ModelConfig, weight_dtype, **components):
    """The stock one-step pipeline; its UNet becomes g_theta (LoRA) and g_ref (LoRA disabled)."""
    components = {**generators.pipeline_components(model, weight_dtype), **components}  # --unet, --scheduler
    return load_one_step_pipeline(model.pretrained_model_name_or_path, dtype=weight_dtype, device=None,
                                  revision=model.revision, variant=model.variant, cache_dir=model.cache_dir,
                                  call_arguments=generators.call_arguments(model), **components)


encode_prompts = drpo_utils.encode_prompts_sd  # condition c: CLIP hidden states (SD 2.x)


# ------------------------------------------------------------------------------------------------
# Algorithm 1
# ------------------------------------------------------------------------------------------------


def drpo_step(ctx: candidates.StepContext, cand: candidates.Candidates):
    """Lines 6-12 of Algorithm 1 for one prompt whose candidates (lines 3-5) are ``cand``: yields the
    loss to backpropagate (chunk by chunk with --candidate_chunk_size) and returns what to log."""
    device = ctx.accelerator.device
    # 6-7: the reward's ranking (maybe scored while the previous prompt trained) and the pairs A+ / A-
    scores, waited = ctx.scorer.result(cand.scores)
    winners, losers = drpo_utils.preference_pairs(scores.ranking, ctx.setup.num_pairs, ctx.drift.pairing,
                                                  cand.rng)
    # 8-11: V = V_pref + lambda V_ref and the detached targets sg(z~ + eta V)
    targets, stats = drpo_utils.drift_targets(cand.features, cand.ref_features, winners.to(device),
                                              losers.to(device), ctx.drift)
    # 12: the regression of Eq. 17 (in pieces of C candidates, recomputed with gradient, when chunking)
    loss = yield from candidates.regression_pieces(ctx, cand, targets)
    stats.update(loss=loss, reward_mean=scores.reported.mean().item(), reward_std=scores.reported.std().item(),
                 num_pairs=len(winners), reward_wait=waited)
    stats.update({f"reward/{name}": value.mean().item() for name, value in scores.components.items()})
    return stats


def offline_drpo_update(ctx: candidates.StepContext, proposal: offline.OfflineProposal):
    """Algorithm 1, lines 8-12, with a preference dataset's A+ / A- in place of lines 6-7 (Section 4,
    "Offline variant"): the queries are the current generator's K candidates; no reward is called."""
    queries = proposal.queries
    targets, stats = drpo_utils.offline_drift_targets(queries.features, queries.ref_features, proposal.chosen,
                                                      proposal.rejected, ctx.drift)
    stats.update(loss=(yield from candidates.regression_pieces(ctx, queries, targets)), num_pairs=proposal.num_pairs)
    return stats


DRPO = methods.register(methods.Method(
    "drpo", "Drifting Preference Optimization (Algorithm 1): the reward only ranks", candidates.candidates,
    drpo_step, offline_update=offline_drpo_update, offline_queries=True))


def optimisation_step(ctx: candidates.StepContext, prompts: list[str], base_seed: int, global_step: int,
                      optimizer, lr_scheduler, params) -> list[dict]:
    """One optimiser step: --gradient_accumulation_steps micro-steps of --train_batch_size prompts, each
    through the method's propose and update (DrPO: lines 3-12), then clipping and AdamW.

    With overlapped scoring the next prompt's candidates are generated and sent to the reward before
    the current prompt's update (the LoRA does not change inside the window, and every prompt's draws
    come from its own generator, so nothing else changes)."""
    accelerator, (micro_steps, batch) = ctx.accelerator, ctx.window

    def propose(micro_step: int, index: int) -> candidates.Candidates:
        rng = runtime.step_generator(base_seed, global_step, micro_step, index, accelerator.process_index)
        prompt = prompts[torch.randint(len(prompts), (), generator=rng).item()]
        return ctx.method.propose(ctx, prompt, rng)

    window = [(m, i) for m in range(micro_steps) for i in range(batch)]
    step_stats, upcoming = [], iter(window[1:])
    current = propose(*window[0])
    for _ in range(micro_steps):
        with accelerator.accumulate(ctx.unet):
            for index in range(batch):
                following = next(upcoming, None)
                ahead = propose(*following) if following and ctx.scorer.background else None
                sync = accelerator.sync_gradients and index == batch - 1
                stats = runtime.backpropagate(accelerator, ctx.unet, ctx.method.update(ctx, current), 1 / batch, sync,
                                              global_step)
                if (tied := ctx.scorer.take_tie_flag()) is not None:
                    stats["tied"] = tied  # all K candidates scored the same: no preference (Contract 3)
                step_stats.append(stats)
                current = ahead or (propose(*following) if following else None)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(params, ctx.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
    return step_stats


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


def build_config(args) -> config.TrainingConfig:
    """The run's typed configs from the parsed, checked flags (the namespace is read nowhere else)."""
    return cli.build_training_configs(args)


def main(args, encode_prompts=encode_prompts, load_pipeline=load_pipeline, sample=drpo_utils.one_step_latents):
    """Check everything that needs no model (what the Hub must serve included) and claim the output folder,
    then train. ``encode_prompts``, ``load_pipeline``, ``sample``: what a model family changes (the SDXL and
    FLUX scripts pass their own)."""
    downloads.check_available(cli.hub_needs(args))  # offline or unreachable: a missing download fails now
    settings = build_config(args)
    runtime.stop_when_launcher_dies()
    accelerator = runtime.setup_accelerator(settings.run, settings.optim)  # refuses fp16 on a CPU
    data, prompts = settings.data, None  # offline: the preference pairs' captions, known once encoded
    if data.offline:
        preference_data.open_dataset(data, settings.model.cache_dir, streaming=True)  # columns checked, no download
    else:
        prompts = load_prompts(data.prompts_file, data.dataset_name, data.dataset_split, data.prompt_column)
    unet_config, vae_config = memory.model_configs(settings.model)
    generators.check_denoiser_config(unet_config, settings.model.pretrained_model_name_or_path)  # a one-step model
    generators.check_scheduler(settings.model)  # --scheduler / --timesteps tried on the base's config, no weights
    settings = settings.resolved(
        model={"resolution": memory.resolve_resolution(settings.model.resolution, unet_config, vae_config)},
        run={"mixed_precision": accelerator.mixed_precision})  # as resolved: the flag or accelerate's configuration
    record = config.run_record(settings, prompt_encoding=f"{encode_prompts.__module__}.{encode_prompts.__name__}",
                               num_processes=accelerator.num_processes,
                               inputs=content.run_inputs(prompts, settings.reward.reward, settings.model.unet))
    # writable, not another run's, locked; a write that fails for space or permission names the intact checkpoint
    with checkpoints.claimed_output_dir(accelerator, settings.run, record), checkpoints.writing_outputs(settings.run):
        if accelerator.is_main_process:  # the resolved flags, reusable as --config
            hub.write_run_config(settings.run.output_dir, args.run_config)
        train(accelerator, settings, record, prompts, memory.own_resolution(unet_config, vae_config), encode_prompts,
              load_pipeline, sample)
    accelerator.end_training()


def load_models(accelerator, settings: config.TrainingConfig, encode_prompts, load_pipeline):
    """The reward, phi, the pipeline with its LoRA, and the method (offline: on the encoded pairs, whose
    captions are the prompts). Returns (pipe, feature_map, reward_fn, method, offline captions or None)."""
    reward = settings.reward
    reward_fn = rewards.load_reward(reward.reward, reward.reward_device or accelerator.device, reward.reward_weights,
                                    remote_timeout=reward.reward_timeout)
    feature_map = features.build_feature_map(settings.method.feature_extractor, settings.method.feature_extractor_path)
    feature_map.to(accelerator.device, runtime.weight_dtype(accelerator))
    pipe = load_pipeline(settings.model, runtime.weight_dtype(accelerator))
    feature_map.check_vae(pipe.vae)
    runtime.prepare_frozen_models(pipe, accelerator.device)
    method, captions = methods.registered()[settings.method.method], None
    if settings.data.offline:  # A+ / A- from the dataset, encoded (or read from the cache)
        space = offline.preference_space(method, settings.method)
        store = offline.load_store(settings, space, pipe, feature_map, encode_prompts, accelerator)
        method, captions = offline.offline_form(method, store), store.captions
    lora_files.add_lora(denoiser(pipe), settings.adapter)
    if settings.adapter.init_lora:
        lora_files.init_from_lora(denoiser(pipe), settings.adapter, type(pipe))
    feature_map.bind(pipe)  # teacher_unet reads the generator's own UNet (LoRA disabled)
    if accelerator.mixed_precision != "no":
        from diffusers.training_utils import cast_training_params

        cast_training_params(denoiser(pipe), dtype=torch.float32)
    if settings.optim.gradient_checkpointing:
        denoiser(pipe).enable_gradient_checkpointing()
        pipe.vae.enable_gradient_checkpointing()  # image feature maps backpropagate through the decoder
        feature_map.enable_gradient_checkpointing()
    return pipe, feature_map, reward_fn, method, captions


def optimiser(accelerator, optim: config.OptimConfig, max_train_steps: int, pipe):
    """AdamW (or 8-bit AdamW) on the LoRA and the diffusers learning-rate schedule."""
    from diffusers.optimization import get_scheduler

    params = [p for p in denoiser(pipe).parameters() if p.requires_grad]
    scale = optim.gradient_accumulation_steps * optim.train_batch_size * accelerator.num_processes
    learning_rate = optim.learning_rate * (scale if optim.scale_lr else 1)
    adamw = runtime.eight_bit_adamw() if optim.use_8bit_adam else torch.optim.AdamW
    optimizer = adamw(params, lr=learning_rate, betas=(optim.adam_beta1, optim.adam_beta2),
                      weight_decay=optim.adam_weight_decay, eps=optim.adam_epsilon)
    lr_scheduler = get_scheduler(optim.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=optim.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_train_steps * accelerator.num_processes,
                                 num_cycles=optim.lr_num_cycles, power=optim.lr_power)
    return params, optimizer, lr_scheduler


def step_context(accelerator, settings: config.TrainingConfig, pipe, unet, feature_map, reward_fn, method,
                 encode_prompts, sample=drpo_utils.one_step_latents) -> candidates.StepContext:
    """Everything a per-prompt step reads (scoring in the background when it can overlap compute)."""
    optim = settings.optim
    overlap = optim.overlap_reward and optim.candidate_chunk_size is not None and \
        optim.gradient_accumulation_steps * optim.train_batch_size > 1
    return candidates.StepContext(
        accelerator=accelerator, pipe=pipe, unet=unet,
        scheduler=type(pipe.scheduler).from_config(pipe.scheduler.config), timesteps=settings.model.timesteps,
        sample=sample,
        feature_map=feature_map, scorer=candidates.RewardScorer(reward_fn, settings.reward.reward, background=overlap),
        encode_prompts=encode_prompts, method=method, setup=settings.method, resolution=settings.model.resolution,
        chunk_size=optim.candidate_chunk_size, window=(optim.gradient_accumulation_steps, optim.train_batch_size),
        max_grad_norm=optim.max_grad_norm)


def activation_bytes_per_candidate(ctx: candidates.StepContext, prompt: str) -> int:
    """What one candidate keeps alive for backward: one differentiable sample of ``prompt``, measured."""
    condition = candidates.prompt_condition(ctx, prompt, 1)
    size = ctx.resolution // ctx.pipe.vae_scale_factor
    noise = torch.zeros(1, latent_channels(ctx.pipe), size, size, device=ctx.accelerator.device)
    probe = dataclasses.replace(ctx, unet=denoiser(ctx.pipe))  # the unwrapped network: no DDP bookkeeping for a probe
    with ctx.accelerator.autocast():
        return memory.saved_activation_bytes(lambda: candidates.current_samples(probe, condition, noise))


def train(accelerator, settings: config.TrainingConfig, record: dict, prompts: list[str] | None, own_resolution: int,
          encode_prompts, load_pipeline, sample):
    """Load the models, run the steps from --resume_from_checkpoint (or 0) to --max_train_steps with
    checkpoints, then save, check and publish the LoRA. ``prompts`` is None for offline DrPO: the
    preference dataset's captions, once encoded."""
    run, optim, valid = settings.run, settings.optim, settings.validation
    repo_id = hub.create_hub_repo(settings.hub, run.output_dir) if settings.hub.push_to_hub and \
        accelerator.is_main_process else None
    if run.seed is not None:
        from accelerate.utils import set_seed

        set_seed(run.seed)  # before the LoRA is initialised
    base_seed = run.seed if run.seed is not None else int(torch.randint(0, 2**31, ()).item())
    pipe, feature_map, reward_fn, method, captions = load_models(accelerator, settings, encode_prompts, load_pipeline)
    prompts = captions or prompts
    params, optimizer, lr_scheduler = optimiser(accelerator, optim, run.max_train_steps, pipe)
    unet, optimizer, lr_scheduler = accelerator.prepare(denoiser(pipe), optimizer, lr_scheduler)
    checkpoints.register_lora_checkpoint_hooks(accelerator, unet, type(pipe))
    global_step = checkpoints.maybe_resume(accelerator, run, record)
    hub.init_trackers(accelerator, settings)
    ctx = step_context(accelerator, settings, pipe, unet, feature_map, reward_fn, method, encode_prompts, sample)
    prompts, held_out = validation.split_validation_prompts(valid, prompts)
    seeds = validation.validation_seeds(valid.num_validation_seeds)
    validate = validation.Validation(accelerator, pipe, held_out, seeds, settings.model.resolution,
                                     os.path.join(run.output_dir, "validation"), {  # main process only
        spec: rewards.load_reward(spec, settings.reward.reward_device or accelerator.device,
                                  remote_timeout=settings.reward.reward_timeout)
        for spec in valid.validation_rewards if accelerator.is_main_process})
    memory.check_step_memory(activation_bytes_per_candidate(ctx, prompts[0]),
                             optim.candidate_chunk_size or settings.method.num_candidates, accelerator.device,
                             settings.model.resolution, own_resolution, optim.gradient_checkpointing)
    history = report.load_history(run.output_dir, global_step)
    logger.info(f"{settings.method.method}: {len(prompts)} prompts, K={settings.method.num_candidates}, "
                f"M={settings.method.num_pairs}, {settings.model.resolution} px, {run.max_train_steps} steps, resuming "
                f"at {global_step}")
    loop = TrainingLoop(ctx, settings, record, prompts, base_seed, optimizer, lr_scheduler, params, validate)
    history = loop.run(global_step, history)
    ctx.scorer.close()
    del optimizer, lr_scheduler, unet, ctx, loop
    accelerator.free_memory()  # room for the fresh pipeline of the final check
    report.finish_training(accelerator, settings, pipe, history, held_out, seeds, reward_fn, repo_id,
                           fresh_pipeline=lambda: load_pipeline(settings.model, runtime.weight_dtype(accelerator)))


class TrainingLoop:
    """The steps from the resumed one to --max_train_steps: each optimisation step, its logs and history,
    the tie watch, validation every --validation_steps, checkpoints every --checkpointing_steps."""

    def __init__(self, ctx, settings, record, prompts, base_seed, optimizer, lr_scheduler, params, validate):
        self.ctx, self.settings, self.record, self.prompts, self.base_seed = ctx, settings, record, prompts, base_seed
        self.optimizer, self.lr_scheduler, self.params, self.validate = optimizer, lr_scheduler, params, validate
        self.tie_watch = candidates.TieWatch(settings.reward.max_tied_steps, settings.reward.reward)

    def step(self, global_step: int) -> dict[str, float]:
        """One optimisation step, its stats averaged over micro-steps and processes."""
        accelerator, start = self.ctx.accelerator, time.time()
        step_stats = optimisation_step(self.ctx, self.prompts, self.base_seed, global_step, self.optimizer,
                                       self.lr_scheduler, self.params)
        return runtime.step_logs(accelerator, step_stats, self.lr_scheduler, time.time() - start)

    def run(self, global_step: int, history: list[dict]) -> list[dict]:
        accelerator, run, valid = self.ctx.accelerator, self.settings.run, self.settings.validation
        progress = tqdm(range(global_step, run.max_train_steps), disable=not accelerator.is_local_main_process,
                        desc=f"{self.settings.method.method} steps")
        for _ in progress:
            with runtime.named_collective_failures(accelerator, run.ddp_timeout, global_step + 1):  # a stuck rank
                logs = self.step(global_step)
                global_step += 1
                history.append({"step": global_step, **logs})
                accelerator.log(logs, step=global_step)
                self.tie_watch.after_step(logs, self.ctx.scorer, self.settings.method.num_candidates)
                progress.set_postfix({"loss": f"{logs['loss']:.3g}", **(
                    {"reward": f"{logs['reward_mean']:.4g}"} if "reward_mean" in logs else {})})
                if valid.validation_steps and global_step % valid.validation_steps == 0:
                    scores = self.validate(global_step)
                    history[-1].update(scores)
                    accelerator.log(scores, step=global_step)
                if global_step % run.checkpointing_steps == 0 or global_step == run.max_train_steps:
                    if accelerator.is_main_process:
                        report.save_history(run.output_dir, history)
                    checkpoints.save_checkpoint(accelerator, run, global_step, self.record)
        accelerator.wait_for_everyone()
        return history


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    cli.run_reporting_user_errors(lambda: main(parse_args()))
