"""One prompt's candidates: what every online method shares before its own loss (Algorithm 1, lines 3-6).

Two execution details live here too, because every method's loss goes through them:

- ``RewardScorer`` calls the reward, in a background thread when scoring overlaps compute: within one
  accumulation window the LoRA does not change, so the next prompt's candidates can be generated and
  scored while the current prompt computes its update. Calls keep their order, so results are the
  same as in series.
- ``loss_pieces`` hands the trainer the loss to backpropagate: in one piece (the candidates' graph of
  the single pass), or, with ``--candidate_chunk_size C``, C candidates at a time recomputed with
  gradient, so the activations alive at once are C candidates', not K's.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

import drpo_utils
from pipelines import rewards
from pipelines.config import MethodConfig
from pipelines.inference import denoiser, latent_channels


class RewardScorer:
    """The trainer's reward calls (no gradient, CPU images), in series or in one background thread.

    The background thread runs its own torch CPU work on one thread, so it does not oversubscribe the
    cores the training thread's ops use (measured: without this, overlapping slowed the compute by as
    much as it hid of a remote reward's latency).

    It also notes whether the last prompt's candidates all tied (no ranking: nothing to learn from them),
    for ``TieWatch``.
    """

    def __init__(self, reward_fn: Callable, name: str, background: bool):
        self.reward_fn, self.name = reward_fn, name
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward",
                                           initializer=torch.set_num_threads, initargs=(1,)) if background else None
        self.last_tie: tuple[str, float] | None = None  # (prompt, the score every candidate got)
        self.scored_since_taken = False

    @property
    def background(self) -> bool:
        return self.executor is not None

    def _timed_score(self, images: torch.Tensor, prompts: list[str]):
        start = time.perf_counter()
        scores = rewards.score_candidates(self.reward_fn, images, prompts, self.name)
        return scores, time.perf_counter() - start, prompts[0]

    def submit(self, images: torch.Tensor, prompts: list[str]) -> Future:
        """Start scoring ``images``; in series the call runs now and the future is already done."""
        if self.executor is not None:
            return self.executor.submit(self._timed_score, images, prompts)
        done = Future()
        done.set_result(self._timed_score(images, prompts))
        return done

    def result(self, future: Future) -> tuple[rewards.RewardScores, float]:
        """The scores, and how long the trainer waited for them (in series: the whole reward call)."""
        start = time.perf_counter()
        scores, seconds, prompt = future.result()
        ranking = scores.ranking
        self.last_tie = (prompt, ranking[0].item()) if bool((ranking == ranking[0]).all()) else None
        self.scored_since_taken = True
        return scores, seconds if self.executor is None else time.perf_counter() - start

    def take_tie_flag(self) -> float | None:
        """1.0 if the prompt scored last had all candidates tied, 0.0 if not, None if none was scored since."""
        if not self.scored_since_taken:
            return None
        self.scored_since_taken = False
        return float(self.last_tie is not None)

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True)


class TieWatch:
    """Stops a run whose reward gives no ranking: every prompt of ``limit`` consecutive optimisation steps
    (on every process) had all K candidates tied, so nothing was learnt in them (``--max_tied_steps``).
    A prompt tied now and then is a logged skip (its ``tied`` share of the step)."""

    def __init__(self, limit: int, reward: str):
        self.limit, self.reward, self.run = limit, reward, 0

    def after_step(self, logs: dict, scorer: RewardScorer, num_candidates: int) -> None:
        if "tied" not in logs or not self.limit:
            return
        self.run = self.run + 1 if logs["tied"] >= 1.0 else 0
        if self.run >= self.limit:
            prompt, score = scorer.last_tie or ("?", float("nan"))
            raise rewards.RewardError(
                f"reward {self.reward!r} tied all K={num_candidates} candidates of every prompt for {self.run} "
                f"consecutive steps (e.g. {prompt[:80]!r}: every candidate scored {score:g}): it gives no ranking on "
                f"these prompts, so the run learns nothing. Check that the reward fits the prompts (color_match "
                f"scores 0 on a prompt that names no colour); --max_tied_steps sets this limit (0: never stop).")


@dataclass(frozen=True)
class StepContext:
    """Everything a per-prompt step needs (Algorithm 1, inputs)."""

    accelerator: object
    pipe: object  # the stock pipeline: its UNet with LoRA is g_theta, with LoRA disabled g_ref
    unet: torch.nn.Module  # the denoiser (UNet; FLUX: transformer) as prepared by accelerate (DDP-wrapped)
    scheduler: object  # private copy of the pipeline's scheduler for the differentiable one-step sampler
    timesteps: tuple[int, ...] | None  # the one step's explicit timestep (--timesteps), else the scheduler's
    sample: Callable  # the differentiable one-step sampler: drpo_utils.one_step_latents (UNets) or _flow (FLUX)
    feature_map: torch.nn.Module  # phi
    scorer: RewardScorer  # R, only ranks
    encode_prompts: Callable  # prompt -> condition c (SD or SDXL)
    method: object  # pipelines.methods.Method: the per-prompt update, DrPO or a baseline
    setup: MethodConfig  # K, M, the drift field's config (lambda, eta, radii, kernel, ...), the method's options
    resolution: int
    chunk_size: int | None = None  # C: candidates backpropagated together (--candidate_chunk_size)
    window: tuple[int, int] = (1, 1)  # (micro-steps, prompts per micro-step) of one optimiser step
    max_grad_norm: float = 1.0

    @property
    def drift(self) -> drpo_utils.DriftConfig:
        return self.setup.drift

    @property
    def options(self):
        """The method's own options (its flags' values)."""
        return self.setup.options

    @property
    def num_candidates(self) -> int:
        return self.setup.num_candidates


def prompt_condition(ctx: StepContext, prompt: str, count: int) -> dict:
    """Condition c, encoded once and shared by ``count`` candidates."""
    condition = ctx.encode_prompts(ctx.pipe, [prompt], ctx.accelerator.device, ctx.resolution)
    return {name: value.expand(count, *value.shape[1:]) for name, value in condition.items()}


def candidate_noise(ctx: StepContext, count: int, rng: torch.Generator) -> torch.Tensor:
    """Initial noises eps_1..count at the training resolution's latent size."""
    size = ctx.resolution // ctx.pipe.vae_scale_factor
    shape = (count, latent_channels(ctx.pipe), size, size)
    return torch.randn(shape, generator=rng).to(ctx.accelerator.device)


