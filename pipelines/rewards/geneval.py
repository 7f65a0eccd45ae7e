"""GenEval-style task checks as a (non-differentiable, binary) reward, with transformers models.

GenEval (Ghosh et al., 2023) scores an image 1 if an instance detector finds what the prompt asks
for — one object, two objects, a count, a colour, a relative position, or colours bound to objects —
and 0 otherwise. Its evaluator uses mmdetection's Mask2Former (Swin-S, COCO instances) and OpenAI
CLIP ViT-L/14 for colours. This version runs the same model families from transformers:
``Mask2FormerForUniversalSegmentation`` (``facebook/mask2former-swin-small-coco-instance``) and
``CLIPModel`` (``openai/clip-vit-large-patch14``), with the evaluator's decision rules:

- detections scoring above 0.3 (0.9 for counting prompts), at most 16 per class, best first, no NMS;
- ``include`` clauses must all hold (at least ``count`` objects; colour and position checked on the
  ``count`` most confident ones), any ``exclude`` clause that holds (``count`` or more) fails the image;
- colour: each object's crop (its mask pasted on grey #999, cropped to its box) classified by CLIP
  zero-shot among 10 colours, averaging three prompt templates per colour;
- position: A is "left of" B when the centre offset, shrunk by 0.1 x (width/height of A + B) per
  axis, points mostly left (normalised component < -0.5); likewise right of / above / below.

Differences from the original evaluator (documented in the README): the detector checkpoint is the
transformers port (scores = class probability x mask score over the top queries, the same rule as
mmdet's Mask2Former), boxes are taken from the masks, preprocessing is the transformers image
processor on tensors, and the task metadata is read back from the prompt text, which GenEval writes
from fixed templates (``parse_prompt``); a prompt outside those templates is an error, not a 0.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from pipelines.rewards.models import clip_preprocess
from pipelines.rewards.protocol import RewardError

DETECTOR = "facebook/mask2former-swin-small-coco-instance"
CLIP = "openai/clip-vit-large-patch14"
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
POSITIONS = ("left of", "right of", "above", "below")
COLOR_TEMPLATES = ("a photo of a {color} {name}", "a photo of a {color}-colored {name}", "a photo of a {color} object")
GENEVAL_NAMES = {"computer mouse": "mouse", "tv remote": "remote", "computer keyboard": "keyboard"}  # -> COCO label
CROP_BACKGROUND = 0x99 / 255  # the evaluator's grey "#999"


# ---------------------------------------------------------------------------------------------
# Prompt -> task metadata (GenEval's prompt templates, inverted)
# ---------------------------------------------------------------------------------------------


def with_article(name: str) -> str:
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def plural(name: str) -> str:
    """GenEval's plural rule: +es after a final s, else +s."""
    return f"{name}es" if name.endswith("s") else f"{name}s"


def parse_prompt(prompt: str, classes) -> dict:
    """The GenEval metadata (tag, include, exclude) of a prompt written by GenEval's templates."""
    names = sorted(classes, key=len, reverse=True)
    obj = "|".join(re.escape(n) for n in names)
    color = "|".join(COLORS)
    art = r"an? "
    text = prompt.strip().lower()

    def single(name, **extra):
        return {"class": name, "count": 1, **extra}

    if match := re.fullmatch(rf"a photo of {art}({obj})", text):
        return {"tag": "single_object", "include": [single(match[1])]}
    if match := re.fullmatch(rf"a photo of {art}({obj}) and {art}({obj})", text):
        return {"tag": "two_object", "include": [single(match[1]), single(match[2])]}
    plurals = {plural(n): n for n in names}
    if match := re.fullmatch(rf"a photo of ({'|'.join(NUMBERS)}) ({'|'.join(map(re.escape, plurals))})", text):
        count, name = NUMBERS.index(match[1]), plurals[match[2]]
        return {"tag": "counting", "include": [{"class": name, "count": count}],
                "exclude": [{"class": name, "count": count + 1}]}
    if match := re.fullmatch(rf"a photo of {art}({color}) ({obj})", text):
        return {"tag": "colors", "include": [single(match[2], color=match[1])]}
    if match := re.fullmatch(rf"a photo of {art}({obj}) ({'|'.join(POSITIONS)}) {art}({obj})", text):
        return {"tag": "position", "include": [single(match[3]), single(match[1], position=(match[2], 0))]}
    if match := re.fullmatch(rf"a photo of {art}({color}) ({obj}) and {art}({color}) ({obj})", text):
        return {"tag": "color_attr", "include": [single(match[2], color=match[1]), single(match[4], color=match[3])]}
    raise RewardError(
        f"geneval: {prompt!r} is not a GenEval prompt; expected 'a photo of a <object>', "
        "'... a <object> and a <object>', '... <number> <objects>', '... a <colour> <object>', "
        "'... a <object> <left of|right of|above|below> a <object>' or "
        "'... a <colour> <object> and a <colour> <object>'"
    )


