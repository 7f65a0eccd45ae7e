"""The latent-MAE encoder of "Generative Modeling via Drifting", in PyTorch, and its Flax weight converter.

DrPO's default feature map phi (Section 4.1, Table 3b "latent-MAE") is the encoder of a masked
autoencoder trained on SD-VAE latents (``latents * 0.18215``, channels-last in JAX): a ResNet with
GroupNorm, basic blocks, stages ``layers`` = [3, 4, 6, 3] of widths ``base_channels`` x [1, 2, 4, 8],
stride 2 at the start of stages 2-4, and a GroupNorm after every stage. The release
(``Goodeat/drifting``, ``models/mae/jax/<name>/``) is Flax: ``ema_params.msgpack`` written by
``flax.serialization.msgpack_serialize`` plus ``metadata.json`` with ``model_config``.

``load_latent_mae(spec)`` accepts that folder (local, or on the Hub as ``owner/repo/path/in/repo``)
or a converted ``.safetensors`` file; the first load of a folder converts the Flax parameters to
PyTorch layout and caches ``encoder.safetensors`` beside them. Only the encoder is kept (the MAE's
decoder and classifier head are not needed for features). No JAX or Flax is needed at run time:
the msgpack layout is read directly with ``msgpack``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path

import msgpack
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

logger = logging.getLogger(__name__)

DEFAULT_WEIGHTS = "Goodeat/drifting/models/mae/jax/mae_latent_256"  # the paper's ~340M encoder
FLAX_FILES = ("metadata.json", "ema_params.msgpack")
CONVERTED_FILE = "encoder.safetensors"
GROUP_NORM_EPS = 1e-6  # flax.linen.GroupNorm's default epsilon
SD_VAE_SCALING_FACTOR = 0.18215  # the release's training latents: SD-VAE sample * 0.18215


def group_count(channels: int, max_groups: int = 32) -> int:
    """The release's GroupNorm group count: the largest divisor of ``channels`` that is <= 32."""
    count = min(max_groups, channels)
    while channels % count:
        count -= 1
    return count


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(group_count(channels), channels, eps=GROUP_NORM_EPS)


