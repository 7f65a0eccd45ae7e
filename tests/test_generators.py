"""Distilled one-step UNets on an SD/SDXL base (DMD2, SDXL-Lightning, Hyper-SD): --unet, --scheduler and
--timesteps load, train and deploy the model the stock pipeline runs (pipelines/generators.py)."""

import copy
import os

import diffusers
import pytest
import torch
from conftest import ROOT, assert_above, build_random_pipeline
from diffusers import AutoPipelineForText2Image, UNet2DConditionModel
from diffusers.models.model_loading_utils import load_state_dict

import train_drpo
import train_drpo_sdxl
from drpo_utils import encode_prompts_sdxl, one_step_latents
from pipelines import generators
from pipelines.build_tiny_models import ONE_STEP_SCHEDULER, ONE_STEP_TIMESTEP, ONE_STEP_UNET_FILE
from pipelines.config import ModelConfig
from pipelines.inference import initial_noise, load_lora
from pipelines.scoring import summarize
from test_train import HELD_OUT_SEEDS, REWARDS, held_out_prompts, train, training_args

TINY_BASE = os.path.join(ROOT, "assets", "tiny-sdxl-base")
TINY_UNET = os.path.join(TINY_BASE, ONE_STEP_UNET_FILE)
DMD2_FLAGS = [f"--unet={TINY_UNET}", f"--scheduler={ONE_STEP_SCHEDULER}", f"--timesteps={ONE_STEP_TIMESTEP}"]
# The model cards' settings: (scheduler class, config overrides, explicit timestep).
FAMILIES = {
    "dmd2": ("LCMScheduler", {}, 399),
    "sdxl-lightning": ("EulerDiscreteScheduler", {"timestep_spacing": "trailing", "prediction_type": "sample"}, None),
    "hyper-sd": ("LCMScheduler", {}, 800),
    "tcd": ("TCDScheduler", {}, 999),
}


def stock_pipeline(unet_file: str = TINY_UNET, scheduler: str = ONE_STEP_SCHEDULER, **overrides):
    """The model card's loading code, stock diffusers only: the base's UNet architecture with the one-step
    weights, the scheduler from the base's config."""
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(TINY_BASE, subfolder="unet"))
    unet.load_state_dict(load_state_dict(unet_file))
    pipe = AutoPipelineForText2Image.from_pretrained(TINY_BASE, unet=unet)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config, **overrides)
    pipe.set_progress_bar_config(disable=True)
    generators.drop_custom_timestep_warning()  # LCM's "first timestep is not 999": DMD2's 399 is meant
    return pipe


def stock_latents(pipe, prompt: str, seed: int, timestep: int | None, noise=None):
    generator = torch.Generator("cpu").manual_seed(seed)
    timesteps = {"timesteps": [timestep]} if timestep is not None else {}
    return pipe(prompt, num_inference_steps=1, guidance_scale=0.0, generator=generator, height=64, width=64,
                output_type="latent", latents=noise, **timesteps).images


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_generator_reproduces_the_stock_pipeline_at_each_familys_step(tmp_path, family):
    name, overrides, timestep = FAMILIES[family]
    path = build_random_pipeline(str(tmp_path), architecture="sdxl-turbo")
    pipe = AutoPipelineForText2Image.from_pretrained(path)
    pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **overrides)
    pipe.set_progress_bar_config(disable=True)
    prompt, seed = "a small red circle on the left", 3
    noise = initial_noise(pipe, seed, 64, 64)
    expected = stock_latents(pipe, prompt, seed, timestep, noise=noise)  # the pipeline scales by init_noise_sigma
    condition = encode_prompts_sdxl(pipe, [prompt], "cpu", 64)
    latents = one_step_latents(pipe.unet, copy.deepcopy(pipe.scheduler), noise, condition,
                               [timestep] if timestep is not None else None)
    # measured 0 (the same float32 calls); a wrong timestep, scaling or prediction type moves latents by O(1)
    torch.testing.assert_close(latents, expected, rtol=1e-5, atol=1e-5)


