"""Bad input stops early with a clear message; LoRA files load with the right scale; Hub push (faked)."""

import argparse
import copy
import json
import os
import re

import pytest
import torch
from conftest import PROMPTS, ROOT, TINY_SD, TINY_SDXL, build_random_pipeline
from diffusers import AutoPipelineForText2Image, StableDiffusionPipeline, StableDiffusionXLPipeline
from huggingface_hub import ModelCard
from huggingface_hub.errors import RemoteEntryNotFoundError
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import drpo_utils
import train_drpo
import train_drpo_sdxl
from pipelines import hub, lora_files
from pipelines.config import AdapterConfig, HubConfig
from pipelines.rewards import RewardError

SCRIPTS = {"sd": (train_drpo, TINY_SD), "sdxl": (train_drpo_sdxl, TINY_SDXL)}

REWARDS = os.path.join(ROOT, "tests", "data", "rewards.py")


def args_for(tmp_path, *extra, model=TINY_SD):
    return [
        f"--pretrained_model_name_or_path={model}", f"--prompts_file={PROMPTS}", f"--output_dir={tmp_path}",
        "--reward=color_match", "--resolution=64", "--num_candidates=4", "--num_pairs=3", "--seed=0", "--report_to=none",
        "--validation_steps=0", "--num_validation_seeds=1", "--max_train_steps=1", "--feature_extractor=image", *extra,
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
        (["--reward=missing_file.py:score"], ValueError, "missing_file.py"),
        ([f"--reward={REWARDS}:no_such_function"], ValueError, "no_such_function"),
        (["--feature_extractor=dino"], ValueError, "choose one of latent_mae, latent_mae1, latent_mae2, latent_mae3, latent, image"),
        (["--num_candidates=1"], ValueError, "at least 2"),
        (["--num_candidates=4", "--num_pairs=7"], ValueError, r"\[1, 6\]"),
        (["--resume_from_checkpoint=checkpoint-99"], FileNotFoundError, "checkpoint-99"),
        (["--mixed_precision=fp16"], ValueError, "bf16"),
    ],
)
@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_arguments_fail_in_parse_args(tmp_path, extra, error, message, script):
    if "fp16" in extra[0] and torch.cuda.is_available():
        pytest.skip("fp16 is valid on a GPU")
    module, model = SCRIPTS[script]
    with pytest.raises(error, match=message):
        module.parse_args(args_for(tmp_path, *extra, model=model))


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


@pytest.mark.parametrize("script", SCRIPTS)
def test_push_without_credentials_fails_before_training(tmp_path, monkeypatch, script):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # online, but no token
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    module, model = SCRIPTS[script]
    with pytest.raises(ValueError, match="--push_to_hub needs Hub credentials"):
        module.parse_args(args_for(tmp_path, "--push_to_hub", model=model))


@pytest.mark.parametrize("function,message", [("wrong_count", "returned 3 scores for 4 images"),
                                              ("not_a_number", "non-finite")])
def test_bad_reward_output_stops_at_the_first_call(tmp_path, function, message):
    args = train_drpo.parse_args(args_for(tmp_path, f"--reward={REWARDS}:{function}"))
    with pytest.raises(RewardError, match=message):
        train_drpo.main(args)


def test_reward_is_called_without_gradients_on_cpu_images(tmp_path):
    args = train_drpo.parse_args(args_for(tmp_path, f"--reward={REWARDS}:requires_no_grad"))
    train_drpo.main(args)
    assert os.path.isfile(tmp_path / "pytorch_lora_weights.safetensors")


def no_readme(repo_id, filename, token=None, **kwargs):
    """What hf_hub_download raises for a repository without that file (a 404 from the Hub)."""
    error = RemoteEntryNotFoundError.__new__(RemoteEntryNotFoundError)  # its constructor wants an HTTP response
    Exception.__init__(error, f"{repo_id} has no {filename}")
    raise error


