"""GenEval task checks: prompt parsing, the decision rules by hand, and the reward on tiny local models."""

import pytest
import torch
from conftest import build_tiny_clip, tiny_mask2former_config

from pipelines.rewards import RewardError, load_reward
from pipelines.rewards.geneval import (
    COLORS,
    CROP_BACKGROUND,
    GenEvalReward,
    check,
    mask_box,
    parse_prompt,
    relative_position,
)

CLASSES = ["person", "dog", "bus", "wine glass", "apple", "teddy bear", "computer mouse", "elephant"]


@pytest.mark.parametrize("prompt,expected", [
    ("a photo of a dog", {"tag": "single_object", "include": [{"class": "dog", "count": 1}]}),
    ("a photo of an elephant", {"tag": "single_object", "include": [{"class": "elephant", "count": 1}]}),
    ("a photo of a teddy bear and a computer mouse",
     {"tag": "two_object", "include": [{"class": "teddy bear", "count": 1}, {"class": "computer mouse", "count": 1}]}),
    ("a photo of three buses", {"tag": "counting", "include": [{"class": "bus", "count": 3}],
                                "exclude": [{"class": "bus", "count": 4}]}),
    ("a photo of two wine glasses", {"tag": "counting", "include": [{"class": "wine glass", "count": 2}],
                                     "exclude": [{"class": "wine glass", "count": 3}]}),
    ("a photo of an orange bus", {"tag": "colors", "include": [{"class": "bus", "count": 1, "color": "orange"}]}),
    ("a photo of a dog right of a teddy bear",
     {"tag": "position", "include": [{"class": "teddy bear", "count": 1},
                                     {"class": "dog", "count": 1, "position": ("right of", 0)}]}),
    ("a photo of a purple wine glass and a black apple",
     {"tag": "color_attr", "include": [{"class": "wine glass", "count": 1, "color": "purple"},
                                       {"class": "apple", "count": 1, "color": "black"}]}),
])
def test_parse_prompt_inverts_the_geneval_templates(prompt, expected):
    assert parse_prompt(prompt, CLASSES) == expected


def test_a_prompt_outside_the_templates_is_an_error():
    with pytest.raises(RewardError, match="not a GenEval prompt"):
        parse_prompt("a cinematic photo of a dog", CLASSES)
    with pytest.raises(RewardError, match="not a GenEval prompt"):
        parse_prompt("a photo of a unicorn", CLASSES)


def test_relative_position_by_hand():
    # offset (-30, 0), sizes (20, 20): shrunk to (-28, 0), unit (-0.93, 0) -> left of
    assert relative_position((0, 0, 10, 10), (30, 0, 40, 10)) == {"left of"}
    assert relative_position((30, 0, 40, 10), (0, 0, 10, 10)) == {"right of"}
    # offset (-30, -30): shrunk (-28, -28) / 42.4 = -0.66 on both axes -> left of and above (y points down)
    assert relative_position((0, 0, 10, 10), (30, 30, 40, 40)) == {"left of", "above"}
    assert relative_position((0, 30, 10, 40), (0, 0, 10, 10)) == {"below"}
    # centres 1.5 apart, margin 0.1 x 20 = 2: the shrunk offset vanishes -> no relation
    assert relative_position((0, 0, 10, 10), (1.5, 0, 11.5, 10)) == set()


def objects(*boxes):
    return [(box, None) for box in boxes]


def test_check_follows_the_evaluator_rules():
    never = lambda found, name: pytest.fail("colour asked without a colour clause")  # noqa: E731
    two = parse_prompt("a photo of two dogs", CLASSES)
    assert check(two, {"dog": objects((0, 0, 5, 5), (9, 9, 12, 12))}, never)[0]
    assert not check(two, {"dog": objects((0, 0, 5, 5))}, never)[0]  # too few
    assert not check(two, {"dog": objects(*[(i, 0, i + 1, 1) for i in range(3)])}, never)[0]  # exclude: 3 >= 3

    colour = parse_prompt("a photo of a purple wine glass and a black apple", CLASSES)
    found = {"wine glass": objects((0, 0, 4, 4)), "apple": objects((8, 8, 9, 9))}
    painted = {"wine glass": ["purple"], "apple": ["black"]}
    assert check(colour, found, lambda objs, name: painted[name][: len(objs)])[0]
    painted["apple"] = ["red"]
    ok, reasons = check(colour, found, lambda objs, name: painted[name][: len(objs)])
    assert not ok and reasons == ["expected black apple, found red"]

    position = parse_prompt("a photo of a dog right of a teddy bear", CLASSES)
    assert check(position, {"teddy bear": objects((0, 0, 10, 10)), "dog": objects((30, 0, 40, 10))}, never)[0]
    assert not check(position, {"teddy bear": objects((30, 0, 40, 10)), "dog": objects((0, 0, 10, 10))}, never)[0]
    assert not check(position, {"dog": objects((30, 0, 40, 10))}, never)[0]  # no target, no position


def test_mask_box_is_right_and_bottom_exclusive():
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[2:5, 3:7] = True
    assert mask_box(mask) == [3, 2, 7, 5]


@pytest.fixture(scope="module")
def tiny_geneval(tmp_path_factory):
    """A tiny Mask2Former (Swin backbone) + its image processor, and a tiny CLIP, saved as on the Hub."""
    pytest.importorskip("scipy", reason="the GenEval checker is the optional geneval install: pip install -e .[geneval]")
    from transformers import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor

    detector = tmp_path_factory.mktemp("tiny-mask2former")
    labels = dict(enumerate(["person", "dog", "mouse", "wine glass", "bus"]))
    config = tiny_mask2former_config(list(labels.values()))
    torch.manual_seed(0)
    Mask2FormerForUniversalSegmentation(config).save_pretrained(detector)
    Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 128}).save_pretrained(detector)
    return str(detector), build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


