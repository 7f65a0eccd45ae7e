"""Weight-free rule rewards: they need no download, so the tiny-model demo and the tests run offline."""

from __future__ import annotations

import io

import torch

# Named colours (RGB in [0, 1]): the tiny models' caption vocabulary and what ``color_match`` looks for.
COLORS = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.75, 0.2),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.85, 0.1),
    "purple": (0.6, 0.15, 0.8),
    "cyan": (0.1, 0.85, 0.9),
    "orange": (1.0, 0.5, 0.05),
    "white": (0.97, 0.97, 0.97),
}


def color_match(images: torch.Tensor, prompts: list[str], width: float = 0.25) -> torch.Tensor:
    """Share of the image painted in the colour the prompt names (0 if it names none of COLORS).

    Fits the embedded tiny models' captions ("a small red circle ..."): it rewards larger, more
    saturated objects of the requested colour.
    """
    scores = []
    for image, prompt in zip(images, prompts):
        named = [word for word in prompt.lower().replace(",", " ").split() if word in COLORS]
        if not named:
            scores.append(0.0)
            continue
        target = torch.tensor(COLORS[named[0]], dtype=image.dtype).view(3, 1, 1)
        closeness = torch.exp(-(image - target).square().sum(0) / (2 * width**2))
        scores.append(closeness.mean().item())
    return torch.tensor(scores)


def jpeg_kilobytes(images: torch.Tensor) -> torch.Tensor:
    """Size of each image saved as JPEG (quality 95), in kB."""
    from PIL import Image

    sizes = []
    for image in (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy():
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=95)
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes)


def jpeg_compressibility(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Negative JPEG size in kB (DDPO's compressibility reward): smoother images score higher."""
    return -jpeg_kilobytes(images)


def jpeg_incompressibility(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """JPEG size in kB (DDPO's incompressibility reward): more detailed images score higher."""
    return jpeg_kilobytes(images)
