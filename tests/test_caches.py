"""Every cache the project writes is keyed by content and checked for damage: a LoRA replaced at the same
path is evaluated anew, a damaged image or feature shard is named and rebuilt, an interrupted build's
staging folder is removed."""

import logging
import os
from pathlib import Path

import pytest
import torch
from conftest import PROMPTS, TINY_SD, reset_accelerate_state

from pipelines import content, eval_cache, evaluate, lora_files, preference_data
from pipelines.config import AdapterConfig

BRIGHTNESS = "benchmarks.rewards:brightness"


def random_lora(folder, seed: int) -> str:
    """A rank-4 LoRA with random (non-zero) B matrices, saved as a run saves it."""
    from pipelines.inference import load_one_step_pipeline

    pipe = load_one_step_pipeline(TINY_SD)
    lora_files.add_lora(pipe.unet, AdapterConfig(rank=4, lora_alpha=4))
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in pipe.unet.named_parameters():
        if "lora_B" in name:
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.05
    lora_files.save_lora(str(folder), pipe.unet, type(pipe))
    return str(folder)


def evaluate_lora(lora, output, cache, capsys) -> tuple[dict, int]:
    """``python -m pipelines.evaluate`` on 2 prompts x 2 seeds: (metrics.json, images it generated)."""
    reset_accelerate_state()
    result = evaluate.main([f"--pretrained_model_name_or_path={TINY_SD}", f"--lora=mine={lora}",
                            f"--prompts_file={PROMPTS}", "--max_prompts=2", "--seeds=0-1", f"--metrics={BRIGHTNESS}",
                            f"--image_cache_dir={cache}", f"--output_dir={output}", "--bootstrap=20"])
    reset_accelerate_state()
    generated = int(capsys.readouterr().err.split("generated ")[-1].split(" images")[0])
    return result, generated


