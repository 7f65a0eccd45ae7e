"""The baselines' losses against their Appendix C formulas on hand-sized inputs, and their reward checks."""

import importlib.util
import math
import os

import pytest
import torch
from conftest import ROOT

import train_drpo
from pipelines.baselines.dpo import dpo_loss, preference_margin
from pipelines.baselines.draft import draft_loss, normalised_draft_loss, unit_rms
from pipelines.baselines.grpo import gaussian_log_prob, group_advantages, grpo_loss, normalised_noise
from pipelines.baselines.vggflow import clip_per_sample, vggflow_loss, vggflow_target
from pipelines.rewards import RewardError
from pipelines.rewards.protocol import differentiable_scores

REWARDS = os.path.join(ROOT, "tests", "data", "rewards.py")


def test_draft_gradient_is_the_reward_gradient_plus_the_anchor():
    """mu_k = x_k W, R(mu) = a . mu: dL/dW = 1/K sum_k x_k^T (-a + 2 lambda (mu_k - mu_ref,k)) (Appendix C.1)."""
    g = torch.Generator().manual_seed(0)
    x, a = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    weight = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(4, 5, generator=g, dtype=torch.float64)
    latents = x @ weight
    draft_loss(latents @ a, latents, ref, ref_weight=0.3).backward()
    expected = sum(torch.outer(x[k], -a + 2 * 0.3 * (latents[k] - ref[k]).detach()) for k in range(4)) / 4
    # draft_loss works in float32 (its .float() casts): measured 9e-8 (3e-7 rel), bound 1e-5 rel + 1e-6
    torch.testing.assert_close(weight.grad, expected.float().double(), rtol=1e-5, atol=1e-6)


def test_draft_chunks_add_up_to_the_whole_loss():
    g = torch.Generator().manual_seed(1)
    rewards, latents, ref = torch.randn(6, generator=g), torch.randn(6, 2, 2, generator=g), torch.randn(6, 2, 2, generator=g)
    whole = draft_loss(rewards, latents, ref, 0.5)
    parts = draft_loss(rewards[:4], latents[:4], ref[:4], 0.5, count=6) + draft_loss(rewards[4:], latents[4:], ref[4:],
                                                                                     0.5, count=6)
    torch.testing.assert_close(whole, parts)  # float32 sums regrouped: measured 0 (default bound 1.3e-6 rel)


def test_unit_rms_by_hand():
    gradient = torch.tensor([[3.0, 4.0], [0.0, 1e-30]])  # RMS sqrt(12.5); a gradient far below float32's eps
    rms = math.sqrt(12.5)
    # float64 inside, float32 out: measured 0 (default bound 1.3e-6 rel)
    torch.testing.assert_close(unit_rms(gradient), torch.tensor([[3 / rms, 4 / rms], [0.0, math.sqrt(2)]]))


@pytest.mark.parametrize("reward_scale", [1.0, 1e-6, 100.0])
def test_normalised_draft_gradient_is_the_unit_rms_reward_direction(reward_scale):
    """mu_k = x_k W, R(mu) = c a . mu: with the normalised gradient d(s L)/dW = s/K sum_k x_k^T (-a / RMS(a) +
    2 lambda (mu_k - mu_ref,k)) for any reward scale c, and any factor s the trainer puts on the loss
    (1 / batch, 1 / accumulation, a loss scaler) scales the reward term and the anchor alike."""
    g = torch.Generator().manual_seed(0)
    x, a = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    weight = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(4, 5, generator=g, dtype=torch.float64)
    latents = x @ weight
    rewards = reward_scale * (latents.detach() @ a)
    gradient = (reward_scale * a).expand(4, 5)  # grad_mu R_k
    loss = normalised_draft_loss(rewards, gradient, latents, ref, ref_weight=0.3)
    assert loss.item() == pytest.approx(draft_loss(rewards, latents, ref, 0.3).item(), rel=1e-6)  # logged value
    (0.125 * loss).backward()
    direction = a / a.square().mean().sqrt()
    expected = 0.125 * sum(torch.outer(x[k], -direction + 2 * 0.3 * (latents[k] - ref[k]).detach()) for k in range(4)) / 4
    # float32 inside the loss: measured 6e-8 abs at every scale, bound 1e-5 rel + 1e-6
    torch.testing.assert_close(weight.grad, expected, rtol=1e-5, atol=1e-6)


