"""Offline DrPO (Section 4 "Offline variant", Appendix B) and offline DPO(1-step) on Pick-a-Pic-layout data."""

import collections
import dataclasses
import io
import os

import pytest
import torch
from conftest import PROMPTS, TINY_SD, TINY_SDXL, TRAINING_SEED, assert_above
from PIL import Image
from test_train import lora_tensors, train

import drpo_utils
from benchmarks.offline import METHOD_FLAGS, OFFLINE_FLAGS, build_preference_set
from pipelines import preference_data
from pipelines.config import DataConfig
from pipelines.scoring import evaluate

HELD_OUT_SEEDS = list(range(5000, 5008))  # x the 8 labelled prompts; paired z, bootstrap over prompts
HIDDEN = os.path.join(os.path.dirname(__file__), "data", "rewards.py") + ":brightness"


def prompts(count=8):
    with open(PROMPTS) as handle:
        return [line.strip() for line in handle][:count]


@pytest.fixture(scope="module")
def brightness_pairs(tmp_path_factory):
    """8 prompts x 4 pairs of the tiny model's samples labelled by brightness, and the same with the labels reversed."""
    root = tmp_path_factory.mktemp("pickapic")
    return {"liked": build_preference_set(str(root / "liked"), prompts(), 4, reward=HIDDEN),
            "reversed": build_preference_set(str(root / "reversed"), prompts(), 4, reward=HIDDEN, reverse=True)}


def offline_args(model, output_dir, data, cache, *extra):
    return [f"--pretrained_model_name_or_path={model}", f"--preference_dataset={data}", f"--output_dir={output_dir}",
            f"--feature_cache_dir={cache}", "--report_to=none", "--num_validation_seeds=2",
            "--checkpointing_steps=1000", *OFFLINE_FLAGS, f"--seed={TRAINING_SEED}", *extra]


# ---------------------------------------------------------------------------------------------
# The field with dataset sets (Eqs. 13-17 unchanged)
# ---------------------------------------------------------------------------------------------


def test_offline_targets_are_the_online_ones_for_the_same_sets_and_the_drift_of_external_sets():
    g = torch.Generator().manual_seed(3)
    z, z_ref = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    winners, losers = torch.tensor([0, 2, 4]), torch.tensor([1, 3, 5])
    config = drpo_utils.DriftConfig(ref_weight=0.3)
    online, _ = drpo_utils.drift_targets(z, z_ref, winners, losers, config)
    offline, _ = drpo_utils.offline_drift_targets(z, z_ref, z[winners], z[losers], config)
    torch.testing.assert_close(online["features"][0].velocity, offline["features"][0].velocity)

    chosen, rejected = torch.randn(2, 5, generator=g) + 2, torch.randn(3, 5, generator=g) - 2
    targets, _ = drpo_utils.offline_drift_targets(z, z_ref, chosen, rejected, config)
    expected = drpo_utils.drift_field(z, chosen, rejected, config.radii) + 0.3 * drpo_utils.reference_field(
        z, z_ref, config)  # Eq. 15 with A+ / A- the dataset's features
    torch.testing.assert_close(targets["features"][0].velocity, expected)
    z_tilde = z / targets["features"][0].coord_scale
    assert ((z_tilde + expected) @ (chosen.mean(0) - rejected.mean(0)) > z_tilde @ (chosen.mean(0) - rejected.mean(0))
            ).all()  # the targets move every query toward the chosen side


# ---------------------------------------------------------------------------------------------
# Records: checked, counted, converted
# ---------------------------------------------------------------------------------------------


def encoded(image, fmt="PNG"):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def layout_config(**extra):
    """A DataConfig in the Pick-a-Pic layout (the checks read its columns and record cap)."""
    return DataConfig(**{"preference_dataset": "pairs", **extra})


def test_bad_records_are_counted_and_skipped_and_other_modes_and_sizes_converted():
    red, grey = Image.new("RGB", (16, 16), (255, 0, 0)), Image.new("L", (40, 24), 128)
    records = [
        {"caption": "a", "jpg_0": encoded(red), "jpg_1": encoded(grey), "label_0": 0.0},  # grey preferred, converted
        {"caption": "b", "jpg_0": encoded(red), "jpg_1": encoded(red), "label_0": 0.5},  # tie
        {"caption": "", "jpg_0": encoded(red), "jpg_1": encoded(red), "label_0": 1.0},  # missing caption
        {"caption": None, "jpg_0": encoded(red), "jpg_1": encoded(red), "label_0": 1.0},
        {"caption": "c", "jpg_0": b"not an image", "jpg_1": encoded(red), "label_0": 1.0},  # undecodable
        {"caption": "d", "jpg_0": encoded(red), "jpg_1": encoded(red), "label_0": 2},  # unknown label
        {"caption": "e", "jpg_0": {"bytes": encoded(red, "JPEG"), "path": None}, "jpg_1": encoded(red), "label_0": 1},
    ]
    counts = collections.Counter()
    pairs = list(preference_data.checked_pairs(iter(records), layout_config(), 16, counts))
    assert [p.caption for p in pairs] == ["a", "e"]
    assert counts == {"records": 7, "pairs used": 2, "tie (no preference)": 1, "missing caption": 2,
                      "undecodable image": 1, "label not 0, 0.5 or 1": 1, "converted to RGB": 1, "resized": 1}
    assert pairs[0].chosen.shape == (3, 16, 16)
    torch.testing.assert_close(pairs[0].chosen, torch.full((3, 16, 16), 128 / 255))  # label 0: image 1 chosen
    torch.testing.assert_close(pairs[0].rejected[0], torch.ones(16, 16))


