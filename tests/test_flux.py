"""FLUX.1-schnell at one step (train_drpo_flux.py): the flow-matching sample equals the stock FluxPipeline's,
and the shared loop (rewards, chunking, resume, DDP, push) runs on the tiny FLUX stand-in."""

import copy

import pytest
import torch
from conftest import TINY_FLUX, TINY_SD, assert_above, reset_accelerate_state
from diffusers import AutoPipelineForText2Image, FluxPipeline

import train_drpo
import train_drpo_flux
from drpo_utils import encode_prompts_flux, one_step_latents_flow
from pipelines.build_tiny_flux import build_flux_pipeline
from pipelines.inference import FLUX_MAX_SEQUENCE_LENGTH, initial_noise, load_one_step_pipeline
from pipelines.scoring import summarize
from test_train import HELD_OUT_SEEDS, REWARDS, held_out_prompts, launch, lora_tensors, training_args

def train_flux(*args):
    reset_accelerate_state()
    train_drpo.main(train_drpo_flux.parse_args(list(args)), encode_prompts=train_drpo_flux.encode_prompts,
                    sample=train_drpo_flux.sample)
    reset_accelerate_state()


def stock_latents(pipe, prompt: str, seed: int, latents=None, length: int = FLUX_MAX_SEQUENCE_LENGTH):
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(prompt, num_inference_steps=1, guidance_scale=0.0, generator=generator, height=64, width=64,
                output_type="latent", latents=latents, max_sequence_length=length).images


@pytest.mark.parametrize("length", [FLUX_MAX_SEQUENCE_LENGTH, 512])
def test_flow_generator_reproduces_the_stock_flux_pipeline(tmp_path, length):
    torch.manual_seed(0)
    build_flux_pipeline(TINY_SD).save_pretrained(tmp_path)  # untrained transformer and T5: exactness only
    pipe = load_one_step_pipeline(str(tmp_path), call_arguments={"max_sequence_length": length})
    assert isinstance(pipe, FluxPipeline)
    prompt, seed = "a small red circle on the left", 3
    noise = initial_noise(pipe, seed, 64, 64)  # [1, C, h, w], as FluxPipeline.prepare_latents draws it
    packed = FluxPipeline._unpack_latents(stock_latents(pipe, prompt, seed, length=length), 64, 64,
                                          pipe.vae_scale_factor)
    condition = encode_prompts_flux(pipe, [prompt], "cpu")
    assert condition["encoder_hidden_states"].shape[1] == length
    latents = one_step_latents_flow(pipe.transformer, copy.deepcopy(pipe.scheduler), noise, condition)
    # measured 0 (the same float32 calls); a wrong sigma, shift, id grid or packing moves latents by O(1)
    torch.testing.assert_close(latents, packed, rtol=1e-5, atol=1e-5)


def test_flux_flags_that_choose_a_unet_are_refused(tmp_path):
    for flag in ("--timesteps=399", "--scheduler=LCMScheduler", "--feature_extractor=teacher_unet"):
        with pytest.raises(ValueError, match="FLUX"):
            train_drpo_flux.parse_args(training_args(TINY_FLUX, tmp_path, flag))


@pytest.mark.behaviour
def test_drpo_on_flux_raises_a_custom_reward_through_the_stock_pipeline(tmp_path):
    launch("train_drpo_flux.py", *training_args(TINY_FLUX, tmp_path, f"--reward={REWARDS}:brightness",
                                                "--max_train_steps=40", "--learning_rate=1e-3"))
    assert all(key.startswith("transformer.") for key in lora_tensors(tmp_path))
    card = (tmp_path / "README.md").read_text()
    assert f"max_sequence_length={FLUX_MAX_SEQUENCE_LENGTH}" in card
    pipe = AutoPipelineForText2Image.from_pretrained(TINY_FLUX)
    pipe.set_progress_bar_config(disable=True)
    prompts = held_out_prompts()

    def brightness_table():
        latents = torch.cat([stock_latents(pipe, prompt, seed) for prompt in prompts for seed in HELD_OUT_SEEDS])
        latents = FluxPipeline._unpack_latents(latents, 64, 64, pipe.vae_scale_factor) / pipe.vae.config.scaling_factor
        images = pipe.vae.decode(latents + pipe.vae.config.shift_factor).sample
        return (images / 2 + 0.5).clamp(0, 1).mean((1, 2, 3)).view(len(prompts), len(HELD_OUT_SEEDS))

    with torch.no_grad():
        base = brightness_table()
        pipe.load_lora_weights(str(tmp_path))
        tuned = brightness_table()
    assert_above(summarize(base, tuned)["z_paired"], 3, (base.mean(), tuned.mean()))