def test_vggflow_normalised_target_by_hand():
    gradient, ref = torch.tensor([[3.0, 4.0], [3e-9, 4e-9]]), torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    step = 2.0 * 0.5 / math.sqrt(12.5)  # eta lambda_r / RMS: both rows point the same way, whatever their size
    expected = torch.tensor([[1 + 3 * step, 1 + 4 * step], [3 * step, 4 * step]])
    # float32 rounding only: measured 1.2e-7 (default bound 1.3e-6 rel)
    torch.testing.assert_close(vggflow_target(ref, gradient, eta=2.0, reward_scale=0.5, max_norm=1.0,
                                              normalised=True), expected)


def test_vggflow_clip_target_and_loss_by_hand():
    gradient = torch.tensor([[3.0, 4.0], [0.3, 0.4]])  # norms 5 and 0.5
    clipped = clip_per_sample(gradient, max_norm=1.0)
    torch.testing.assert_close(clipped, torch.tensor([[0.6, 0.8], [0.3, 0.4]]))  # float32 rounding only (measured 0)
    ref = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    target = vggflow_target(ref, gradient, eta=2.0, reward_scale=0.5, max_norm=1.0)
    # mu_ref + eta lambda_r clip(g), up to float32 rounding: measured 0 (default bound 1.3e-6 rel)
    torch.testing.assert_close(target, torch.tensor([[1.6, 1.8], [0.3, 0.4]]))
    latents = torch.tensor([[1.0, 2.0], [1.0, 0.0]], requires_grad=True)
    loss = vggflow_loss(latents, target, ref, ref_weight=0.1)
    by_hand = ((0.6**2 + 0.2**2) + (0.7**2 + 0.4**2) + 0.1 * ((0 + 1) + (1 + 0))) / 2
    assert loss.item() == pytest.approx(by_hand, rel=1e-5)  # float32 loss: measured 1e-16, bound ~100 float32 ulps
    loss.backward()
    # the float32 expression autograd differentiates, by hand: measured 0 (default bound 1.3e-6 rel)
    torch.testing.assert_close(latents.grad, (2 * (latents - target) + 0.1 * 2 * (latents - ref)).detach() / 2)


def test_dpo_sigmoid_margin_by_hand():
    """g = -||h - h+||^2 + ||h - h-||^2; L = -log sigmoid(beta (g_theta - g_ref)) + lambda ||mu - mu_ref||^2."""
    h_theta, h_ref = {"z": torch.tensor([[0.5, 0.0]])}, {"z": torch.tensor([[0.0, 0.0]])}
    h_pos, h_neg = {"z": torch.tensor([[1.0, 0.0]])}, {"z": torch.tensor([[-1.0, 0.0]])}
    g_theta = -(0.5**2) + 1.5**2  # 2.0
    g_ref = -1.0 + 1.0  # 0.0
    # g = 2 from halves and ones: exact in float32 (measured 0; default bound 1.3e-6 rel)
    torch.testing.assert_close(preference_margin(h_theta, h_pos, h_neg), torch.tensor([g_theta]))
    latents, ref_latents = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 1.0]])
    loss = dpo_loss(h_theta, h_ref, h_pos, h_neg, latents, ref_latents, beta=0.7, ref_weight=0.2)
    # float32 logsigmoid and anchor: measured 4e-8 rel, bound 1e-5 (a wrong beta or lambda moves it by > 1e-2)
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.7 * (g_theta - g_ref)))) + 0.2 * 1.0, rel=1e-5)
    # Moving h_theta toward h+ lowers the loss: its gradient points away from h+.
    h = torch.tensor([[0.5, 0.0]], requires_grad=True)
    dpo_loss({"z": h}, h_ref, h_pos, h_neg, latents, latents, beta=0.7, ref_weight=0.0).backward()
    assert h.grad[0, 0] < 0


