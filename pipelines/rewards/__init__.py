"""Rewards: the one registry behind ``--reward``, and every kind of reward DrPO can rank with.

=============== ===========================================================================
``protocol.py`` what a reward receives and returns; ``score_candidates`` enforces it
``rules.py``    weight-free rules: ``color_match``, ``jpeg_compressibility``, ``jpeg_incompressibility``
``models.py``   model rewards: PickScore, CLIP score, LAION aesthetic, HPS v2 / v2.1, ImageReward, HPSv3
``geneval.py``  GenEval task checks (binary, non-differentiable)
``mixture.py``  ``a,b,...`` mixtures, z-scored per prompt and weighted
``remote.py``   the ``http://host:port/score`` client; ``server.py`` serves any reward over HTTP
=============== ===========================================================================

``--reward`` takes a name of ``REWARDS``, ``path/to/file.py:function``, ``package.module:function``, a
server URL, or a comma-separated mixture of any of these.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import urllib.error
from dataclasses import dataclass
from typing import Callable, Sequence

from pipelines.rewards import geneval, models, rules
from pipelines.rewards.mixture import MixtureReward
from pipelines.rewards.protocol import RewardError, RewardFn, RewardScores, score_candidates
from pipelines.rewards.remote import RemoteReward, ShardedRemoteReward, probe_server

__all__ = ["REWARDS", "RewardEntry", "RewardError", "RewardFn", "RewardScores", "check_reward_spec", "load_reward",
           "reward_help", "score_candidates"]


@dataclass(frozen=True)
class RewardEntry:
    """A named reward: how to load it on a device, what it measures, what it downloads."""

    load: Callable[..., RewardFn]
    measures: str
    downloads: str = ""  # empty: needs no weights
    differentiable: bool = False
    hub: tuple[str, ...] = ()  # what it fetches from the Hub (pipelines.downloads resources), checked at start
    requires: tuple[str, str] | None = None  # (module, the install that provides it) beyond the core install


def _rule(function: RewardFn) -> Callable[..., RewardFn]:
    return lambda device="cpu": function


HPS_EXTRA = ("open_clip", "pip install -e .[hps]")
REWARDS: dict[str, RewardEntry] = {
    "color_match": RewardEntry(_rule(rules.color_match), "share of the image in the colour the prompt names "
                                                         "(fits the tiny models)"),
    "jpeg_compressibility": RewardEntry(_rule(rules.jpeg_compressibility), "minus the JPEG size in kB (DDPO)"),
    "jpeg_incompressibility": RewardEntry(_rule(rules.jpeg_incompressibility), "the JPEG size in kB (DDPO)"),
    "pickscore": RewardEntry(models.pickscore, "PickScore_v1, the paper's default",
                             "yuvalkirstain/PickScore_v1 + laion/CLIP-ViT-H-14-laion2B-s32B-b79K tokenizer (~4 GB)",
                             differentiable=True,
                             hub=("yuvalkirstain/PickScore_v1", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K")),
    "clip": RewardEntry(models.clip_score, "CLIP ViT-L/14 image-prompt cosine",
                        "openai/clip-vit-large-patch14 (~1.7 GB)", differentiable=True,
                        hub=("openai/clip-vit-large-patch14",)),
    "aesthetic": RewardEntry(models.aesthetic, "LAION aesthetic predictor v2 (ignores the prompt)",
                             "openai/clip-vit-large-patch14 (~1.7 GB) + the LAION aesthetic v2 head from GitHub (4 MB)",
                             differentiable=True, hub=("openai/clip-vit-large-patch14",)),
    "hpsv2": RewardEntry(models.hpsv2, "Human Preference Score v2",
                         f"{models.HPS_REPO}:HPS_v2_compressed.pt (open_clip ViT-H-14, ~3.9 GB)", differentiable=True,
                         hub=(f"{models.HPS_REPO}:HPS_v2_compressed.pt",), requires=HPS_EXTRA),
    "hpsv21": RewardEntry(models.hpsv21, "Human Preference Score v2.1",
                          f"{models.HPS_REPO}:HPS_v2.1_compressed.pt (open_clip ViT-H-14, ~3.9 GB)",
                          differentiable=True, hub=(f"{models.HPS_REPO}:HPS_v2.1_compressed.pt",),
                          requires=HPS_EXTRA),
    "imagereward": RewardEntry(models.imagereward, "ImageReward-v1.0",
                               "THUDM/ImageReward: ImageReward.pt + med_config.json (~1.8 GB), tokenizer "
                               "bert-base-uncased", differentiable=True,
                               hub=("THUDM/ImageReward:ImageReward.pt", "THUDM/ImageReward:med_config.json",
                                    "bert-base-uncased"),
                               requires=("ImageReward", "pip install -e .[imagereward] && pip install --no-deps "
                                                        "image-reward==1.5")),
    "hpsv3": RewardEntry(models.hpsv3, "HPSv3 (Qwen2-VL-7B reward model; its own environment)",
                         "MizzenAI/HPSv3:HPSv3.safetensors + Qwen/Qwen2-VL-7B-Instruct (~16 GB), "
                         "and the hpsv3 package",
                         hub=("MizzenAI/HPSv3:HPSv3.safetensors", "Qwen/Qwen2-VL-7B-Instruct")),
    "geneval": RewardEntry(geneval.geneval, "GenEval task checks, binary",
                           "facebook/mask2former-swin-small-coco-instance (~280 MB) + openai/clip-vit-large-patch14 "
                           "(~1.7 GB)", hub=("facebook/mask2former-swin-small-coco-instance",
                                             "openai/clip-vit-large-patch14"),
                           requires=("scipy", "pip install -e .[geneval]")),
}

OTHER_SPECS = ("a comma-separated mixture like pickscore,clip, a server URL http://host:port/score (several "
               "servers of one reward joined by '|', each call split across them), or path/to/file.py:function / "
               "package.module:function")


def reward_help() -> str:
    """The ``--reward`` help text, from the registry."""
    return f"One of {', '.join(REWARDS)}; or {OTHER_SPECS}."


def mixture_parts(spec: str) -> list[str]:
    """The components of ``a,b,...`` (a single reward is a mixture of one)."""
    return [part.strip() for part in spec.split(",") if part.strip()]


def is_url(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


def load_custom_reward(spec: str) -> RewardFn:
    """``path/to/file.py:function`` or ``package.module:function``."""
    location, function_name = spec.rsplit(":", 1)
    if location.endswith(".py"):
        if not os.path.isfile(location):
            raise FileNotFoundError(f"reward file {location!r} does not exist")
        module_spec = importlib.util.spec_from_file_location(f"drpo_custom_reward_{abs(hash(location))}", location)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(location)
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ValueError(f"{location!r} has no callable {function_name!r} to use as a reward")
    return function


def load_reward(spec: str, device="cpu", weights: Sequence[float] | None = None,
                remote_timeout: float = 60.0) -> RewardFn:
    """The reward a ``--reward`` spec names; model rewards load on ``device``, a server URL answers each
    request within ``remote_timeout`` seconds in all (``--reward_timeout``) or is retried.

    A named model reward that cannot get its weights raises ``OSError`` naming them.
    """
    parts = mixture_parts(spec)
    if len(parts) > 1:
        components = {part: load_reward(part, device, remote_timeout=remote_timeout) for part in parts}
        return MixtureReward(components, list(weights) if weights else [1.0] * len(parts))
    spec = parts[0] if parts else spec
    if is_url(spec) and "|" in spec:  # one reward on several servers
        return ShardedRemoteReward([url.strip() for url in spec.split("|")], timeout=remote_timeout)
    if is_url(spec):
        return RemoteReward(spec, timeout=remote_timeout)
    if spec in REWARDS:
        entry = REWARDS[spec]
        try:
            return entry.load(device=device)
        except (OSError, urllib.error.URLError) as error:
            raise OSError(f"reward {spec!r} needs the weights {entry.downloads}; loading failed: {error}") from error
    if ":" in spec:
        return load_custom_reward(spec)
    raise ValueError(f"Unknown reward {spec!r}; choose one of {', '.join(REWARDS)}, or {OTHER_SPECS}.")


def hub_resources(spec: str) -> list[str]:
    """What the named rewards of ``spec`` (a mixture included) fetch from the Hub."""
    return [resource for part in mixture_parts(spec) if part in REWARDS for resource in REWARDS[part].hub]


def check_installed(name: str, flag: str = "--reward") -> None:
    """A named reward whose package is an optional install: present, or a ValueError saying the command."""
    import importlib.util

    requires = REWARDS[name].requires
    if requires is not None and importlib.util.find_spec(requires[0]) is None:
        raise ValueError(f"{flag} {name} needs the {requires[0]} package, an optional install: {requires[1]}")


def check_reward_spec(spec: str, weights: Sequence[float] | None, flag: str = "--reward") -> None:
    """Cheap validation of ``--reward`` / ``--reward_weights`` (no model loading): names, files, weight count."""
    parts = mixture_parts(spec)
    if not parts:
        raise ValueError(f"{flag} is empty")
    if weights is not None and len(weights) != len(parts):
        raise ValueError(f"--reward_weights has {len(weights)} values for {len(parts)} rewards in {spec!r}")
    for part in parts:
        if part in REWARDS:
            check_installed(part, flag)
            continue
        if is_url(part):  # servers are probed by ``probe_servers``, after the cheap checks
            continue
        location, colon, function = part.rpartition(":")
        if colon and (not location.strip() or not function.strip()):
            raise ValueError(f"{flag} {part!r}: a custom reward is path/to/file.py:function or package.module:function "
                             "(both parts needed)")
        try:
            load_reward(part)  # custom functions: the file / module must exist; unknown names list the choices
        except (ImportError, OSError, ValueError) as error:
            raise ValueError(f"{flag} {part!r}: {error}") from error


def probe_servers(spec: str) -> None:
    """GET the /health of every server a spec names (start-up, after every check that needs no network):
    a server that is down or refuses the token stops the run before any model loads."""
    for part in mixture_parts(spec):
        if is_url(part):
            for url in part.split("|"):
                probe_server(url.strip())
