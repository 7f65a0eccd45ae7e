"""Pictures people look at: image rows and the labelled grid (per prompt, its text, then one labelled row of
images per model) that validation, the final check and the evaluation all write."""

from __future__ import annotations

import torch


def to_pil(images: torch.Tensor):
    """[N, 3, H, W] in [0, 1] -> one PIL image, the N images side by side."""
    from PIL import Image

    row = torch.cat(list(images), dim=2)
    return Image.fromarray((row.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy())


def labelled_grid(prompts: list[str], rows: dict[str, torch.Tensor], per_prompt: int):
    """Per prompt: a caption line with the prompt, then one row per entry of ``rows`` with its label on the
    left (e.g. ``{"base": ..., "LoRA": ...}``, each [len(prompts) * per_prompt, 3, H, W], prompt-major)."""
    from PIL import Image, ImageDraw, ImageFont

    height, width = next(iter(rows.values())).shape[-2:]
    font = ImageFont.load_default(size=max(10, min(16, height // 5)))
    label_width = max(int(font.getlength(label)) for label in rows) + 12
    caption = font.size + 8
    canvas_width = max([label_width + per_prompt * width] + [int(font.getlength(p)) + 8 for p in prompts])
    canvas = Image.new("RGB", (canvas_width, len(prompts) * (caption + len(rows) * height)), "white")
    draw, top = ImageDraw.Draw(canvas), 0
    for index, prompt in enumerate(prompts):
        draw.text((4, top + 3), prompt, fill="black", font=font)
        top += caption
        for label, images in rows.items():
            draw.text((4, top + height // 2 - font.size // 2), label, fill="black", font=font)
            canvas.paste(to_pil(images[index * per_prompt:(index + 1) * per_prompt]), (label_width, top))
            top += height
    return canvas
