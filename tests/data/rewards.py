"""Custom rewards for the tests (the reward protocol of pipelines/rewards/protocol.py: images [N, 3, H, W] in [0, 1]
on the CPU and prompts in, N floats out)."""

import os

import numpy as np
import torch


def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))


def darkness(images, prompts):
    return (-images.mean(dim=(1, 2, 3))).numpy()


def wrong_count(images, prompts):
    return [0.0] * (len(images) - 1)


def not_a_number(images, prompts):
    return np.full(len(images), np.nan)


def requires_no_grad(images, prompts):
    assert not torch.is_grad_enabled() and not images.requires_grad and images.device.type == "cpu"
    assert images.dtype == torch.float32 and images.min() >= 0 and images.max() <= 1
    assert isinstance(prompts, list) and len(prompts) == len(images)
    return images.mean(dim=(1, 2, 3)).tolist()


def meet_a_partner(images, prompts):
    """``brightness`` after waiting (up to $DRPO_TEST_PARTNER_WAIT s) for a second call to be inside this
    function at the same time; records in $DRPO_TEST_ROOM/most_inside how many calls ever were (a folder,
    so that copies of this module loaded for different devices share it)."""
    import pathlib
    import time
    import uuid

    room = pathlib.Path(os.environ["DRPO_TEST_ROOM"])
    me = room / f"inside-{uuid.uuid4().hex}"
    me.touch()
    try:
        deadline = time.monotonic() + float(os.environ["DRPO_TEST_PARTNER_WAIT"])
        most = room / "most_inside"
        while True:
            inside = len(list(room.glob("inside-*")))
            seen = int((most.read_text() if most.exists() else "") or 0)  # empty while another call writes it
            if inside > seen:
                most.write_text(str(inside))
            if max(inside, seen) >= 2 or time.monotonic() > deadline:  # met (even if the partner has left)
                break
            time.sleep(0.01)
    finally:
        me.unlink()
    return brightness(images, prompts)


def constant(images, prompts):
    """The same score for every image: no ranking at all."""
    return [0.5] * len(images)


def brightness_rescaled(images, prompts):
    """100 x brightness + 5: the same ranking as ``brightness`` on another scale and offset."""
    return 100.0 * images.mean(dim=(1, 2, 3)) + 5.0


def brightness_tiny(images, prompts):
    """1e-8 x brightness: the same ranking and gradient direction, at a scale where Adam's eps (1e-8) dominates."""
    return 1e-8 * images.mean(dim=(1, 2, 3))
