"""Feature maps: documented keys and shapes, differentiable w.r.t. the image, frozen, clear errors."""

import pytest
import torch
from conftest import TINY_SD, tiny_latent_mae

from drpo_utils import encode_prompts_sd
from pipelines.features import FEATURE_MAPS, build_feature_map


def tiny_vit_mae(path):
    from transformers import ViTMAEConfig, ViTMAEModel

    torch.manual_seed(0)
    config = ViTMAEConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          image_size=32, patch_size=8)
    ViTMAEModel(config).save_pretrained(path)
    return str(path)


def tiny_dinov2(path):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=56,
                          patch_size=14)
    Dinov2Model(config).save_pretrained(path)
    return str(path)


def build(name, tmp_path):
    weights = {"vit_mae": tiny_vit_mae, "vit_mae_released": tiny_vit_mae, "vit_mae_released_masked": tiny_vit_mae,
               "dinov2": tiny_dinov2}
    weights.update(dict.fromkeys(["latent_mae", "latent_mae1", "latent_mae2", "latent_mae3"], tiny_latent_mae))
    feature_map = build_feature_map(name, weights[name](tmp_path / name) if name in weights else None)
    if feature_map.needs_condition:  # teacher_unet: reads the tiny SD generator's UNet, which carries a LoRA
        from peft import LoraConfig

        from pipelines.inference import load_one_step_pipeline

        pipe = load_one_step_pipeline(TINY_SD)
        pipe.unet.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v"]))
        feature_map.bind(pipe)
        feature_map.condition = encode_prompts_sd(pipe, ["a red circle"] * 3, "cpu")
    return feature_map


def features_of(feature_map, latents, images):
    if feature_map.needs_condition:
        return feature_map(latents, None, feature_map.condition)
    return feature_map(latents, images if feature_map.needs_images else None)


