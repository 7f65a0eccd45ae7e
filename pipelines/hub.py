"""What leaves the machine: the trackers' config and the run's ``config.yaml`` (never a secret), the Hub
repository and its upload, and the base model's licence for the model card."""

from __future__ import annotations

import dataclasses
import os
import re

from pipelines import files, flags
from pipelines.config import HubConfig, TrainingConfig
from pipelines.redact import public_text

SECRET_NAME = re.compile(r"(^|_)(token|secret|password|api_?key)$", re.I)  # hub_token, not max_new_tokens


def public_config(config: TrainingConfig) -> dict:
    """The run's settings for the trackers, flat and scalar, without secrets: no token-like field, no
    credential in a URL (TensorBoard writes the config into its event files, wandb uploads it)."""
    flat = {}
    for part in dataclasses.fields(config):
        values = getattr(config, part.name)
        for item in dataclasses.fields(values):
            value = getattr(values, item.name)
            value = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
            for key, leaf in (value.items() if isinstance(value, dict) else [(item.name, value)]):
                leaf = ",".join(map(str, leaf)) if isinstance(leaf, (list, tuple)) else leaf
                if SECRET_NAME.search(key) or not isinstance(leaf, (int, float, str, bool)):
                    continue
                flat[key] = public_text(leaf) if isinstance(leaf, str) else leaf
    return flat


def public_flags(values: dict) -> dict:
    """Flag values as ``config.yaml`` publishes them: no token-like flag, no credential in a URL (in a
    string or in a list of them)."""
    def public(value):
        if isinstance(value, str):
            return public_text(value)
        return [public(item) for item in value] if isinstance(value, (list, tuple)) else value

    return {key: public(value) for key, value in values.items() if not SECRET_NAME.search(key)}


RUN_CONFIG = "config.yaml"


def write_run_config(output_dir: str, run_config: dict) -> None:
    """``config.yaml`` in the run folder: the resolved flags, reusable as ``--config`` (``run_config``: the
    script and its flags, from ``parse_and_check``)."""
    always = ("\nand the drift preset and the method's own flags at any value (their defaults have changed before)"
              if "drift_preset" in run_config["flags"] else "")
    header = (f"The flags of this run that differ from their defaults (--config file and command line resolved)"
              f"{always}.\nRerun: accelerate launch {run_config['script']} --config {RUN_CONFIG}")
    files.write_text(os.path.join(output_dir, RUN_CONFIG), flags.config_yaml(run_config["flags"], header))


def init_trackers(accelerator, config: TrainingConfig) -> None:
    if accelerator.is_main_process and config.run.report_to != "none":
        accelerator.init_trackers(config.run.tracker_project_name, config=public_config(config))


def hub_token(hub: HubConfig) -> str | None:
    from huggingface_hub import get_token

    return hub.hub_token or get_token()


def repo_name(hub: HubConfig, output_dir: str) -> str:
    return hub.hub_model_id or os.path.basename(os.path.abspath(output_dir))


def create_hub_repo(hub: HubConfig, output_dir: str) -> str:
    """Create (or reuse) the Hub repository at start-up, so auth problems fail before training."""
    from huggingface_hub import create_repo

    return create_repo(repo_name(hub, output_dir), exist_ok=True, token=hub_token(hub)).repo_id


def push_to_hub(hub: HubConfig, output_dir: str, repo_id: str) -> None:
    from huggingface_hub import upload_folder

    upload_folder(repo_id=repo_id, folder_path=output_dir, commit_message="DrPO LoRA", token=hub_token(hub),
                  ignore_patterns=["checkpoint-*", "checkpoint-*/**", "logs/**", "*.tmp", ".drpo*"])


CARD_START, CARD_END = "<!-- drpo:card -->", "<!-- /drpo:card -->"  # the part of a card this project writes
CARD_FIELDS = ("base_model", "library_name", "license", "license_name", "license_link", "widget")