def test_grpo_advantages_ratio_clipping_anchor_and_kl_by_hand():
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0])
    z = (rewards - rewards.mean()) / rewards.std()
    # z by hand omits eps_r = 1e-6 in std + eps_r (2.5e-7 rel): measured 3e-7 rel, bound 1e-5 rel + 1e-6
    torch.testing.assert_close(group_advantages(rewards, scale=2.0, max_abs=2.5), (2 * z).clamp(-2.5, 2.5), rtol=1e-5,
                               atol=1e-6)
    assert group_advantages(torch.ones(4), 1.0, 5.0).abs().max() == 0  # a tied group has no advantage

    actions, means = torch.tensor([[0.1, 0.2]]), torch.tensor([[0.0, 0.0]])
    assert gaussian_log_prob(actions, means, 0.1).item() == pytest.approx(-0.5 * (1.0 + 4.0) / 2)  # float32: measured 0
    noise = torch.tensor([[[1.0, 3.0]]])
    # float32 std and division: measured 6e-8 (default bound 1.3e-6 rel + 1e-5)
    torch.testing.assert_close(normalised_noise(noise), (noise - 2.0) / (math.sqrt(2.0) + 1e-6))

    log_prob = torch.tensor([0.5, -0.1], requires_grad=True)
    old, advantages = torch.tensor([0.0, 0.0]), torch.tensor([1.0, -1.0])
    latents, ref = torch.tensor([[1.0], [2.0]]), torch.tensor([[0.0], [0.0]])
    loss = grpo_loss(log_prob, old, advantages, latents, ref, clip_eps=0.2, log_ratio_clip=10.0, ref_weight=0.05,
                     kl_weight=0.3)
    rho = [math.exp(0.5), math.exp(-0.1)]
    policy = [-min(rho[0] * 1, 1.2 * 1), -min(rho[1] * -1, max(0.8, min(1.2, rho[1])) * -1)]
    kl = [r - 1 - math.log(r) for r in rho]
    by_hand = sum(policy[k] + 0.05 * [1.0, 4.0][k] + 0.3 * kl[k] for k in range(2)) / 2
    # float32 terms of ~1 (ulp 1e-7) cancel to a loss of 5e-4: measured 5e-8, bound 1e-5, 70x below the
    # smallest term (0.3 KL_1 / 2 = 7e-4)
    assert loss.item() == pytest.approx(by_hand, abs=1e-5)
    loss.backward()
    # Sample 0: ratio e^0.5 > 1.2 with A > 0 is clipped: only the KL term moves it.
    assert log_prob.grad[0].item() == pytest.approx(0.3 * (rho[0] - 1) / 2, rel=1e-5)  # float32: measured 2e-8 rel


def test_grpo_log_ratio_is_clipped_at_m():
    loss = grpo_loss(torch.tensor([50.0]), torch.tensor([0.0]), torch.tensor([0.0]), torch.zeros(1, 1),
                     torch.zeros(1, 1), 0.2, log_ratio_clip=10.0, ref_weight=0.0, kl_weight=1.0)
    assert loss.item() == pytest.approx(math.exp(10.0) - 1 - 10.0, rel=1e-5)  # float32 exp: measured 4e-8 rel


def test_a_reward_without_gradient_is_named_with_the_methods_that_work():
    images = torch.rand(2, 3, 8, 8, requires_grad=True)
    with pytest.raises(RewardError, match=r"reward 'lookup' returned no gradient.*--method drpo, dpo or grpo"):
        differentiable_scores(lambda images, prompts: [0.1, 0.2], images, ["a", "b"], "lookup")
    with pytest.raises(RewardError, match="without grad_fn"):
        differentiable_scores(lambda images, prompts: images.detach().mean((1, 2, 3)), images, ["a", "b"], "detached")
    scores = differentiable_scores(lambda images, prompts: images.mean((1, 2, 3)), images, ["a", "b"], "mean")
    scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_draft_stops_at_the_first_call_of_a_reward_without_gradient(tmp_path):
    from test_train_inputs import args_for

    for reward, message in (("darkness", "failed on images that require grad"),  # calls .numpy() on them
                            ("requires_no_grad", "failed on images that require grad"),
                            ("wrong_count", "returned no gradient")):  # python floats
        args = train_drpo.parse_args(args_for(tmp_path, "--method=draft", f"--reward={REWARDS}:{reward}"))
        with pytest.raises(RewardError, match=f"{message}.*--method drpo, dpo or grpo"):
            train_drpo.main(args, load_pipeline=train_drpo.load_pipeline)


@pytest.mark.parametrize("reward", ["color_match", "jpeg_compressibility", "http://127.0.0.1:1/score", pytest.param(
    "geneval", marks=pytest.mark.skipif(importlib.util.find_spec("scipy") is None,
                                        reason="the geneval reward is the optional geneval install"))])