@pytest.mark.parametrize("script,method", [("sd", "drpo"), ("sdxl", "drpo"), ("sd", "draft")])
def test_push_to_hub_creates_repo_first_and_uploads_the_lora(tmp_path, monkeypatch, script, method):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the fake Hub client below answers
    calls = []

    def fake_create_repo(repo_id, exist_ok=False, token=None, **kwargs):
        calls.append(("create", repo_id, token, os.path.exists(tmp_path / "pytorch_lora_weights.safetensors")))
        return type("RepoUrl", (), {"repo_id": f"someone/{repo_id}"})()

    def fake_upload_folder(repo_id, folder_path, ignore_patterns=None, token=None, **kwargs):
        calls.append(("upload", repo_id, sorted(os.listdir(folder_path)), ignore_patterns))

    def no_card_yet(repo_id, filename, token=None, **kwargs):
        calls.append(("card", repo_id, filename))
        no_readme(repo_id, filename)

    monkeypatch.setattr("huggingface_hub.create_repo", fake_create_repo)
    monkeypatch.setattr("huggingface_hub.upload_folder", fake_upload_folder)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", no_card_yet)
    module, model = SCRIPTS[script]
    reward = f"--reward={REWARDS}:brightness" if method == "draft" else "--reward=color_match"
    args = module.parse_args(args_for(tmp_path, "--push_to_hub", "--hub_token=hf_fake", "--hub_model_id=drpo-tiny",
                                      reward, "--checkpointing_steps=1", f"--method={method}", model=model))
    train_drpo.main(args, encode_prompts=module.encode_prompts, load_pipeline=module.load_pipeline)
    assert calls[0] == ("create", "drpo-tiny", "hf_fake", False)  # created before any training output
    assert calls[1] == ("card", "someone/drpo-tiny", "README.md")  # a card already there would be kept
    kind, repo_id, files, ignore = calls[2]
    assert kind == "upload" and repo_id == "someone/drpo-tiny"
    assert {"pytorch_lora_weights.safetensors", "README.md", "samples_before_after.png"} <= set(files)
    assert "checkpoint-*" in ignore
    card = (tmp_path / "README.md").read_text()
    assert "samples_before_after.png" in card and "load_lora_weights" in card and f"method `{method}`" in card
    assert "base_model:" not in card  # a local folder is no Hub id (the Hub would reject it)
    assert "widget:" in card and "samples/prompt_0.png" in card and (tmp_path / "samples" / "prompt_0.png").is_file()
    family = "stable-diffusion-xl" if script == "sdxl" else "stable-diffusion"
    assert {"text-to-image", "diffusers-training", "lora", "template:sd-lora", family, f"{family}-diffusers"} <= set(
        re.findall(r"^- (\S+)$", card, re.M))


EXISTING_CARD = """---
license: mit
tags:
- my-tag
- lora
---

# My LoRA

Words the owner wrote.
"""


def test_an_existing_hub_card_is_kept_and_extended(tmp_path, monkeypatch):
    """Its text, licence and tags stay; ours join; our section is added once and replaced on the next push."""
    ours = (f"---\nlicense: other\nlicense_name: sai-nc-community\nbase_model: stabilityai/sd-turbo\n"
            f"tags:\n- lora\n- drpo\n---\n{hub.CARD_START}\n\n# DrPO LoRA, run 1\n{hub.CARD_END}\n")
    merged = hub.merge_model_cards(EXISTING_CARD, ours)
    card = ModelCard(merged)
    assert card.data.license == "mit" and card.data.license_name == "sai-nc-community"
    assert card.data.base_model == "stabilityai/sd-turbo" and card.data.tags == ["my-tag", "lora", "drpo"]
    assert "# My LoRA\n\nWords the owner wrote." in card.text and card.text.count("DrPO LoRA, run 1") == 1
    again = hub.merge_model_cards(merged, ours.replace("run 1", "run 2"))
    assert "run 1" not in again and again.count("run 2") == 1 and "Words the owner wrote." in again
    # through the push path: the Hub's README.md is downloaded and the folder's card rewritten before the upload
    (tmp_path / "README.md").write_text(ours)
    existing = tmp_path / "hub-readme.md"
    existing.write_text(EXISTING_CARD)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", lambda repo_id, filename, token=None: str(existing))
    hub.extend_existing_card(HubConfig(), str(tmp_path), "someone/drpo")
    assert (tmp_path / "README.md").read_text() == merged


def test_an_unreadable_hub_card_is_never_overwritten(tmp_path, monkeypatch):
    (tmp_path / "README.md").write_text("ours")

    def hub_down(repo_id, filename, token=None):
        raise ConnectionError("the Hub is down")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", hub_down)
    with pytest.raises(RuntimeError, match="could not read the model card someone/drpo already has .*hf upload"):
        hub.extend_existing_card(HubConfig(), str(tmp_path), "someone/drpo")