def test_reward_runs_the_detector_and_scores_zero_or_one(tiny_geneval):
    detector, clip = tiny_geneval
    reward = GenEvalReward(detector, clip, threshold=0.0)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    found, other = reward.detect(images, thresholds=[0.0, 0.99])
    assert found and set(found) <= {"person", "dog", "mouse", "wine glass", "bus"}
    assert not other  # a random tiny detector scores nothing above 0.99
    for name, objs in found.items():
        for (x0, y0, x1, y1), mask in objs:
            assert mask.shape == (64, 64) and mask[y0:y1, x0:x1].any() and not mask[:y0].any()
    scores = reward(images, ["a photo of a dog", "a photo of a computer mouse"])  # GenEval's alias of COCO "mouse"
    assert scores.shape == (2,) and set(scores.tolist()) <= {0.0, 1.0}


def test_reward_verdicts_follow_the_detections(tiny_geneval, monkeypatch):
    detector, clip = tiny_geneval
    reward = GenEvalReward(detector, clip)
    box_left, box_right = (0, 0, 20, 20), (40, 0, 60, 20)
    scenes = [{"dog": objects(box_left)}, {"bus": objects(box_left)},
              {"person": objects(box_left), "dog": objects(box_right)},
              {"person": objects(box_right), "dog": objects(box_left)},
              {"dog": objects(box_left, box_right, (20, 40, 40, 60))}]
    seen = []

    def detect(images, thresholds):
        seen.append(thresholds)
        return scenes

    monkeypatch.setattr(reward, "detect", detect)
    prompts = ["a photo of a dog", "a photo of a dog", "a photo of a dog right of a person",
               "a photo of a dog right of a person", "a photo of two dogs"]
    assert reward(torch.zeros(5, 3, 64, 64), prompts).tolist() == [1.0, 0.0, 1.0, 0.0, 0.0]  # 3 dogs for "two"
    assert seen == [[0.3, 0.3, 0.3, 0.3, 0.9]]  # one batched pass; counting prompts use the 0.9 threshold


def test_colour_crops_paste_the_mask_on_grey_and_classify_among_ten(tiny_geneval):
    detector, clip = tiny_geneval
    reward = GenEvalReward(detector, clip)
    image = torch.zeros(3, 16, 16)
    image[0] = 1.0  # all red
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[4:8, 4:6] = True
    mask[6, 9] = True
    (crop,) = reward.crops(image, [(mask_box(mask), mask)])
    assert crop.shape == (3, 4, 6)  # rows 4-7, columns 4-9
    assert torch.equal(crop[:, :, :2], image[:, 4:8, 4:6])  # the object keeps its pixels
    assert torch.allclose(crop[:, 0, 2:], torch.full((3, 4), CROP_BACKGROUND))  # the rest is grey
    colours = reward.colours(image, [(mask_box(mask), mask)] * 2, "dog")
    assert len(colours) == 2 and colours[0] == colours[1] and colours[0] in COLORS
    assert reward.colour_classifier("dog").shape == (10, 16)


def test_geneval_prompts_are_checked_before_any_model_runs(tiny_geneval, monkeypatch):
    detector, clip = tiny_geneval
    reward = GenEvalReward(detector, clip)
    monkeypatch.setattr(reward, "detect", lambda *args: pytest.fail("detector ran"))
    with pytest.raises(RewardError, match="not a GenEval prompt"):
        reward(torch.zeros(2, 3, 64, 64), ["a photo of a dog", "a sunset over the sea"])


def test_named_geneval_without_network_says_which_weights(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="needs the weights .*mask2former-swin-small-coco-instance"):
        load_reward("geneval")


def test_colours_are_asked_with_genevals_names_and_the_margin_is_used(tiny_geneval, monkeypatch):
    """GenEval's "tv remote" is COCO's "remote": detections are looked up by label, CLIP is asked about a
    "tv remote"; ``position_margin`` reaches the position rule."""
    detector, clip = tiny_geneval
    reward = GenEvalReward(detector, clip)
    reward.classes["tv remote"] = "bus"  # the tiny detector's label set has no "remote": stand one in
    asked = []
    monkeypatch.setattr(reward, "detect", lambda images, thresholds: [{"bus": objects((0, 0, 8, 8))}])
    monkeypatch.setattr(reward, "colours", lambda image, objs, name: asked.append(name) or ["yellow"])
    assert reward(torch.zeros(1, 3, 64, 64), ["a photo of a yellow tv remote"]).tolist() == [1.0]
    assert asked == ["tv remote"]

    scene = [{"person": objects((0, 0, 10, 10)), "dog": objects((14, 0, 24, 10))}]  # centres 14 apart, sizes 20
    monkeypatch.setattr(reward, "detect", lambda images, thresholds: scene)
    prompt = ["a photo of a dog right of a person"]
    assert reward(torch.zeros(1, 3, 64, 64), prompt).tolist() == [1.0]  # 14 - 0.1 * 20 > 0
    reward.position_margin = 0.8  # 14 - 0.8 * 20 < 0: no relation
    assert reward(torch.zeros(1, 3, 64, 64), prompt).tolist() == [0.0]
