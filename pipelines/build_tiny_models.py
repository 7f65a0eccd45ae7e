"""Train the embedded tiny one-step text-to-image model on procedurally generated images.

    python -m pipelines.build_tiny_models --output_dir assets/tiny-sd-turbo
    python -m pipelines.build_tiny_models --architecture sdxl-turbo --output_dir assets/tiny-sdxl-turbo \
        --vae_from assets/tiny-sd-turbo/vae
    python -m pipelines.build_tiny_models --architecture sdxl-one-step-unet --output_dir assets/tiny-sdxl-base \
        --turbo_from assets/tiny-sdxl-turbo --generator_steps 800

The result is an SD-Turbo-shaped (UNet2DConditionModel, AutoencoderKL, CLIPTextModel + CLIPTokenizer,
EulerAncestral "trailing" scheduler) or SDXL-Turbo-shaped (two text encoders, the second with a
projection, a UNet with ``text_time`` added conditioning) diffusers folder that
``AutoPipelineForText2Image`` loads offline and runs in one step at guidance 0. Images are coloured shapes described by captions such as
"a large red circle on the left". Recipe (about 17 minutes on 2 CPU cores):

1. train a tiny KL-VAE on the procedural images (32 px crops, then 64 px);
2. train text encoder + UNet as a *one-step* generator by regression: the pipeline's one-step x0
   prediction for noise n and caption c is fitted to the VAE latent of the image rendered from c
   with its free factors read off the noise (background texture from a low-pass of channel 0; shade,
   size and position jitter from the means of channels 1-3). This designed noise-to-image coupling
   plays the role of a distilled multi-step sampler: samples are sharp, follow the caption and vary
   by seed, so a reward that reads pixels sees real variation between candidates.
"""

from __future__ import annotations

import argparse
import math
import os

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from drpo_utils import encode_prompts_sd, encode_prompts_sdxl, one_step_latents
from pipelines import flags
from pipelines.generators import drop_custom_timestep_warning
from pipelines.inference import denoiser
from pipelines.rewards.rules import COLORS

SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.13, "large": 0.22}
PLACES = {
    "on the left": (0.28, 0.5),
    "on the right": (0.72, 0.5),
    "at the top": (0.5, 0.28),
    "at the bottom": (0.5, 0.72),
    "in the center": (0.5, 0.5),
}
RESOLUTION = 64
LATENT_FACTOR = 4  # the tiny VAE downsamples 4x: 64 px images <-> 16x16x4 latents


def all_captions() -> list[str]:
    """Every caption of the procedural world: 'a {size} {colour} {shape} {place}'."""
    return [
        f"a {size} {color} {shape} {place}"
        for size in SIZES for color in COLORS for shape in SHAPES for place in PLACES
    ]


