import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_SD = os.path.join(ROOT, "assets", "tiny-sd-turbo")
TINY_SDXL = os.path.join(ROOT, "assets", "tiny-sdxl-turbo")
PROMPTS = os.path.join(ROOT, "assets", "tiny_prompts.txt")


@pytest.fixture(scope="session")
def tiny_sd():
    return TINY_SD


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