def test_flux_chunked_gradients_equal_unchunked_and_resume_continues_exactly(tmp_path):
    common = ["--reward=color_match", "--num_candidates=4", "--num_pairs=4", "--checkpointing_steps=2"]
    train_flux(*training_args(TINY_FLUX, tmp_path / "whole", *common, "--max_train_steps=4"))
    train_flux(*training_args(TINY_FLUX, tmp_path / "chunked", *common, "--max_train_steps=2",
                              "--candidate_chunk_size=2"))
    train_flux(*training_args(TINY_FLUX, tmp_path / "chunked", *common, "--max_train_steps=4",
                              "--candidate_chunk_size=2", "--resume_from_checkpoint=latest"))
    whole, chunked = lora_tensors(tmp_path / "whole"), lora_tensors(tmp_path / "chunked")
    assert whole.keys() == chunked.keys()
    for key in whole:  # chunking only regroups float32 sums: measured <= 1e-7
        torch.testing.assert_close(chunked[key], whole[key], rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(whole[key], lora_tensors(tmp_path / "whole" / "checkpoint-2")[key]) for key in whole)


@pytest.mark.parametrize("method", ["draft", "vggflow", "dpo", "grpo"])
def test_every_baseline_trains_on_flux(tmp_path, method):
    reward = f"--reward={REWARDS}:brightness"  # differentiable, for DRaFT and VGG-Flow
    train_flux(*training_args(TINY_FLUX, tmp_path, reward, f"--method={method}", "--num_candidates=4",
                              "--num_pairs=4", "--max_train_steps=2", "--learning_rate=1e-2"))
    tensors = lora_tensors(tmp_path)
    assert tensors and all(key.startswith("transformer.") for key in tensors)
    assert any("lora.up" in key and value.abs().sum() > 0 for key, value in tensors.items())  # trained (B starts at 0)


def test_flux_inputs_that_would_fail_later_are_refused_at_start_up(tmp_path):
    from pipelines import generators, memory

    with pytest.raises(ValueError, match="at most 512 T5 tokens"):
        train_drpo_flux.parse_args(training_args(TINY_FLUX, tmp_path, "--max_sequence_length=600"))
    flux, vae = {"_class_name": "FluxTransformer2DModel"}, {"block_out_channels": [128, 256, 512, 512]}
    assert memory.resolve_resolution(512, flux, vae) == 512
    with pytest.raises(ValueError, match="multiple of 16 .*packs 2x2 latent patches"):
        memory.resolve_resolution(520, flux, vae)  # a multiple of 8, but the packed grid needs 16
    with pytest.raises(ValueError, match="guidance-distilled"):
        generators.check_denoiser_config({"guidance_embeds": True}, "black-forest-labs/FLUX.1-dev")
    with pytest.raises(ValueError, match="time_cond_proj_dim"):
        generators.check_denoiser_config({"time_cond_proj_dim": 256}, "latent-consistency/lcm-sdxl")


def test_the_evaluation_refuses_unet_flags_on_flux(tmp_path):
    from pipelines import evaluate

    with pytest.raises(ValueError, match="--timesteps apply to a UNet"):
        evaluate.main([f"--pretrained_model_name_or_path={TINY_FLUX}", "--prompts_file=assets/tiny_prompts.txt",
                       "--timesteps=399", "--scheduler=LCMScheduler", "--metrics=benchmarks.rewards:brightness",
                       f"--output_dir={tmp_path}"])
