#!/usr/bin/env python
"""Online DrPO (arXiv 2606.02521) for SDXL-Turbo-family one-step models.

    accelerate launch train_drpo_sdxl.py --pretrained_model_name_or_path=stabilityai/sdxl-turbo \
        --pretrained_vae_model_name_or_path=madebyollin/sdxl-vae-fp16-fix \
        --prompts_file=prompts.txt --reward=my_reward.py:score --output_dir=drpo-sdxl-turbo

Same flags, outputs and training loop as train_drpo.py (it runs train_drpo.main); only what SDXL
changes lives here: two text encoders (penultimate states concatenated, pooled output of the second)
and ``add_time_ids`` as ``added_cond_kwargs`` (drpo_utils.encode_prompts_sdxl), and the VAE, which is
kept in fp32 unless an fp16-safe VAE is given with --pretrained_vae_model_name_or_path.
"""

from __future__ import annotations

import logging

import torch

import drpo_utils
import train_drpo
from pipelines import cli, config

encode_prompts = drpo_utils.encode_prompts_sdxl  # condition c: both encoders + pooled text + time ids


def build_parser():
    # Pixel-space MAE features: the paper's choice for SDXL (the latent-MAE speaks SD-VAE latents only).
    parser = train_drpo.build_parser("DrPO for SDXL-Turbo-family one-step models.", default_feature_extractor="vit_mae",
                                    prog="train_drpo_sdxl.py")
    parser.add_argument(
        "--pretrained_vae_model_name_or_path", default=None,
        help="An fp16-safe VAE (e.g. madebyollin/sdxl-vae-fp16-fix); without it the SDXL VAE stays in fp32.",
    )
    return parser


def parse_args(input_args=None):
    return train_drpo.parse_args(input_args, build_parser())


def load_pipeline(model: config.ModelConfig, weight_dtype):
    """SDXL-Turbo pipeline; the stock SDXL VAE overflows in fp16, so it stays fp32 unless replaced."""
    from diffusers import AutoencoderKL

    if model.pretrained_vae_model_name_or_path is not None:
        vae = AutoencoderKL.from_pretrained(model.pretrained_vae_model_name_or_path, dtype=weight_dtype,
                                            cache_dir=model.cache_dir)
        return train_drpo.load_pipeline(model, weight_dtype, vae=vae)
    vae = AutoencoderKL.from_pretrained(model.pretrained_model_name_or_path, subfolder="vae", revision=model.revision,
                                        dtype=torch.float32, cache_dir=model.cache_dir)  # fp32, not rounded to 16 bits
    return train_drpo.load_pipeline(model, weight_dtype, vae=vae)


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    cli.run_reporting_user_errors(
        lambda: train_drpo.main(parse_args(), encode_prompts=encode_prompts, load_pipeline=load_pipeline))
