import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_SD = os.path.join(ROOT, "assets", "tiny-sd-turbo")
TINY_SDXL = os.path.join(ROOT, "assets", "tiny-sdxl-turbo")
TINY_FLUX = os.path.join(ROOT, "assets", "tiny-flux-schnell")
PROMPTS = os.path.join(ROOT, "assets", "tiny_prompts.txt")

# The training seed of the behavioural tests (``@pytest.mark.behaviour``): 0 in the suite.
# ``python -m benchmarks.behaviour_margins`` runs them at other seeds, with $DRPO_MARGIN_LOG set, to measure
# how far each one's statistic stays from its threshold (the README's Tests section quotes the result).
TRAINING_SEED = int(os.environ.get("DRPO_TEST_SEED", "0"))


def assert_above(statistic: float, threshold: float, context=None) -> None:
    """``assert statistic > threshold``, recorded to $DRPO_MARGIN_LOG (when set) for the margins benchmark."""
    log = os.environ.get("DRPO_MARGIN_LOG")
    if log:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0]
        with open(log, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"test": test, "seed": TRAINING_SEED, "statistic": float(statistic),
                                     "threshold": float(threshold)}) + "\n")
    assert statistic > threshold, (statistic, threshold, context)


def refuse_constant(name):
    raise ValueError(f"{name} is not standard JSON")