def current_samples(ctx: StepContext, condition: dict, noise: torch.Tensor):
    """x_i = g_theta(eps_i, c) and Z = phi(x_i), differentiable (Algorithm 1, lines 4-5).

    Returns the latents, their decoded images (None unless phi reads images) and the features.
    """
    latents = ctx.sample(ctx.unet, ctx.scheduler, noise, condition, ctx.timesteps)
    images = drpo_utils.decode_latents(ctx.pipe.vae, latents) if ctx.feature_map.needs_images else None
    return latents, images, phi(ctx, latents, images, condition)


def phi(ctx: StepContext, latents: torch.Tensor, images: torch.Tensor | None, condition: dict) -> dict:
    """The feature map on samples of one prompt (its condition passed to the maps that read it)."""
    if ctx.feature_map.needs_condition:
        return ctx.feature_map(latents, images, condition)
    return ctx.feature_map(latents, images)


def current_latents(ctx: StepContext, condition: dict, noise: torch.Tensor) -> torch.Tensor:
    """mu_theta = g_theta(eps, c), differentiable, under the run's autocast."""
    with ctx.accelerator.autocast():
        return ctx.sample(ctx.unet, ctx.scheduler, noise, condition, ctx.timesteps)


@torch.no_grad()
def reference_latents(ctx: StepContext, condition: dict, noise: torch.Tensor) -> torch.Tensor:
    """mu_ref = g_ref(eps, c): the frozen base model (the same UNet, LoRA disabled), same noises."""
    with ctx.accelerator.autocast(), drpo_utils.lora_disabled(denoiser(ctx.pipe)) as frozen:
        return ctx.sample(frozen, ctx.scheduler, noise, condition, ctx.timesteps)


@torch.no_grad()
def reference_features(ctx: StepContext, condition: dict, noise: torch.Tensor):
    """R = phi(g_ref(eps_i, c)): the base model's features for the same noises."""
    latents = reference_latents(ctx, condition, noise)
    images = drpo_utils.decode_latents(ctx.pipe.vae, latents) if ctx.feature_map.needs_images else None
    return phi(ctx, latents, images, condition)


@dataclass
class Candidates:
    """One prompt's K candidates (Algorithm 1, lines 3-5) and their pending reward (line 6)."""

    prompt: str
    rng: torch.Generator  # the prompt's own draws: noises here, pairs in the method's update
    condition: dict
    noise: torch.Tensor
    latents: torch.Tensor
    features: dict  # Z: with gradient in the single pass, without when chunked (recomputed per chunk)
    ref_features: dict  # R, never with gradient
    scores: Future | None  # -> (RewardScores, seconds); None for offline queries


