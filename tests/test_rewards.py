"""Model rewards on small local models in the real formats, mixtures, and the reward server over 127.0.0.1."""

import importlib.util
import json
import os
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
import torch.nn.functional as F
import train_drpo
from conftest import PROMPTS, ROOT, TINY_SD, build_tiny_clip

import pipelines.rewards as rewards
from pipelines.rewards import REWARDS as REGISTRY
from pipelines.rewards import MixtureReward, RemoteReward
from pipelines.rewards.mixture import standardise_per_prompt
from pipelines.rewards.models import ClipSimilarity, clip_preprocess
from pipelines.rewards.server import build_server

REWARDS = os.path.join(ROOT, "tests", "data", "rewards.py")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


def test_clip_preprocess_matches_the_clip_image_processor():
    import transformers
    from PIL import Image

    # the PIL-backed processor: CLIPImageProcessorPil in recent transformers 5, CLIPImageProcessor before
    CLIPImageProcessorPil = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)

    torch.manual_seed(0)
    # A smooth picture (interpolation kernels disagree on white noise, not on images).
    image = torch.nn.functional.interpolate(torch.rand(1, 3, 6, 8), size=(48, 64), mode="bilinear")[0]
    pil = Image.fromarray((image * 255).round().byte().permute(1, 2, 0).numpy())
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    expected = processor(images=pil, return_tensors="pt").pixel_values
    ours = clip_preprocess((image * 255).round()[None] / 255, 32)
    assert ours.shape == expected.shape == (1, 3, 32, 32)
    # Same pipeline up to the bicubic implementation (PIL vs torch): a small per-pixel difference.
    # measured 4.4e-3, fixed (mostly PIL's 8-bit resize), not noise; align_corners gives 0.044, a crop shift 0.17
    assert (ours - expected).abs().mean() < 0.02


def test_pickscore_is_logit_scale_times_cosine_and_reads_the_image(tiny_clip):
    pickscore = ClipSimilarity(tiny_clip, scale="logit")
    cosine = ClipSimilarity(tiny_clip, scale="cosine")
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    prompts = ["a large red circle on the left"] * 2 + ["a small blue square at the top"] * 2
    picks = pickscore(images, prompts)
    # the same float32 embeddings times the same scale: measured 0 (default bound 1.3e-6 rel)
    torch.testing.assert_close(picks, pickscore.model.logit_scale.exp().item() * cosine(images, prompts))
    assert picks.shape == (4,) and torch.isfinite(picks).all()
    assert not torch.allclose(picks, pickscore(images.flip(-1).roll(7, dims=-2), prompts))  # image changes -> score
    assert not torch.allclose(picks, pickscore(images, prompts[::-1]))  # prompt changes -> score (by 2.1)


@pytest.fixture(scope="module")
def tiny_hps(tmp_path_factory):
    """A tiny open_clip config + a checkpoint in the HPS v2 release format ``{"state_dict": ...}``."""
    pytest.importorskip("open_clip", reason="HPS v2 is the optional hps install: pip install -e .[hps]")
    import open_clip

    path = tmp_path_factory.mktemp("tiny-hps")
    config = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16,
                                              "patch_size": 8},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
    architecture = path / "tiny-hps-vit.json"
    architecture.write_text(json.dumps(config))
    open_clip.add_model_config(str(architecture))
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-hps-vit", pretrained=None)
    checkpoint = path / "HPS_v2_compressed.pt"
    torch.save({"state_dict": model.state_dict()}, checkpoint)
    return str(architecture), str(checkpoint)


