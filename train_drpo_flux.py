#!/usr/bin/env python
"""Online DrPO (arXiv 2606.02521) for FLUX.1-schnell, sampled at one step.

    accelerate launch train_drpo_flux.py --pretrained_model_name_or_path=black-forest-labs/FLUX.1-schnell \
        --prompts_file=prompts.txt --reward=my_reward.py:score --output_dir=drpo-flux-schnell \
        --mixed_precision=bf16 --gradient_checkpointing --candidate_chunk_size=2

Same flags, outputs and training loop as train_drpo.py (it runs train_drpo.main); only what FLUX changes
lives here: the condition (T5 token states padded to --max_sequence_length plus CLIP's pooled output,
drpo_utils.encode_prompts_flux), the one-step sample (flow matching from sigma = 1 on 2x2-packed latents,
x0 = eps - v, drpo_utils.one_step_latents_flow), and the LoRA's target modules (the attention projections of
both streams); the pipeline loads as SD's does (train_drpo.load_pipeline). The LoRA is saved in diffusers'
FLUX format (keys ``transformer.*``) and loads with
``AutoPipelineForText2Image.from_pretrained(...).load_lora_weights(...)``.
"""

from __future__ import annotations

import logging

import drpo_utils
import train_drpo
from pipelines import cli, flags
from pipelines.inference import FLUX_MAX_SEQUENCE_LENGTH

logger = logging.getLogger(__name__)
encode_prompts = drpo_utils.encode_prompts_flux  # condition c: T5 states + CLIP pooled output
sample = drpo_utils.one_step_latents_flow  # x = g_theta(eps, c): one flow-matching Euler step, x0 = eps - v

# Attention projections of the image and the text streams (the diffusers FLUX LoRA examples' attention set).
LORA_TARGET_MODULES = "to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out"
FLUX_MAX_T5_TOKENS = 512  # FluxPipeline.check_inputs refuses more
UNET_AND_SCHEDULER_FLAGS = ("unet", "scheduler", "timestep_spacing", "prediction_type", "timesteps")


def build_parser():
    # Pixel-space MAE features, as for SDXL (the latent-MAE speaks SD-VAE latents only).
    parser = train_drpo.build_parser("DrPO for FLUX.1-schnell at one step.", default_feature_extractor="vit_mae",
                                     prog="train_drpo_flux.py")
    parser.set_defaults(lora_target_modules=LORA_TARGET_MODULES)
    parser.add_argument("--max_sequence_length", type=flags.positive_int, default=FLUX_MAX_SEQUENCE_LENGTH,
                        help="T5 tokens of the prompt, in training and in the model card's call (FLUX.1-schnell: "
                             "at most 256).")
    return parser


def parse_args(input_args=None):
    args = train_drpo.parse_args(input_args, build_parser())
    given = [f"--{name}" for name in UNET_AND_SCHEDULER_FLAGS if getattr(args, name) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} choose a distilled UNet and its scheduler (train_drpo.py / "
                         "train_drpo_sdxl.py); FLUX's one step is flow matching from sigma = 1")
    if args.max_sequence_length > FLUX_MAX_T5_TOKENS:
        raise ValueError(f"--max_sequence_length {args.max_sequence_length}: FluxPipeline takes at most "
                         f"{FLUX_MAX_T5_TOKENS} T5 tokens (FLUX.1-schnell: {FLUX_MAX_SEQUENCE_LENGTH})")
    if args.max_sequence_length > FLUX_MAX_SEQUENCE_LENGTH:
        logger.warning("--max_sequence_length %d: FLUX.1-schnell was trained with at most %d T5 tokens",
                       args.max_sequence_length, FLUX_MAX_SEQUENCE_LENGTH)
    if args.feature_extractor == "teacher_unet":
        raise ValueError("--feature_extractor teacher_unet reads a UNet's activations; FLUX has a transformer: "
                         "choose vit_mae, dinov2, image or latent")
    if args.output_kohya_format:
        raise ValueError("--output_kohya_format converts UNet LoRA keys; the FLUX LoRA is saved in diffusers' "
                         "format, which ComfyUI also loads")
    return args


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    cli.run_reporting_user_errors(
        lambda: train_drpo.main(parse_args(), encode_prompts=encode_prompts, sample=sample))