def latent_mae_sizes(*sources):
    """Feature sizes of the tiny latent-MAE (widths 8-64) on an 8x8 latent: stage s is (8 / 2^(s-1))^2 x 8 * 2^(s-1)."""
    sizes = {}
    for source in sources:
        stage = int(source[5])
        channels, side = 8 * 2 ** (stage - 1), 8 // 2 ** (stage - 1)
        sizes.update({f"{source}_mean": channels, f"{source}_std": channels})
        for patch in (2, 4):
            if side % patch == 0:
                tokens = (side // patch) ** 2
                sizes.update({f"{source}_mean_{patch}": tokens * channels, f"{source}_std_{patch}": tokens * channels})
    return sizes


MAE1_SOURCES = ("layer1_blk2", "layer1", "layer2_blk2", "layer2", "layer3_blk2", "layer3_blk4", "layer3",
                "layer4_blk2", "layer4")


EXPECTED = {
    "latent": {"latent": 4 * 8 * 8},
    "image": {"image_fine": 3 * 16 * 16, "image_coarse": 3 * 4 * 4, "color_moments": 6},
    "vit_mae": {"cls": 32, "patch_mean": 32, "patch_std": 32, "patch_2x2": 4 * 32},
    "vit_mae_released": {"patch_mean": 32, "patch_std": 32, "cls": 32},
    "vit_mae_released_masked": {"patch_mean": 32, "patch_std": 32, "cls": 32},
    "dinov2": {"cls": 32, "patch_mean": 32, "patch_std": 32, "patch_2x2": 4 * 32},
    "latent_mae": latent_mae_sizes(*MAE1_SOURCES),
    "latent_mae1": latent_mae_sizes(*MAE1_SOURCES),
    "latent_mae2": latent_mae_sizes("layer2", "layer3", "layer4"),
    "latent_mae3": latent_mae_sizes("layer4"),
    # tiny SD UNet on an 8x8 latent: 2x2 maps of 64 channels pooled to 1x1; up_blocks.0 upsamples to 4x4, pooled 4x4
    "teacher_unet": {"down_blocks.2": 64, "mid_block": 64, "up_blocks.0": 64},
}


@pytest.mark.parametrize("name", sorted(FEATURE_MAPS))
def test_keys_shapes_gradients_and_no_trainable_parameters(name, tmp_path):
    """What pipelines/features.py promises: frozen, eval mode, differentiable w.r.t. its input, a dict of named tensors."""
    feature_map = build(name, tmp_path)
    assert not any(p.requires_grad for p in feature_map.parameters()) and not feature_map.training
    latents = torch.randn(3, 4, 8, 8, requires_grad=True)
    images = torch.rand(3, 3, 64, 64, requires_grad=True)
    features = features_of(feature_map, latents, images)
    assert {k: tuple(v.shape) for k, v in features.items()} == {k: (3, d) for k, d in EXPECTED[name].items()}
    sum(f.square().sum() for f in features.values()).backward()
    source = images if feature_map.needs_images else latents
    assert source.grad is not None and source.grad.abs().sum() > 0


def test_vit_mae_keeps_patch_order_and_disables_masking(tmp_path):
    feature_map = build("vit_mae", tmp_path)
    assert feature_map.model.config.mask_ratio == 0.0
    images = torch.rand(2, 3, 32, 32)
    first, second = feature_map(None, images), feature_map(None, images)
    for key in first:  # deterministic: ViTMAE's random patch shuffle is replaced by the identity
        torch.testing.assert_close(first[key], second[key])  # the same call twice: measured 0
    # The pooled 2x2 cells follow the image: a picture bright on the left differs from its mirror.
    half = torch.zeros(1, 3, 32, 32)
    half[..., :16] = 1.0
    cells = feature_map(None, half)["patch_2x2"].view(32, 2, 2)
    mirrored = feature_map(None, half.flip(-1))["patch_2x2"].view(32, 2, 2)
    # float32 attention over mirrored patches: measured 5e-7, bound 1e-4; without the flip they differ by 5.6
    torch.testing.assert_close(cells, mirrored.flip(-1), rtol=1e-4, atol=1e-4)


def test_released_vit_mae_features_by_hand(tmp_path):
    """The released trainer's MAE features: hidden state of the last layer before the final LayerNorm (the
    model's own hidden_states[L]), patch mean, population std with eps 1e-6, CLS; its literal form masks
    3/4 of the patches at random on every call."""
    feature_map = build("vit_mae_released", tmp_path)
    images = torch.rand(2, 3, 32, 32)
    features = feature_map(None, images)
    pixels = torch.nn.functional.interpolate(images, size=(32, 32), mode="bicubic", align_corners=False)
    pixels = (pixels - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    order = torch.arange(16, dtype=torch.float32).expand(2, -1)
    out = feature_map.model(pixel_values=pixels, noise=order, output_hidden_states=True)
    hidden = out.hidden_states[2]  # two layers; last_hidden_state is its LayerNorm
    assert not torch.allclose(hidden, out.last_hidden_state)
    patches = hidden[:, 1:]
    by_hand = {"patch_mean": patches.mean(1), "patch_std": (patches.var(1, unbiased=False) + 1e-6).sqrt(),
               "cls": hidden[:, 0]}
    for key, value in by_hand.items():  # the same float32 ops: measured 0; bound 1e-6
        torch.testing.assert_close(features[key], value, rtol=1e-6, atol=1e-6)
    masked = build("vit_mae_released_masked", tmp_path)
    assert masked.model.config.mask_ratio == 0.75
    torch.manual_seed(0)
    first = masked(None, images)["patch_mean"]
    second = masked(None, images)["patch_mean"]
    assert not torch.allclose(first, second)  # another random quarter of the patches on each call


def test_a_stochastic_feature_map_refuses_chunked_gradients():
    import train_drpo
    from conftest import PROMPTS

    with pytest.raises(ValueError, match="draws new random features on every call"):
        train_drpo.parse_args([f"--pretrained_model_name_or_path={TINY_SD}", "--reward=color_match",
                               f"--prompts_file={PROMPTS}", "--feature_extractor=vit_mae_released_masked",
                               "--candidate_chunk_size=4"])


def test_unknown_feature_map_and_missing_weights_are_clear(tmp_path):
    names = ("latent_mae, latent_mae1, latent_mae2, latent_mae3, latent, image, vit_mae, vit_mae_released, "
             "vit_mae_released_masked, dinov2")
    with pytest.raises(ValueError, match=f"choose one of {names}"):
        build_feature_map("dino")
    with pytest.raises(OSError, match="needs the weights"):
        build_feature_map("vit_mae", str(tmp_path / "nowhere"))


def count_layer_forwards(feature_map, images):
    """How often the inside of the first transformer layer runs during one forward + backward."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layer = next(m for m in feature_map.model.modules() if isinstance(m, GradientCheckpointingLayer))
    inside = next(iter(layer.children()))  # hooks on the layer itself stay outside the checkpoint
    calls = []
    handle = inside.register_forward_hook(lambda *args: calls.append(1))
    try:
        out = feature_map(None, images)
        sum(f.square().sum() for f in out.values()).backward()
    finally:
        handle.remove()
    return len(calls), out


@pytest.mark.parametrize("name", ["vit_mae", "dinov2"])
def test_gradient_checkpointing_recomputes_layers_in_backward(name, tmp_path):
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    plain_calls, plain = count_layer_forwards(build(name, tmp_path / "plain"), images)
    checkpointed = build(name, tmp_path / "checkpointed")
    checkpointed.enable_gradient_checkpointing()
    calls, out = count_layer_forwards(checkpointed, images)
    assert (plain_calls, calls) == (1, 2)  # recomputed in backward
    torch.testing.assert_close(out["cls"], plain["cls"])  # the same function, recomputed: measured 0