def build_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer over the caption alphabet, with merges that build most caption words."""
    words = sorted({word for caption in all_captions() for word in caption.split()})
    vocab = ["<|startoftext|>", "<|endoftext|>"]
    vocab += [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) + "</w>" for c in range(ord("a"), ord("z") + 1)]
    merges = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            if (merged, piece) not in merges:
                merges.append((merged, piece))
            merged += piece
            if merged not in vocab:
                vocab.append(merged)
    return CLIPTokenizer(vocab={token: i for i, token in enumerate(vocab)}, merges=merges, model_max_length=77)


# ------------------------------------------------------------------------------------------------
# Procedural images
# ------------------------------------------------------------------------------------------------


def noise_factors(noise: torch.Tensor) -> dict[str, torch.Tensor]:
    """Free image factors read off the initial noise [B, 4, h, w] (each roughly uniform in [0, 1])."""
    normal = torch.distributions.Normal(0.0, 1.0)
    h, w = noise.shape[-2:]
    half = w // 2
    background = F.avg_pool2d(noise[:, :1], 4) * 4.0  # low-pass of channel 0, unit variance
    return {
        "background": background,
        "shade": normal.cdf(noise[:, 1].mean((1, 2)) * math.sqrt(h * w)),
        "size": normal.cdf(noise[:, 2].mean((1, 2)) * math.sqrt(h * w)),
        "dx": normal.cdf(noise[:, 3, :, :half].mean((1, 2)) * math.sqrt(h * half)),
        "dy": normal.cdf(noise[:, 3, :, half:].mean((1, 2)) * math.sqrt(h * half)),
    }


def parse_caption(caption: str) -> tuple[str, str, str, str]:
    size, color, shape, *place = caption.split()[1:]
    return size, color, shape, " ".join(place)


def render(captions: list[str], noise: torch.Tensor, resolution: int = RESOLUTION) -> torch.Tensor:
    """Images [B, 3, R, R] in [0, 1] for the captions, free factors taken from ``noise``."""
    factors = noise_factors(noise)
    coords = (torch.arange(resolution, dtype=torch.float32) + 0.5) / resolution
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    images = []
    for i, caption in enumerate(captions):
        size, color, shape, place = parse_caption(caption)
        cx, cy = PLACES[place]
        cx = cx + 0.2 * (factors["dx"][i] - 0.5)
        cy = cy + 0.2 * (factors["dy"][i] - 0.5)
        radius = SIZES[size] * (0.75 + 0.5 * factors["size"][i])
        dx, dy = xx - cx, yy - cy
        if shape == "circle":
            distance = torch.sqrt(dx**2 + dy**2) - radius
        elif shape == "square":
            distance = torch.maximum(dx.abs(), dy.abs()) - 0.85 * radius
        else:  # upward triangle: max over the three edge normals
            normals = [(0.0, 1.0), (-math.sqrt(3) / 2, -0.5), (math.sqrt(3) / 2, -0.5)]
            distance = torch.stack([nx * dx + ny * dy for nx, ny in normals]).amax(0) - 0.55 * radius
        mask = torch.sigmoid(-distance * resolution)  # about one pixel of anti-aliasing
        background = F.interpolate(factors["background"][i : i + 1], size=resolution, mode="bilinear")[0, 0]
        background = (0.4 + 0.12 * background).clamp(0, 1)
        shade = 0.55 + 0.45 * factors["shade"][i]
        rgb = torch.tensor(COLORS[color]).view(3, 1, 1) * shade
        images.append(background * (1 - mask) + rgb * mask)
    return torch.stack(images)


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=RESOLUTION, layers_per_block=1,
        block_out_channels=(32, 64, 64), norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    )


def build_unet(cross_attention_dim: int, **sdxl_kwargs) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        **sdxl_kwargs, sample_size=RESOLUTION // LATENT_FACTOR, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64), norm_num_groups=16, cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    )


def text_config(vocab_size: int, hidden_size: int, **kwargs) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1, **kwargs,
    )


def build_text_encoder(vocab_size: int) -> CLIPTextModel:
    return CLIPTextModel(text_config(vocab_size, 64))


def build_sd_pipeline(vae: AutoencoderKL, tokenizer: CLIPTokenizer) -> StableDiffusionPipeline:
    """SD-Turbo shape: one CLIP text encoder, its last hidden states as cross-attention context."""
    text_encoder = build_text_encoder(len(tokenizer))
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=build_unet(text_encoder.config.hidden_size),
        scheduler=build_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def build_sdxl_pipeline(vae: AutoencoderKL, tokenizer: CLIPTokenizer) -> StableDiffusionXLPipeline:
    """SDXL-Turbo shape: two text encoders (penultimate states concatenated; pooled projection of the
    second) and a UNet with ``text_time`` added conditioning (pooled text + 6 time ids)."""
    time_embed_dim, hidden = 8, 32
    text_encoder = CLIPTextModel(text_config(len(tokenizer), hidden))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(len(tokenizer), hidden, projection_dim=hidden))
    unet = build_unet(
        2 * hidden, addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + hidden,
    )
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet, scheduler=build_scheduler(), force_zeros_for_empty_prompt=True,
    )


ARCHITECTURES = {"sd-turbo": (build_sd_pipeline, encode_prompts_sd), "sdxl-turbo": (build_sdxl_pipeline, encode_prompts_sdxl)}


def build_scheduler() -> EulerAncestralDiscreteScheduler:
    """SD-Turbo's scheduler (scaled-linear betas, trailing spacing: one step at t = 999).

    The tiny model predicts v rather than epsilon: at t = 999 the epsilon parameterisation gives
    x0 = sigma * (n - eps) with sigma ~ 14.6, so a tiny UNet would have to reproduce its input to
    1 % to get x0 right; v-prediction is well conditioned there. Both are handled by the generator.
    """
    return EulerAncestralDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="v_prediction", timestep_spacing="trailing", steps_offset=1,
    )


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


def random_batch(batch_size: int, generator: torch.Generator) -> tuple[list[str], torch.Tensor]:
    captions = all_captions()
    picks = torch.randint(len(captions), (batch_size,), generator=generator)
    noise = torch.randn(batch_size, 4, RESOLUTION // LATENT_FACTOR, RESOLUTION // LATENT_FACTOR, generator=generator)
    return [captions[i] for i in picks], noise


def train_vae(vae: AutoencoderKL, steps: int, batch_size: int, generator: torch.Generator) -> None:
    """Reconstruction + tiny KL; the first 60% of steps on random 32 px crops, the rest at 64 px."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    progress = tqdm(range(steps), desc="tiny VAE", unit="step")
    for step in progress:
        images = render(*random_batch(batch_size, generator)) * 2 - 1
        if step < 0.6 * steps:
            top, left = torch.randint(0, RESOLUTION - 32 + 1, (2,), generator=generator).tolist()
            images = images[:, :, top : top + 32, left : left + 32]
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        loss = F.mse_loss(reconstruction, images) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % 20 == 0 or step == steps - 1:
            progress.set_postfix(loss=f"{loss.item():.5f}")


