"""The methods the training loop runs, in one registry: DrPO (``train_drpo.py``, Algorithm 1) and the
paper's baselines (``pipelines/baselines/``, Appendix C).

A method is one ``Method`` entry that carries everything the rest of the code asks about it: its
per-prompt ``propose`` / ``update`` (the loop, chunking, overlapped scoring, DDP and checkpoints are
shared), its own options (a frozen dataclass whose fields are its flags), whether it differentiates the
reward, and its offline form (``--preference_dataset``), if it has one. ``--method``'s choices, the
start-up checks and their messages all come from here.

Adding a method: write its module (propose, update, an options dataclass, ``register(Method(...))``)
and add the module to ``BUILTIN`` below; or, from any code, call ``register`` before ``parse_args``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

BUILTIN = ("pipelines.baselines.draft", "pipelines.baselines.vggflow", "pipelines.baselines.dpo",
           "pipelines.baselines.grpo")  # DrPO itself registers from train_drpo.py, where Algorithm 1 is


@dataclass(frozen=True)
class Method:
    """A per-prompt update plugged into the shared loop (``train_drpo.optimisation_step``).

    ``propose(ctx, prompt, rng)`` does the part without gradient (samples, reward calls handed to the
    scorer, so that they can overlap compute); ``update(ctx, proposal)`` yields (loss, is_last) pieces to
    backpropagate and returns the stats to log. ``options``: the dataclass of its own flags (``ctx.options``
    holds the run's values). ``reward_gradient``: the reward is differentiated (a ranking-only reward is
    refused at start-up). ``offline_update(ctx, proposal)``: the update for a prompt's dataset pairs
    (``pipelines.offline.OfflineProposal``), with ``offline_queries`` when it needs the current generator's
    candidates as queries and ``offline_space(options)`` naming the space the pairs are encoded into
    ("features" or "latent").
    """

    name: str
    summary: str
    propose: Callable
    update: Callable
    options: type | None = None
    reward_gradient: bool = False
    offline_update: Callable | None = None
    offline_queries: bool = False
    offline_space: Callable = lambda options: "features"

    @property
    def flags(self) -> list[str]:
        """The ``dest`` of each of the method's own flags."""
        import dataclasses

        return [] if self.options is None else [item.name for item in dataclasses.fields(self.options)]


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` under its name (registering a name twice is a programming error)."""
    if method.name in REGISTRY and REGISTRY[method.name] is not method:
        raise ValueError(f"a method named {method.name!r} is already registered")
    REGISTRY[method.name] = method
    return method


def registered() -> dict[str, Method]:
    """Every method by name, in alphabetical order (whatever order the modules were imported in): the
    built-in modules imported (each registers itself), and whatever else registered."""
    for module in BUILTIN:
        importlib.import_module(module)
    return dict(sorted(REGISTRY.items()))


def names(predicate: Callable[[Method], bool] = lambda method: True) -> list[str]:
    """Registered method names (those ``predicate`` accepts), in registration order."""
    return [name for name, method in registered().items() if predicate(method)]


def ranking_only() -> str:
    """'a, b or c': the methods that only rank, for messages."""
    found = names(lambda method: not method.reward_gradient)
    return ", ".join(found[:-1]) + f" or {found[-1]}" if len(found) > 1 else "".join(found)
