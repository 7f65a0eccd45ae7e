import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_SD = os.path.join(ROOT, "assets", "tiny-sd-turbo")
PROMPTS = os.path.join(ROOT, "assets", "tiny_prompts.txt")


@pytest.fixture(scope="session")
def tiny_sd():
    return TINY_SD


def build_random_pipeline(path: str, prediction_type: str = "epsilon") -> str:
    """An untrained SD-Turbo-shaped pipeline saved with save_pretrained (fast; for exactness tests)."""
    import torch
    from diffusers import StableDiffusionPipeline

    from pipelines.build_tiny_models import build_scheduler, build_text_encoder, build_tokenizer, build_unet, build_vae

    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(len(tokenizer))
    scheduler = build_scheduler()
    scheduler.register_to_config(prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(
        vae=build_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=build_unet(text_encoder.config.hidden_size),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path
