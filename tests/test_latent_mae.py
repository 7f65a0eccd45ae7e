"""The latent-MAE feature map: Flax msgpack conversion, the encoder's numerics, its pooled features."""

import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, random_flax_latent_mae, tiny_latent_mae, write_flax_release
from safetensors.torch import load_file

from pipelines.features import activation_statistics, build_feature_map
from pipelines.latent_mae import CONVERTED_FILE, load_latent_mae, read_flax_msgpack

FLAX_FIXTURE = os.path.join(ROOT, "tests", "data", "flax_latent_mae")  # written by flax itself


# --- an independent reference: the Flax model's maths in NHWC, straight from the Flax parameter tree ---


def conv_nhwc(x, kernel, stride, padding):
    """Cross-correlation with an HWIO kernel, written as a sum of shifted matmuls."""
    kernel = torch.as_tensor(kernel, dtype=torch.float64)
    size = kernel.shape[0]
    x = F.pad(x, (0, 0, padding, padding, padding, padding))
    out_h = (x.shape[1] - size) // stride + 1
    out_w = (x.shape[2] - size) // stride + 1
    out = 0
    for i in range(size):
        for j in range(size):
            window = x[:, i : i + stride * (out_h - 1) + 1 : stride, j : j + stride * (out_w - 1) + 1 : stride]
            out = out + window @ kernel[i, j]
    return out