class BasicBlock(nn.Module):
    """relu(skip(x) + GN(conv3x3(relu(GN(conv3x3(x)))))); skip = GN(conv1x1(x)) when the shape changes."""

    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.gn1 = group_norm(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.gn2 = group_norm(channels)
        self.projection = None
        if stride != 1 or in_channels != channels:
            self.projection = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                                            group_norm(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.gn2(self.conv2(F.relu(self.gn1(self.conv1(x)))))
        skip = x if self.projection is None else self.projection(x)
        return F.relu(skip + y)


class LatentMAEEncoder(nn.Module):
    """The MAE-ResNet encoder; ``forward`` returns every activation by name, NCHW.

    Names: ``conv1`` (stem), ``layer{s}_blk{b}`` (output of block b of stage s) and ``layer{s}``
    (stage s after its GroupNorm), in forward order.
    """

    def __init__(self, base_channels: int = 256, layers=(3, 4, 6, 3), in_channels: int = 4):
        super().__init__()
        self.config = {"base_channels": base_channels, "layers": list(layers), "in_channels": in_channels}
        self.conv1 = nn.Conv2d(in_channels, base_channels, 3, padding=1, bias=False)
        self.gn1 = group_norm(base_channels)
        self.stages, self.stage_norms = nn.ModuleList(), nn.ModuleList()
        width = base_channels
        for index, depth in enumerate(layers):
            out_width = base_channels * 2**index
            blocks = [BasicBlock(width, out_width, stride=2 if index else 1)]
            blocks += [BasicBlock(out_width, out_width, stride=1) for _ in range(depth - 1)]
            self.stages.append(nn.ModuleList(blocks))
            self.stage_norms.append(group_norm(out_width))
            width = out_width
        self.gradient_checkpointing = False

    def forward(self, latents: torch.Tensor) -> dict[str, torch.Tensor]:
        x = F.relu(self.gn1(self.conv1(latents)))
        activations = {"conv1": x}
        for index, (blocks, norm) in enumerate(zip(self.stages, self.stage_norms), start=1):
            for number, block in enumerate(blocks, start=1):
                x = checkpoint(block, x, use_reentrant=False) if self.gradient_checkpointing else block(x)
                activations[f"layer{index}_blk{number}"] = x
            x = norm(x)
            activations[f"layer{index}"] = x
        return activations


# ---------------------------------------------------------------------------------------------
# Flax msgpack -> PyTorch
# ---------------------------------------------------------------------------------------------

_NDARRAY, _NPSCALAR = 1, 3  # flax.serialization's msgpack extension codes
_CHUNKED = "__msgpack_chunked_array__"


def _decode_array(data: bytes) -> np.ndarray:
    """One ndarray leaf: msgpack (shape, dtype name, C-order bytes)."""
    shape, dtype_name, buffer = msgpack.unpackb(data, raw=True)
    dtype_name = dtype_name.decode()
    if dtype_name == "bfloat16":  # numpy has no bfloat16: keep the bits, widen in torch
        bits = torch.from_numpy(np.frombuffer(buffer, dtype=np.uint16).astype(np.int16))
        return bits.view(torch.bfloat16).float().numpy().reshape(shape)
    return np.frombuffer(buffer, dtype=np.dtype(dtype_name)).reshape(shape)


def _ext_hook(code: int, data: bytes):
    if code == _NDARRAY:
        return _decode_array(data)
    if code == _NPSCALAR:
        return _decode_array(data)[()]
    raise ValueError(f"unsupported Flax msgpack extension type {code}")


def _join_chunks(tree):
    """Arrays above 1 GiB are stored as {__msgpack_chunked_array__, shape, chunks} dicts."""
    if not isinstance(tree, dict):
        return tree
    if tree.get(_CHUNKED):
        shape = [tree["shape"][str(i)] for i in range(len(tree["shape"]))]
        chunks = [tree["chunks"][str(i)] for i in range(len(tree["chunks"]))]
        return np.concatenate(chunks).reshape(shape)
    return {key: _join_chunks(value) for key, value in tree.items()}


def read_flax_msgpack(path: str | os.PathLike) -> dict:
    """The nested parameter dict of a ``flax.serialization.msgpack_serialize`` file, as numpy arrays."""
    tree = msgpack.unpackb(Path(path).read_bytes(), ext_hook=_ext_hook, raw=False, strict_map_key=False)
    return _join_chunks(tree)


def _flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else key
        flat.update(_flatten(value, name) if isinstance(value, dict) else {name: value})
    return flat


_FLAX_TO_TORCH = [  # (Flax path pattern, PyTorch name template)
    (r"(conv1|gn1)", r"\1"),
    (r"stages_(\d+)/layers_(\d+)/(conv1|conv2|gn1|gn2)", r"stages.\1.\2.\3"),
    (r"stages_(\d+)/layers_(\d+)/proj_conv", r"stages.\1.\2.projection.0"),
    (r"stages_(\d+)/layers_(\d+)/proj_gn", r"stages.\1.\2.projection.1"),
]


def _torch_module_name(flax_module: str) -> str:
    for pattern, template in _FLAX_TO_TORCH:
        if re.fullmatch(pattern, flax_module):
            return re.sub(pattern, template, flax_module)
    match = re.fullmatch(r"layer(\d+)_norm", flax_module)
    if match:
        return f"stage_norms.{int(match.group(1)) - 1}"
    raise KeyError(f"unexpected latent-MAE encoder parameter {flax_module!r}")


def convert_flax_params(params: dict) -> dict[str, torch.Tensor]:
    """Flax encoder parameters -> ``LatentMAEEncoder`` state dict.

    Conv kernels go from HWIO to OIHW; GroupNorm ``scale``/``bias`` become ``weight``/``bias``.
    Everything outside ``encoder`` (the MAE decoder, the classifier head) is dropped.
    """
    params = params.get("params", params)
    if "encoder" not in params:
        raise KeyError(f"no 'encoder' in the Flax parameters (top-level keys: {sorted(params)})")
    state = {}
    for path, value in _flatten(params["encoder"]).items():
        module, leaf = path.rsplit("/", 1)
        tensor = torch.from_numpy(np.array(value, dtype=np.float32))
        if leaf == "kernel":
            leaf, tensor = "weight", tensor.permute(3, 2, 0, 1)
        elif leaf == "scale":
            leaf = "weight"
        state[f"{_torch_module_name(module)}.{leaf}"] = tensor.contiguous()
    return state


def encoder_from_config(model_config: dict) -> LatentMAEEncoder:
    """The encoder a release's ``metadata.json`` ``model_config`` describes (latent-space models only)."""
    if int(model_config.get("input_patch_size", 1)) != 1:
        raise ValueError("latent_mae takes latent-space encoders (input_patch_size 1); this is a pixel-space MAE "
                         f"(input_patch_size {model_config['input_patch_size']})")
    return LatentMAEEncoder(int(model_config.get("base_channels", 64)), tuple(model_config.get("layers", (2, 2, 2, 2))),
                            int(model_config.get("in_channels", 4)))


def _file_metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}


def _source_fingerprint(folder: Path) -> str:
    """What the cached conversion was made from: the msgpack's size and mtime, and metadata.json."""
    params = (folder / "ema_params.msgpack").stat()
    return json.dumps([params.st_size, params.st_mtime_ns, (folder / "metadata.json").read_text()])


def _load_converted(path: Path) -> LatentMAEEncoder:
    metadata = _file_metadata(path)
    if "model_config" not in metadata:
        raise ValueError(f"{path} has no 'model_config' metadata; convert a Flax release folder with load_latent_mae")
    encoder = encoder_from_config(json.loads(metadata["model_config"]))
    encoder.load_state_dict(load_file(str(path)))
    return encoder


def _convert_folder(folder: Path) -> LatentMAEEncoder:
    """Convert a Flax release folder, caching ``encoder.safetensors`` beside it.

    The cache is reused only if it was made from the same files (``_source_fingerprint``). It is
    written to a temporary file of its own and renamed into place, so processes converting at the
    same time (one per GPU on a first run) never see or leave a half-written file.
    """
    cached, source = folder / CONVERTED_FILE, _source_fingerprint(folder)
    if cached.is_file() and _file_metadata(cached).get("source") == source:
        return _load_converted(cached)
    model_config = json.loads((folder / "metadata.json").read_text())["model_config"]
    encoder = encoder_from_config(model_config)
    encoder.load_state_dict(convert_flax_params(read_flax_msgpack(folder / "ema_params.msgpack")))
    try:
        handle, partial = tempfile.mkstemp(dir=folder, prefix=f".{CONVERTED_FILE}.", suffix=".tmp")
        os.close(handle)
        try:
            save_file(encoder.state_dict(), partial, metadata={"model_config": json.dumps(model_config),
                                                               "source": source})
            os.chmod(partial, 0o644)  # mkstemp makes it private; the download beside it is world-readable
            os.replace(partial, cached)
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    except OSError as error:
        logger.warning("could not cache the converted latent-MAE next to %s (%s); it is converted on every load",
                       folder, error)
    return encoder


def _download(spec: str) -> Path:
    """``owner/repo/path/in/repo`` -> the local folder holding that release's two files."""
    from huggingface_hub import hf_hub_download

    parts = spec.strip("/").split("/")
    if len(parts) < 2:
        raise OSError(f"{spec!r} is neither a local path nor a Hub spec 'owner/repo[/folder]'")
    repo_id, subfolder = "/".join(parts[:2]), "/".join(parts[2:]) or None
    try:
        paths = [hf_hub_download(repo_id, name, subfolder=subfolder) for name in FLAX_FILES]
    except Exception as error:  # noqa: BLE001 - offline, missing repo or file: all mean "weights unavailable"
        raise OSError(f"could not download {', '.join(FLAX_FILES)} from {spec!r}: {error}") from error
    return Path(paths[1]).parent


def load_latent_mae(spec: str | os.PathLike = DEFAULT_WEIGHTS) -> LatentMAEEncoder:
    """A latent-MAE encoder from a converted ``.safetensors`` file, a Flax release folder, or the Hub."""
    path = Path(spec)
    if path.is_file():
        return _load_converted(path)
    if path.is_dir():
        missing = [name for name in FLAX_FILES if not (path / name).is_file()]
        if missing and (path / CONVERTED_FILE).is_file():
            return _load_converted(path / CONVERTED_FILE)
        if missing:
            raise OSError(f"{path} holds neither a Flax release ({', '.join(FLAX_FILES)}) nor {CONVERTED_FILE}")
        return _convert_folder(path)
    return _convert_folder(_download(str(spec)))