def test_model_card_lists_hub_datasets_not_local_folders(tmp_path):
    from pipelines import report

    for dataset, listed in (("someone/prompts", ["someone/prompts"]), (str(tmp_path), None)):
        args = train_drpo.parse_args([f"--pretrained_model_name_or_path={TINY_SD}", "--reward=color_match",
                                      f"--dataset_name={dataset}", f"--output_dir={tmp_path / 'run'}"])
        os.makedirs(tmp_path / "run", exist_ok=True)
        report.write_model_card(train_drpo.build_config(args), None, {})
        assert ModelCard.load(tmp_path / "run" / "README.md").data.datasets == listed


def test_model_card_names_the_base_models_licence():
    assert hub.base_model_licence("stabilityai/sd-turbo") == (  # offline: the table
        "other", "sai-nc-community", "https://huggingface.co/stabilityai/sd-turbo/blob/main/LICENSE.md")
    assert hub.base_model_licence(None) == ("other", None, None)
    assert hub.family_tags(StableDiffusionXLPipeline) == ["stable-diffusion-xl", "stable-diffusion-xl-diffusers"]


def test_model_card_base_model_is_a_hub_id_or_nothing(tmp_path):
    assert hub.hub_base_model("stabilityai/sd-turbo") == "stabilityai/sd-turbo"
    snapshot = tmp_path / "hub" / "models--stabilityai--sdxl-turbo" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert hub.hub_base_model(str(snapshot)) == "stabilityai/sdxl-turbo"
    assert hub.hub_base_model(TINY_SD) is None


