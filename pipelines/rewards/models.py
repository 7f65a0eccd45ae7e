"""Rewards that are models: PickScore, CLIP score, LAION aesthetic, HPS v2 / v2.1, ImageReward, HPSv3.

Each follows the reward protocol (``pipelines/rewards/protocol.py``): CPU images in [0, 1] and prompts
in, one score per image out. They move the images to their own device and preprocess in torch,
matching their authors' PIL pipelines (tested). Weights come from the Hub on first use, or from local
folders/files saved in the same formats.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(images: torch.Tensor, size: int) -> torch.Tensor:
    """CLIPImageProcessor in torch: bicubic resize of the short side to ``size``, centre crop, normalise."""
    height, width = images.shape[-2:]
    scale = size / min(height, width)
    resized = F.interpolate(images, size=(max(size, int(height * scale)), max(size, int(width * scale))),
                            mode="bicubic", antialias=True, align_corners=False)
    top, left = (resized.shape[-2] - size) // 2, (resized.shape[-1] - size) // 2
    return clip_normalise(resized[..., top : top + size, left : left + size])


def clip_normalise(pixels: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CLIP_MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=pixels.device).view(1, 3, 1, 1)
    return (pixels - mean) / std


def clip_preprocess_longest(images: torch.Tensor, size: int) -> torch.Tensor:
    """open_clip's ``resize_mode="longest"`` eval transform (HPS v2's ResizeMaxSize) in torch: bicubic resize
    of the long side to ``size``, zero padding centred to a square, then CLIP normalisation."""
    height, width = images.shape[-2:]
    scale = size / max(height, width)
    new_height, new_width = round(height * scale), round(width * scale)
    resized = F.interpolate(images, size=(new_height, new_width), mode="bicubic", antialias=True, align_corners=False)
    pad_height, pad_width = size - new_height, size - new_width
    padded = F.pad(resized, (pad_width // 2, pad_width - pad_width // 2, pad_height // 2, pad_height - pad_height // 2))
    return clip_normalise(padded)


class BatchedReward:
    """A model reward scored ``batch_size`` images at a time; subclasses define ``score_batch(images,
    prompts)`` for one batch and return its scores. Without gradient (ranking) unless the images
    require grad (the reward-gradient methods), which then flows back through the model to them."""

    batch_size = 16

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        size = self.batch_size
        with torch.set_grad_enabled(torch.is_grad_enabled() and images.requires_grad):
            return torch.cat([self.score_batch(images[start : start + size], prompts[start : start + size]).float()
                              for start in range(0, len(images), size)]).to(images.device)

    def score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError


class ClipSimilarity(BatchedReward):
    """Text-image similarity of a ``transformers.CLIPModel`` (weights as their authors publish them).

    ``scale="logit"`` gives ``logit_scale.exp() * cos`` (PickScore), ``scale="cosine"`` the cosine.
    """

    def __init__(self, model: str, tokenizer: str | None = None, scale: str = "cosine", device="cpu",
                 batch_size: int = 32):
        from transformers import AutoTokenizer, CLIPModel

        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(model).to(self.device).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or model)
        self.scale, self.batch_size = scale, batch_size
        self.image_size = self.model.config.vision_config.image_size

    def score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        text = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.tokenizer.model_max_length,
                              return_tensors="pt").to(self.device)
        pixels = clip_preprocess(images.to(self.device), self.image_size)
        image_embeds = self.model.get_image_features(pixel_values=pixels)
        text_embeds = self.model.get_text_features(**text)
        cosine = F.cosine_similarity(image_embeds.pooler_output, text_embeds.pooler_output, dim=-1)
        factor = self.model.logit_scale.exp() if self.scale == "logit" else 1.0
        return factor * cosine


def pickscore(device="cpu", model="yuvalkirstain/PickScore_v1", tokenizer="laion/CLIP-ViT-H-14-laion2B-s32B-b79K"):
    """PickScore_v1 (the paper's default reward): logit_scale * cos of its CLIP-H embeddings."""
    return ClipSimilarity(model, tokenizer, scale="logit", device=device)


def clip_score(device="cpu", model="openai/clip-vit-large-patch14"):
    """CLIP ViT-L/14 cosine similarity of image and prompt (Table A5 reports it x100)."""
    return ClipSimilarity(model, scale="cosine", device=device)


AESTHETIC_HEAD_URL = (
    "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac%2Blogos%2Bava1-l14-linearMSE.pth"
)


class AestheticScore(BatchedReward):
    """LAION aesthetic predictor v2: an MLP on the L2-normalised CLIP ViT-L/14 image embedding.

    The head (768 -> 1024 -> 128 -> 64 -> 16 -> 1, dropout between the first four layers) is the
    authors' ``sac+logos+ava1-l14-linearMSE.pth``, a plain state dict read with ``weights_only=True``.
    Unconditional: the prompt is ignored.
    """

    def __init__(self, clip: str = "openai/clip-vit-large-patch14", head: str = AESTHETIC_HEAD_URL, device="cpu",
                 batch_size: int = 32):
        from transformers import CLIPVisionModelWithProjection

        self.device = torch.device(device)
        self.vision = CLIPVisionModelWithProjection.from_pretrained(clip).to(self.device).eval().requires_grad_(False)
        width = self.vision.config.projection_dim
        self.head = torch.nn.Sequential(
            torch.nn.Linear(width, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1),
        )
        if head.startswith(("http://", "https://")):
            state = torch.hub.load_state_dict_from_url(head, map_location="cpu", weights_only=True)
        else:
            state = torch.load(head, map_location="cpu", weights_only=True)
        self.head.load_state_dict({k.removeprefix("layers."): v for k, v in state.items()})
        self.head = self.head.to(self.device).eval().requires_grad_(False)
        self.image_size, self.batch_size = self.vision.config.image_size, batch_size

    def score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = clip_preprocess(images.to(self.device), self.image_size)
        embeds = F.normalize(self.vision(pixel_values=pixels).image_embeds, dim=-1)
        return self.head(embeds).squeeze(-1)


def aesthetic(device="cpu"):
    return AestheticScore(device=device)


HPS_REPO = "xswu/HPSv2"


class HPSv2Score(BatchedReward):
    """Human Preference Score v2 / v2.1: an open_clip ViT-H-14 fine-tuned on HPD v2.

    The authors publish the whole CLIP state dict (``{"state_dict": ...}``) in ``xswu/HPSv2``; the
    architecture comes from open_clip and the weights from that file, as in their ``hpsv2.score``.
    The score is the cosine of the normalised image and text embeddings (about 0.2-0.35), without
    the logit scale. Preprocessing: HPS v2's eval transform (long side resized to 224, zero-padded to
    a square, OpenAI CLIP normalisation), done in torch; for square images the same as a centre crop.
    """

    def __init__(self, checkpoint: str, architecture: str = "ViT-H-14", device="cpu", batch_size: int = 16):
        checkpoint = resolve_file(checkpoint)  # before building a 1B-parameter model the weights may not reach
        import open_clip

        if architecture.endswith(".json"):  # a local open_clip config (tests, custom variants)
            open_clip.add_model_config(architecture)
            architecture = os.path.splitext(os.path.basename(architecture))[0]
        self.device = torch.device(device)
        self.model = open_clip.create_model(architecture, pretrained=None)
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        self.model.load_state_dict(state.get("state_dict", state))
        self.model = self.model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(architecture)
        self.image_size = self.model.visual.image_size[0]
        self.batch_size = batch_size

    def score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = clip_preprocess_longest(images.to(self.device), self.image_size)
        image_embeds = F.normalize(self.model.encode_image(pixels), dim=-1)
        text_embeds = F.normalize(self.model.encode_text(self.tokenizer(prompts).to(self.device)), dim=-1)
        return (image_embeds * text_embeds).sum(-1)


def resolve_file(spec: str) -> str:
    """A local file, or ``owner/repo:filename`` downloaded from the Hub (cached by huggingface_hub)."""
    if os.path.isfile(spec):
        return spec
    repo_id, _, filename = spec.partition(":")
    if not filename:
        raise OSError(f"{spec!r} is neither a local file nor a Hub file 'owner/repo:filename'")
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo_id, filename)


