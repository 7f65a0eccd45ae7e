"""--candidate_chunk_size gives the unchunked gradient with memory flat in K, and overlapped reward
scoring gives the serial results."""

import dataclasses
import json
import os

import pytest
import torch
from accelerate import Accelerator
from conftest import ROOT, TINY_SD, TINY_SDXL, reset_accelerate_state
from test_train import lora_tensors, train, training_args

import train_drpo
import train_drpo_sdxl
from pipelines import candidates, features, lora_files, methods, runtime
from pipelines.rewards import load_reward

REWARDS = os.path.join(ROOT, "tests", "data", "rewards.py")
SCRIPTS = {"sd": (train_drpo, TINY_SD), "sdxl": (train_drpo_sdxl, TINY_SDXL)}


@pytest.fixture
def float64(monkeypatch):
    """Train in float64 (frozen weights, LoRA, noises): summation-order noise falls to ~1e-16 relative."""
    monkeypatch.setattr(runtime, "weight_dtype", lambda accelerator: torch.float64)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(default)


def step_context(module, model, tmp_path, *extra, feature_extractor="image"):
    """A StepContext as train_drpo.train builds it, on the tiny model (LoRA B non-zero so gradients are generic),
    in the default dtype (float64 under the ``float64`` fixture)."""
    reset_accelerate_state()
    args = module.parse_args(training_args(model, tmp_path, f"--reward={REWARDS}:brightness", *extra))
    settings = train_drpo.build_config(args).resolved(model={"resolution": 64})
    accelerator = Accelerator(cpu=True)
    pipe = module.load_pipeline(settings.model, torch.get_default_dtype())
    pipe.vae.to(torch.get_default_dtype())  # SDXL's loader keeps its VAE in fp32 whatever the weight dtype
    runtime.prepare_frozen_models(pipe, "cpu")
    lora_files.add_lora(pipe.unet, settings.adapter)
    torch.manual_seed(0)
    for name, parameter in pipe.unet.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(std=0.02)
    feature_map = features.build_feature_map(feature_extractor)
    feature_map.bind(pipe)
    return train_drpo.step_context(accelerator, settings, pipe, pipe.unet, feature_map, load_reward(args.reward),
                                   methods.registered()[args.method], module.encode_prompts)


def with_chunk_size(ctx, chunk_size):
    import dataclasses

    return dataclasses.replace(ctx, chunk_size=chunk_size)


def proposal(ctx, chunk_size):
    """One prompt's candidates as the step proposes them (without gradient and C at a time when chunked)."""
    return candidates.candidates(with_chunk_size(ctx, chunk_size), "a large red circle", torch.Generator().manual_seed(123))


def lora_gradient(ctx, chunk_size, cand):
    """The LoRA gradient of the DrPO loss on candidates ``cand`` with the given chunk size (same pairs)."""
    import dataclasses

    ctx = with_chunk_size(ctx, chunk_size)
    ctx.unet.zero_grad(set_to_none=True)
    rng = torch.Generator()
    rng.set_state(cand.rng.get_state())  # the same pair draws for every chunk size
    stats = runtime.backpropagate(ctx.accelerator, ctx.unet, train_drpo.drpo_step(ctx, dataclasses.replace(cand, rng=rng)),
                                   1.0, True, 0)
    grads = {n: p.grad.clone() for n, p in ctx.unet.named_parameters() if p.requires_grad}
    return grads, stats


def relative_difference(grads, reference):
    difference = torch.cat([(grads[n] - reference[n]).flatten() for n in reference]).norm()
    return difference / torch.cat([g.flatten() for g in reference.values()]).norm()


@pytest.mark.parametrize("script", SCRIPTS)
def test_chunked_gradients_equal_the_unchunked_gradient(tmp_path, script, float64):
    """The chunked backward of Eq. 17 is the one-pass gradient on the same candidates, for C = 1, 3, 4 (a
    ragged last chunk) and K = 6, and the single-pass step (its no-gradient forward ran all K at once) gives
    it too. In float64, where only summation order differs: measured <= 2e-14 relative; the bound 1e-10
    leaves four orders of magnitude (a chunking fault is O(1e-1); in float32 the same noise is ~1e-6)."""
    module, model = SCRIPTS[script]
    ctx = step_context(module, model, tmp_path, "--num_candidates=6", "--num_pairs=6")
    assert len(ctx.feature_map(torch.zeros(1, 4, 16, 16), torch.zeros(1, 3, 64, 64))) == 3  # a multi-tensor phi
    cand = proposal(ctx, 2)  # generated and featurised without gradient, two candidates at a time
    reference, stats = lora_gradient(ctx, 6, cand)  # all K recomputed with gradient in one piece
    assert torch.cat([g.flatten() for g in reference.values()]).norm() > 0
    for chunk in (1, 3, 4):
        chunked, chunked_stats = lora_gradient(ctx, chunk, cand)
        assert relative_difference(chunked, reference) <= 1e-10, chunk
        assert chunked_stats["loss"] == pytest.approx(stats["loss"], rel=1e-10)
    single_pass, _ = lora_gradient(ctx, None, proposal(ctx, None))
    assert relative_difference(single_pass, reference) <= 1e-10