def test_hpsv2_scores_like_the_authors_pipeline_and_reads_the_image(tiny_hps):
    """hpsv2.score: its eval transform (long side to the input size, zero padding: open_clip's "longest"
    mode) on a PIL image, encode, normalise, diagonal of image @ text.T — on non-square images."""
    import open_clip
    from PIL import Image

    from pipelines.rewards.models import hpsv2

    architecture, checkpoint = tiny_hps
    reward = hpsv2(checkpoint=checkpoint, architecture=architecture)
    images = F.interpolate(torch.rand(3, 3, 6, 8, generator=torch.Generator().manual_seed(2)), size=(48, 64),
                           mode="bilinear")
    images = (images * 255).round() / 255
    prompts = ["a large red circle on the left", "a small blue square", "a green triangle at the top"]
    ours = reward(images, prompts)

    model = open_clip.create_model("tiny-hps-vit", pretrained=None, output_dict=True)
    preprocess = open_clip.image_transform(32, is_train=False, mean=open_clip.OPENAI_DATASET_MEAN,
                                           std=open_clip.OPENAI_DATASET_STD, resize_mode="longest", fill_color=0)
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["state_dict"])
    model.eval()
    tokenizer = open_clip.get_tokenizer("tiny-hps-vit")
    pils = [Image.fromarray((image * 255).byte().permute(1, 2, 0).numpy()) for image in images]
    with torch.no_grad():
        out = model(torch.stack([preprocess(p) for p in pils]), tokenizer(prompts))
    expected = torch.diagonal(out["image_features"] @ out["text_features"].T)
    torch.testing.assert_close(ours, expected, rtol=0, atol=2e-3)  # PIL vs torch bicubic only (measured 1.4e-4)
    assert ours.max() - ours.min() > 0.02  # the tolerance is far below the spread it must resolve
    assert not torch.allclose(ours, reward(images.flip(-1), prompts))  # image changes -> score (by 0.03)
    assert not torch.allclose(ours, reward(images, prompts[::-1]))  # prompt changes -> score (by 0.08)


def test_hpsv21_reads_its_own_checkpoint(tiny_hps, tmp_path):
    from pipelines.rewards.models import hpsv21

    architecture, checkpoint = tiny_hps
    assert "HPS_v2.1_compressed.pt" in REGISTRY["hpsv21"].downloads
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    state = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}
    torch.save({"state_dict": state}, tmp_path / "HPS_v2.1_compressed.pt")
    images, prompts = torch.rand(2, 3, 32, 32), ["a red circle", "a blue square"]
    v2 = REGISTRY["hpsv2"].load(checkpoint=checkpoint, architecture=architecture)(images, prompts)
    v21 = hpsv21(checkpoint=str(tmp_path / "HPS_v2.1_compressed.pt"), architecture=architecture)(images, prompts)
    assert not torch.allclose(v2, v21)  # other weights: scores 0.2 apart (measured)


@pytest.fixture
def tiny_image_reward(tmp_path, monkeypatch):
    """ImageReward's own classes at a small size, saved as its release is (a state dict + med_config.json).

    The test replaces the ``bert-base-uncased`` download with a local BERT vocabulary and shrinks the
    ViT-L the package hard-codes to a 1-layer, 32-wide ViT of the same class (same key layout).
    """
    if importlib.util.find_spec("ImageReward") is None:  # not imported here: it needs our shims first
        pytest.skip("ImageReward is its own install: pip install --no-deps image-reward==1.5 (docs/rewards.md; "
                    ".ci/run installs it)")
    from transformers import BertTokenizer

    import pipelines.rewards.models
    from pipelines.rewards.models import import_image_reward

    image_reward = import_image_reward()
    from ImageReward.models.BLIP import blip_pretrain
    from ImageReward.models.BLIP.vit import VisionTransformer

    words = "a an the red green blue circle square triangle large small on left right top of".split()
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]))
    BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path / "bert")
    monkeypatch.setattr(pipelines.rewards.models, "BLIP_TOKENIZER", str(tmp_path / "bert"))

    def small_vit(vit, image_size, *args):
        return VisionTransformer(img_size=image_size, patch_size=16, embed_dim=32, depth=1, num_heads=2), 32

    monkeypatch.setattr(blip_pretrain, "create_vit", small_vit)
    med_config = {"architectures": ["BertModel"], "hidden_act": "gelu", "hidden_size": 768,
                  "intermediate_size": 64, "num_attention_heads": 12, "num_hidden_layers": 1,
                  "max_position_embeddings": 64, "vocab_size": len(words) + 7, "type_vocab_size": 2,  # + [DEC], [ENC]
                  "pad_token_id": 0, "layer_norm_eps": 1e-12, "attention_probs_dropout_prob": 0.1,
                  "hidden_dropout_prob": 0.1, "initializer_range": 0.02, "model_type": "bert",
                  "encoder_width": 768, "add_cross_attention": True}
    (tmp_path / "med_config.json").write_text(json.dumps(med_config))
    torch.manual_seed(0)
    model = image_reward.ImageReward(med_config=str(tmp_path / "med_config.json"))
    for layer in model.mlp.layers:  # the package's MLP init (std 1/769) maps everything to ~0
        if isinstance(layer, torch.nn.Linear):
            torch.nn.init.normal_(layer.weight, std=layer.in_features**-0.5)
    torch.save(model.state_dict(), tmp_path / "ImageReward.pt")
    return str(tmp_path / "ImageReward.pt"), str(tmp_path / "med_config.json")