def group_norm_nhwc(x, params, eps=1e-6):
    channels = x.shape[-1]
    groups = max(g for g in range(1, min(32, channels) + 1) if channels % g == 0)
    grouped = x.reshape(*x.shape[:3], groups, channels // groups)
    mean = grouped.mean(dim=(1, 2, 4), keepdim=True)
    var = grouped.var(dim=(1, 2, 4), unbiased=False, keepdim=True)
    normed = ((grouped - mean) / (var + eps).sqrt()).reshape(x.shape)
    return normed * torch.as_tensor(params["scale"], dtype=x.dtype) + torch.as_tensor(params["bias"], dtype=x.dtype)


def reference_activations(tree, latents_nchw):
    """Every encoder activation, float64, NCHW, computed from the Flax tree without the converter."""
    enc = tree["params"]["encoder"]
    x = latents_nchw.double().permute(0, 2, 3, 1)
    x = torch.relu(group_norm_nhwc(conv_nhwc(x, enc["conv1"]["kernel"], 1, 1), enc["gn1"]))
    out = {"conv1": x}
    stage = 0
    while f"stages_{stage}" in enc:
        blocks = enc[f"stages_{stage}"]
        for index in range(len(blocks)):
            p = blocks[f"layers_{index}"]
            stride = 2 if stage > 0 and index == 0 else 1
            y = torch.relu(group_norm_nhwc(conv_nhwc(x, p["conv1"]["kernel"], stride, 1), p["gn1"]))
            y = group_norm_nhwc(conv_nhwc(y, p["conv2"]["kernel"], 1, 1), p["gn2"])
            skip = x
            if "proj_conv" in p:
                skip = group_norm_nhwc(conv_nhwc(x, p["proj_conv"]["kernel"], stride, 0), p["proj_gn"])
            x = torch.relu(skip + y)
            out[f"layer{stage + 1}_blk{index + 1}"] = x
        x = group_norm_nhwc(x, enc[f"layer{stage + 1}_norm"])
        out[f"layer{stage + 1}"] = x
        stage += 1
    return {name: value.permute(0, 3, 1, 2) for name, value in out.items()}


@pytest.mark.parametrize("chunk_bytes", [None, 1000])
def test_converted_encoder_matches_an_independent_reference(tmp_path, chunk_bytes):
    """Our msgpack writer (the format spec) -> converter -> PyTorch encoder == NHWC reference, to 1e-9."""
    layers = (2, 3, 1, 2)
    tree = random_flax_latent_mae(base_channels=16, layers=layers, seed=3)
    config = {"base_channels": 16, "layers": list(layers), "in_channels": 4, "input_patch_size": 1}
    folder = write_flax_release(tmp_path / "release", tree, config, chunk_bytes=chunk_bytes)
    if chunk_bytes:  # large kernels really were written as chunked arrays
        raw = (tmp_path / "release" / "ema_params.msgpack").read_bytes()
        assert b"__msgpack_chunked_array__" in raw
    encoder = load_latent_mae(folder)
    assert encoder.config == {"base_channels": 16, "layers": list(layers), "in_channels": 4}
    latents = torch.randn(2, 4, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        ours = encoder.double()(latents)  # float64 on both sides: any difference is the conversion's
    expected = reference_activations(tree, latents)
    assert list(ours) == list(expected)
    # float64: measured 3e-14; a GroupNorm eps of 1e-5 instead of flax's 1e-6 would move them by 3e-4
    for name in expected:
        torch.testing.assert_close(ours[name], expected[name], rtol=0, atol=1e-9, msg=name)


def test_reader_restores_the_tree_written_by_flax():
    tree = read_flax_msgpack(os.path.join(FLAX_FIXTURE, "ema_params.msgpack"))
    encoder = tree["params"]["encoder"]
    assert set(tree["params"]) == {"encoder", "fc"}
    assert encoder["stages_1"]["layers_0"]["conv1"]["kernel"].shape == (3, 3, 8, 16)  # HWIO
    assert "proj_conv" in encoder["stages_1"]["layers_0"] and "proj_conv" not in encoder["stages_0"]["layers_0"]


def test_encoder_matches_jax_on_a_file_written_by_flax(tmp_path):
    """The committed fixture was written by flax.serialization with JAX's own activations
    (tests/data/make_flax_latent_mae.py): conv padding/stride, HWIO kernels and GroupNorm agree."""
    folder = shutil.copytree(FLAX_FIXTURE, tmp_path / "release")
    expected = load_file(os.path.join(folder, "expected.safetensors"))
    encoder = load_latent_mae(folder)
    with torch.no_grad():
        ours = encoder.double()(expected.pop("input").double())
    assert set(ours) == set(expected)
    # JAX's float32 activations, 21 layers deep (frozen in the fixture), against ours in float64 (no noise of this
    # machine on top): measured 2.1e-5, bound 3e-4; padding, stride, kernel layout or group count errors are O(1),
    # and the GroupNorm eps is pinned by the float64 test above
    for name, value in expected.items():
        torch.testing.assert_close(ours[name], value.double(), rtol=0, atol=3e-4, msg=name)


def test_conversion_is_cached_next_to_the_download_and_round_trips(tmp_path):
    folder = tiny_latent_mae(tmp_path / "release")
    first = load_latent_mae(folder)
    cached = os.path.join(folder, CONVERTED_FILE)
    assert sorted(os.listdir(folder)) == sorted([CONVERTED_FILE, "ema_params.msgpack", "metadata.json"])  # no temp
    from_file = load_latent_mae(cached)
    os.remove(os.path.join(folder, "ema_params.msgpack"))  # a folder with only the converted file loads too
    from_folder = load_latent_mae(folder)
    latents = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        reference = first(latents)
        for other in (from_file, from_folder):
            for name, value in other(latents).items():
                torch.testing.assert_close(value, reference[name], rtol=0, atol=0)


def test_bad_release_folders_are_clear(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError, match="neither a Flax release"):
        load_latent_mae(tmp_path / "empty")
    with pytest.raises(OSError, match="needs the weights .*nowhere"):
        build_feature_map("latent_mae", str(tmp_path / "nowhere"))
    pixel = write_flax_release(tmp_path / "pixel", random_flax_latent_mae(layers=(1, 1, 1, 1)),
                               {"base_channels": 8, "layers": [1, 1, 1, 1], "input_patch_size": 2})
    with pytest.raises(ValueError, match="pixel-space MAE"):
        load_latent_mae(pixel)


def test_default_weights_are_the_papers_release_and_fail_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="Goodeat/drifting/models/mae/jax/mae_latent_256"):
        build_feature_map("latent_mae")


def test_activation_statistics_by_hand():
    x = torch.arange(16.0).view(1, 1, 4, 4)  # rows 0-3, 4-7, 8-11, 12-15
    stats = activation_statistics("a", x, patch_sizes=(2, 3))
    assert set(stats) == {"a_mean", "a_std", "a_mean_2", "a_std_2"}  # 3 does not divide 4
    # Small integers and their float32 moments: measured 0 (default bound 1.3e-6 rel).
    torch.testing.assert_close(stats["a_mean"], torch.tensor([[7.5]]))
    torch.testing.assert_close(stats["a_std"], torch.tensor([[(85 / 4 + 1e-6) ** 0.5]]))  # var of 0..15 = 21.25
    # 2x2 patches in row-major order: {0,1,4,5}, {2,3,6,7}, {8,9,12,13}, {10,11,14,15}
    torch.testing.assert_close(stats["a_mean_2"], torch.tensor([[2.5, 4.5, 10.5, 12.5]]))
    torch.testing.assert_close(stats["a_std_2"], torch.full((1, 4), (4.25 + 1e-6) ** 0.5))  # var {0,1,4,5}


def feature_sources(name, folder):
    keys = build_feature_map(name, folder)(torch.randn(1, 4, 8, 8)).keys()
    return sorted({key.split("_mean")[0].split("_std")[0] for key in keys})


def test_variants_use_the_layers_of_table_3b(tmp_path):
    folder = tiny_latent_mae(tmp_path / "release")
    multi = ["layer1", "layer1_blk2", "layer2", "layer2_blk2", "layer3", "layer3_blk2", "layer3_blk4", "layer4",
             "layer4_blk2"]
    assert feature_sources("latent_mae", folder) == feature_sources("latent_mae1", folder) == multi
    assert feature_sources("latent_mae2", folder) == ["layer2", "layer3", "layer4"]
    assert feature_sources("latent_mae3", folder) == ["layer4"]


def test_gradient_checkpointing_recomputes_blocks_and_keeps_the_function(tmp_path):
    folder = tiny_latent_mae(tmp_path / "release")
    latents = torch.randn(2, 4, 8, 8, requires_grad=True)

    def run(feature_map):
        calls = []
        block = feature_map.encoder.stages[0][0].conv1
        handle = block.register_forward_hook(lambda *args: calls.append(1))
        features = feature_map(latents)
        (grad,) = torch.autograd.grad(sum(f.square().sum() for f in features.values()), latents)
        handle.remove()
        return len(calls), grad

    plain_calls, plain_grad = run(build_feature_map("latent_mae", folder))
    checkpointed = build_feature_map("latent_mae", folder)
    checkpointed.enable_gradient_checkpointing()
    calls, grad = run(checkpointed)
    assert (plain_calls, calls) == (1, 2)
    torch.testing.assert_close(grad, plain_grad)  # the same float32 backward, recomputed: measured 0



def test_hub_spec_downloads_the_release_folder_and_caches_beside_it(tmp_path, monkeypatch):
    """``owner/repo/folder`` -> hf_hub_download(owner/repo, file, subfolder=folder) for both files."""
    import huggingface_hub

    release = tiny_latent_mae(tmp_path / "hub-cache" / "models" / "mae" / "jax" / "mae_latent_256")
    calls = []

    def fake_download(repo_id, filename, subfolder=None):
        calls.append((repo_id, filename, subfolder))
        return os.path.join(release, filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    encoder = load_latent_mae("Goodeat/drifting/models/mae/jax/mae_latent_256")
    assert calls == [("Goodeat/drifting", name, "models/mae/jax/mae_latent_256")
                     for name in ("metadata.json", "ema_params.msgpack")]
    assert encoder.config["layers"] == [3, 4, 6, 3] and os.path.isfile(os.path.join(release, CONVERTED_FILE))


def test_a_vae_with_another_latent_space_gets_a_warning(tmp_path, caplog):
    from types import SimpleNamespace

    feature_map = build_feature_map("latent_mae", tiny_latent_mae(tmp_path / "release"))
    sd_vae = SimpleNamespace(config=SimpleNamespace(scaling_factor=0.18215, latent_channels=4))
    sdxl_vae = SimpleNamespace(config=SimpleNamespace(scaling_factor=0.13025, latent_channels=4))
    feature_map.check_vae(sd_vae)
    assert not caplog.records
    feature_map.check_vae(sdxl_vae)
    assert "SD-VAE latents" in caplog.text and "0.13025" in caplog.text


def test_a_changed_release_is_converted_again(tmp_path):
    folder = tiny_latent_mae(tmp_path / "release", seed=0)
    latents = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        first = load_latent_mae(folder)(latents)["layer4"]
        tiny_latent_mae(tmp_path / "release", seed=1)  # new weights, same shapes: the cache is stale
        second = load_latent_mae(folder)(latents)["layer4"]
        fresh = load_latent_mae(os.path.join(folder, CONVERTED_FILE))(latents)["layer4"]
    assert not torch.allclose(first, second)  # 2.3 apart (measured)
    torch.testing.assert_close(second, fresh, rtol=0, atol=0)  # and the cache now holds the new weights
