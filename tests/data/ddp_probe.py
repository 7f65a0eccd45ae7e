"""Run a training script under torchrun and record, per rank, the prompts/noises drawn and the final LoRA.

Needs the repository root on PYTHONPATH (the test sets it).
"""

import json
import os
import runpy
import sys

import torch

from pipelines import report, rewards
from pipelines.inference import denoiser

probe_dir, script, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
rank = int(os.environ["RANK"])
draws = []
original_score = rewards.score_candidates
original_finish = report.finish_training


def recording_score(reward_fn, images, prompts, name):
    draws.append({"prompt": prompts[0], "image_sum": float(images.sum())})
    return original_score(reward_fn, images, prompts, name)


def recording_finish(accelerator, settings, pipe, *rest, **kwargs):
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(accelerator.unwrap_model(denoiser(pipe)))
    torch.save({k: v.detach().cpu() for k, v in state.items()}, os.path.join(probe_dir, f"lora_rank{rank}.pt"))
    with open(os.path.join(probe_dir, f"draws_rank{rank}.json"), "w") as handle:
        json.dump(draws, handle)
    return original_finish(accelerator, settings, pipe, *rest, **kwargs)


rewards.score_candidates = recording_score
report.finish_training = recording_finish
sys.argv = [script, *argv]
runpy.run_path(script, run_name="__main__")
