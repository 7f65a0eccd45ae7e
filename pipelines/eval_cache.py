"""The evaluation's models and image cache: which models are compared (the base, LoRAs, finetuned UNets,
the paper's three sampling modes), and the PNG cache every metric, the GenEval checker and the judge read
their images from, keyed by content and checked for damage (``pipelines/content.py``)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass

import torch

from pipelines import files
from pipelines.inference import load_lora

logger = logging.getLogger(__name__)

BASE = "base"
LABEL = re.compile(r"^[\w.+-]+$")


@dataclass(frozen=True)
class EvalModel:
    label: str
    kind: str  # "base", "lora" or "unet" (the paper's three sampling modes)
    path: str | None = None


def split_label(item: str) -> tuple[str | None, str]:
    """``name=spec`` -> (name, spec); a bare spec -> (None, spec)."""
    name, sep, rest = item.partition("=")
    return (name, rest) if sep and LABEL.match(name) and rest else (None, item)


def default_label(path: str) -> str:
    """A local folder's (or file's) base name, else the Hub id as given."""
    if os.path.exists(path):
        name = os.path.basename(os.path.normpath(path))
        return os.path.splitext(name)[0] if os.path.isfile(path) else name
    return path


def parse_models(loras: list[str], unets: list[str]) -> list[EvalModel]:
    models = [EvalModel(BASE, "base")]
    for kind, items in (("lora", loras), ("unet", unets)):
        for item in items:
            name, path = split_label(item)
            models.append(EvalModel(name or default_label(path), kind, path))
    labels = [m.label for m in models]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ValueError(f"model names {repeated} repeat (one is 'base'): name them with --lora name=path")
    return models


def slug(text: str) -> str:
    return re.sub(r"[^\w.+-]+", "--", text).strip("-") or "model"


def resolved(path: str | None) -> str | None:
    return os.path.abspath(path) if path is not None and os.path.exists(path) else path


PIXELS_KEY = "drpo-pixels-sha256"  # a PNG text chunk: the SHA-256 of the image's RGB bytes


def pixel_digest(pixels) -> str:
    """SHA-256 of an [H, W, 3] uint8 array's bytes."""
    import numpy as np

    return hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()


class ImageCache:
    """PNG images per (model, prompt, seed): ``<root>/<model>-<key hash>/<prompt hash>-<seed>.png``.

    The folder's key is the *content* of everything that changes a model's images (``pipelines.content``):
    the base model's files or Hub commit, the LoRA's / UNet's files (the same path retrained is another
    key), a distilled one-step UNet (by content) and its scheduler settings, resolution, dtype, variant and the
    diffusers version; ``model.json`` in each folder says what
    it holds. Each PNG carries the SHA-256 of its pixels: an image that is cut short or altered is named,
    removed and generated again. Writes go through a temporary file (never a half-written image).
    """

    def __init__(self, root: str, base_model: str, resolution: int | None, dtype: str, revision=None, variant=None,
                 generator: dict | None = None):
        import diffusers

        from pipelines.content import source_key

        self.root, self.keys = root, {}
        self.setting = {"base_model": resolved(base_model), "base_model_content": source_key(base_model, revision),
                        "resolution": resolution, "dtype": dtype, "revision": revision, "variant": variant,
                        "diffusers": diffusers.__version__, **(generator or {})}  # a distilled UNet, its scheduler

    def describe(self, model: EvalModel) -> dict:
        """What the model's images depend on (its weights by content), computed once per model."""
        from pipelines.content import source_key

        if model not in self.keys:
            weights = None if model.path is None else source_key(model.path)
            self.keys[model] = {**self.setting, "kind": model.kind, "path": resolved(model.path), "weights": weights}
        return self.keys[model]

    def folder(self, model: EvalModel) -> str:
        key = {name: value for name, value in self.describe(model).items() if name not in ("path", "base_model")}
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
        return os.path.join(self.root, f"{slug(model.label)}-{digest}")

    def path(self, model: EvalModel, prompt: str, seed: int) -> str:
        return os.path.join(self.folder(model), f"{hashlib.sha1(prompt.encode()).hexdigest()[:16]}-{seed}.png")

    def has(self, model: EvalModel, prompt: str, seed: int) -> bool:
        """A whole, unaltered cached image exists; a damaged one is named, removed and so generated again."""
        path = self.path(model, prompt, seed)
        if not os.path.isfile(path):
            return False
        if self.read(path) is None:
            logger.warning(f"cached image {path} is damaged (cut short or altered): generating it again")
            with contextlib.suppress(OSError):
                os.remove(path)
            return False
        return True

    @staticmethod
    def read(path: str):
        """The image's [H, W, 3] uint8 pixels if the file decodes and matches its stored checksum, else None."""
        import numpy as np
        from PIL import Image

        try:
            with Image.open(path) as image:
                image.load()
                pixels, stored = np.asarray(image.convert("RGB")), image.text.get(PIXELS_KEY)
        except (OSError, SyntaxError, ValueError):  # PIL's errors for truncated or invalid files
            return None
        return pixels if stored == pixel_digest(pixels) else None

    def save(self, model: EvalModel, prompt: str, seed: int, image: torch.Tensor) -> None:
        from PIL import Image, PngImagePlugin

        path = self.path(model, prompt, seed)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        pixels = (image.float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        info = PngImagePlugin.PngInfo()
        info.add_text(PIXELS_KEY, pixel_digest(pixels))
        with files.atomic_path(path) as staging:
            Image.fromarray(pixels).save(staging, format="PNG", pnginfo=info)

    def describe_folder(self, model: EvalModel) -> None:
        os.makedirs(self.folder(model), exist_ok=True)
        files.write_json(os.path.join(self.folder(model), "model.json"), {"label": model.label, **self.describe(model)})

    def load(self, model: EvalModel, pairs: list[tuple[str, int]]) -> torch.Tensor:
        """[len(pairs), 3, H, W] float32 in [0, 1] for (prompt, seed) pairs (checked when generation ended)."""
        import numpy as np

        arrays = []
        for prompt, seed in pairs:
            path = self.path(model, prompt, seed)
            pixels = self.read(path)
            if pixels is None:
                raise CacheError(f"cached image {path} is damaged (cut short or altered); run the evaluation again: "
                                 "it generates the damaged images anew")
            arrays.append(pixels)
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous().float() / 255.0


class CacheError(RuntimeError):
    """A cache entry that is damaged."""


@contextlib.contextmanager
def model_weights(pipe, model: EvalModel, dtype, device):
    """The pipeline as ``model``: a LoRA loaded then unloaded, or a finetuned UNet swapped in then out."""
    if model.kind == "lora":
        load_lora(pipe, model.path)
        try:
            yield pipe
        finally:
            pipe.unload_lora_weights()
    elif model.kind == "unet":
        from diffusers import UNet2DConditionModel

        subfolder = "unet" if os.path.isdir(os.path.join(model.path, "unet")) else None
        original = pipe.unet
        pipe.unet = UNet2DConditionModel.from_pretrained(model.path, subfolder=subfolder, dtype=dtype).to(device)
        try:
            yield pipe
        finally:
            pipe.unet = original
    else:
        yield pipe