def test_the_stand_in_one_step_unet_equals_the_stock_pipeline_through_the_trainers_loader():
    model = ModelConfig(pretrained_model_name_or_path=TINY_BASE, unet=TINY_UNET, scheduler=ONE_STEP_SCHEDULER,
                        timesteps=(ONE_STEP_TIMESTEP,))
    ours, stock = train_drpo_sdxl.load_pipeline(model, torch.float32), stock_pipeline()
    assert type(ours.scheduler) is type(stock.scheduler) and ours.one_step_arguments == {"timesteps": [ONE_STEP_TIMESTEP]}
    prompt, seed = "a large blue square at the top", 7
    noise = initial_noise(stock, seed, 64, 64)
    expected = stock_latents(stock, prompt, seed, ONE_STEP_TIMESTEP)
    latents = one_step_latents(ours.unet, copy.deepcopy(ours.scheduler), noise,
                               encode_prompts_sdxl(ours, [prompt], "cpu", 64), model.timesteps)
    torch.testing.assert_close(latents, expected, rtol=1e-5, atol=1e-5)
    # the base folder's own UNet and scheduler give another model: the flags are what make it the one-step one
    base = AutoPipelineForText2Image.from_pretrained(TINY_BASE)
    assert not torch.allclose(base.unet.conv_in.weight, ours.unet.conv_in.weight)


def test_a_bin_unet_file_and_a_unet_folder_load_like_the_safetensors_file(tmp_path):
    state_dict = load_state_dict(TINY_UNET)
    torch.save(state_dict, tmp_path / "unet.bin")
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(TINY_BASE, subfolder="unet"))
    unet.load_state_dict(state_dict)
    unet.save_pretrained(tmp_path / "folder")
    for source in (tmp_path / "unet.bin", tmp_path / "folder"):
        loaded = generators.load_unet(ModelConfig(pretrained_model_name_or_path=TINY_BASE, unet=str(source)),
                                      torch.float32)
        for key, value in loaded.state_dict().items():
            torch.testing.assert_close(value, state_dict[key].float(), rtol=0, atol=0)


def test_a_unet_file_of_another_architecture_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"conv_in.weight": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="does not fit the base's UNet"):
        generators.load_unet(ModelConfig(pretrained_model_name_or_path=TINY_BASE,
                                         unet=str(tmp_path / "other.safetensors")), torch.float32)