@pytest.mark.parametrize("architecture,pipeline_cls,encode", [
    ("sd-turbo", StableDiffusionPipeline, drpo_utils.encode_prompts_sd),
    ("sdxl-turbo", StableDiffusionXLPipeline, drpo_utils.encode_prompts_sdxl),
])
def test_saved_lora_loads_into_a_stock_pipeline_with_the_right_scale(tmp_path, architecture, pipeline_cls, encode):
    """rank 4, alpha 8: the alpha travels in the adapter metadata; without it the output changes."""
    pipe = AutoPipelineForText2Image.from_pretrained(
        build_random_pipeline(str(tmp_path / "model"), architecture=architecture))
    assert isinstance(pipe, pipeline_cls)
    pipe.set_progress_bar_config(disable=True)
    lora_files.add_lora(pipe.unet, AdapterConfig(rank=4, lora_alpha=8))
    torch.manual_seed(0)
    for name, param in pipe.unet.named_parameters():
        if "lora_B" in name:
            param.data.normal_(std=0.05)
    prompt, seed = "a small red circle on the left", 7
    from pipelines.inference import initial_noise

    condition = encode(pipe, [prompt], "cpu", 64)
    with torch.no_grad():
        trained = drpo_utils.one_step_latents(pipe.unet, copy.deepcopy(pipe.scheduler), initial_noise(pipe, seed, 64, 64),
                                              condition)
    lora_dir = tmp_path / "lora"
    lora_files.save_lora(str(lora_dir), pipe.unet, pipeline_cls)
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

    # the same weights through the same float32 UNet: measured 0; 1e-4 leaves room for another op order, while
    # no LoRA (7.2) or a lost alpha (4.3) move the latents by O(1) (measured)
    torch.testing.assert_close(stock_latents(str(lora_dir)), trained, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(stock_latents(None), trained, atol=1e-3)
    stripped = tmp_path / "stripped"
    stripped.mkdir()
    save_file(load_file(str(lora_dir / "pytorch_lora_weights.safetensors")), str(stripped / "pytorch_lora_weights.safetensors"))
    assert not torch.allclose(stock_latents(str(stripped)), trained, atol=1e-4)  # alpha lost -> wrong scale


def test_sdxl_defaults_to_pixel_mae_and_trains_with_local_weights(tmp_path):
    from test_features import tiny_vit_mae

    defaults = train_drpo_sdxl.parse_args(["--pretrained_model_name_or_path=x", f"--prompts_file={PROMPTS}",
                                           "--reward=color_match"])
    assert defaults.feature_extractor == "vit_mae" and defaults.resolution is None  # None: the model's own
    weights = tiny_vit_mae(tmp_path / "vit-mae")
    args = train_drpo_sdxl.parse_args(args_for(tmp_path / "out", "--feature_extractor=vit_mae",
                                               f"--feature_extractor_path={weights}", "--gradient_checkpointing",
                                               model=TINY_SDXL))
    train_drpo.main(args, encode_prompts=train_drpo_sdxl.encode_prompts, load_pipeline=train_drpo_sdxl.load_pipeline)
    history = (tmp_path / "out" / "reward_history.jsonl").read_text()
    assert "drift_norm_pref/patch_2x2" in history and os.path.isfile(tmp_path / "out" / "pytorch_lora_weights.safetensors")


def test_missing_feature_weights_fail_before_the_model_loads(tmp_path):
    args = train_drpo.parse_args(args_for(tmp_path, "--feature_extractor=vit_mae",
                                          f"--feature_extractor_path={tmp_path / 'nowhere'}"))
    with pytest.raises(OSError, match="--feature_extractor .*nowhere': no such file or folder"):
        train_drpo.main(args, load_pipeline=no_model_loading)
    # a Hub id that is not cached, with HF_HUB_OFFLINE set (the tests' setting): at once, naming the flag
    args = train_drpo.parse_args(args_for(tmp_path, "--feature_extractor=vit_mae"))
    with pytest.raises(OSError, match="--feature_extractor needs 'facebook/vit-mae-base' from the Hub, which is not in "
                                      "the local cache, and HF_HUB_OFFLINE is set"):
        train_drpo.main(args, load_pipeline=no_model_loading)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_has_help_and_help_shows_every_default(script):
    module, _ = SCRIPTS[script]
    parser = module.build_parser()
    text = " ".join(parser.format_help().split())
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help, f"{action.option_strings[0]} has no help text"
        if not action.required:
            assert f"(default: {action.default})" in text, action.option_strings[0]


@pytest.mark.parametrize("script", SCRIPTS)
def test_resolution_defaults_to_the_models_own(tmp_path, monkeypatch, script):
    module, model = SCRIPTS[script]
    seen = {}

    def stop_at_pipeline(args, weight_dtype):
        seen["resolution"] = args.resolution
        raise KeyboardInterrupt

    args = module.parse_args([a for a in args_for(tmp_path, model=model) if not a.startswith("--resolution")])
    assert args.resolution is None
    with pytest.raises(KeyboardInterrupt):
        train_drpo.main(args, load_pipeline=stop_at_pipeline)
    assert seen["resolution"] == 64  # tiny models: sample_size 16 x VAE factor 4


@pytest.mark.parametrize("resolution", ["60", "36"])  # 0 and negative: refused by the parser (test_flags.py)
def test_bad_resolution_fails_before_the_model_loads(tmp_path, resolution):
    args = train_drpo.parse_args(args_for(tmp_path, f"--resolution={resolution}"))
    with pytest.raises(ValueError, match="--resolution must be a positive multiple of 8"):
        train_drpo.main(args, load_pipeline=no_model_loading)


def test_memory_check_warns_before_the_first_step_when_k_and_resolution_do_not_fit(tmp_path, monkeypatch, caplog):
    """The tiny model at 512 px with K = 24 needs ~40 GB for backward: say so (and what to lower) before step 1."""
    def first_step(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_drpo, "optimisation_step", first_step)
    args = train_drpo.parse_args(args_for(tmp_path, "--num_candidates=24", "--num_pairs=12") + ["--resolution=512"])
    with caplog.at_level("WARNING", logger="pipelines.memory"), pytest.raises(KeyboardInterrupt):
        train_drpo.main(args)
    warning = " ".join(r.getMessage() for r in caplog.records if r.name == "pipelines.memory")
    assert "--resolution 512 with 24 candidates" in warning and "Lower --resolution (this model's own is 64)" \
        in warning and "--candidate_chunk_size" in warning, warning


def test_memory_check_is_quiet_when_the_step_fits(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(train_drpo, "optimisation_step", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    args = train_drpo.parse_args(args_for(tmp_path))
    with caplog.at_level("WARNING", logger="pipelines.memory"), pytest.raises(KeyboardInterrupt):
        train_drpo.main(args)
    assert not [r for r in caplog.records if r.name == "pipelines.memory"]


def test_saved_activations_grow_with_the_latent_area():
    from pipelines.memory import saved_activation_bytes

    layer = torch.nn.Conv2d(4, 8, 3, padding=1).requires_grad_(True)
    small = saved_activation_bytes(lambda: layer(torch.randn(1, 4, 16, 16)).relu())
    large = saved_activation_bytes(lambda: layer(torch.randn(1, 4, 32, 32)).relu())
    weight = layer.weight.numel() * 4
    assert small == 4 * 16 * 16 * 4 + weight + 8 * 16 * 16 * 4  # conv input and weight, relu output (float32)
    assert large - weight == 4 * (small - weight)


def test_saved_activation_peak_counts_what_is_alive_not_what_was_ever_saved():
    from pipelines.memory import SavedActivationPeak

    x = torch.randn(1000, requires_grad=True)
    with SavedActivationPeak() as whole:
        x.sin().sin().sum().backward()  # sin saves its input: x, then sin(x), both alive until backward
    with SavedActivationPeak() as chunked:
        for part in x.split(250):  # four graphs of a quarter each, each freed by its backward
            part.sin().sin().sum().backward()
    assert whole.bytes == 2 * 1000 * 4 and chunked.bytes == 2 * 250 * 4 and chunked.alive == 0



def test_no_secret_reaches_the_tracker_files_and_the_diffusers_flags_reach_their_objects(tmp_path, monkeypatch):
    """A planted --hub_token appears in no file the run writes (TensorBoard's event files included), a
    credential in a reward URL is masked in the tracker config; --lr_num_cycles (--lr_power's default),
    --lora_dropout and --tracker_project_name reach the scheduler, the LoRA and the trackers."""
    from accelerate import Accelerator
    from peft import LoraConfig

    planted, secret = "hf_PLANTEDtoken123", "s3cretVALUE"
    seen = {}
    import diffusers.optimization

    original_scheduler, original_init = diffusers.optimization.get_scheduler, Accelerator.init_trackers
    monkeypatch.setattr(diffusers.optimization, "get_scheduler",
                        lambda *a, **k: seen.update(k) or original_scheduler(*a, **k))
    monkeypatch.setattr(Accelerator, "init_trackers", lambda self, name, config=None, **k: seen.update(
        project=name, config=config) or original_init(self, name, config=config, **k))
    monkeypatch.setattr(LoraConfig, "__post_init__", lambda self, original=LoraConfig.__post_init__: seen.update(
        dropout=self.lora_dropout) or original(self))
    monkeypatch.setattr("huggingface_hub.create_repo", lambda repo_id, **kwargs: type("Repo", (), {"repo_id": repo_id}))
    monkeypatch.setattr("huggingface_hub.upload_folder", lambda **kwargs: None)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", no_readme)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)  # the fake Hub client above answers
    args = train_drpo.parse_args(args_for(tmp_path, "--push_to_hub", f"--hub_token={planted}", "--report_to=tensorboard",
                                          "--lr_scheduler=cosine_with_restarts", "--lr_num_cycles=3",
                                          "--lora_dropout=0.1", "--tracker_project_name=mine",
                                          "--output_kohya_format"))
    train_drpo.main(args)
    assert (tmp_path / lora_files.KOHYA_FILE).is_file()
    assert (seen["num_cycles"], seen["power"], seen["dropout"], seen["project"]) == (3, 1.0, 0.1, "mine")
    assert "hub_token" not in seen["config"] and seen["config"]["lr_num_cycles"] == 3
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert any("events.out.tfevents" in path.name for path in written)  # the tracker did write
    assert not [path for path in written if planted.encode() in path.read_bytes()]
    masked = hub.public_config(train_drpo.build_config(argparse.Namespace(
        **{**vars(args), "reward": f"http://u:{secret}@h:1/s?token={secret}"})))
    assert secret not in json.dumps(masked) and masked["reward"] == "http://***@h:1/s?token=***"


def test_an_offline_push_is_refused_at_start_up_in_one_line(tmp_path):
    with pytest.raises(ValueError, match="--push_to_hub uploads to the Hub, but HF_HUB_OFFLINE is set"):
        train_drpo.parse_args(args_for(tmp_path, "--push_to_hub", "--hub_token=hf_x"))  # conftest: offline


def test_wandb_with_a_hub_token_and_8bit_adam_without_a_gpu_are_refused(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(ValueError, match="would upload the token"):
        train_drpo.parse_args(args_for(tmp_path, "--push_to_hub", "--hub_token=hf_x", "--report_to=wandb"))
    with pytest.raises((ImportError, ValueError), match="bitsandbytes|needs a GPU"):
        train_drpo.parse_args(args_for(tmp_path, "--use_8bit_adam"))


def test_the_kohya_file_holds_the_same_lora_under_kohyas_names(tmp_path):
    """--output_kohya_format: every LoRA matrix under lora_unet_<module>.lora_down/.lora_up, with the run's
    alpha (not the rank diffusers' converter writes: alpha 8 at rank 4 is a scale of 2)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(TINY_SD, subfolder="unet")
    lora_files.add_lora(unet, AdapterConfig(rank=4, lora_alpha=8))
    torch.manual_seed(0)
    for name, parameter in unet.named_parameters():
        if "lora_B" in name:  # a trained-looking LoRA (a fresh one is zero: every file would give the base images)
            parameter.data.normal_(0, 0.2)
    lora_files.save_lora(str(tmp_path), unet, StableDiffusionPipeline)
    kohya_path = lora_files.save_kohya_lora(str(tmp_path), alpha=8, base_model_version="sd_v2")
    kohya = load_file(kohya_path)
    ours = load_file(tmp_path / "pytorch_lora_weights.safetensors")
    with safe_open(kohya_path, "pt") as handle:
        assert {k: v for k, v in handle.metadata().items() if k != "ss_training_comment"} == {
            "ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "8",
            "ss_base_model_version": "sd_v2", "ss_v2": "True"}
    assert lora_files.kohya_base_model_version(StableDiffusionPipeline, 1024) == "sd_v2"
    assert lora_files.kohya_base_model_version(StableDiffusionXLPipeline, 2048) == "sdxl_base_v1-0"
    assert all(key.startswith("lora_unet_") for key in kohya)
    downs = {k: v for k, v in kohya.items() if k.endswith(".lora_down.weight")}
    assert len(downs) == len(ours) // 2 == sum(k.endswith(".alpha") for k in kohya)
    assert all(kohya[k.replace(".lora_down.weight", ".alpha")].item() == 8 for k in downs)
    ours_down = sorted(v.sum().item() for k, v in ours.items() if "lora_A" in k or "lora.down" in k)
    assert ours_down == pytest.approx(sorted(v.sum().item() for v in downs.values()))  # the same tensors: measured 0
    # diffusers' load_lora_weights reads the kohya file into the same images as the diffusers file
    pipe = StableDiffusionPipeline.from_pretrained(TINY_SD, safety_checker=None)
    images = []
    for weights in (kohya_path, str(tmp_path / "pytorch_lora_weights.safetensors"), None):
        if weights is not None:
            pipe.load_lora_weights(weights)
        images.append(pipe("a large red circle in the center", num_inference_steps=1, guidance_scale=0.0,
                           generator=torch.Generator().manual_seed(0), output_type="pt").images)
        pipe.unload_lora_weights()
    torch.testing.assert_close(images[0], images[1])
    assert (images[1] - images[2]).abs().max() > 0.01  # and the LoRA does change them


def test_a_reward_that_ties_every_candidate_stops_the_run_naming_it(tmp_path):
    """Without a ranking nothing is learnt: after --max_tied_steps steps of all-tied prompts the run stops with
    a message naming the reward and the score, and leaves no staging file or half checkpoint behind."""
    args = train_drpo.parse_args(args_for(tmp_path, f"--reward={REWARDS}:constant", "--max_train_steps=20",
                                          "--max_tied_steps=3", "--checkpointing_steps=2"))
    with pytest.raises(RewardError, match=r"tied all K=4 candidates of every prompt for 3 consecutive steps .*"
                                          r"every candidate scored 0.5.*--max_tied_steps"):
        train_drpo.main(args)
    history = [json.loads(line) for line in (tmp_path / "reward_history.jsonl").read_text().splitlines()]
    assert [row["tied"] for row in history] == [1.0, 1.0]  # saved with checkpoint-2; step 3 stopped the run
    leftovers = [p.name for p in tmp_path.rglob("*") if p.name.endswith((".tmp", ".deleting")) or ".tmp" in p.name]
    assert leftovers == [] and sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]
    resumed = train_drpo.parse_args(args_for(tmp_path, f"--reward={REWARDS}:constant", "--max_train_steps=20",
                                             "--max_tied_steps=3", "--checkpointing_steps=2",
                                             "--resume_from_checkpoint=latest"))
    with pytest.raises(AssertionError, match="the model was loaded"):  # unlocked and whole: a resume gets that far
        train_drpo.main(resumed, load_pipeline=no_model_loading)


def test_a_prompt_tied_now_and_then_is_a_logged_skip(tmp_path):
    args = train_drpo.parse_args(args_for(tmp_path, "--reward=color_match", "--max_train_steps=2",
                                          "--max_tied_steps=1"))
    train_drpo.main(args)  # the tiny prompts all name a colour: their candidates differ
    history = [json.loads(line) for line in (tmp_path / "reward_history.jsonl").read_text().splitlines()]
    assert [row["tied"] for row in history] == [0.0, 0.0]


def test_an_unreachable_hub_fails_at_once_naming_what_is_missing(tmp_path, monkeypatch):
    """Online but without a network: one probe (refused at once here), then a message, not minutes of retries."""
    from huggingface_hub import constants

    from pipelines import downloads

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    downloads.hub_reachable.cache_clear()
    args = train_drpo.parse_args(args_for(tmp_path, "--reward=pickscore"))
    try:
        with pytest.raises(OSError, match=r"--reward needs 'yuvalkirstain/PickScore_v1' from the Hub, which is not in "
                                          r"the local cache, and the Hub cannot be reached.*HF_HUB_OFFLINE=1"):
            train_drpo.main(args, load_pipeline=no_model_loading)
    finally:
        downloads.hub_reachable.cache_clear()


def test_init_lora_starts_a_new_run_from_a_lora_and_refuses_another_rank(tmp_path):
    """--init_lora: the new run's adapter starts as the given LoRA (after one step at a negligible learning
    rate it is still that LoRA, not a fresh one), recorded in run.json and the card; a rank mismatch is
    refused naming the flags to pass."""
    first, second = tmp_path / "first", tmp_path / "second"
    train_drpo.main(train_drpo.parse_args(args_for(first, "--max_train_steps=2", "--rank=4", "--learning_rate=1e-2")))
    train_drpo.main(train_drpo.parse_args(args_for(second, "--max_train_steps=1", "--rank=4", "--learning_rate=1e-12",
                                                   f"--init_lora={first}", "--checkpointing_steps=1")))
    start, after = (load_file(folder / "pytorch_lora_weights.safetensors") for folder in (first, second))
    assert start.keys() == after.keys()
    for key in start:
        torch.testing.assert_close(after[key], start[key], atol=1e-6, rtol=0)
    assert any(value.abs().max() > 1e-3 for key, value in start.items() if ".up." in key)  # a trained LoRA, not zero
    assert json.loads((second / "checkpoint-1" / "run.json").read_text())["init_lora"] == str(first)
    assert f"starting from the LoRA `{first}`" in (second / "README.md").read_text()
    with pytest.raises(ValueError, match=r"is a LoRA of --rank=4 --lora_alpha=4, this run's is --rank=8 "
                                         r"--lora_alpha=8: pass --rank=4 --lora_alpha=4"):
        train_drpo.main(train_drpo.parse_args(args_for(tmp_path / "third", "--rank=8", f"--init_lora={first}")))
    with pytest.raises(FileNotFoundError, match="--init_lora"):
        train_drpo.parse_args(args_for(tmp_path / "fourth", f"--init_lora={tmp_path / 'missing'}"))


@pytest.mark.parametrize("variable,mode", [("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"), ("ACCELERATE_USE_FSDP", "FSDP")])
def test_a_deepspeed_or_fsdp_launch_is_refused_before_any_model_loads(tmp_path, monkeypatch, variable, mode):
    """What `accelerate launch` sets from a DeepSpeed / FSDP config: refused in one message, DDP named."""
    monkeypatch.setenv(variable, "true")
    with pytest.raises(ValueError, match=f"selects {mode}; this trainer supports DDP"):
        train_drpo.main(train_drpo.parse_args(args_for(tmp_path)), load_pipeline=no_model_loading)


@pytest.mark.parametrize("extra,warned", [([], True), (["--pairing=random"], False), (["--drift_preset=paper"], False),
                                          (["--method=dpo"], False)])
def test_an_unused_pair_count_is_named(tmp_path, caplog, extra, warned):
    """The default top / bottom split takes K/2 a side: a given --num_pairs would change nothing, and the
    run says so at start-up (random pairs, the paper preset and DPO use M)."""
    with caplog.at_level("WARNING", logger="pipelines.cli"):
        train_drpo.parse_args(args_for(tmp_path, *extra))
    assert ("--num_pairs 3 has no effect" in caplog.text) == warned