def strictly_parsed(path) -> None:
    """Parse a .json / .jsonl file as standard JSON: NaN, Infinity and -Infinity are errors."""
    text = path.read_text(encoding="utf-8")
    documents = [line for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" else [text]
    for document in documents:
        json.loads(document, parse_constant=refuse_constant)


@pytest.fixture(autouse=True)
def every_json_written_is_standard(request):
    """After each test that used ``tmp_path``: every JSON file in it (what the project wrote: metrics, run
    records, checksums, histories, caches' indexes) parses as standard JSON (Issue 20, strict outputs)."""
    root = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    yield
    if root is not None:
        for path in [*root.rglob("*.json"), *root.rglob("*.jsonl")]:
            try:
                strictly_parsed(path)
            except ValueError as error:
                raise AssertionError(f"{path.relative_to(root)}: {error}") from error


@pytest.fixture(scope="session")
def tiny_sd():
    return TINY_SD


def reset_accelerate_state():
    """Forget the process-wide accelerate state, so ``main()`` can run several times in one process."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def build_random_pipeline(path: str, prediction_type: str = "epsilon", architecture: str = "sd-turbo") -> str:
    """An untrained SD-/SDXL-Turbo-shaped pipeline saved with save_pretrained (fast; for exactness tests)."""
    import torch

    from pipelines.build_tiny_models import ARCHITECTURES, build_tokenizer, build_vae

    torch.manual_seed(0)
    build_pipeline, _ = ARCHITECTURES[architecture]
    pipe = build_pipeline(build_vae(), build_tokenizer())
    pipe.scheduler.register_to_config(prediction_type=prediction_type)
    pipe.save_pretrained(path)
    return path


def random_flax_latent_mae(base_channels=8, layers=(3, 4, 6, 3), in_channels=4, seed=0) -> dict:
    """Random latent-MAE parameters in the release's Flax layout: ``{"params": {"encoder": ..., "fc": ...}}``.

    Names and shapes follow Flax linen: conv ``kernel`` HWIO, GroupNorm ``scale``/``bias``, blocks under
    ``stages_{s}/layers_{b}``, projections only where a block changes shape (Flax creates parameters
    lazily), plus a classifier head the converter must ignore.
    """
    import numpy as np

    rng = np.random.default_rng(seed)

    def conv(size, cin, cout):
        return {"kernel": rng.normal(0, (size * size * cin) ** -0.5, (size, size, cin, cout)).astype(np.float32)}

    def norm(channels):
        return {"scale": (1 + 0.1 * rng.normal(size=channels)).astype(np.float32),
                "bias": (0.1 * rng.normal(size=channels)).astype(np.float32)}

    encoder = {"conv1": conv(3, in_channels, base_channels), "gn1": norm(base_channels)}
    width = base_channels
    for stage, depth in enumerate(layers):
        out = base_channels * 2**stage
        blocks = {}
        for index in range(depth):
            cin = width if index == 0 else out
            block = {"conv1": conv(3, cin, out), "gn1": norm(out), "conv2": conv(3, out, out), "gn2": norm(out)}
            if index == 0 and (stage > 0 or cin != out):
                block.update(proj_conv=conv(1, cin, out), proj_gn=norm(out))
            blocks[f"layers_{index}"] = block
        encoder[f"stages_{stage}"] = blocks
        encoder[f"layer{stage + 1}_norm"] = norm(out)
        width = out
    head = {"kernel": rng.normal(size=(width, 10)).astype(np.float32), "bias": np.zeros(10, np.float32)}
    return {"params": {"encoder": encoder, "fc": head}}


def write_flax_release(folder, params: dict, model_config: dict, chunk_bytes: int | None = None):
    """Write ``ema_params.msgpack`` + ``metadata.json`` as the release does, with our own msgpack writer.

    Format (flax.serialization): a msgpack map tree whose array leaves are extension type 1 holding
    msgpack ``(shape, dtype name, C-order bytes)``; arrays above the chunk limit (1 GiB in Flax,
    ``chunk_bytes`` here) become ``{"__msgpack_chunked_array__": True, "shape": {"0": ..}, "chunks": {"0": ..}}``.
    """
    import json
    import pathlib

    import msgpack
    import numpy as np

    def chunked(array):
        per_chunk = max(1, chunk_bytes // array.itemsize)
        flat = array.reshape(-1)
        chunks = [flat[i : i + per_chunk] for i in range(0, flat.size, per_chunk)]
        return {"__msgpack_chunked_array__": True, "shape": {str(i): n for i, n in enumerate(array.shape)},
                "chunks": {str(i): c for i, c in enumerate(chunks)}}

    def prepare(tree):
        if isinstance(tree, dict):
            return {key: prepare(value) for key, value in tree.items()}
        if isinstance(tree, np.ndarray) and chunk_bytes is not None and tree.nbytes > chunk_bytes:
            return chunked(tree)
        return tree

    def encode(value):
        if isinstance(value, np.ndarray):
            payload = msgpack.packb((value.shape, value.dtype.name, value.tobytes("C")), use_bin_type=True)
            return msgpack.ExtType(1, payload)
        raise TypeError(type(value))

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ema_params.msgpack").write_bytes(msgpack.packb(prepare(params), default=encode, strict_types=True))
    (folder / "metadata.json").write_text(json.dumps({"model_config": model_config}))
    return str(folder)


def tiny_latent_mae(folder, base_channels=8, layers=(3, 4, 6, 3), seed=0) -> str:
    """A small random latent-MAE release folder (the format ``--feature_extractor_path`` reads)."""
    config = {"base_channels": base_channels, "layers": list(layers), "in_channels": 4, "patch_size": 2,
              "input_patch_size": 1, "use_bf16": True, "num_classes": 10}
    return write_flax_release(folder, random_flax_latent_mae(base_channels, layers, seed=seed), config)


def build_tiny_clip(path) -> str:
    """A tiny CLIPModel + tokenizer saved with save_pretrained: the layout PickScore_v1 / CLIP-L use."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    from pipelines.build_tiny_models import build_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1, projection_dim=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, projection_dim=16),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def tiny_mask2former_config(label_names: list[str]):
    """A random Mask2Former (Swin backbone) small enough for CPU tests, detecting ``label_names``."""
    from transformers import Mask2FormerConfig, SwinConfig

    labels = dict(enumerate(label_names))
    backbone = SwinConfig(image_size=64, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4,
                          out_features=["stage1", "stage2", "stage3", "stage4"])
    return Mask2FormerConfig(backbone_config=backbone, hidden_dim=32, num_queries=8, encoder_layers=1,
                             decoder_layers=2, mask_feature_size=32, feature_size=32, dim_feedforward=64,
                             num_attention_heads=2, encoder_feedforward_dim=64, id2label=labels,
                             label2id={v: k for k, v in labels.items()}, use_pretrained_backbone=False)
