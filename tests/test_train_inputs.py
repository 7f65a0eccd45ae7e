"""Bad input stops early with a clear message; LoRA files load with the right scale; Hub push (faked)."""

import copy
import json
import os

import pytest
import torch
from conftest import PROMPTS, ROOT, TINY_SD, build_random_pipeline
from diffusers import AutoPipelineForText2Image, StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import drpo_utils
import train_drpo

REWARDS = os.path.join(ROOT, "tests", "data", "rewards.py")


def args_for(tmp_path, *extra):
    return [
        f"--pretrained_model_name_or_path={TINY_SD}", f"--prompts_file={PROMPTS}", f"--output_dir={tmp_path}",
        "--resolution=64", "--num_candidates=4", "--num_pairs=3", "--seed=0", "--report_to=none",
        "--validation_steps=0", "--num_validation_seeds=1", "--max_train_steps=1", *extra,
    ]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield


def no_model_loading(*args, **kwargs):
    raise AssertionError("the model was loaded before the bad input was reported")


@pytest.mark.parametrize(
    "extra,error,message",
    [
        (["--reward=pickscorez"], ValueError, "choose one of color_match, jpeg_compressibility"),
        (["--reward=missing_file.py:score"], FileNotFoundError, "missing_file.py"),
        ([f"--reward={REWARDS}:no_such_function"], ValueError, "no_such_function"),
        (["--feature_extractor=dino"], ValueError, "choose one of latent, image"),
        (["--num_candidates=1"], ValueError, "at least 2"),
        (["--num_candidates=4", "--num_pairs=7"], ValueError, r"\[1, 6\]"),
        (["--drift_radii=0.1,-1"], ValueError, "positive"),
        (["--resume_from_checkpoint=checkpoint-99"], FileNotFoundError, "checkpoint-99"),
        (["--mixed_precision=fp16"], ValueError, "bf16"),
    ],
)
def test_bad_arguments_fail_in_parse_args(tmp_path, extra, error, message):
    if "fp16" in extra[0] and torch.cuda.is_available():
        pytest.skip("fp16 is valid on a GPU")
    with pytest.raises(error, match=message):
        train_drpo.parse_args(args_for(tmp_path, *extra))


def test_unknown_drift_kernel_lists_choices(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_drpo.parse_args(args_for(tmp_path, "--drift_kernel=gauss"))
    assert "rbf" in capsys.readouterr().err


def test_empty_prompt_file_fails_before_loading_the_model(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    args = train_drpo.parse_args(args_for(tmp_path, f"--prompts_file={empty}"))
    with pytest.raises(ValueError, match="no prompts"):
        train_drpo.main(args, load_pipeline=no_model_loading)


def test_push_without_credentials_fails_before_training(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    with pytest.raises(ValueError, match="--push_to_hub needs Hub credentials"):
        train_drpo.parse_args(args_for(tmp_path, "--push_to_hub"))


@pytest.mark.parametrize("function,message", [("wrong_count", "returned 3 scores for 4 images"),
                                              ("not_a_number", "non-finite")])
def test_bad_reward_output_stops_at_the_first_call(tmp_path, function, message):
    args = train_drpo.parse_args(args_for(tmp_path, f"--reward={REWARDS}:{function}"))
    with pytest.raises(drpo_utils.RewardError, match=message):
        train_drpo.main(args)


def test_reward_is_called_without_gradients_on_cpu_images(tmp_path):
    args = train_drpo.parse_args(args_for(tmp_path, f"--reward={REWARDS}:requires_no_grad"))
    train_drpo.main(args)
    assert os.path.isfile(tmp_path / "pytorch_lora_weights.safetensors")


def test_push_to_hub_creates_repo_first_and_uploads_the_lora(tmp_path, monkeypatch):
    calls = []

    def fake_create_repo(repo_id, exist_ok=False, token=None, **kwargs):
        calls.append(("create", repo_id, token, os.path.exists(tmp_path / "pytorch_lora_weights.safetensors")))
        return type("RepoUrl", (), {"repo_id": f"someone/{repo_id}"})()

    def fake_upload_folder(repo_id, folder_path, ignore_patterns=None, token=None, **kwargs):
        calls.append(("upload", repo_id, sorted(os.listdir(folder_path)), ignore_patterns))

    monkeypatch.setattr("huggingface_hub.create_repo", fake_create_repo)
    monkeypatch.setattr("huggingface_hub.upload_folder", fake_upload_folder)
    args = train_drpo.parse_args(args_for(tmp_path, "--push_to_hub", "--hub_token=hf_fake", "--hub_model_id=drpo-tiny",
                                          "--reward=color_match", "--checkpointing_steps=1"))
    train_drpo.main(args)
    assert calls[0] == ("create", "drpo-tiny", "hf_fake", False)  # created before any training output
    kind, repo_id, files, ignore = calls[1]
    assert kind == "upload" and repo_id == "someone/drpo-tiny"
    assert {"pytorch_lora_weights.safetensors", "README.md", "samples_before_after.png"} <= set(files)
    assert "checkpoint-*" in ignore
    card = (tmp_path / "README.md").read_text()
    assert "base_model:" in card and "samples_before_after.png" in card and "load_lora_weights" in card


def test_saved_lora_loads_into_a_stock_pipeline_with_the_right_scale(tmp_path):
    """rank 4, alpha 8: the alpha travels in the adapter metadata; without it the output changes."""
    pipe = AutoPipelineForText2Image.from_pretrained(build_random_pipeline(str(tmp_path / "model")))
    pipe.set_progress_bar_config(disable=True)
    args = train_drpo.parse_args(args_for(tmp_path, "--rank=4", "--lora_alpha=8"))
    drpo_utils.add_lora(pipe.unet, args)
    torch.manual_seed(0)
    for name, param in pipe.unet.named_parameters():
        if "lora_B" in name:
            param.data.normal_(std=0.05)
    prompt, seed = "a small red circle on the left", 7
    from pipelines.one_step import initial_noise

    condition = drpo_utils.encode_prompts_sd(pipe, [prompt], "cpu")
    with torch.no_grad():
        trained = drpo_utils.one_step_latents(pipe.unet, copy.deepcopy(pipe.scheduler), initial_noise(pipe, seed, 64, 64),
                                              condition)
    lora_dir = tmp_path / "lora"
    drpo_utils.save_lora(str(lora_dir), pipe.unet, StableDiffusionPipeline)
    with safe_open(str(lora_dir / "pytorch_lora_weights.safetensors"), "pt") as handle:
        metadata = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert metadata["unet.lora_alpha"] == 8 and metadata["unet.r"] == 4

    def stock_latents(lora_path):
        fresh = AutoPipelineForText2Image.from_pretrained(str(tmp_path / "model"))
        fresh.set_progress_bar_config(disable=True)
        if lora_path is not None:
            fresh.load_lora_weights(lora_path)
        return fresh(prompt, num_inference_steps=1, guidance_scale=0.0, height=64, width=64, output_type="latent",
                     generator=torch.Generator().manual_seed(seed)).images

    torch.testing.assert_close(stock_latents(str(lora_dir)), trained, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(stock_latents(None), trained, atol=1e-3)
    stripped = tmp_path / "stripped"
    stripped.mkdir()
    save_file(load_file(str(lora_dir / "pytorch_lora_weights.safetensors")), str(stripped / "pytorch_lora_weights.safetensors"))
    assert not torch.allclose(stock_latents(str(stripped)), trained, atol=1e-4)  # alpha lost -> wrong scale