@torch.no_grad()
def calibrate_latent_scale(vae: AutoencoderKL, generator: torch.Generator) -> float:
    """scaling_factor = 1 / std of the latents, as for the SD VAEs."""
    images = render(*random_batch(256, generator)) * 2 - 1
    return 1.0 / vae.encode(images).latent_dist.mean.std().item()


def train_generator(pipe, encode_prompts, steps: int, batch_size: int, generator: torch.Generator,
                    scheduler=None, timesteps=None, text_encoders: bool = True, sample=one_step_latents) -> None:
    """Fit the one-step x0 prediction for (noise, caption) to the latent of render(caption, noise).

    The denoiser (UNet or FLUX transformer) and (with ``text_encoders``) the text encoder(s) are trained
    together, through the pipeline's own prompt encoding; ``scheduler`` / ``timesteps`` / ``sample``: the
    one step's (default: the tiny Turbo's, t = 999).
    """
    scheduler = scheduler or build_scheduler()
    encoders = [m for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None]
    trained = [denoiser(pipe)] + (encoders if text_encoders else [])
    parameters = [p for module in trained for p in module.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=5e-4, weight_decay=0.0)
    lr_schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=5e-4, total_steps=steps, pct_start=0.05)
    vae = pipe.vae
    progress = tqdm(range(steps), desc="tiny one-step generator", unit="step")
    for step in progress:
        captions, noise = random_batch(batch_size, generator)
        with torch.no_grad():
            target = vae.encode(render(captions, noise) * 2 - 1).latent_dist.mean * vae.config.scaling_factor
        condition = encode_prompts(pipe, captions, "cpu", RESOLUTION)
        prediction = sample(denoiser(pipe), scheduler, noise, condition, timesteps)
        loss = F.mse_loss(prediction, target)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        lr_schedule.step()
        if step % 20 == 0 or step == steps - 1:
            progress.set_postfix(loss=f"{loss.item():.5f}")


# A DMD2-style stand-in: an SDXL-shaped base with SDXL base's (non-Turbo) scheduler, and beside it a separately
# saved one-step UNet trained for an LCM step at timestep 399 from pure noise (DMD2's convention).
ONE_STEP_UNET_FILE = "tiny_1step_unet_fp16.safetensors"
ONE_STEP_SCHEDULER, ONE_STEP_TIMESTEP = "LCMScheduler", 399


