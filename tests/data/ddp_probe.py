"""Run a training script under torchrun and record, per rank, the prompts/noises drawn and the final LoRA."""

import json
import os
import runpy
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import drpo_utils  # noqa: E402

probe_dir, script, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
rank = int(os.environ["RANK"])
draws = []
original_score = drpo_utils.score_candidates
original_finish = drpo_utils.finish_training


def recording_score(reward_fn, images, prompts, name):
    draws.append({"prompt": prompts[0], "image_sum": float(images.sum())})
    return original_score(reward_fn, images, prompts, name)


def recording_finish(accelerator, args, pipe, *rest, **kwargs):
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(accelerator.unwrap_model(pipe.unet))
    torch.save({k: v.detach().cpu() for k, v in state.items()}, os.path.join(probe_dir, f"lora_rank{rank}.pt"))
    with open(os.path.join(probe_dir, f"draws_rank{rank}.json"), "w") as handle:
        json.dump(draws, handle)
    return original_finish(accelerator, args, pipe, *rest, **kwargs)


drpo_utils.score_candidates = recording_score
drpo_utils.finish_training = recording_finish
sys.argv = [script, *argv]
runpy.run_path(script, run_name="__main__")