@pytest.mark.parametrize("flags,message", [
    (["--scheduler=NoSuchScheduler"], "not a diffusers scheduler class; one-step models use"),
    (["--scheduler=EulerAncestralDiscreteScheduler", "--timesteps=399"], "takes explicit timesteps"),
    (["--timesteps=399,200"], "takes one timestep"),
    (["--unet=missing/unet.safetensors"], "no such file or folder"),
])
def test_generator_flags_are_checked_before_anything_loads(tmp_path, flags, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        train_drpo_sdxl.parse_args(training_args(TINY_BASE, tmp_path, *flags))


def test_a_timestep_the_scheduler_refuses_fails_before_any_weights_load(tmp_path, monkeypatch):
    def no_model_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the scheduler was checked")

    args = train_drpo_sdxl.parse_args(training_args(TINY_BASE, tmp_path, f"--unet={TINY_UNET}",
                                                    "--scheduler=EulerDiscreteScheduler", "--timesteps=1000"))
    with pytest.raises(ValueError, match="--timesteps 1000"):
        train_drpo.main(args, encode_prompts=train_drpo_sdxl.encode_prompts, load_pipeline=no_model_loading)


@pytest.mark.behaviour
def test_drpo_on_a_dmd2_style_unet_raises_a_custom_reward_through_the_stock_pipeline(tmp_path):
    train("train_drpo_sdxl.py", *training_args(TINY_BASE, tmp_path, *DMD2_FLAGS, f"--reward={REWARDS}:brightness",
                                               "--max_train_steps=40", "--learning_rate=1e-3"))
    card = (tmp_path / "README.md").read_text()
    for line in (f"unet.load_state_dict(load_state_dict(\"{TINY_UNET}\"))", f"from diffusers import {ONE_STEP_SCHEDULER}",
                 f"pipe.scheduler = {ONE_STEP_SCHEDULER}.from_config(pipe.scheduler.config)",
                 f"timesteps=[{ONE_STEP_TIMESTEP}]"):
        assert line in card, line
    pipe, prompts = stock_pipeline(), held_out_prompts()

    def brightness_table():
        table = [[stock_latents(pipe, prompt, seed, ONE_STEP_TIMESTEP) for seed in HELD_OUT_SEEDS]
                 for prompt in prompts]
        images = pipe.vae.decode(torch.cat([torch.cat(row) for row in table]) / pipe.vae.config.scaling_factor).sample
        return (images / 2 + 0.5).clamp(0, 1).mean((1, 2, 3)).view(len(prompts), len(HELD_OUT_SEEDS))

    with torch.no_grad():
        base = brightness_table()
        load_lora(pipe, str(tmp_path))
        tuned = brightness_table()
    assert_above(summarize(base, tuned)["z_paired"], 3, (base.mean(), tuned.mean()))


def test_the_evaluation_generates_with_the_distilled_unet_and_keys_its_cache_by_it(tmp_path, capsys):
    from PIL import Image

    from conftest import PROMPTS, reset_accelerate_state
    from pipelines import evaluate

    cache, prompt = tmp_path / "images", [line.strip() for line in open(PROMPTS)][0]
    common = [f"--pretrained_model_name_or_path={TINY_BASE}", f"--prompts_file={PROMPTS}", "--max_prompts=1",
              "--seeds=0-1", "--metrics=benchmarks.rewards:brightness", f"--image_cache_dir={cache}", "--bootstrap=20"]
    for output, extra in (("plain", []), ("dmd2", [f"--base_unet={TINY_UNET}", f"--scheduler={ONE_STEP_SCHEDULER}",
                                                   f"--timesteps={ONE_STEP_TIMESTEP}"])):
        reset_accelerate_state()
        evaluate.main([*common, f"--output_dir={tmp_path / output}", *extra])
        reset_accelerate_state()
        assert "generated 2 images" in capsys.readouterr().err  # nothing served from the other run's folder
    folders = sorted(os.listdir(cache))
    assert len(folders) == 2 and all(folder.startswith("base-") for folder in folders)
    pipe = stock_pipeline()
    with torch.no_grad():
        latents = stock_latents(pipe, prompt, 0, ONE_STEP_TIMESTEP)
        expected = (pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample[0] / 2 + 0.5).clamp(0, 1)
    pngs = [os.path.join(cache, folder, name) for folder in folders for name in os.listdir(os.path.join(cache, folder))
            if name.endswith("-0.png")]
    errors = [(torch.tensor(list(Image.open(png).getdata())).T.reshape(3, 64, 64) / 255 - expected).abs().max()
              for png in pngs]
    assert min(errors) <= 1 / 255 + 1e-4 < max(errors), errors  # one folder holds the DMD2-style images


def test_a_hub_unet_that_is_not_cached_fails_at_once_offline(tmp_path):
    def no_model_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the --unet download was checked")

    dmd2 = "tianweiy/DMD2:dmd2_sdxl_1step_unet_fp16.bin"
    args = train_drpo_sdxl.parse_args(training_args(TINY_BASE, tmp_path, f"--unet={dmd2}", "--scheduler=LCMScheduler",
                                                    "--timesteps=399"))
    with pytest.raises(OSError, match="--unet needs 'tianweiy/DMD2:dmd2_sdxl_1step_unet_fp16.bin' from the Hub"):
        train_drpo.main(args, encode_prompts=train_drpo_sdxl.encode_prompts, load_pipeline=no_model_loading)


def test_a_local_unet_is_part_of_what_a_resume_compares(tmp_path):
    from pipelines import content

    unet = tmp_path / "unet.safetensors"
    unet.write_bytes(b"first weights")
    before = content.run_inputs(["a prompt"], "color_match", str(unet))
    unet.write_bytes(b"retrained weights")  # the same path, another UNet: resuming on it is refused
    assert content.run_inputs(["a prompt"], "color_match", str(unet)) != before
    assert content.run_inputs(["a prompt"], "color_match") == {k: v for k, v in before.items() if "unet" not in k}


def test_the_documented_gpu_commands_parse(tmp_path):
    """Every training command of docs/generators.md passes its script's own checks (flags, values, files)."""
    import re
    import shlex

    import train_drpo_flux

    scripts = {"train_drpo_sdxl.py": train_drpo_sdxl, "train_drpo_flux.py": train_drpo_flux}
    text = open(os.path.join(ROOT, "docs", "generators.md")).read()
    commands = [shlex.split(re.sub(r"\\\n\s*", " ", block)) for block in re.findall(r"```bash\n(.*?)```", text, re.S)
                if block.startswith("accelerate launch")]
    assert len(commands) == 4  # DMD2, SDXL-Lightning, Hyper-SD, FLUX.1-schnell
    for argv in commands:
        script = next(word for word in argv if word.endswith(".py"))
        args = scripts[script].parse_args([*argv[argv.index(script) + 1:], f"--output_dir={tmp_path / script}"])
        assert args.pretrained_model_name_or_path.startswith(("stabilityai/", "black-forest-labs/"))