def test_streaming_reads_a_parquet_folder_record_by_record_without_an_arrow_copy(tmp_path, brightness_pairs):
    import datasets

    data = layout_config(preference_dataset=brightness_pairs["liked"], dataset_split="train", streaming=True)
    dataset = preference_data.open_dataset(data, str(tmp_path / "datasets-cache"))
    assert isinstance(dataset, datasets.IterableDataset)
    counts = collections.Counter()
    assert len(list(preference_data.checked_pairs(iter(dataset), layout_config(), 16, counts))) == 32
    cache = tmp_path / "datasets-cache"
    written = [name for _, _, names in os.walk(cache) for name in names if name.endswith(".arrow")]
    assert written == []  # nothing materialised
    with pytest.raises(ValueError, match=r"no column 'prompt' \(--caption_column\).*'caption'"):
        preference_data.open_dataset(dataclasses.replace(data, caption_column="prompt"))


def test_nearest_captions_pool_the_pairs_of_the_closest_prompts():
    embeddings = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    assert preference_data.nearest_captions(embeddings, 1) == [[1], [0], [3], [2]]
    assert preference_data.nearest_captions(embeddings, 0) == [[], [], [], []]


# ---------------------------------------------------------------------------------------------
# Training on it
# ---------------------------------------------------------------------------------------------


def held_out_brightness(output_dir):
    result, _, _ = evaluate(TINY_SD, str(output_dir), HIDDEN, prompts(8), HELD_OUT_SEEDS)
    return result


@pytest.mark.behaviour
def test_offline_drpo_follows_the_labels_of_a_reward_it_never_sees(tmp_path, brightness_pairs):
    cache = tmp_path / "cache"
    for labels, sign in (("liked", 1), ("reversed", -1)):
        train("train_drpo.py", *offline_args(TINY_SD, tmp_path / labels, brightness_pairs[labels], cache,
                                             "--max_train_steps=40"))
        assert_above(sign * held_out_brightness(tmp_path / labels)["z_paired"], 3, labels)
    assert "method `drpo`" in (tmp_path / "liked" / "README.md").read_text()


def test_the_feature_cache_is_read_not_rebuilt_and_gives_the_same_lora(tmp_path, brightness_pairs, monkeypatch):
    cache = tmp_path / "cache"
    flags = ["--max_train_steps=3", "--num_validation_seeds=1"]
    train("train_drpo.py", *offline_args(TINY_SD, tmp_path / "first", brightness_pairs["liked"], cache, *flags))
    (folder,) = [name for name in os.listdir(cache) if not name.startswith(".")]

    def no_encoding(*args, **kwargs):
        raise AssertionError("the second run encoded the dataset again")

    monkeypatch.setattr(preference_data, "build_cache", no_encoding)
    train("train_drpo.py", *offline_args(TINY_SD, tmp_path / "second", brightness_pairs["liked"], cache, *flags))
    first, second = lora_tensors(tmp_path / "first"), lora_tensors(tmp_path / "second")
    assert all(torch.equal(first[name], second[name]) for name in first)
    # another resolution is another cache entry
    monkeypatch.undo()
    train("train_drpo.py", *offline_args(TINY_SD, tmp_path / "third", brightness_pairs["liked"], cache, *flags,
                                         "--resolution=32"))
    assert len([name for name in os.listdir(cache) if not name.startswith(".")]) == 2 and folder in os.listdir(cache)


@pytest.mark.behaviour
def test_offline_dpo_trains_on_the_same_set_and_sdxl_encodes_through_its_vae(tmp_path, brightness_pairs):
    train("train_drpo.py", *offline_args(TINY_SD, tmp_path / "dpo", brightness_pairs["liked"], tmp_path / "cache",
                                         "--max_train_steps=40", *METHOD_FLAGS["dpo"],
                                         "--learning_rate=3e-3"))  # z 6.8-10.2 at 1e-3 over seeds 0-2; 16.2-26.1 here
    assert_above(held_out_brightness(tmp_path / "dpo")["z_paired"], 3)
    train("train_drpo_sdxl.py", *offline_args(TINY_SDXL, tmp_path / "sdxl", brightness_pairs["liked"],
                                              tmp_path / "cache", "--max_train_steps=2", "--method=dpo"))
    assert os.path.isfile(tmp_path / "sdxl" / "pytorch_lora_weights.safetensors")


def test_a_dataset_without_one_usable_pair_stops_at_start_up(tmp_path):
    import datasets

    tie = encoded(Image.new("RGB", (64, 64)))
    folder = tmp_path / "ties"
    folder.mkdir()
    datasets.Dataset.from_dict({"caption": ["a", "b"], "jpg_0": [tie, b"broken"], "jpg_1": [tie, tie],
                                "label_0": [0.5, 1.0]}).to_parquet(str(folder / "train.parquet"))
    with pytest.raises(ValueError, match=r"no usable preference pair.*tie \(no preference\): 1.*undecodable image: 1"):
        train("train_drpo.py", *offline_args(TINY_SD, tmp_path / "out", folder, tmp_path / "cache",
                                             "--max_train_steps=1"))
    assert not os.listdir(tmp_path / "cache")  # no half-built cache left behind


def test_methods_that_need_their_own_samples_are_refused_offline(tmp_path, brightness_pairs):
    import train_drpo

    with pytest.raises(ValueError, match="with --preference_dataset use --method dpo or drpo"):
        train_drpo.parse_args(offline_args(TINY_SD, tmp_path, brightness_pairs["liked"], tmp_path, "--method=grpo"))
