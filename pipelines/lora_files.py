"""The LoRA and its files: attach the trainable adapter, save it as ``pytorch_lora_weights.safetensors``
(with the adapter metadata, so alpha != rank loads at the right scale) and in kohya's key names, and load
saved weights back into the existing adapter (a resume)."""

from __future__ import annotations

import os
import tempfile

import torch

from pipelines import files
from pipelines.config import AdapterConfig

LORA_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "pytorch_lora_weights_kohya.safetensors"
LORA_TARGET_MODULES = "to_q,to_k,to_v,to_out.0"


def add_lora(unet, adapter: AdapterConfig) -> None:
    """Attach the trainable LoRA adapter ("default") to the frozen UNet (paper: rank 16, attention)."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=adapter.rank, lora_alpha=adapter.lora_alpha, lora_dropout=adapter.lora_dropout,
                                init_lora_weights="gaussian", target_modules=list(adapter.lora_target_modules)))


def adapter_metadata(unet) -> dict:
    """The adapter's peft config as a dict, its sets (target_modules) as sorted lists: a set's order varies
    between processes, and identical runs must write identical bytes."""
    metadata = unet.peft_config["default"].to_dict()
    return {key: sorted(value) if isinstance(value, set) else value for key, value in metadata.items()}


def canonical_header(path: str) -> None:
    """Rewrite a safetensors file's JSON header with sorted keys. The header is written from a hash map
    whose order changes from process to process, so identical runs would write different bytes; the
    tensors' offsets point past the header, whose length does not change."""
    import json
    import struct

    with open(path, "rb") as handle:
        data = handle.read()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.dumps(json.loads(data[8:8 + length]), sort_keys=True, separators=(",", ":")).encode()
    if len(header) > length:  # not the compact JSON safetensors writes: leave the file as it is
        return
    with files.atomic_path(path) as staging, open(staging, "wb") as handle:
        handle.write(data[:8] + header + b" " * (length - len(header)) + data[8 + length:])


def save_lora(directory: str, unet, pipeline_cls) -> None:
    """``pytorch_lora_weights.safetensors`` (keys ``unet.*``) with the adapter metadata (alpha, rank);
    identical runs write identical bytes."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state_dict = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".drpo-lora-") as staging:  # a whole file or none
        pipeline_cls.save_lora_weights(staging, unet_lora_layers=state_dict,
                                       unet_lora_adapter_metadata=adapter_metadata(unet))
        for name in os.listdir(staging):
            canonical_header(os.path.join(staging, name))
            os.replace(os.path.join(staging, name), os.path.join(directory, name))


def save_kohya_lora(directory: str, alpha: float) -> str:
    """The saved LoRA in kohya's key names (``lora_unet_...``, ``.lora_down``/``.lora_up``, ``.alpha``),
    which ComfyUI and A1111 load; converted by diffusers' ``convert_state_dict_to_kohya``, whose ``.alpha``
    entries are the rank, so they are set to the run's alpha (the scale alpha / rank must survive)."""
    from diffusers.utils import convert_all_state_dict_to_peft, convert_state_dict_to_kohya
    from safetensors.torch import load_file, save_file

    diffusers_keys = load_file(os.path.join(directory, LORA_FILE))
    kohya = convert_state_dict_to_kohya(convert_all_state_dict_to_peft(diffusers_keys))
    kohya.update({key: torch.tensor(float(alpha)) for key in kohya if key.endswith(".alpha")})
    path = os.path.join(directory, KOHYA_FILE)
    with files.atomic_path(path) as staging:
        save_file(kohya, staging)
    canonical_header(path)
    return path


def load_lora_into_adapter(directory: str, unet, pipeline_cls) -> None:
    """Load saved LoRA weights into the *existing* "default" adapter (never a new ``default_1``)."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    state_dict = pipeline_cls.lora_state_dict(directory)[0]
    unet_state = {k.removeprefix("unet."): v for k, v in state_dict.items() if k.startswith("unet.")}
    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(unet_state), adapter_name="default")
    if getattr(result, "unexpected_keys", None):
        raise RuntimeError(f"checkpoint LoRA does not match the model: {result.unexpected_keys[:5]}")
