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
import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from diffusers import AutoPipelineForText2Image
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params
from tqdm.auto import tqdm

import drpo_utils

logger = get_logger(__name__)


# ------------------------------------------------------------------------------------------------
# What SD-Turbo needs (train_drpo_sdxl.py overrides exactly these)
# ------------------------------------------------------------------------------------------------


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description="DrPO for SD-Turbo-family one-step models.")
    drpo_utils.add_training_args(parser, default_resolution=512)
    args = parser.parse_args(input_args)
    drpo_utils.check_args(args)
    return args


def load_pipeline(args, weight_dtype, **components):
    """The stock one-step pipeline; its UNet becomes g_theta (LoRA) and g_ref (LoRA disabled)."""
    pipe = AutoPipelineForText2Image.from_pretrained(
        args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant, dtype=weight_dtype,
        **components,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


encode_prompts = drpo_utils.encode_prompts_sd  # condition c: CLIP hidden states (SD 2.x)


# ------------------------------------------------------------------------------------------------
# Algorithm 1
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DrPOContext:
    """Everything one DrPO step needs (Algorithm 1, inputs)."""

    args: argparse.Namespace
    accelerator: Accelerator
    pipe: object  # the stock pipeline: its UNet with LoRA is g_theta, with LoRA disabled g_ref
    unet: torch.nn.Module  # pipe.unet as prepared by accelerate (DDP-wrapped when distributed)
    scheduler: object  # private copy of the pipeline's scheduler for the differentiable one-step sampler
    feature_map: drpo_utils.FeatureMap  # phi
    reward_fn: drpo_utils.RewardFn  # R, only ranks
    config: drpo_utils.DriftConfig  # lambda, eta, radii, kernel
    encode_prompts: Callable  # prompt -> condition c (SD or SDXL)


def drpo_step(ctx: DrPOContext, prompt: str, rng: torch.Generator):
    """Lines 3-12 of Algorithm 1 for one prompt; returns the loss and what to log."""
    args, pipe, device = ctx.args, ctx.pipe, ctx.accelerator.device
    k = args.num_candidates
    # 3: condition c (encoded once, shared by the K candidates) and noises eps_1..K
    condition = ctx.encode_prompts(pipe, [prompt], device, args.resolution)
    condition = {name: value.expand(k, *value.shape[1:]) for name, value in condition.items()}
    latent_size = args.resolution // pipe.vae_scale_factor
    noise = torch.randn((k, pipe.unet.config.in_channels, latent_size, latent_size), generator=rng).to(device)
    # 4: current samples x_i = g_theta(eps_i, c) and reference samples x_i^ref = g_ref(eps_i, c)
    with ctx.accelerator.autocast():
        latents = drpo_utils.one_step_latents(ctx.unet, ctx.scheduler, noise, condition)
        with torch.no_grad(), drpo_utils.lora_disabled(pipe.unet):
            ref_latents = drpo_utils.one_step_latents(pipe.unet, ctx.scheduler, noise, condition)
        # 5: features Z = phi(x_i) (differentiable) and R = phi(x_i^ref) (frozen)
        feature_map = ctx.feature_map
        images = drpo_utils.decode_latents(pipe.vae, latents) if feature_map.needs_images else None
        features = feature_map(latents, images)
        with torch.no_grad():
            ref_images = drpo_utils.decode_latents(pipe.vae, ref_latents) if feature_map.needs_images else None
            ref_features = feature_map(ref_latents, ref_images)
            if images is None:
                images = drpo_utils.decode_latents(pipe.vae, latents)
    # 6-7: rank with the reward (no gradient, CPU images) and form A+ / A-
    rewards = drpo_utils.score_candidates(ctx.reward_fn, images, [prompt] * k, args.reward)
    winners, losers = drpo_utils.sample_reward_pairs(rewards, args.num_pairs, rng)
    # 8-12: V = V_pref + lambda V_ref, target sg(z + eta V), regression
    loss, stats = drpo_utils.drpo_loss(features, ref_features, winners.to(device), losers.to(device), ctx.config)
    shown = getattr(ctx.reward_fn, "last_raw", rewards)  # a mixture ranks by z-scores but shows raw values
    stats.update(loss=loss.item(), reward_mean=shown.mean().item(), reward_std=shown.std().item(),
                 num_pairs=len(winners))
    stats.update({f"reward/{name}": value for name, value in getattr(ctx.reward_fn, "last_components", {}).items()})
    return loss, stats


def main(args, encode_prompts=encode_prompts, load_pipeline=load_pipeline):
    accelerator = drpo_utils.setup_accelerator(args)
    prompts = drpo_utils.load_prompts(args)
    reward_fn = drpo_utils.load_reward(args.reward, accelerator.device, args.reward_weights)
    feature_map = drpo_utils.build_feature_map(args.feature_extractor, args.feature_extractor_path)
    repo_id = drpo_utils.create_hub_repo(args) if args.push_to_hub and accelerator.is_main_process else None
    if args.seed is not None:
        set_seed(args.seed)
    base_seed = args.seed if args.seed is not None else int(torch.randint(0, 2**31, ()).item())

    weight_dtype = drpo_utils.weight_dtype(accelerator)
    pipe = load_pipeline(args, weight_dtype)
    feature_map.check_vae(pipe.vae)
    drpo_utils.prepare_frozen_models(pipe, accelerator.device)
    drpo_utils.add_lora(pipe.unet, args)
    if accelerator.mixed_precision != "no":
        cast_training_params(pipe.unet, dtype=torch.float32)
    if args.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        pipe.vae.enable_gradient_checkpointing()  # image feature maps backpropagate through the decoder
        feature_map.enable_gradient_checkpointing()

    params = [p for p in pipe.unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay, eps=args.adam_epsilon,
    )
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    unet, optimizer, lr_scheduler = accelerator.prepare(pipe.unet, optimizer, lr_scheduler)
    drpo_utils.register_lora_checkpoint_hooks(accelerator, unet, type(pipe))
    global_step = drpo_utils.maybe_resume(accelerator, args)
    drpo_utils.init_trackers(accelerator, args)

    ctx = DrPOContext(
        args=args, accelerator=accelerator, pipe=pipe, unet=unet,
        scheduler=type(pipe.scheduler).from_config(pipe.scheduler.config),
        feature_map=feature_map.to(accelerator.device, weight_dtype),
        reward_fn=reward_fn, config=drpo_utils.drift_config_from_args(args), encode_prompts=encode_prompts,
    )
    validation_prompts = drpo_utils.validation_prompts(args, prompts)
    history = drpo_utils.load_history(args.output_dir, global_step)
    logger.info(f"DrPO: {len(prompts)} prompts, K={args.num_candidates}, M={args.num_pairs}, "
                f"{args.max_train_steps} steps, resuming at {global_step}")

    progress = tqdm(range(global_step, args.max_train_steps), disable=not accelerator.is_local_main_process,
                    desc="DrPO steps")
    for _ in progress:
        start, step_stats = time.time(), []
        for micro_step in range(args.gradient_accumulation_steps):
            with accelerator.accumulate(unet):
                loss = 0.0
                for index in range(args.train_batch_size):
                    rng = drpo_utils.step_generator(base_seed, global_step, micro_step, index, accelerator.process_index)
                    prompt = prompts[torch.randint(len(prompts), (), generator=rng).item()]
                    prompt_loss, stats = drpo_step(ctx, prompt, rng)
                    drpo_utils.check_finite_loss(accelerator, prompt_loss, global_step)
                    loss = loss + prompt_loss / args.train_batch_size
                    step_stats.append(stats)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
        global_step += 1
        logs = drpo_utils.step_logs(accelerator, step_stats, lr_scheduler, time.time() - start)
        history.append({"step": global_step, **logs})
        accelerator.log(logs, step=global_step)
        progress.set_postfix(loss=f"{logs['loss']:.3g}", reward=f"{logs['reward_mean']:.4g}")

        if global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps:
            drpo_utils.save_history(accelerator, args.output_dir, history)
            drpo_utils.save_checkpoint(accelerator, args, global_step)
        if args.validation_steps and global_step % args.validation_steps == 0:
            drpo_utils.log_validation(accelerator, pipe, validation_prompts, args, global_step)

    accelerator.wait_for_everyone()
    del optimizer, lr_scheduler, unet, ctx
    accelerator.free_memory()  # room for the fresh pipeline of the final check
    drpo_utils.finish_training(accelerator, args, pipe, history, validation_prompts, reward_fn, repo_id,
                               fresh_pipeline=lambda: load_pipeline(args, weight_dtype))
    accelerator.end_training()


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    main(parse_args())