def hpsv2(device="cpu", checkpoint=f"{HPS_REPO}:HPS_v2_compressed.pt", architecture="ViT-H-14"):
    return HPSv2Score(checkpoint, architecture, device=device)


def hpsv21(device="cpu", checkpoint=f"{HPS_REPO}:HPS_v2.1_compressed.pt", architecture="ViT-H-14"):
    return HPSv2Score(checkpoint, architecture, device=device)


def _find_pruneable_heads_and_indices(heads, n_heads: int, head_size: int, already_pruned_heads: set):
    """Which attention heads to prune and the flat indices of the dimensions that stay (the helper
    transformers < 4.56 exported and BLIP's ``med.py`` imports; only used when pruning heads)."""
    heads = set(heads) - already_pruned_heads
    keep = torch.ones(n_heads, head_size, dtype=torch.bool)
    for head in heads:
        keep[head - sum(1 for pruned in already_pruned_heads if pruned < head)] = False
    return heads, torch.arange(n_heads * head_size)[keep.flatten()]


BLIP_TOKENIZER = "bert-base-uncased"  # what BLIP (and so ImageReward) tokenises prompts with


def _blip_tokenizer():
    """BLIP's ``init_tokenizer`` for transformers 5, where ``additional_special_tokens_ids`` is gone:
    BERT's tokenizer plus the [DEC] and [ENC] tokens (vocabulary 30524, as ``med_config.json`` expects)."""
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(BLIP_TOKENIZER)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tokenizer.enc_token_id = tokenizer.convert_tokens_to_ids("[ENC]")
    return tokenizer


