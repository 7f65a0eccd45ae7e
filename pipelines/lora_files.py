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


def denoiser_name(pipeline_cls) -> str:
    """The LoRA keys' prefix in the pipeline's LoRA format: ``unet`` (SD, SDXL), ``transformer`` (FLUX)."""
    return getattr(pipeline_cls, "unet_name", None) or pipeline_cls.transformer_name


def save_lora(directory: str, unet, pipeline_cls) -> None:
    """``pytorch_lora_weights.safetensors`` (keys ``unet.*``; FLUX: ``transformer.*``) with the adapter metadata
    (alpha, rank); identical runs write identical bytes."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state_dict = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    denoiser = denoiser_name(pipeline_cls)
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".drpo-lora-") as staging:  # a whole file or none
        pipeline_cls.save_lora_weights(staging, **{f"{denoiser}_lora_layers": state_dict,
                                                   f"{denoiser}_lora_adapter_metadata": adapter_metadata(unet)})
        for name in os.listdir(staging):
            canonical_header(os.path.join(staging, name))
            os.replace(os.path.join(staging, name), os.path.join(directory, name))


def kohya_base_model_version(pipeline_cls, cross_attention_dim: int) -> str:
    """kohya's ``ss_base_model_version`` of the base model: SDXL, SD 2.x (SD-Turbo; 1024-d text) or SD 1.x."""
    if "XL" in pipeline_cls.__name__:
        return "sdxl_base_v1-0"
    return "sd_v2" if cross_attention_dim == 1024 else "sd_v1"


def save_kohya_lora(directory: str, alpha: float, base_model_version: str) -> str:
    """The saved LoRA in kohya's key names (``lora_unet_...``, ``.lora_down``/``.lora_up``, ``.alpha``),
    which ComfyUI and A1111 load; converted by diffusers' ``convert_state_dict_to_kohya``, whose ``.alpha``
    entries are the rank, so they are set to the run's alpha (the scale alpha / rank must survive). The
    ``ss_*`` metadata kohya's tools read: network module, dim (rank), alpha, base model version."""
    from diffusers.utils import convert_all_state_dict_to_peft, convert_state_dict_to_kohya
    from safetensors.torch import load_file, save_file

    diffusers_keys = load_file(os.path.join(directory, LORA_FILE))
    kohya = convert_state_dict_to_kohya(convert_all_state_dict_to_peft(diffusers_keys))
    kohya.update({key: torch.tensor(float(alpha)) for key in kohya if key.endswith(".alpha")})
    rank = next(value.shape[0] for key, value in sorted(kohya.items()) if key.endswith(".lora_down.weight"))
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": f"{alpha:g}",
                "ss_base_model_version": base_model_version, "ss_v2": str(base_model_version == "sd_v2"),
                "ss_training_comment": "DrPO (arXiv 2606.02521)"}
    path = os.path.join(directory, KOHYA_FILE)
    with files.atomic_path(path) as staging:
        save_file(kohya, staging, metadata=metadata)
    canonical_header(path)
    return path


def read_lora(source: str, pipeline_cls) -> tuple[dict, dict | None]:
    """(state dict, adapter metadata) of a saved LoRA, through the pipeline's own ``lora_state_dict`` (which
    returns network alphas too for the UNet pipelines, not for FLUX: the metadata is always last)."""
    loaded = pipeline_cls.lora_state_dict(source, return_lora_metadata=True)
    return loaded[0], loaded[-1]


def init_from_lora(unet, adapter: AdapterConfig, pipeline_cls) -> None:
    """``--init_lora``: a new run's adapter starts from an existing LoRA (a folder, a file or a Hub id) whose
    rank, alpha and target modules (from its adapter metadata, else its tensors) are the run's own."""
    state_dict, metadata = read_lora(adapter.init_lora, pipeline_cls)
    name = denoiser_name(pipeline_cls)
    downs = [value for key, value in state_dict.items()
             if key.startswith(f"{name}.") and key.split(".")[-2] in ("down", "lora_A", "lora_down")]
    if not downs:
        raise ValueError(f"--init_lora {adapter.init_lora!r} holds no {name} LoRA weights")
    metadata = metadata or {}
    found = {"--rank": metadata.get(f"{name}.r", downs[0].shape[0]),
             "--lora_alpha": metadata.get(f"{name}.lora_alpha", metadata.get(f"{name}.r", downs[0].shape[0]))}
    wanted = {"--rank": adapter.rank, "--lora_alpha": adapter.lora_alpha}
    if found != wanted:
        given = " ".join(f"{flag}={value}" for flag, value in found.items())
        raise ValueError(f"--init_lora {adapter.init_lora!r} is a LoRA of {given}, this run's is "
                         f"{' '.join(f'{flag}={value}' for flag, value in wanted.items())}: pass {given}")
    load_lora_into_adapter(adapter.init_lora, unet, pipeline_cls)


def load_lora_into_adapter(directory: str, unet, pipeline_cls) -> None:
    """Load saved LoRA weights into the *existing* "default" adapter (never a new ``default_1``)."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    state_dict, prefix = read_lora(directory, pipeline_cls)[0], f"{denoiser_name(pipeline_cls)}."
    unet_state = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(unet_state), adapter_name="default")
    if getattr(result, "unexpected_keys", None):
        raise RuntimeError(f"checkpoint LoRA does not match the model: {result.unexpected_keys[:5]}")