def hub_card_text(repo_id: str, token: str | None) -> str | None:
    """The README.md the Hub repository holds already, or None (a new repository)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    try:
        with open(hf_hub_download(repo_id, "README.md", token=token), encoding="utf-8") as handle:
            return handle.read()
    except RemoteEntryNotFoundError:
        return None
    except Exception as error:  # noqa: BLE001 - unreadable is not absent: never overwrite a card unseen
        raise RuntimeError(f"could not read the model card {repo_id} already has ({type(error).__name__}: {error}); "
                           "nothing was uploaded, the outputs are in the output folder: upload them with `hf upload` "
                           "once the Hub answers") from error


def merge_model_cards(existing: str, ours: str) -> str:
    """diffusers' convention (``load_or_create_model_card``): a card already on the Hub is kept — its text
    and metadata — and extended: our tags join its own, the fields it lacks (base model, licence, widget)
    are filled, and our section is added, or replaced where an earlier push left it."""
    from huggingface_hub import ModelCard

    kept, new = ModelCard(existing), ModelCard(ours)
    kept.data.tags = list(dict.fromkeys([*(kept.data.tags or []), *(new.data.tags or [])]))
    for field in CARD_FIELDS:
        if getattr(kept.data, field, None) is None and getattr(new.data, field, None) is not None:
            setattr(kept.data, field, getattr(new.data, field))
    section = new.text[new.text.index(CARD_START):new.text.index(CARD_END) + len(CARD_END)]
    text = kept.text
    if CARD_START in text and CARD_END in text:
        text = text[:text.index(CARD_START)] + section + text[text.index(CARD_END) + len(CARD_END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    return str(ModelCard(f"---\n{kept.data.to_yaml()}\n---\n{text}"))


def extend_existing_card(hub: HubConfig, output_dir: str, repo_id: str) -> None:
    """Before the upload: the output folder's card merged into the one the repository holds, if any."""
    existing = hub_card_text(repo_id, hub_token(hub))
    if existing is None:
        return
    path = os.path.join(output_dir, "README.md")
    with open(path, encoding="utf-8") as handle:
        ours = handle.read()
    files.write_text(path, merge_model_cards(existing, ours))


def hub_base_model(name_or_path: str) -> str | None:
    """The base model's Hub id for the card's ``base_model``: the id itself, the repo of a Hub cache
    snapshot folder, or None for a model that only exists on this disk."""
    if not os.path.exists(name_or_path):
        return name_or_path
    match = re.search(r"models--([^/\\]+?)--([^/\\]+)[/\\]snapshots", os.path.abspath(name_or_path))
    return f"{match.group(1)}/{match.group(2)}" if match else None


# The base models' own card metadata (license, license_name, license_link), for runs without Hub access.
KNOWN_LICENCES = {repo: ("other", "sai-nc-community", f"https://huggingface.co/{repo}/blob/main/LICENSE.md")
                  for repo in ("stabilityai/sd-turbo", "stabilityai/sdxl-turbo")}
KNOWN_LICENCES["black-forest-labs/FLUX.1-schnell"] = ("apache-2.0", None, None)


def base_model_licence(base_model: str | None) -> tuple[str, str | None, str | None]:
    """(license, license_name, license_link) of the base model's Hub card, else of KNOWN_LICENCES, else
    ("other", None, None)."""
    try:  # a local model (None) fails here too
        from huggingface_hub import ModelCard

        data = ModelCard.load(base_model).data
        if data.license:
            return data.license, data.get("license_name"), data.get("license_link")
    except Exception:  # noqa: BLE001 - offline, private or missing card: the table below, then "other"
        pass
    return KNOWN_LICENCES.get(base_model, ("other", None, None))


def family_tags(pipeline_cls) -> list[str]:
    """diffusers' tags of the model family, as its training examples write them."""
    family = "flux" if pipeline_cls.__name__.startswith("Flux") else \
        "stable-diffusion-xl" if "XL" in pipeline_cls.__name__ else "stable-diffusion"
    return [family, f"{family}-diffusers"]