def test_imagereward_scores_like_the_package_and_reads_the_image(tiny_image_reward):
    """Batched tensors through our preprocessing == the package's own ``score(prompt, PIL image)``."""
    from PIL import Image

    from pipelines.rewards.models import ImageRewardScore

    checkpoint, med_config = tiny_image_reward
    reward = ImageRewardScore(checkpoint, med_config)
    images = F.interpolate(torch.rand(3, 3, 6, 6, generator=torch.Generator().manual_seed(3)), size=64,
                           mode="bilinear")
    images = (images * 255).round() / 255
    prompts = ["a large red circle on the left", "a small blue square", "a green triangle on top"]
    ours = reward(images, prompts)
    pils = [Image.fromarray((image * 255).byte().permute(1, 2, 0).numpy()) for image in images]
    with torch.no_grad():
        expected = torch.tensor([reward.model.score(p, pil) for p, pil in zip(prompts, pils)], dtype=torch.float32)
    torch.testing.assert_close(ours, expected, rtol=0, atol=2e-3)  # PIL vs torch bicubic only (measured 1e-4)
    assert ours.max() - ours.min() > 0.1  # far above the tolerance
    assert not torch.allclose(ours, reward(images.flip(-1).roll(9, dims=-2), prompts), atol=1e-3)  # by 3.3e-3
    assert not torch.allclose(ours, reward(images, prompts[::-1]), atol=1e-3)  # by 0.12 (measured)


@pytest.mark.parametrize("name", ["pickscore", "clip", "aesthetic", "hpsv2", "hpsv21", pytest.param(
    "imagereward", marks=pytest.mark.skipif(importlib.util.find_spec("ImageReward") is None,
                                            reason="pip install --no-deps image-reward==1.5 (docs/rewards.md)"))])
def test_named_model_reward_without_network_says_which_weights(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="needs the weights"):
        rewards.load_reward(name)


@pytest.mark.parametrize("reward,module,install", [
    ("imagereward", "ImageReward", "pip install -e .[imagereward] && pip install --no-deps image-reward==1.5"),
    ("hpsv2", "open_clip", "pip install -e .[hps]"), ("geneval", "scipy", "pip install -e .[geneval]")])
def test_a_reward_of_an_optional_install_that_is_absent_says_the_command(monkeypatch, reward, module, install):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    with pytest.raises(ValueError, match=re.escape(f"--reward {reward} needs the {module} package, an optional "
                                                   f"install: {install}")):
        train_drpo.parse_args([f"--pretrained_model_name_or_path={TINY_SD}", f"--reward=color_match,{reward}",
                               f"--prompts_file={PROMPTS}"])


def test_training_with_a_model_reward_fails_at_start_up_not_in_step_one(tmp_path):
    from test_train_inputs import args_for, no_model_loading

    import train_drpo

    args = train_drpo.parse_args(args_for(tmp_path, "--reward=pickscore"))
    with pytest.raises(OSError, match="PickScore_v1"):
        train_drpo.main(args, load_pipeline=no_model_loading)