def _post_init_then_init_weights(model) -> None:
    """BLIP's BERT calls ``init_weights()`` from ``__init__`` (transformers 4); transformers 5 needs
    ``post_init()`` instead, which registers the model's static properties (tied weights, parallel
    plans) and then calls ``init_weights()`` itself."""
    from transformers import PreTrainedModel

    if hasattr(model, "all_tied_weights_keys"):  # the call from post_init
        PreTrainedModel.init_weights(model)
    else:  # the transformers-4 call from __init__
        model.post_init()


def _invert_attention_mask(model, mask: torch.Tensor) -> torch.Tensor:
    """1 = attend, 0 = ignore -> an additive mask broadcast over heads (and queries), in the model's dtype."""
    extended = mask[:, None, :, :] if mask.dim() == 3 else mask[:, None, None, :]
    extended = extended.to(model.dtype)
    return (1.0 - extended) * torch.finfo(model.dtype).min


def _get_head_mask(model, head_mask: torch.Tensor | None, num_layers: int):
    """Per-layer head masks broadcast to [layers, batch, heads, queries, keys] (None: no masking)."""
    if head_mask is None:
        return [None] * num_layers
    if head_mask.dim() == 1:
        head_mask = head_mask[None, None, :, None, None].expand(num_layers, -1, -1, -1, -1)
    elif head_mask.dim() == 2:
        head_mask = head_mask[:, None, :, None, None]
    return head_mask.to(model.dtype)


def import_image_reward():
    """``import ImageReward`` (package ``image-reward`` 1.5) on transformers 5.

    Its BLIP text encoder imports three helpers from ``transformers.modeling_utils`` that transformers
    >= 4.56 no longer exports: two live on in ``transformers.pytorch_utils``, the third is
    ``_find_pruneable_heads_and_indices`` above; its tokenizer set-up reads an attribute transformers 5
    removed (replaced by ``_blip_tokenizer``); its BERT initialises the transformers-4 way
    (``_post_init_then_init_weights``) and calls two mask helpers transformers 5 dropped from
    ``PreTrainedModel`` (``_invert_attention_mask``, ``_get_head_mask``). Its other imports need
    ``openai-clip`` (which needs ``pkg_resources``, hence setuptools < 81), ``fairscale`` and a timm with
    the 0.6 module paths (timm 1.x keeps them as aliases). See requirements.txt.
    """
    import transformers.modeling_utils as modeling_utils
    import transformers.pytorch_utils as pytorch_utils

    for name in ("apply_chunking_to_forward", "prune_linear_layer"):
        if not hasattr(modeling_utils, name):
            setattr(modeling_utils, name, getattr(pytorch_utils, name))
    if not hasattr(modeling_utils, "find_pruneable_heads_and_indices"):
        modeling_utils.find_pruneable_heads_and_indices = _find_pruneable_heads_and_indices
    import ImageReward
    from ImageReward.models.BLIP import blip_pretrain, med

    blip_pretrain.init_tokenizer = _blip_tokenizer
    med.BertPreTrainedModel.init_weights = _post_init_then_init_weights
    for name, method in (("invert_attention_mask", _invert_attention_mask), ("get_head_mask", _get_head_mask)):
        if not hasattr(med.BertPreTrainedModel, name):
            setattr(med.BertPreTrainedModel, name, method)
    return ImageReward