def candidates(ctx: StepContext, prompt: str, rng: torch.Generator, grad: bool | None = None,
               scored: bool = True) -> Candidates:
    """Lines 3-6 of Algorithm 1: condition and noises, the current samples and their features, the
    reference features, and (``scored``) the reward call on the decoded candidates handed to the scorer.

    The features keep their graph (``grad``) in the single pass, not when chunked. Offline DrPO uses
    the candidates as queries only (``scored=False``: no reward, no decode the features do not need).
    """
    k = ctx.num_candidates
    condition, noise = prompt_condition(ctx, prompt, k), candidate_noise(ctx, k, rng)
    grad = ctx.chunk_size is None if grad is None else grad
    rows_list = chunk_rows(k, None if grad else ctx.chunk_size)  # without gradient C at a time: memory flat in K
    with ctx.accelerator.autocast(), torch.set_grad_enabled(grad):
        (latents, images, z), z_ref = concatenated([
            (current_samples(ctx, rows_of(condition, rows), noise[rows]),
             reference_features(ctx, rows_of(condition, rows), noise[rows])) for rows in rows_list])
    if not scored:
        return Candidates(prompt, rng, condition, noise, latents, z, z_ref, scores=None)
    if images is None:
        with torch.no_grad():
            images = torch.cat([drpo_utils.decode_latents(ctx.pipe.vae, latents[rows]) for rows in rows_list])
    scores = ctx.scorer.submit(images.detach(), [prompt] * k)
    return Candidates(prompt, rng, condition, noise, latents, z, z_ref, scores)


def chunk_rows(count: int, size: int | None) -> list[slice]:
    """Consecutive row slices of at most ``size`` (all rows at once when ``size`` is None)."""
    size = count if size is None else size
    return [slice(start, min(start + size, count)) for start in range(0, count, size)]


def concatenated(parts: list):
    """Per-chunk outputs joined along the candidate axis: tensors, dicts of tensors, None, or tuples of them."""
    first = parts[0]
    if first is None or len(parts) == 1:
        return first
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, dict):
        return {name: torch.cat([part[name] for part in parts]) for name in first}
    return tuple(concatenated(list(group)) for group in zip(*parts))


def rows_of(condition: dict, rows) -> dict:
    return {name: value[rows] for name, value in condition.items()}


def recomputed_features(ctx: StepContext, cand: Candidates, rows) -> dict:
    """Z for candidates ``rows``, recomputed with gradient (the same function of the same noises)."""
    with ctx.accelerator.autocast():
        return current_samples(ctx, rows_of(cand.condition, rows), cand.noise[rows])[2]


def loss_pieces(ctx: StepContext, count: int, loss_of_rows: Callable,
                whole: Callable | None = None) -> Iterator[tuple[torch.Tensor, bool]]:
    """The loss to backpropagate as (piece, is_last) pairs; returns the summed loss value.

    ``loss_of_rows(rows)`` recomputes what it needs for candidates ``rows`` with gradient and returns
    their loss normalised by the full count, so the pieces add up to the whole loss (and gradient).
    ``whole()``, if given, is the loss on the graph the proposal kept (the single pass): used when not
    chunking. Otherwise the candidates go C at a time with --candidate_chunk_size, all at once without.
    """
    if ctx.chunk_size is None and whole is not None:
        loss = whole()
        yield loss, True
        return loss.item()
    total, rows_list = 0.0, chunk_rows(count, ctx.chunk_size)
    for rows in rows_list:
        loss = loss_of_rows(rows)
        total += loss.item()
        yield loss, rows is rows_list[-1]
    return total


def regression_pieces(ctx: StepContext, cand: Candidates, targets: dict) -> Iterator[tuple[torch.Tensor, bool]]:
    """Eq. 17 against the detached targets, as loss pieces: on the single pass's graph, or C candidates
    at a time recomputed with gradient (--candidate_chunk_size); returns the loss value."""
    k = ctx.num_candidates
    return (yield from loss_pieces(
        ctx, k, whole=lambda: drpo_utils.regression_loss(cand.features, targets, ctx.drift),
        loss_of_rows=lambda rows: drpo_utils.regression_loss(recomputed_features(ctx, cand, rows), targets,
                                                             ctx.drift, rows, k)))


def zero_piece(ctx: StepContext, cand_condition: dict, noise: torch.Tensor) -> torch.Tensor:
    """A zero loss through the (DDP-wrapped) generator, for a prompt with nothing to learn from: every
    rank still runs its one synchronising backward."""
    return current_latents(ctx, rows_of(cand_condition, slice(0, 1)), noise[:1]).sum() * 0.0