def test_a_lora_replaced_at_the_same_path_is_evaluated_anew(tmp_path, capsys, caplog):
    lora, cache = tmp_path / "lora", tmp_path / "images"
    random_lora(lora, seed=1)
    first, generated = evaluate_lora(lora, tmp_path / "first", cache, capsys)
    assert generated == 8  # 2 models x 2 prompts x 2 seeds
    assert evaluate_lora(lora, tmp_path / "again", cache, capsys)[1] == 0  # unchanged: all read from the cache
    random_lora(lora, seed=2)  # another LoRA, same path (a run retrained into the same folder)
    second, generated = evaluate_lora(lora, tmp_path / "second", cache, capsys)
    assert generated == 4  # the LoRA's images again; the base model's are still valid
    mean = (lambda result: result["metrics"]["brightness"]["mine"]["mean"])
    assert mean(second) != mean(first)

    model = eval_cache.EvalModel("mine", "lora", str(lora))
    prompt = [line.strip() for line in open(PROMPTS)][0]
    png = Path(eval_cache.ImageCache(str(cache), TINY_SD, None, "no").path(model, prompt, 0))  # as the run keys it
    png.write_bytes(png.read_bytes()[: len(png.read_bytes()) // 2])  # cut short
    with caplog.at_level(logging.WARNING, logger="pipelines.eval_cache"):
        third, generated = evaluate_lora(lora, tmp_path / "third", cache, capsys)
    assert generated == 1 and f"cached image {png} is damaged" in caplog.text
    # the same image generated again, alone rather than beside its other seed: batch-size float noise can
    # flip PNG rounding, at most 1/255 per pixel, so brightness means move <= 1/255 (measured 8e-8)
    assert mean(third) == pytest.approx(mean(second), abs=1 / 255)


def test_an_altered_image_fails_its_checksum():
    import numpy as np
    from PIL import Image, PngImagePlugin

    pixels = np.zeros((4, 4, 3), np.uint8)
    info = PngImagePlugin.PngInfo()
    info.add_text(eval_cache.PIXELS_KEY, eval_cache.pixel_digest(pixels))
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "x.png")
        Image.fromarray(pixels).save(path, pnginfo=info)
        assert eval_cache.ImageCache.read(path) is not None
        pixels[0, 0, 0] = 1  # same header, other pixels
        Image.fromarray(pixels).save(path, pnginfo=info)
        assert eval_cache.ImageCache.read(path) is None


def test_content_keys_follow_bytes_not_paths(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "w.safetensors").write_bytes(b"one")
    key = content.source_key(str(tmp_path / "a"))
    (tmp_path / "a" / "w.safetensors").write_bytes(b"two")
    assert content.source_key(str(tmp_path / "a")) != key
    big = tmp_path / "big.bin"
    with open(big, "wb") as handle:  # over the full-hash limit: size, mtime and both ends
        handle.truncate(content.FULL_HASH_LIMIT + 1)
    before = content.file_key(str(big))
    with open(big, "r+b") as handle:
        handle.write(b"x")
    assert content.file_key(str(big)) != before


# ---------------------------------------------------------------------------------------------
# The offline feature cache
# ---------------------------------------------------------------------------------------------


def offline_run(tmp_path, name, data, cache):
    from test_offline import offline_args
    from test_train import train

    train("train_drpo.py", *offline_args(TINY_SD, tmp_path / name, data, cache, "--max_train_steps=2",
                                         "--num_validation_seeds=1"))


@pytest.fixture(scope="module")
def preference_set(tmp_path_factory):
    from benchmarks.offline import build_preference_set
    from conftest import ROOT

    prompts = [line.strip() for line in open(PROMPTS)][:2]
    return build_preference_set(str(tmp_path_factory.mktemp("pairs")), prompts, 2,
                                reward=f"{ROOT}/tests/data/rewards.py:brightness")


def test_a_feature_shard_altered_in_place_is_detected_and_rebuilt_before_training(tmp_path, preference_set,
                                                                                   monkeypatch, caplog):
    cache = tmp_path / "cache"
    offline_run(tmp_path, "first", preference_set, cache)
    (folder,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    shard = folder / "pairs-00000.safetensors"
    data = bytearray(shard.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(64)  # 64 bytes of the features zeroed, header intact
    shard.write_bytes(bytes(data))
    builds, build = [], preference_data.build_cache
    monkeypatch.setattr(preference_data, "build_cache", lambda *a, **k: builds.append(1) or build(*a, **k))
    with caplog.at_level(logging.WARNING, logger="pipelines.preference_data"):
        offline_run(tmp_path, "second", preference_set, cache)
    assert builds == [1] and "pairs-00000.safetensors is missing or does not match its checksum" in caplog.text
    assert preference_data.verified_index(str(folder))["pairs"] > 0  # rebuilt whole


def test_an_interrupted_builds_staging_folder_is_removed_at_start(tmp_path):
    dead = tmp_path / f"{preference_data.STAGING_PREFIX}999999999-abc"  # no such process
    alive = tmp_path / f"{preference_data.STAGING_PREFIX}{os.getpid()}-def"  # a build in progress
    dead.mkdir()
    alive.mkdir()
    preference_data.remove_stale_staging(str(tmp_path))
    assert not dead.exists() and alive.exists()


def test_the_feature_cache_key_follows_the_dataset_and_model_content(tmp_path, preference_set):
    import shutil

    import train_drpo
    from test_offline import offline_args

    def key_of(data):
        settings = train_drpo.build_config(train_drpo.parse_args(offline_args(TINY_SD, tmp_path / "out", data,
                                                                              tmp_path / "cache")))
        return preference_data.cache_key(settings.resolved(run={"mixed_precision": "no"}), "features:image:None")

    key = key_of(preference_set)
    copy = tmp_path / "copy"
    shutil.copytree(preference_set, copy)
    assert key_of(str(copy)) == key  # the same data at another path: the same cache
    parquet = next(p for p in copy.rglob("*") if p.is_file())
    parquet.write_bytes(parquet.read_bytes() + b"\0")
    assert key_of(str(copy)) != key


def test_an_evaluation_checks_every_metrics_weights_before_generating(tmp_path, monkeypatch):
    """Offline, a metric whose weights are not cached stops the evaluation before the first image."""
    from pipelines import inference

    def no_generation(*args, **kwargs):
        raise AssertionError("an image was generated before the missing weights were reported")

    monkeypatch.setattr(evaluate, "generate_images", no_generation)
    monkeypatch.setattr(inference, "generate_images", no_generation)
    with pytest.raises(OSError, match="--metrics needs 'yuvalkirstain/PickScore_v1' from the Hub"):
        evaluate.main([f"--pretrained_model_name_or_path={TINY_SD}", f"--prompts_file={PROMPTS}", "--max_prompts=1",
                       "--seeds=0", "--metrics=color_match,pickscore", f"--output_dir={tmp_path / 'out'}"])