IMAGE_REWARD_REPO = "THUDM/ImageReward"


class ImageRewardScore(BatchedReward):
    """ImageReward-v1.0 (``image-reward``): BLIP ViT-L image tokens cross-attended by a BERT text
    encoder, an MLP on the [CLS] state, standardised by the authors' mean and std.

    The package's ``ImageReward`` model built from ``med_config.json`` and loaded with its checkpoint
    (both from ``THUDM/ImageReward`` unless given as local files; tokenizer ``bert-base-uncased``), as
    ``ImageReward.load`` does, except that a checkpoint leaving any parameter unset is an error (the
    package loads with ``strict=False`` silently). Scored in batches through its ``score_gard`` path on
    tensors, with its preprocessing (bicubic 224 short side, centre crop, CLIP normalisation) done in
    torch, and prompts tokenised as ``score`` does (max length 35).
    """

    def __init__(self, checkpoint: str = f"{IMAGE_REWARD_REPO}:ImageReward.pt",
                 med_config: str = f"{IMAGE_REWARD_REPO}:med_config.json", device="cpu", batch_size: int = 16):
        image_reward = import_image_reward()
        self.device = torch.device(device)
        checkpoint, med_config = resolve_file(checkpoint), resolve_file(med_config)  # fail before building the model
        self.model = image_reward.ImageReward(med_config=med_config, device=self.device)
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        missing = set(self.model.load_state_dict(state, strict=False).missing_keys)
        unset = sorted(missing & {name for name, _ in self.model.named_parameters()})
        if unset:
            raise RuntimeError(f"ImageReward checkpoint {checkpoint!r} leaves {len(unset)} parameters unset: "
                               f"{', '.join(unset[:5])}{' ...' if len(unset) > 5 else ''}")
        self.model = self.model.to(self.device).eval().requires_grad_(False)
        self.batch_size = batch_size

    def score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = clip_preprocess(images.to(self.device), 224)
        text = self.model.blip.tokenizer(prompts, padding="max_length", truncation=True, max_length=35,
                                         return_tensors="pt").to(self.device)
        return self.model.score_gard(text.input_ids, text.attention_mask, pixels).squeeze(-1)


def imagereward(device="cpu"):
    return ImageRewardScore(device=device)


HPSV3_ENVIRONMENT = (
    "reward 'hpsv3' needs the `hpsv3` package, which pins transformers==4.45.2 and so cannot share this "
    "environment (transformers 5). Serve it from its own: `python -m venv hpsv3-env && hpsv3-env/bin/pip install "
    "hpsv3 msgpack`, then, from this repository's root, `hpsv3-env/bin/python -m pipelines.rewards.server "
    "--reward hpsv3 --port 8000`, and train with --reward http://127.0.0.1:8000/score"
)


class HPSv3Score(BatchedReward):
    """HPSv3 (the paper's large VLM reward): Qwen2-VL-7B with a reward head (``MizzenAI/HPSv3``), through
    the authors' ``hpsv3.HPSv3RewardInferencer``; the score is the predicted mean mu (logit 0; logit 1
    is its uncertainty). Images go to it as PIL images, which it resizes with its Qwen2-VL processor."""

    def __init__(self, device="cpu", checkpoint: str | None = None, config: str | None = None, batch_size: int = 8):
        try:
            from hpsv3 import HPSv3RewardInferencer
        except ImportError as error:
            raise ImportError(HPSV3_ENVIRONMENT) from error
        self.inferencer = HPSv3RewardInferencer(config_path=config, checkpoint_path=checkpoint, device=str(device))
        self.batch_size = batch_size

    def score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        from PIL import Image

        pixels = (images * 255).round().byte().permute(0, 2, 3, 1).numpy()
        return self.inferencer.reward([Image.fromarray(image) for image in pixels], prompts)[:, 0]


def hpsv3(device="cpu"):
    return HPSv3Score(device=device)