# ---------------------------------------------------------------------------------------------
# The decision rules
# ---------------------------------------------------------------------------------------------


def relative_position(box_a, box_b, margin: float = 0.1) -> set[str]:
    """Relations of A to B from boxes (x0, y0, x1, y1), y pointing down: centre offset shrunk by
    ``margin`` x (size of A + size of B) on each axis, then a direction test on its unit vector."""
    a, b = torch.as_tensor(box_a, dtype=torch.float64)[:4], torch.as_tensor(box_b, dtype=torch.float64)[:4]
    offset = (a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2
    sizes = (a[2:] - a[:2]).abs() + (b[2:] - b[:2]).abs()
    shrunk = (offset.abs() - margin * sizes).clamp_min(0) * offset.sign()
    if shrunk.abs().max() < 1e-3:
        return set()
    dx, dy = (shrunk / offset.norm()).tolist()
    relations = {"left of": dx < -0.5, "right of": dx > 0.5, "above": dy < -0.5, "below": dy > 0.5}
    return {name for name, holds in relations.items() if holds}


def check(metadata: dict, detections: dict, colours_of, margin: float = 0.1) -> tuple[bool, list[str]]:
    """GenEval's verdict for one image: ``detections`` maps class -> objects (box, mask), most
    confident first; ``colours_of(objects, name)`` names each object's colour; ``margin`` is the
    position rule's (``relative_position``)."""
    reasons, matched = [], []
    for clause in metadata.get("include", []):
        name, count = clause["class"], clause["count"]
        found = detections.get(name, [])[:count]
        ok = len(found) >= count
        if not ok:
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        if ok and "color" in clause:
            colours = colours_of(found, name)
            ok = colours.count(clause["color"]) >= count
            if not ok:
                reasons.append(f"expected {clause['color']} {name}, found {', '.join(colours)}")
        if ok and "position" in clause:
            relation, target = clause["position"]
            targets = matched[target]
            ok = targets is not None and all(
                relation in relative_position(obj[0], other[0], margin) for obj in found for other in targets)
            if not ok:
                reasons.append(f"expected {name} {relation} {metadata['include'][target]['class']}")
        matched.append(found if ok else None)
    for clause in metadata.get("exclude", []):
        if len(detections.get(clause["class"], [])) >= clause["count"]:
            reasons.append(f"expected {clause['class']}<{clause['count']}")
    return not reasons, reasons


def mask_box(mask: torch.Tensor) -> list[float]:
    """(x0, y0, x1, y1) of a binary mask, right/bottom exclusive (mmdet's mask2bbox)."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


# ---------------------------------------------------------------------------------------------
# The reward
# ---------------------------------------------------------------------------------------------


class GenEvalReward:
    """1.0 if the image passes the prompt's GenEval check, else 0.0 (a reward in the sense of ``pipelines/rewards/protocol.py``)."""

    def __init__(self, detector: str = DETECTOR, clip: str = CLIP, device="cpu", threshold: float = 0.3,
                 counting_threshold: float = 0.9, max_objects: int = 16, position_margin: float = 0.1):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel, Mask2FormerForUniversalSegmentation

        self.device = torch.device(device)
        self.processor = AutoImageProcessor.from_pretrained(detector)
        self.detector = Mask2FormerForUniversalSegmentation.from_pretrained(detector).to(self.device).eval()
        self.clip = CLIPModel.from_pretrained(clip).to(self.device).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(clip)
        self.labels = dict(self.detector.config.id2label)
        self.classes = {name: name for name in self.labels.values()}
        self.classes.update({alias: label for alias, label in GENEVAL_NAMES.items() if label in self.classes})
        self.threshold, self.counting_threshold = threshold, counting_threshold
        self.max_objects, self.position_margin = max_objects, position_margin
        self._colour_classifiers: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def detect(self, images: torch.Tensor, thresholds: list[float]) -> list[dict[str, list]]:
        """Per image: class -> [(box, mask), ...] scoring above its threshold, most confident first, at
        most ``max_objects`` per class. One detector pass for the batch."""
        inputs = self.processor(images=list(images), do_rescale=False, return_tensors="pt").to(self.device)
        results = self.processor.post_process_instance_segmentation(
            self.detector(**inputs), threshold=min(thresholds), target_sizes=[tuple(images.shape[-2:])] * len(images),
            return_binary_maps=True)
        return [self._objects(result, threshold) for result, threshold in zip(results, thresholds)]

    def _objects(self, result: dict, threshold: float) -> dict[str, list]:
        found: dict[str, list] = {}
        segments = sorted(enumerate(result["segments_info"]), key=lambda item: -item[1]["score"])
        for index, info in segments:
            name, mask = self.labels[info["label_id"]], result["segmentation"][index].bool()
            if info["score"] > threshold and mask.any() and len(found.get(name, [])) < self.max_objects:
                found.setdefault(name, []).append((mask_box(mask), mask))
        return found

    @torch.no_grad()
    def colour_classifier(self, name: str) -> torch.Tensor:
        """[10, d] CLIP text embeddings: per colour, the normalised mean of its templates' embeddings."""
        if name not in self._colour_classifiers:
            weights = []
            for colour in COLORS:
                texts = [t.format(color=colour, name=name) for t in COLOR_TEMPLATES]
                tokens = self.tokenizer(texts, padding=True, return_tensors="pt").to(self.device)
                embeds = F.normalize(self.clip.get_text_features(**tokens).pooler_output, dim=-1)
                weights.append(F.normalize(embeds.mean(0), dim=-1))
            self._colour_classifiers[name] = torch.stack(weights)
        return self._colour_classifiers[name]

    def crops(self, image: torch.Tensor, objects) -> list[torch.Tensor]:
        """Each object alone: its mask over grey, cropped to its box."""
        out = []
        for (x0, y0, x1, y1), mask in objects:
            pasted = torch.where(mask.to(image.device), image, torch.full_like(image, CROP_BACKGROUND))
            out.append(pasted[:, y0:y1, x0:x1])
        return out

    @torch.no_grad()
    def colours(self, image: torch.Tensor, objects, name: str) -> list[str]:
        size = self.clip.config.vision_config.image_size
        pixels = torch.cat([clip_preprocess(crop[None].to(self.device), size) for crop in self.crops(image, objects)])
        embeds = F.normalize(self.clip.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        return [COLORS[i] for i in (embeds @ self.colour_classifier(name).T).argmax(-1).tolist()]

    def metadata(self, prompt: str) -> dict:
        """The prompt's task, in GenEval's object names (which the colour templates use too)."""
        return parse_prompt(prompt, self.classes)

    def by_geneval_name(self, found: dict[str, list]) -> dict[str, list]:
        """Detections keyed by GenEval's names ("tv remote") instead of the detector's labels ("remote")."""
        return {name: found[label] for name, label in self.classes.items() if label in found}

    def verdicts(self, images: torch.Tensor, prompts: list[str]) -> list[tuple[bool, list[str]]]:
        """(passed, reasons) per image; every prompt is parsed before any model runs."""
        metadata = [self.metadata(prompt) for prompt in prompts]
        thresholds = [self.counting_threshold if m["tag"] == "counting" else self.threshold for m in metadata]
        detections = self.detect(images, thresholds)
        verdicts = []
        for task, found, image in zip(metadata, detections, images):
            colours_of = lambda objects, name, image=image: self.colours(image, objects, name)  # noqa: E731
            verdicts.append(check(task, self.by_geneval_name(found), colours_of, self.position_margin))
        return verdicts

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return torch.tensor([float(passed) for passed, _ in self.verdicts(images, prompts)])


def geneval(device="cpu") -> GenEvalReward:
    """The ``geneval`` reward with the evaluator's detector and CLIP model."""
    return GenEvalReward(device=device)