def sdxl_base_scheduler() -> EulerDiscreteScheduler:
    """SDXL base's scheduler (Euler, scaled-linear betas, leading spacing, epsilon): not a one-step one."""
    return EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1)


def build_one_step_unet_base(turbo_dir: str, output_dir: str, steps: int, batch_size: int,
                             generator: torch.Generator) -> None:
    """The tiny SDXL-Turbo's text encoders, VAE and (as the base's placeholder UNet, fp16) UNet with SDXL
    base's scheduler; and ``ONE_STEP_UNET_FILE``: its UNet retrained as an epsilon-prediction one-step model
    for ``LCMScheduler`` at ``timesteps=[399]`` (text encoders frozen, as they are the base's)."""
    from safetensors.torch import save_file

    pipe = StableDiffusionXLPipeline.from_pretrained(turbo_dir)
    pipe.scheduler = sdxl_base_scheduler()
    pipe.unet.to(torch.float16)
    pipe.save_pretrained(output_dir)
    pipe.unet.to(torch.float32).train()
    for module in (pipe.text_encoder, pipe.text_encoder_2, pipe.vae):
        module.requires_grad_(False).eval()
    lcm = LCMScheduler.from_config(pipe.scheduler.config)
    drop_custom_timestep_warning()
    train_generator(pipe, encode_prompts_sdxl, steps, batch_size, generator, scheduler=lcm,
                    timesteps=[ONE_STEP_TIMESTEP], text_encoders=False)
    state_dict = {key: value.to(torch.float16).contiguous() for key, value in pipe.unet.state_dict().items()}
    save_file(state_dict, os.path.join(output_dir, ONE_STEP_UNET_FILE))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architecture", default="sd-turbo", choices=sorted([*ARCHITECTURES, "sdxl-one-step-unet"]),
                        help="sdxl-one-step-unet: the DMD2-style stand-in, built from --turbo_from (its UNet "
                             "retrained for --generator_steps)")
    parser.add_argument("--turbo_from", default="assets/tiny-sdxl-turbo",
                        help="sdxl-one-step-unet: the tiny SDXL-Turbo folder it starts from.")
    parser.add_argument("--output_dir", default="assets/tiny-sd-turbo")
    parser.add_argument("--vae_from", default=None, help="Reuse a trained tiny VAE folder instead of training one.")
    parser.add_argument("--vae_steps", type=flags.positive_int, default=1000)
    parser.add_argument("--generator_steps", type=flags.positive_int, default=3000)
    parser.add_argument("--batch_size", type=flags.positive_int, default=32)
    parser.add_argument("--seed", type=flags.seed, default=0)
    return parser


def main(args=None):
    args = build_parser().parse_args(args)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    if args.architecture == "sdxl-one-step-unet":
        build_one_step_unet_base(args.turbo_from, args.output_dir, args.generator_steps, args.batch_size, generator)
        print(f"saved {args.output_dir}")
        return
    build_pipeline, encode_prompts = ARCHITECTURES[args.architecture]

    if args.vae_from:
        vae = AutoencoderKL.from_pretrained(args.vae_from)
    else:
        vae = build_vae()
        train_vae(vae, args.vae_steps, args.batch_size, generator)
        vae.register_to_config(scaling_factor=calibrate_latent_scale(vae, generator))
    vae.requires_grad_(False).eval()

    pipe = build_pipeline(vae, build_tokenizer())
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module) and module is not vae:
            module.train()
    train_generator(pipe, encode_prompts, args.generator_steps, args.batch_size, generator)
    save_trained(pipe, args.output_dir)


def save_trained(pipe, output_dir: str) -> None:
    """Every module back in eval mode, then the diffusers folder."""
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    pipe.save_pretrained(output_dir)
    print(f"saved {output_dir}")


if __name__ == "__main__":
    main()