def test_teacher_unet_features_chunk_exactly_and_read_the_base_unet_under_the_prompt(tmp_path, float64):
    """teacher_unet (the authors' SDXL recipe): three pooled UNet activations, a deterministic and
    differentiable function of the latent given the prompt, computed with the LoRA off; its chunked
    DrPO gradient equals the one-piece gradient (float64: the bound of the test above)."""
    ctx = step_context(train_drpo_sdxl, TINY_SDXL, tmp_path, "--num_candidates=6", "--num_pairs=6",
                       feature_extractor="teacher_unet")
    condition = candidates.prompt_condition(ctx, "a large red circle", 2)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    first = candidates.phi(ctx, latents, None, condition)
    assert list(first) == list(features.TEACHER_LAYERS)
    for name, value in candidates.phi(ctx, latents, None, condition).items():
        torch.testing.assert_close(value, first[name], rtol=0, atol=0)  # deterministic: fixed noise pattern
    other_prompt = candidates.phi(ctx, latents, None, candidates.prompt_condition(ctx, "a small blue square", 2))
    assert not torch.allclose(other_prompt["mid_block"], first["mid_block"])
    sum(value.square().sum() for value in first.values()).backward()
    assert latents.grad.abs().sum() > 0
    assert all(p.grad is None for p in ctx.pipe.unet.parameters() if p.requires_grad)  # the LoRA is off
    cand = proposal(ctx, 2)
    reference, _ = lora_gradient(ctx, 6, cand)
    assert torch.cat([g.flatten() for g in reference.values()]).norm() > 0
    for chunk in (1, 3):
        assert relative_difference(lora_gradient(ctx, chunk, cand)[0], reference) <= 1e-10, chunk


def test_chunk_size_outside_one_to_k_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"--candidate_chunk_size must be in \[1, K=8\]"):
        train_drpo.parse_args(training_args(TINY_SD, tmp_path, "--candidate_chunk_size=9"))


def test_chunked_training_equals_unchunked_training(tmp_path, float64):
    """Three optimiser steps with accumulation: C = 3 chunks (a ragged last one) give the one-pass LoRA.

    The two runs compute the same function with different batch sizes, so they differ by summation-order
    noise, which Adam's elementwise normalisation amplifies on gradient entries near zero: in float32,
    1.7e-4 relative here and 3.4e-3 on another machine. In float64 the same noise measured 9e-7 here (and
    4e-7 between 1 and 2 threads of one configuration); the bound 1e-4 leaves two orders of magnitude to
    it, and a wiring fault (a chunk dropped, a piece mis-scaled) moves the LoRA by ~1e-1."""
    common = ["--reward=color_match", "--max_train_steps=3", "--learning_rate=1e-3", "--gradient_accumulation_steps=2"]
    train("train_drpo.py", *training_args(TINY_SD, tmp_path / "one_pass", *common))
    train("train_drpo.py", *training_args(TINY_SD, tmp_path / "chunked", *common, "--candidate_chunk_size=3"))
    one_pass, chunked = lora_tensors(tmp_path / "one_pass"), lora_tensors(tmp_path / "chunked")
    assert all(tensor.dtype == torch.float64 for tensor in one_pass.values())
    trained = [key for key in one_pass if "lora.up" in key or "lora_B" in key]  # B starts at zero
    difference = torch.cat([(chunked[k] - one_pass[k]).flatten() for k in trained]).norm()
    scale = torch.cat([one_pass[k].flatten() for k in trained]).norm()
    print("chunked vs one pass, relative:", (difference / scale).item())
    assert trained and scale > 0 and difference <= 1e-4 * scale, (difference / scale).item()
    curves = [[json.loads(line)["loss"] for line in open(tmp_path / run / "reward_history.jsonl")]
              for run in ("one_pass", "chunked")]
    # step 1's loss agrees to 1e-15 (same weights); later ones inherit the LoRA's noise: measured 3e-7
    assert curves[0] == pytest.approx(curves[1], rel=1e-5)


def test_overlapped_scoring_gives_the_serial_lora_and_logs_the_wait(tmp_path):
    common = ["--reward=color_match", "--max_train_steps=2", "--learning_rate=1e-3", "--gradient_accumulation_steps=2",
              "--train_batch_size=2", "--candidate_chunk_size=4"]
    train("train_drpo.py", *training_args(TINY_SD, tmp_path / "serial", *common, "--no-overlap_reward"))
    train("train_drpo.py", *training_args(TINY_SD, tmp_path / "overlapped", *common))
    serial, overlapped = lora_tensors(tmp_path / "serial"), lora_tensors(tmp_path / "overlapped")
    for key in serial:
        torch.testing.assert_close(overlapped[key], serial[key], rtol=0, atol=0)
    history = (tmp_path / "overlapped" / "reward_history.jsonl").read_text()
    assert '"reward_wait"' in history


