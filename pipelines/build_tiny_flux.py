"""Train the embedded tiny FLUX.1-schnell stand-in on the procedural images of ``build_tiny_models``.

    python -m pipelines.build_tiny_flux --output_dir assets/tiny-flux-schnell --vae_from assets/tiny-sd-turbo \
        --generator_steps 1500

A FLUX-shaped diffusers folder (``FluxPipeline``: a ``FluxTransformer2DModel`` with double- and single-stream
blocks on 2x2-packed latents, CLIP for the pooled text and T5 for the token states, a flow-matching Euler
scheduler without dynamic shift, a VAE with a shift factor) that ``AutoPipelineForText2Image`` loads offline
and runs at ``num_inference_steps=1``. The VAE, CLIP text encoder and CLIP tokenizer start from the tiny
SD-Turbo's; the transformer and a tiny T5 (with a Unigram tokenizer over the caption words) are trained with
CLIP as a one-step generator by the same recipe: the one-step sample x0 = eps - v for noise eps and caption c
is regressed onto the latent of the image rendered from c with its free factors read off eps.
"""

from __future__ import annotations

import argparse

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

from drpo_utils import encode_prompts_flux, one_step_latents_flow
from pipelines import flags
from pipelines.build_tiny_models import all_captions, save_trained, train_generator
from pipelines.inference import FLUX_MAX_SEQUENCE_LENGTH


def build_t5_tokenizer() -> T5Tokenizer:
    """A Unigram tokenizer whose pieces are the caption words (plus letters for anything else)."""
    words = sorted({word for caption in all_captions() for word in caption.split()})
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(f"\u2581{word}", -1.0) for word in words]
    vocab += [("\u2581", -3.0)] + [(chr(c), -5.0) for c in range(ord("a"), ord("z") + 1)]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=FLUX_MAX_SEQUENCE_LENGTH)


def build_flux_pipeline(sd_turbo: str) -> FluxPipeline:
    """The tiny FLUX shape around the tiny SD-Turbo's VAE (given FLUX's shift factor, here 0) and CLIP."""
    vae = AutoencoderKL.from_pretrained(sd_turbo, subfolder="vae")
    vae.register_to_config(shift_factor=0.0)
    text_encoder = CLIPTextModel.from_pretrained(sd_turbo, subfolder="text_encoder")
    tokenizer_2 = build_t5_tokenizer()
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                 dropout_rate=0.0, pad_token_id=0, eos_token_id=1))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * vae.config.latent_channels, num_layers=1, num_single_layers=2,
        attention_head_dim=16, num_attention_heads=4, joint_attention_dim=t5.config.d_model,
        pooled_projection_dim=text_encoder.config.hidden_size, guidance_embeds=False, axes_dims_rope=(4, 6, 6))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False,
                                                base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5,
                                                max_shift=1.15)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                        tokenizer=CLIPTokenizer.from_pretrained(sd_turbo, subfolder="tokenizer"),
                        text_encoder_2=t5, tokenizer_2=tokenizer_2, transformer=transformer)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="assets/tiny-flux-schnell")
    parser.add_argument("--vae_from", default="assets/tiny-sd-turbo",
                        help="The tiny SD-Turbo folder whose VAE, CLIP text encoder and tokenizer are reused.")
    parser.add_argument("--generator_steps", type=flags.positive_int, default=1500)  # the committed model's
    parser.add_argument("--batch_size", type=flags.positive_int, default=32)
    parser.add_argument("--seed", type=flags.seed, default=0)
    return parser


def main(args=None):
    args = build_parser().parse_args(args)
    torch.manual_seed(args.seed)
    pipe = build_flux_pipeline(args.vae_from)
    pipe.one_step_arguments = {"max_sequence_length": FLUX_MAX_SEQUENCE_LENGTH}  # what encode_prompts_flux pads to
    pipe.vae.requires_grad_(False).eval()
    for module in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2):
        module.train()
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    train_generator(pipe, encode_prompts_flux, args.generator_steps, args.batch_size,
                    torch.Generator().manual_seed(args.seed), scheduler=scheduler, sample=one_step_latents_flow)
    save_trained(pipe, args.output_dir)


if __name__ == "__main__":
    main()