def test_mixture_standardises_per_prompt_and_weights_components():
    scores = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0])
    z = standardise_per_prompt(scores, ["a", "a", "a", "b", "b"])
    # float64 z-scores of 1, 2, 3 (std 1) and of a tie (0): measured 0 (default bound 1e-7)
    torch.testing.assert_close(z, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    images[0] = 1.0  # brightest
    mixture = rewards.load_reward(f"{REWARDS}:brightness,{REWARDS}:darkness", weights=[2.0, 1.0])
    assert isinstance(mixture, MixtureReward)
    mixed = mixture(images, ["p"] * 3)
    bright = standardise_per_prompt(images.mean((1, 2, 3)), ["p"] * 3)
    torch.testing.assert_close(mixed, 2.0 * bright - bright)  # darkness = -brightness (float64: measured 0)
    details = rewards.score_candidates(mixture, images, ["p"] * 3, "mixture")
    assert set(details.components) == {f"{REWARDS}:brightness", f"{REWARDS}:darkness"}
    torch.testing.assert_close(details.ranking, mixed)  # the same mixture again: measured 0
    # float64 of the same float32 brightness means: measured 0 (default bound 1e-7)
    torch.testing.assert_close(details.reported, (2.0 * images.mean((1, 2, 3)) - images.mean((1, 2, 3))).double())
    with pytest.raises(ValueError, match="2 values for 3 rewards"):
        rewards.check_reward_spec("color_match,jpeg_compressibility,clip", [1.0, 2.0])


# ---------------------------------------------------------------------------------------------
# The reward server, for real on 127.0.0.1
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def serve():
    servers = []

    def start(reward, **kwargs):
        server = build_server(reward, host="127.0.0.1", port=0, **kwargs)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/score"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def quantised(images):
    return (images * 255).round() / 255  # what survives the 8-bit PNG transport


def test_remote_reward_scores_like_the_local_one(serve):
    url = serve(f"{REWARDS}:brightness", token="s3cret")
    images = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    remote = rewards.score_candidates(RemoteReward(url, token="s3cret"), images, ["p"] * 5, url).ranking
    local = quantised(images).mean((1, 2, 3))
    # the same 8-bit pixels and float32 means: measured 0; 1e-5 rel covers a reordered float32 sum
    torch.testing.assert_close(remote, local.double(), rtol=1e-5, atol=1e-6)


def test_server_rejects_missing_or_wrong_tokens(serve, monkeypatch):
    monkeypatch.delenv("DRPO_REWARD_TOKEN", raising=False)
    url = serve(f"{REWARDS}:brightness", token="s3cret")
    images = torch.rand(2, 3, 8, 8)
    for token in (None, "wrong"):
        with pytest.raises(rewards.RewardError, match="HTTP 401"):
            RemoteReward(url, token=token)(images, ["p", "p"])
    monkeypatch.setenv("DRPO_REWARD_TOKEN", "s3cret")  # the client reads the shared token from the environment
    assert len(RemoteReward(url)(images, ["p", "p"])) == 2


def test_server_caps_batch_and_request_size(serve):
    url = serve(f"{REWARDS}:brightness", max_batch=3, max_request_mb=0.01)
    with pytest.raises(rewards.RewardError, match="HTTP 413.*1..3 images"):
        RemoteReward(url)(torch.rand(4, 3, 4, 4), ["p"] * 4)
    with pytest.raises(rewards.RewardError, match="HTTP 413.*bytes"):
        RemoteReward(url)(torch.rand(2, 3, 128, 128), ["p"] * 2)  # noisy PNGs > 10 kB


def test_server_reports_a_reward_that_returns_the_wrong_count(serve):
    url = serve(f"{REWARDS}:wrong_count")
    with pytest.raises(rewards.RewardError, match="HTTP 422.*returned 1 scores for 2 images"):
        RemoteReward(url)(torch.rand(2, 3, 8, 8), ["p", "p"])


def test_client_errors_for_a_server_that_is_down_slow_or_answers_garbage():
    images, prompts = torch.rand(2, 3, 8, 8), ["p", "p"]
    probe = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = probe.server_port
    probe.server_close()  # nothing listens there any more
    with pytest.raises(rewards.RewardError, match="unreachable or too slow after 2 attempts"):
        RemoteReward(f"http://127.0.0.1:{port}/score", retries=1, backoff=0.01)(images, prompts)

    answers = {"/slow": None, "/words": {"scores": ["high", "low"]}, "/count": {"scores": [1.0]}}

    class Fake(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            if self.path == "/slow":
                time.sleep(2)
            body = json.dumps(answers[self.path]).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    fake = ThreadingHTTPServer(("127.0.0.1", 0), Fake)
    threading.Thread(target=fake.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{fake.server_port}"
    try:
        with pytest.raises(rewards.RewardError, match="too slow"):
            RemoteReward(base + "/slow", timeout=0.3, retries=0)(images, prompts)
        with pytest.raises(rewards.RewardError, match="list of numbers"):
            RemoteReward(base + "/words")(images, prompts)
        with pytest.raises(rewards.RewardError, match="returned 1 scores for 2 images"):
            rewards.score_candidates(RemoteReward(base + "/count"), images, prompts, base + "/count")
    finally:
        fake.shutdown()
        fake.server_close()


@pytest.mark.parametrize("in_a_mixture", [False, True], ids=["url", "mixture-with-url"])
def test_training_with_a_remote_reward_end_to_end(serve, tmp_path, in_a_mixture):
    from test_train_inputs import args_for

    import train_drpo

    url = serve("color_match")
    spec = f"jpeg_compressibility,{url}" if in_a_mixture else url
    args = train_drpo.parse_args(args_for(tmp_path, f"--reward={spec}", "--max_train_steps=2"))
    train_drpo.main(args)
    history = [json.loads(line) for line in (tmp_path / "reward_history.jsonl").read_text().splitlines()]
    assert len(history) == 2
    if in_a_mixture:  # both components scored every step, the server's among them
        assert all(row[f"reward/{url}"] > 0 and row["reward/jpeg_compressibility"] < 0 for row in history), history
    else:
        assert all(row["reward_mean"] > 0 for row in history)
    assert os.path.isfile(tmp_path / "pytorch_lora_weights.safetensors")


def test_aesthetic_predictor_loads_the_published_head_format(tiny_clip, tmp_path):
    """A CLIP vision tower + the authors' MLP head file (keys layers.0 ... layers.7)."""
    from pipelines.rewards.models import AestheticScore

    torch.manual_seed(0)
    widths = [(16, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)]
    state = {}
    for index, (fan_in, fan_out) in zip([0, 2, 4, 6, 7], widths):
        state[f"layers.{index}.weight"] = torch.randn(fan_out, fan_in) / fan_in**0.5
        state[f"layers.{index}.bias"] = torch.zeros(fan_out)
    torch.save(state, tmp_path / "head.pth")
    scorer = AestheticScore(clip=tiny_clip, head=str(tmp_path / "head.pth"))
    images = torch.rand(3, 3, 40, 40, generator=torch.Generator().manual_seed(2))
    scores = scorer(images, ["ignored"] * 3)
    # By hand: normalised projected image embedding through the head (dropout off in eval).
    pixels = clip_preprocess(images, 32)
    embeds = torch.nn.functional.normalize(scorer.vision(pixel_values=pixels).image_embeds, dim=-1)
    hidden = embeds
    for index in (0, 2, 4, 6, 7):
        hidden = hidden @ state[f"layers.{index}.weight"].T + state[f"layers.{index}.bias"]
    # the head's float32 matmuls by hand: measured 0; 1e-4 covers another summation order
    torch.testing.assert_close(scores, hidden.squeeze(-1), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(scores, scorer(1 - images, ["ignored"] * 3))  # 0.012 apart (measured)


def test_server_refuses_to_serve_beyond_loopback_without_a_token(monkeypatch):
    monkeypatch.delenv("DRPO_REWARD_TOKEN", raising=False)
    with pytest.raises(ValueError, match="needs a shared --token"):
        build_server("color_match", host="0.0.0.0", port=0)


def test_server_only_decodes_png():
    import base64
    import io

    from PIL import Image

    from pipelines.rewards.remote import decode_png

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="JPEG")
    with pytest.raises(Exception, match="cannot identify|PNG"):
        decode_png(base64.b64encode(buffer.getvalue()).decode())
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, format="PNG")
    with pytest.raises(ValueError, match="exceeds"):
        decode_png(base64.b64encode(buffer.getvalue()).decode(), max_pixels=1000)


def test_hpsv3_outside_its_environment_says_how_to_serve_it():
    with pytest.raises(ImportError, match="pins transformers==4.45.2.*pipelines.rewards.server --reward hpsv3"):
        rewards.load_reward("hpsv3")


def test_hpsv3_adapter_feeds_the_inferencer_pil_images_and_keeps_mu(monkeypatch):
    """Against the package's API (``HPSv3RewardInferencer(config_path, checkpoint_path, device).reward(
    images, prompts) -> [N, 2]`` logits, mu first), with a stand-in for the 7B model."""
    import sys
    import types

    from PIL import Image

    from pipelines.rewards.models import HPSv3Score

    calls = []

    class Inferencer:
        def __init__(self, config_path=None, checkpoint_path=None, device="cuda"):
            calls.append(("init", config_path, checkpoint_path, device))

        def reward(self, image_paths, prompts):
            assert all(isinstance(image, Image.Image) and image.mode == "RGB" for image in image_paths)
            calls.append(("reward", len(image_paths), list(prompts)))
            means = torch.tensor([float(image.getpixel((0, 0))[0]) for image in image_paths])
            return torch.stack([means, torch.full_like(means, 7.0)], dim=1)  # [mu, sigma]

    monkeypatch.setitem(sys.modules, "hpsv3", types.SimpleNamespace(HPSv3RewardInferencer=Inferencer))
    reward = HPSv3Score(device="cpu", batch_size=2)
    images = torch.zeros(3, 3, 8, 8)
    images[:, 0, 0, 0] = torch.tensor([0.0, 0.5, 1.0])  # red value of the first pixel: 0, 128, 255
    scores = reward(images, ["a", "b", "c"])
    torch.testing.assert_close(scores, torch.tensor([0.0, 128.0, 255.0]), rtol=0, atol=0)  # mu, not sigma: integers
    assert calls == [("init", None, None, "cpu"), ("reward", 2, ["a", "b"]), ("reward", 1, ["c"])]


def test_imagereward_checkpoint_missing_parameters_is_an_error(tiny_image_reward, tmp_path):
    from pipelines.rewards.models import ImageRewardScore

    checkpoint, med_config = tiny_image_reward
    state = torch.load(checkpoint, weights_only=True)
    torch.save({k: v for k, v in state.items() if not k.startswith("mlp.")}, tmp_path / "partial.pt")
    with pytest.raises(RuntimeError, match="leaves 10 parameters unset: mlp.layers.0.bias"):
        ImageRewardScore(str(tmp_path / "partial.pt"), med_config)


def test_one_reward_on_two_servers_splits_each_call_and_scores_as_one_server(serve, monkeypatch):
    urls = [serve(f"{REWARDS}:brightness"), serve(f"{REWARDS}:brightness")]
    calls, send = [], RemoteReward.__call__

    def recorded(self, images, prompts):
        calls.append((self.url, len(images)))
        return send(self, images, prompts)

    monkeypatch.setattr(RemoteReward, "__call__", recorded)
    images = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    sharded = rewards.score_candidates(rewards.load_reward("|".join(urls)), images, ["p"] * 5, "two servers").ranking
    assert sorted(calls) == sorted([(urls[0], 3), (urls[1], 2)])
    # the same 8-bit pixels and float32 means: measured 0; 1e-5 rel covers a reordered float32 sum
    torch.testing.assert_close(sharded, quantised(images).mean((1, 2, 3)).double(), rtol=1e-5, atol=1e-6)


def test_a_server_with_two_devices_scores_two_requests_at_once(serve, monkeypatch, tmp_path):
    """--devices cpu,cpu: two workers behind one port score two requests at the same time; one worker, one
    at a time. Observed by the reward itself (how many calls were inside it together), not by a clock."""
    from concurrent.futures import ThreadPoolExecutor

    images = torch.rand(2, 3, 8, 8)
    for devices, partner_wait, together in ((("cpu",), 1.0, 1), (("cpu", "cpu"), 120.0, 2)):
        room = tmp_path / f"room-{len(devices)}"
        room.mkdir()
        # each call waits (up to partner_wait s) for a second call to be inside the reward with it
        monkeypatch.setenv("DRPO_TEST_ROOM", str(room))
        monkeypatch.setenv("DRPO_TEST_PARTNER_WAIT", str(partner_wait))
        client = RemoteReward(serve(f"{REWARDS}:meet_a_partner", devices=devices))
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda _: client(images, ["p", "q"]), range(2)))
        assert answers[0] == answers[1] and len(answers[0]) == 2
        assert int((room / "most_inside").read_text()) == together, devices
