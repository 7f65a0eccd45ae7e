"""Write the Flax fixture the latent-MAE converter is tested against (needs `pip install flax`; run once).

    python tests/data/make_flax_latent_mae.py tests/data/flax_latent_mae

Builds a small, randomly initialised latent-MAE ResNet encoder in Flax linen with the module layout
of the drifting models' release (encoder -> conv1/gn1, ``stages`` as a list of ``nn.Sequential`` of
basic blocks, ``layer{i}_norm``), adds an ``fc`` head the converter must ignore, and saves

- ``ema_params.msgpack``: ``flax.serialization.msgpack_serialize({"params": ...})``, the release format;
- ``metadata.json``: ``{"model_config": {...}}`` as the release writes it;
- ``expected.safetensors``: an NHWC->NCHW input batch and every encoder activation computed by Flax,
  so the PyTorch port is checked against JAX's own convolution and GroupNorm numerics.
"""

import json
import sys
from pathlib import Path

import jax
import numpy as np
from flax import linen as nn
from flax import serialization
from safetensors.numpy import save_file

CONFIG = {"base_channels": 8, "layers": [3, 4, 6, 3], "in_channels": 4, "patch_size": 2,
          "input_patch_size": 1, "dropout_prob": 0.0, "use_bf16": False, "num_classes": 10}


def groups(channels: int, max_groups: int = 32) -> int:
    count = min(max_groups, channels)
    while channels % count:
        count -= 1
    return count


class Block(nn.Module):
    filters: int
    stride: int = 1

    def setup(self):
        self.conv1 = nn.Conv(self.filters, (3, 3), strides=self.stride, padding=1, use_bias=False)
        self.gn1 = nn.GroupNorm(num_groups=groups(self.filters))
        self.conv2 = nn.Conv(self.filters, (3, 3), strides=1, padding=1, use_bias=False)
        self.gn2 = nn.GroupNorm(num_groups=groups(self.filters))
        self.proj_conv = nn.Conv(self.filters, (1, 1), strides=self.stride, use_bias=False)
        self.proj_gn = nn.GroupNorm(num_groups=groups(self.filters))

    def __call__(self, x):
        y = self.gn2(self.conv2(nn.relu(self.gn1(self.conv1(x)))))
        skip = x if x.shape == y.shape else self.proj_gn(self.proj_conv(x))
        return nn.relu(skip + y)


class Encoder(nn.Module):
    base_channels: int
    layers: tuple

    def setup(self):
        self.conv1 = nn.Conv(self.base_channels, (3, 3), strides=1, padding=1, use_bias=False)
        self.gn1 = nn.GroupNorm(num_groups=groups(self.base_channels))
        stages = []
        for index, depth in enumerate(self.layers):
            width = self.base_channels * 2**index
            blocks = [Block(width, stride=2 if index else 1)] + [Block(width) for _ in range(depth - 1)]
            stages.append(nn.Sequential(blocks))
            setattr(self, f"layer{index + 1}_norm", nn.GroupNorm(num_groups=groups(width)))
        self.stages = stages

    def __call__(self, x):
        x = nn.relu(self.gn1(self.conv1(x)))
        maps = {"conv1": x}
        for index, stage in enumerate(self.stages):
            for number, block in enumerate(stage.layers, start=1):
                x = block(x)
                maps[f"layer{index + 1}_blk{number}"] = x
            x = getattr(self, f"layer{index + 1}_norm")(x)
            maps[f"layer{index + 1}"] = x
        return maps


class MAE(nn.Module):
    base_channels: int
    layers: tuple
    num_classes: int

    def setup(self):
        self.encoder = Encoder(self.base_channels, self.layers)
        self.fc = nn.Dense(self.num_classes)

    def __call__(self, x):
        maps = self.encoder(x)
        self.fc(maps["layer4"].mean(axis=(1, 2)))
        return maps


def main(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    model = MAE(CONFIG["base_channels"], tuple(CONFIG["layers"]), CONFIG["num_classes"])
    inputs = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, CONFIG["in_channels"]))
    params = model.init(jax.random.PRNGKey(0), inputs)["params"]
    # GroupNorm initialises scale=1, bias=0: perturb them so the converter's mapping of both is tested.
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
    leaves = [leaf + 0.1 * jax.random.normal(key, leaf.shape) for leaf, key in zip(leaves, keys)]
    params = jax.tree_util.tree_unflatten(tree, leaves)
    maps = model.apply({"params": params}, inputs)
    (out_dir / "ema_params.msgpack").write_bytes(serialization.msgpack_serialize({"params": params}))
    (out_dir / "metadata.json").write_text(json.dumps({"model_config": CONFIG}, indent=2))
    tensors = {"input": np.asarray(inputs).transpose(0, 3, 1, 2).copy()}
    tensors.update({name: np.asarray(value).transpose(0, 3, 1, 2).copy() for name, value in maps.items()})
    save_file(tensors, str(out_dir / "expected.safetensors"))
    print(f"wrote {out_dir}: encoder modules {sorted(params['encoder'])}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
