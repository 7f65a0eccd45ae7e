"""--candidate_chunk_size gives the unchunked gradient with memory flat in K, and overlapped reward
scoring gives the serial results."""

import json
import os

import pytest
import torch
from accelerate import Accelerator
from conftest import ROOT, TINY_SD, TINY_SDXL, reset_accelerate_state
from test_train import lora_tensors, train, training_args

import train_drpo
import train_drpo_sdxl
from pipelines import candidates, features, training
from pipelines.rewards import load_reward

REWARDS = os.path.join(ROOT, "tests", "data", "rewards.py")
SCRIPTS = {"sd": (train_drpo, TINY_SD), "sdxl": (train_drpo_sdxl, TINY_SDXL)}


def step_context(module, model, tmp_path, *extra, feature_extractor="image"):
    """A StepContext as train_drpo.main builds it, on the tiny model (LoRA B non-zero so gradients are generic)."""
    reset_accelerate_state()
    args = module.parse_args(training_args(model, tmp_path, f"--reward={REWARDS}:brightness", *extra))
    args.resolution = 64
    accelerator = Accelerator(cpu=True)
    pipe = module.load_pipeline(args, torch.float32)
    training.prepare_frozen_models(pipe, "cpu")
    training.add_lora(pipe.unet, args)
    torch.manual_seed(0)
    for name, parameter in pipe.unet.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(std=0.02)
    reward = load_reward(args.reward)
    feature_map = features.build_feature_map(feature_extractor)
    feature_map.bind(pipe)
    return candidates.StepContext(
        args=args, accelerator=accelerator, pipe=pipe, unet=pipe.unet, scheduler=type(pipe.scheduler).from_config(
            pipe.scheduler.config), feature_map=feature_map,
        scorer=candidates.RewardScorer(reward, args.reward, background=False), config=train_drpo.drift_config(args),
        encode_prompts=module.encode_prompts, method=train_drpo.METHODS[args.method])


def with_chunk_size(ctx, chunk_size):
    import dataclasses

    return dataclasses.replace(ctx, args=type(ctx.args)(**{**vars(ctx.args), "candidate_chunk_size": chunk_size}))


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
    stats = training.backpropagate(ctx.accelerator, ctx.unet, train_drpo.drpo_step(ctx, dataclasses.replace(cand, rng=rng)),
                                   1.0, True, 0)
    grads = {n: p.grad.clone() for n, p in ctx.unet.named_parameters() if p.requires_grad}
    return grads, stats


def relative_difference(grads, reference):
    difference = torch.cat([(grads[n] - reference[n]).flatten() for n in reference]).norm()
    return difference / torch.cat([g.flatten() for g in reference.values()]).norm()


@pytest.mark.parametrize("script", SCRIPTS)
def test_chunked_gradients_equal_the_unchunked_gradient(tmp_path, script):
    """The chunked backward of Eq. 17 is the one-pass gradient (1e-5) on the same candidates, for
    C = 1, 3, 4 (a ragged last chunk) and K = 6; against the single-pass step, whose no-gradient forward
    ran all K at once, the difference is the float noise of batch-size-dependent kernels (below 1e-3)."""
    module, model = SCRIPTS[script]
    ctx = step_context(module, model, tmp_path, "--num_candidates=6", "--num_pairs=6")
    assert len(ctx.feature_map(torch.zeros(1, 4, 16, 16), torch.zeros(1, 3, 64, 64))) == 3  # a multi-tensor phi
    cand = proposal(ctx, 2)  # generated and featurised without gradient, two candidates at a time
    reference, stats = lora_gradient(ctx, 6, cand)  # all K recomputed with gradient in one piece
    assert torch.cat([g.flatten() for g in reference.values()]).norm() > 0
    for chunk in (1, 3, 4):
        chunked, chunked_stats = lora_gradient(ctx, chunk, cand)
        assert relative_difference(chunked, reference) <= 1e-5, chunk
        assert chunked_stats["loss"] == pytest.approx(stats["loss"], rel=1e-5)
    single_pass, _ = lora_gradient(ctx, None, proposal(ctx, None))
    assert relative_difference(single_pass, reference) <= 1e-3


def test_teacher_unet_features_chunk_exactly_and_read_the_base_unet_under_the_prompt(tmp_path):
    """teacher_unet (the authors' SDXL recipe): three pooled UNet activations, a deterministic and
    differentiable function of the latent given the prompt, computed with the LoRA off; its chunked
    DrPO gradient equals the one-piece gradient."""
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
        assert relative_difference(lora_gradient(ctx, chunk, cand)[0], reference) <= 1e-5, chunk


def test_chunk_size_outside_one_to_k_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"--candidate_chunk_size must be in \[1, K=8\]"):
        train_drpo.parse_args(training_args(TINY_SD, tmp_path, "--candidate_chunk_size=9"))


def test_chunked_training_equals_unchunked_training(tmp_path):
    common = ["--reward=color_match", "--max_train_steps=3", "--learning_rate=1e-3", "--gradient_accumulation_steps=2"]
    train("train_drpo.py", *training_args(TINY_SD, tmp_path / "one_pass", *common))
    train("train_drpo.py", *training_args(TINY_SD, tmp_path / "chunked", *common, "--candidate_chunk_size=3"))
    one_pass, chunked = lora_tensors(tmp_path / "one_pass"), lora_tensors(tmp_path / "chunked")
    # Same gradients up to float summation order; Adam's elementwise normalisation can flip the update of
    # a near-zero gradient entry, so compare the trained-from-zero lora_B as a whole, and the loss curves.
    trained = [key for key in one_pass if "lora.up" in key or "lora_B" in key]
    difference = torch.cat([(chunked[k] - one_pass[k]).flatten() for k in trained]).norm()
    assert trained and difference <= 1e-3 * torch.cat([one_pass[k].flatten() for k in trained]).norm()
    curves = [[json.loads(line)["loss"] for line in open(tmp_path / run / "reward_history.jsonl")]
              for run in ("one_pass", "chunked")]
    assert curves[0] == pytest.approx(curves[1], rel=1e-4)


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
    stats = training.backpropagate(accelerator, None, pieces(), 0.5, sync, step=0)
    assert stats == {"loss": 6.0}
    assert [kind for kind, _ in accelerator.calls] == expected
    assert [value for _, value in accelerator.calls] == [0.5, 1.0, 1.5]  # each piece scaled