def test_reward_gradient_methods_refuse_ranking_only_rewards_at_start_up(tmp_path, reward):
    from test_train_inputs import args_for

    with pytest.raises(ValueError, match=f"--method vggflow backpropagates through the reward.*{reward}"):
        train_drpo.parse_args(args_for(tmp_path, "--method=vggflow", f"--reward={reward}"))



@pytest.mark.parametrize("method", ["drpo_paper", "drpo_top_bottom", "dpo"])
def test_ranking_methods_ignore_the_rewards_scale_and_offset(tmp_path, method):
    """The reward only ranks (DrPO's random pairs or top / bottom split, DPO's pairs): 100 x R + 5 trains
    the same LoRA as R, bit for bit."""
    from test_train import lora_tensors, train, training_args

    from conftest import TINY_SD

    extra = {"drpo_paper": ["--method=drpo", "--drift_preset=paper"],  # M random reward-ordered pairs
             "drpo_top_bottom": ["--method=drpo", "--drift_preset=authors"]}.get(method, [f"--method={method}"])
    loras = []
    for reward in ("brightness", "brightness_rescaled"):
        train("train_drpo.py", *training_args(TINY_SD, tmp_path / reward, f"--reward={REWARDS}:{reward}",
                                              "--max_train_steps=2", "--learning_rate=1e-3", *extra))
        loras.append(lora_tensors(tmp_path / reward))
    plain, rescaled = loras
    assert plain.keys() == rescaled.keys()
    moved = max(tensor.abs().max().item() for name, tensor in plain.items() if "lora.up" in name)
    assert moved > 0  # the runs trained (the up matrices start at zero)
    assert all(torch.equal(plain[name], rescaled[name]) for name in plain)


@pytest.mark.parametrize("method", ["draft", "vggflow"])
def test_normalised_reward_gradients_ignore_the_rewards_scale(tmp_path, method):
    """With the default normalised gradients, brightness x 1e-8 trains the LoRA brightness trains (to float
    rounding); with the raw gradients of Appendix C the same tiny reward leaves the generator nearly where it was."""
    from test_train import lora_tensors, train, training_args

    from conftest import TINY_SD

    runs = {"plain": ("brightness", []), "tiny": ("brightness_tiny", []),
            "raw_tiny": ("brightness_tiny", [f"--{method}_gradient=raw"])}
    loras = {}
    for name, (reward, extra) in runs.items():
        train("train_drpo.py", *training_args(TINY_SD, tmp_path / name, f"--reward={REWARDS}:{reward}",
                                              "--max_train_steps=2", "--learning_rate=1e-3", f"--method={method}",
                                              *extra))
        loras[name] = lora_tensors(tmp_path / name)

    def moved(lora):
        return max(tensor.abs().max().item() for key, tensor in lora.items() if "lora.up" in key)

    assert moved(loras["plain"]) > 0
    # Float rounding of the two reward gradients, through Adam: measured max abs difference 0 (draft), 1.3e-6
    # (vggflow, one of 1024 entries of a LoRA that moved by 2e-3); bound 1e-5 abs + 1e-4 rel.
    for key in loras["plain"]:
        torch.testing.assert_close(loras["tiny"][key], loras["plain"][key], rtol=1e-4, atol=1e-5)
    # raw / normalised movement, measured: draft 0.0026 (Adam's eps outweighs gradients of ~1e-11), vggflow 0
    # (the target is mu_ref to float precision, where the generator already is)
    assert moved(loras["raw_tiny"]) < 0.1 * moved(loras["plain"])


def test_grpo_advantages_ignore_the_offset_and_the_scale_up_to_eps():
    """A_k = alpha (r_k - mean r) / (std r + eps_r) (Appendix C): an offset cancels; a scale c changes A by
    the factor (std + eps) / (std + eps / c), at most eps / std relative."""
    rewards = torch.tensor([0.41, 0.43, 0.40, 0.47, 0.45, 0.42], dtype=torch.float64)
    plain = group_advantages(rewards, 1.0, 5.0).double()
    torch.testing.assert_close(group_advantages(rewards + 5.0, 1.0, 5.0).double(), plain, rtol=1e-6, atol=0)
    rescaled = group_advantages(100.0 * rewards + 5.0, 1.0, 5.0).double()
    bound = 1e-6 / rewards.std().item()  # 4e-5 here
    assert ((rescaled - plain).abs() <= 2 * bound * plain.abs() + 1e-7).all()
