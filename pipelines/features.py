"""Feature maps phi (Section 4.1): the space in which DrPO builds its drift.

A feature map is a frozen ``torch.nn.Module`` with ``forward(latents, images) -> {name: [N, ...]}``:
``latents`` are the generator's x0 latents, ``images`` their VAE decodes in [0, 1] (None unless the
map sets ``needs_images``). It is differentiable in its input, and every named tensor it returns gets
its own drift field and loss term (``drpo_utils.drpo_loss``). ``FEATURE_MAPS`` is the registry that
``--feature_extractor`` chooses from; the latent-MAE network itself is in ``pipelines/latent_mae.py``.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F

import drpo_utils
from pipelines import latent_mae

logger = logging.getLogger(__name__)


class FeatureMap(torch.nn.Module):
    """phi: ``forward(latents, images) -> {name: [N, ...]}``; ``images`` is None unless ``needs_images``.

    A map with ``needs_condition`` also gets the candidates' prompt condition (``forward(latents, images,
    condition)``), and ``bind(pipe)`` hands every map the loaded pipeline before training.
    """

    needs_images = False
    needs_condition = False
    stochastic = False  # another call on the same input gives other features (chunked gradients refuse it)

    def bind(self, pipe) -> None:
        """Called once with the run's pipeline (default: nothing to take from it)."""

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the feature network's activations in backward (no-op for weight-free maps)."""

    def check_vae(self, vae) -> None:
        """Warn when phi was trained for another latent space than this generator's VAE (default: any fits)."""