def test_overlap_scores_in_the_background(tmp_path):
    """The scorer really runs the reward off the main thread when overlapping (and on it in series)."""
    import threading

    threads = []

    def reward(images, prompts):
        threads.append(threading.current_thread().name)
        return images.mean((1, 2, 3))

    for background in (False, True):
        scorer = candidates.RewardScorer(reward, "probe", background=background)
        scores, waited = scorer.result(scorer.submit(torch.rand(2, 3, 8, 8), ["a", "b"]))
        scorer.close()
        assert len(scores.ranking) == 2 and waited >= 0
    assert threads[0] == threading.current_thread().name and threads[1].startswith("reward")


class EventLog:
    """Reward calls and per-prompt updates of one optimiser step, in the order they happened (no clock)."""

    def __init__(self, wait_for_next_reward: bool, prompts: int):
        import threading

        self.events, self.rewards_started, self.updates_done = [], 0, 0
        self.condition = threading.Condition()
        self.wait_for_next_reward, self.prompts = wait_for_next_reward, prompts

    def reward(self, images, prompts):
        with self.condition:
            self.events.append(("reward starts", self.rewards_started))
            self.rewards_started += 1
            self.condition.notify_all()
        return images.mean((1, 2, 3))

    def method(self, inner):
        def update(ctx, proposal):
            stats = yield from inner.update(ctx, proposal)
            with self.condition:
                index = self.updates_done
                if self.wait_for_next_reward and index + 1 < self.prompts:
                    # Overlapped, prompt i+1's reward was handed to the scorer before update i began, so it
                    # starts while update i is still open; a serial loop never starts it here and the
                    # (generous) wait ends in the ordering failure below, not in a hang.
                    self.condition.wait_for(lambda: self.rewards_started > index + 1, timeout=300)
                self.events.append(("update ends", index))
                self.updates_done += 1
            return stats

        return dataclasses.replace(inner, update=update)

    def position(self, event):
        return self.events.index(event)


@pytest.mark.parametrize("overlap", [True, False])
def test_overlapped_scoring_starts_the_next_reward_before_the_current_update_ends(tmp_path, overlap):
    """What overlap guarantees, observed from the order of events rather than a clock: with it, the reward
    call of prompt i+1 starts before prompt i's update ends; in series, only after."""
    import dataclasses

    window = 3
    ctx = step_context(train_drpo, TINY_SD, tmp_path, "--num_candidates=4", "--num_pairs=3",
                       f"--gradient_accumulation_steps={window}", "--candidate_chunk_size=2")
    log = EventLog(wait_for_next_reward=overlap, prompts=window)
    ctx = dataclasses.replace(ctx, method=log.method(ctx.method),
                              scorer=candidates.RewardScorer(log.reward, "events", background=overlap))
    params = [p for p in ctx.unet.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.0)
    try:
        train_drpo.optimisation_step(ctx, ["a large red circle", "a small blue square"], 0, 0, optimizer,
                                     torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0), params)
    finally:
        ctx.scorer.close()
    assert log.rewards_started == log.updates_done == window, log.events
    for index in range(window - 1):
        next_reward, update_end = log.position(("reward starts", index + 1)), log.position(("update ends", index))
        assert (next_reward < update_end) == overlap, log.events


class RecordingAccelerator:
    """Records which backward passes ran under no_sync (what DDP would not synchronise)."""

    device = torch.device("cpu")

    def __init__(self):
        self.calls, self._quiet = [], False

    def no_sync(self, model):
        import contextlib

        @contextlib.contextmanager
        def quiet():
            self._quiet = True
            yield
            self._quiet = False

        return quiet()

    def backward(self, loss):
        self.calls.append(("no_sync" if self._quiet else "sync", round(loss.item(), 6)))

    def gather(self, tensor):
        return tensor


@pytest.mark.parametrize("sync,expected", [(True, ["no_sync", "no_sync", "sync"]), (False, ["no_sync"] * 3)])
def test_a_prompt_synchronises_gradients_once_at_its_last_piece(sync, expected):
    def pieces():
        for index in range(3):
            yield torch.tensor(float(index + 1)), index == 2
        return {"loss": 6.0}

    accelerator = RecordingAccelerator()
    stats = runtime.backpropagate(accelerator, None, pieces(), 0.5, sync, step=0)
    assert stats == {"loss": 6.0}
    assert [kind for kind, _ in accelerator.calls] == expected
    assert [value for _, value in accelerator.calls] == [0.5, 1.0, 1.5]  # each piece scaled
