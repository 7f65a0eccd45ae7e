"""Custom rewards for the tests (the reward protocol of pipelines/rewards/protocol.py: images [N, 3, H, W] in [0, 1]
on the CPU and prompts in, N floats out)."""

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