class LatentFeatures(FeatureMap):
    """phi(x) = the raw x0 latent (Table 3b "Latent")."""

    def forward(self, latents: torch.Tensor, images: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return {"latent": latents.to(drpo_utils.compute_dtype(latents)).flatten(1)}


class ImageFeatures(FeatureMap):
    """phi(x) on the VAE-decoded image: multi-scale average-pooled RGB plus colour moments.

    Three tensors (one drift each): the image pooled to ``fine`` and ``coarse`` grids,
    and per-channel mean / std. A weight-free pixel-space map for small models and tests; the
    paper's learned maps (latent-MAE, DINOv2, MAE) plug into the same registry.
    """

    needs_images = True

    def __init__(self, fine: int = 16, coarse: int = 4):
        super().__init__()
        self.fine, self.coarse = fine, coarse

    def forward(self, latents: torch.Tensor, images: torch.Tensor) -> dict[str, torch.Tensor]:
        images = images.to(drpo_utils.compute_dtype(images))
        return {
            "image_fine": F.adaptive_avg_pool2d(images, self.fine).flatten(1),
            "image_coarse": F.adaptive_avg_pool2d(images, self.coarse).flatten(1),
            "color_moments": torch.cat([images.mean((2, 3)), images.std((2, 3))], dim=1),
        }


class ImageTransformerFeatures(FeatureMap):
    """A frozen ViT on the VAE-decoded image (transformers weights), pooled into four feature tensors.

    The image is resized to ``input_size`` (bicubic, antialiased) and normalised with ImageNet
    statistics; from the last hidden states come the CLS token, the mean and std of the patch tokens,
    and the patch tokens average-pooled to a 2x2 grid: four tensors, one drift each.
    """

    needs_images = True
    DEFAULT_WEIGHTS = ""
    IMAGENET_MEAN = (0.485, 0.456, 0.406)
    IMAGENET_STD = (0.229, 0.224, 0.225)

    def __init__(self, path: str | None = None):
        super().__init__()
        self.model = self.load(path or self.DEFAULT_WEIGHTS)
        self.register_buffer("mean", torch.tensor(self.IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def load(self, path: str):
        raise NotImplementedError

    @property
    def input_size(self) -> int:
        return self.model.config.image_size

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Last hidden states [N, 1 + patches, width], patches in row-major order."""
        raise NotImplementedError

    def enable_gradient_checkpointing(self) -> None:
        """transformers only checkpoints in train mode; with zero dropout that changes nothing else."""
        config = self.model.config
        if config.hidden_dropout_prob or config.attention_probs_dropout_prob:
            raise ValueError(f"gradient checkpointing of {type(self).__name__} needs a config without dropout")
        self.model.gradient_checkpointing_enable()
        self.model.train()

    def forward(self, latents: torch.Tensor, images: torch.Tensor) -> dict[str, torch.Tensor]:
        size = self.input_size
        pixels = F.interpolate(images.float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        pixels = ((pixels - self.mean) / self.std).to(self.model.dtype)
        hidden = self.encode(pixels).float()
        grid = size // self.model.config.patch_size
        patches = hidden[:, 1 : 1 + grid * grid]
        patch_grid = patches.transpose(1, 2).reshape(len(pixels), -1, grid, grid)
        return {
            "cls": hidden[:, 0],
            "patch_mean": patches.mean(1),
            "patch_std": patches.std(1),
            "patch_2x2": F.adaptive_avg_pool2d(patch_grid, 2).flatten(1),
        }


class ViTMAEFeatures(ImageTransformerFeatures):
    """Pixel-space MAE (the paper's map for SDXL-Turbo): ``ViTMAEModel`` with masking off and the
    identity patch shuffle, at its 224 px input."""

    DEFAULT_WEIGHTS = "facebook/vit-mae-base"

    def load(self, path: str):
        from transformers import ViTMAEModel

        return ViTMAEModel.from_pretrained(path, mask_ratio=0.0)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = (self.input_size // self.model.config.patch_size) ** 2
        keep_order = torch.arange(patches, device=pixels.device, dtype=torch.float32).expand(len(pixels), -1)
        return self.model(pixel_values=pixels, noise=keep_order).last_hidden_state


class ReleasedViTMAEFeatures(ViTMAEFeatures):
    """The released SDXL trainer's MAE features (UGVly/DrPO ``FrozenViTMAEImageFeatureExtractor``): three
    tensors of the last encoder layer's hidden states *before* the final LayerNorm — the patch tokens' mean,
    their std sqrt(var + 1e-6) (population variance) and the CLS token — on the image resized bicubically
    (no antialiasing) to the model's input. Masking off and patches in order, as ``vit_mae``: our reading
    of their intent (``vit_mae_released_masked`` keeps what their code does)."""

    MASK_RATIO = 0.0
    STD_EPS = 1e-6

    def load(self, path: str):
        from transformers import ViTMAEModel

        return ViTMAEModel.from_pretrained(path, mask_ratio=self.MASK_RATIO)

    def hidden_before_layernorm(self, pixels: torch.Tensor) -> torch.Tensor:
        noise = None
        if not self.MASK_RATIO:
            patches = (self.input_size // self.model.config.patch_size) ** 2
            noise = torch.arange(patches, device=pixels.device, dtype=torch.float32).expand(len(pixels), -1)
        hidden_states = self.model(pixel_values=pixels, noise=noise, output_hidden_states=True).hidden_states
        return hidden_states[self.model.config.num_hidden_layers]

    def forward(self, latents: torch.Tensor, images: torch.Tensor) -> dict[str, torch.Tensor]:
        size = self.input_size
        pixels = F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False)
        hidden = self.hidden_before_layernorm(((pixels - self.mean) / self.std).to(self.model.dtype)).float()
        patches = hidden[:, 1:]
        variance = (patches - patches.mean(1, keepdim=True)).square().mean(1)
        return {"patch_mean": patches.mean(1), "patch_std": (variance.clamp_min(0) + self.STD_EPS).sqrt(),
                "cls": hidden[:, 0]}


class ReleasedMaskedViTMAEFeatures(ReleasedViTMAEFeatures):
    """``vit_mae_released`` as the released code literally runs it: ``ViTMAEModel`` keeps its configured random
    masking (ratio 0.75) at inference, so each call sees another random quarter of the patches, and A+ / A-
    features differ from those of the same image computed in another call."""

    MASK_RATIO = 0.75
    stochastic = True


class DINOv2Features(ImageTransformerFeatures):
    """VAE-decode + DINOv2 (Table 3b "VAE-dec.+DINOv2"): ``Dinov2Model`` at 224 px, as its processor crops."""

    DEFAULT_WEIGHTS = "facebook/dinov2-base"

    def load(self, path: str):
        from transformers import Dinov2Model

        return Dinov2Model.from_pretrained(path)

    @property
    def input_size(self) -> int:
        return 224 // self.model.config.patch_size * self.model.config.patch_size

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels).last_hidden_state


def activation_statistics(name: str, activation: torch.Tensor, patch_sizes=(2, 4)) -> dict[str, torch.Tensor]:
    """The drifting models' pooled features of one activation [N, C, H, W], in float32 (float64 stays float64).

    ``{name}_mean`` / ``{name}_std``: per-channel mean and std over space, [N, C]; ``{name}_mean_{p}`` /
    ``{name}_std_{p}``: the same inside each p x p patch, row-major patches flattened to [N, H*W/p^2 * C]
    (only when p divides H and W). std = sqrt(var + 1e-6), as in the release, so it stays differentiable
    where an activation is constant.
    """
    x = activation.to(drpo_utils.compute_dtype(activation))
    n, c, h, w = x.shape

    def mean_and_std(values: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        variance = values.var(dim=dim, unbiased=False)
        return values.mean(dim=dim), (variance + 1e-6).sqrt()

    stats = dict(zip((f"{name}_mean", f"{name}_std"), mean_and_std(x.flatten(2), dim=2)))
    for size in patch_sizes:
        if h % size or w % size:
            continue
        patches = x.view(n, c, h // size, size, w // size, size).permute(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(n, (h // size) * (w // size), c, size * size)
        patch_mean, patch_std = mean_and_std(patches, dim=3)
        stats.update({f"{name}_mean_{size}": patch_mean.flatten(1), f"{name}_std_{size}": patch_std.flatten(1)})
    return stats


class LatentMAEFeatures(FeatureMap):
    """latent-MAE1 (Table 3b, the paper's SD-Turbo default): the drifting models' latent-MAE encoder on the
    x0 latent (SD-VAE latents times the scaling factor, as the encoder was trained), multi-layer.

    Sources: every stage output ``layer{s}`` and every second block inside a stage ``layer{s}_blk{b}``;
    each gives ``activation_statistics`` (mean/std globally and over 2x2 / 4x4 patches), one drift each.
    """

    DEFAULT_WEIGHTS = latent_mae.DEFAULT_WEIGHTS

    def __init__(self, path: str | None = None):
        super().__init__()
        self.encoder = latent_mae.load_latent_mae(path or self.DEFAULT_WEIGHTS)
        self.sources = self.source_names(self.encoder.config["layers"])

    @staticmethod
    def source_names(layers) -> list[str]:
        names = []
        for stage, depth in enumerate(layers, start=1):
            names += [f"layer{stage}_blk{block}" for block in range(2, depth, 2)] + [f"layer{stage}"]
        return names

    def enable_gradient_checkpointing(self) -> None:
        self.encoder.gradient_checkpointing = True

    def check_vae(self, vae) -> None:
        if vae.config.scaling_factor != latent_mae.SD_VAE_SCALING_FACTOR or vae.config.latent_channels != 4:
            logger.warning(
                "the latent-MAE was trained on SD-VAE latents (4 channels, scaling factor %s); this VAE has %s "
                "channels and scaling factor %s, so its features may mean little (SDXL: use vit_mae)",
                latent_mae.SD_VAE_SCALING_FACTOR, vae.config.latent_channels, vae.config.scaling_factor)

    def forward(self, latents: torch.Tensor, images: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        activations = self.encoder(latents.to(self.encoder.conv1.weight.dtype))
        features = {}
        for name in self.sources:
            features.update(activation_statistics(name, activations[name]))
        return features


class LatentMAELastThreeFeatures(LatentMAEFeatures):
    """latent-MAE2 (Table 3b): the last three stage outputs only."""

    @staticmethod
    def source_names(layers) -> list[str]:
        return [f"layer{stage}" for stage in range(len(layers) - 2, len(layers) + 1)]


class LatentMAEFinalFeatures(LatentMAEFeatures):
    """latent-MAE3 (Table 3b): the final stage output only."""

    @staticmethod
    def source_names(layers) -> list[str]:
        return [f"layer{len(layers)}"]


TEACHER_LAYERS = ("down_blocks.2", "mid_block", "up_blocks.0")


class TeacherUNetFeatures(FeatureMap):
    """The frozen base UNet's own activations (the DrPO authors' SDXL-Turbo recipe,
    ``scripts/train/sdxl_turbo_drpo_teacher.sh``): the x0 latent plus noise 0.1 is run through the
    generator's UNet with its LoRA disabled at timestep 100 under the candidates' prompt condition, and
    the outputs of ``down_blocks.2``, ``mid_block`` and ``up_blocks.0`` are average-pooled 4x4 (a map
    smaller than 4 is pooled to 1x1): one drift per layer.

    The noise is one fixed Gaussian pattern (seeded) shared by every sample, so phi is a deterministic
    function of the latent: the same for Z, R and recomputed chunks. (The authors draw fresh noise at
    every call.) Gradient checkpointing is switched off inside the call: a recompute in backward
    would run with the LoRA enabled.
    """

    needs_condition = True

    def __init__(self, layers=TEACHER_LAYERS, noise: float = 0.1, timestep: int = 100, pool: int = 4, seed: int = 0):
        super().__init__()
        self.layers, self.noise, self.timestep, self.pool, self.seed = tuple(layers), noise, timestep, pool, seed
        self._unet = []  # the generator's UNet, bound later (a list: not registered as this module's parameters)

    def bind(self, pipe) -> None:
        if not hasattr(pipe, "unet"):
            raise ValueError(f"--feature_extractor teacher_unet reads a UNet's activations; {type(pipe).__name__} has "
                             "a transformer: choose another feature map (vit_mae, dinov2, image, latent)")
        for name in self.layers:
            pipe.unet.get_submodule(name)  # a wrong layer name fails now, naming it
        self._unet[:] = [pipe.unet]

    def noise_pattern(self, latents: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randn(latents.shape[1:], generator=generator).to(latents.device, latents.dtype)

    def pooled(self, activation: torch.Tensor) -> torch.Tensor:
        if min(activation.shape[-2:]) >= self.pool:
            return F.avg_pool2d(activation.to(drpo_utils.compute_dtype(activation)), self.pool).flatten(1)
        return F.adaptive_avg_pool2d(activation.to(drpo_utils.compute_dtype(activation)), 1).flatten(1)

    def forward(self, latents: torch.Tensor, images: torch.Tensor | None, condition: dict) -> dict[str, torch.Tensor]:
        (unet,) = self._unet
        captured = {}

        def keep(name):
            def hook(module, inputs, output):
                captured[name] = output[0] if isinstance(output, tuple) else output
            return hook

        noisy = latents + self.noise * self.noise_pattern(latents)
        timesteps = torch.full((len(latents),), self.timestep, device=latents.device)
        handles = [unet.get_submodule(name).register_forward_hook(keep(name)) for name in self.layers]
        checkpointed = [m for m in unet.modules() if getattr(m, "gradient_checkpointing", False)]
        try:
            for module in checkpointed:
                module.gradient_checkpointing = False
            with drpo_utils.lora_disabled(unet):
                unet(noisy.to(unet.dtype), timesteps, **drpo_utils.unet_inputs(condition), return_dict=False)
        finally:
            for handle in handles:
                handle.remove()
            for module in checkpointed:
                module.gradient_checkpointing = True
        return {name: self.pooled(captured[name]) for name in self.layers}


FEATURE_MAPS: dict[str, Callable[..., FeatureMap]] = {
    "latent_mae": LatentMAEFeatures, "latent_mae1": LatentMAEFeatures, "latent_mae2": LatentMAELastThreeFeatures,
    "latent_mae3": LatentMAEFinalFeatures,
    "latent": LatentFeatures, "image": ImageFeatures, "vit_mae": ViTMAEFeatures,
    "vit_mae_released": ReleasedViTMAEFeatures, "vit_mae_released_masked": ReleasedMaskedViTMAEFeatures,
    "dinov2": DINOv2Features, "teacher_unet": TeacherUNetFeatures,
}
# The maps that load a network (and so take --feature_extractor_path).
WEIGHTED_FEATURE_MAPS = {name for name, cls in FEATURE_MAPS.items() if getattr(cls, "DEFAULT_WEIGHTS", "")}


def build_feature_map(name: str, path: str | None = None) -> FeatureMap:
    """A frozen feature map from the registry, in eval mode, with clear errors for missing or wrong weights."""
    if name not in FEATURE_MAPS:
        raise ValueError(f"Unknown feature extractor {name!r}; choose one of {', '.join(FEATURE_MAPS)}.")
    if name not in WEIGHTED_FEATURE_MAPS:
        if path is not None:
            raise ValueError(f"--feature_extractor {name!r} has no weights to load; remove --feature_extractor_path "
                             f"{path!r} (it would be ignored)")
        return FEATURE_MAPS[name]().eval().requires_grad_(False)
    weights = path or FEATURE_MAPS[name].DEFAULT_WEIGHTS
    try:
        feature_map = FEATURE_MAPS[name](path)
    except OSError as error:
        raise OSError(
            f"feature extractor {name!r} needs the weights {weights!r} (downloaded from the Hub, or a local folder "
            f"given with --feature_extractor_path); loading failed: {error}"
        ) from error
    except Exception as error:  # noqa: BLE001 - e.g. a SafetensorError or JSON error from a file that is no model
        raise OSError(f"--feature_extractor_path {weights!r} is not a {name} model: {type(error).__name__}: {error}") \
            from error
    return feature_map.eval().requires_grad_(False)
