"""Cost of one DrPO update vs one reward-backpropagation (DRaFT, paper Appendix C.1) update.

    python -m benchmarks.step_cost --model assets/tiny-sd-turbo --num_candidates 8 \
        --reward_width 512 --reward_depth 8

Both methods see the same K candidates of one prompt. The reward is a ViT-style transformer with
random weights whose size is set by flags (only cost matters). DrPO calls it under no_grad; DRaFT
backpropagates through it, the VAE decoder and the generator. The script also times the parts a
DrPO step cannot avoid (generator forward+backward, reference forward, reward forward, feature
forward+backward, drift field) and reports the step time as a multiple of their sum.

Peak memory: ``torch.cuda.max_memory_allocated`` on a GPU; on the CPU, the peak resident set size of
a fresh subprocess per method minus its size before the first step.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import time

import torch

import drpo_utils
from benchmarks.harness import publish, run_isolated
from pipelines import candidates, features, training
from pipelines.inference import load_one_step_pipeline

PROMPT = "a large red circle on the left"


class RandomRewardModel(torch.nn.Module):
    """A ViT-shaped scorer (patchify -> transformer -> linear head) with random weights."""

    def __init__(self, width: int, depth: int, resolution: int, patch: int = 16):
        super().__init__()
        self.resolution = resolution
        self.patchify = torch.nn.Conv2d(3, width, patch, stride=patch)
        layer = torch.nn.TransformerEncoderLayer(width, max(1, width // 64), 4 * width, batch_first=True,
                                                 norm_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = torch.nn.Linear(width, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = torch.nn.functional.interpolate(images, size=self.resolution, mode="bilinear", antialias=False)
        tokens = self.patchify(images * 2 - 1).flatten(2).transpose(1, 2)
        return self.head(self.encoder(tokens).mean(1)).squeeze(1)


def timed(fn, device, repeats: int) -> float:
    """Median wall time of fn() over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


class Bench:
    """The real DrPO step of train_drpo.py and a DRaFT step on the same model, prompt and noises."""

    def __init__(self, args):
        from accelerate import Accelerator

        import train_drpo

        self.args = args
        self.device = torch.device(args.device)
        torch.manual_seed(0)
        self.pipe = load_one_step_pipeline(args.model, device=self.device)
        training.prepare_frozen_models(self.pipe, self.device)
        lora_args = argparse.Namespace(rank=16, lora_alpha=None, lora_target_modules=training.LORA_TARGET_MODULES)
        training.add_lora(self.pipe.unet, lora_args)
        self.params = [p for p in self.pipe.unet.parameters() if p.requires_grad]
        self.reward_model = RandomRewardModel(args.reward_width, args.reward_depth, args.reward_resolution)
        self.reward_model = self.reward_model.to(self.device).eval().requires_grad_(False)
        self.step_args = argparse.Namespace(num_candidates=args.num_candidates, num_pairs=args.num_pairs,
                                            resolution=args.resolution, reward="random-vit", candidate_chunk_size=None)
        self.ctx = candidates.StepContext(
            args=self.step_args, accelerator=Accelerator(cpu=self.device.type == "cpu"), pipe=self.pipe,
            unet=self.pipe.unet, scheduler=copy.deepcopy(self.pipe.scheduler),
            feature_map=features.build_feature_map(args.feature_extractor).to(self.device),
            scorer=candidates.RewardScorer(self.reward_fn, "random-vit", background=False),
            config=drpo_utils.DriftConfig(), encode_prompts=train_drpo.encode_prompts,
        )
        k, size = args.num_candidates, args.resolution // self.pipe.vae_scale_factor
        self.condition = train_drpo.encode_prompts(self.pipe, [PROMPT] * k, self.device, args.resolution)
        self.noise = torch.randn(k, self.pipe.unet.config.in_channels, size, size, generator=self.rng())
        self.noise = self.noise.to(self.device)

    @staticmethod
    def rng():
        return torch.Generator().manual_seed(0)

    def reward_fn(self, images, prompts):
        """A reward as the protocol says: CPU images in, N floats out (scored on the reward model's device)."""
        return self.reward_model(images.to(self.device)).cpu()

    # -- the pieces -----------------------------------------------------------------------------

    def generate(self, grad: bool):
        with torch.set_grad_enabled(grad):
            return drpo_utils.one_step_latents(self.pipe.unet, self.ctx.scheduler, self.noise, self.condition)

    def reference(self):
        with torch.no_grad(), drpo_utils.lora_disabled(self.pipe.unet):
            return self.generate(grad=False)

    def features(self, latents):
        feature_map = self.ctx.feature_map
        images = drpo_utils.decode_latents(self.pipe.vae, latents) if feature_map.needs_images else None
        return feature_map(latents, images)

    # -- full updates -------------------------------------------------------------------------------

    def drpo_step(self):
        import train_drpo

        for loss, _ in train_drpo.drpo_step(self.ctx, candidates.candidates(self.ctx, PROMPT, self.rng())):
            loss.backward()
        self.zero_grad()

    def draft_step(self):
        """DRaFT-1 step: -mean R(D(mu_theta)) + lambda_ref ||mu_theta - mu_ref||^2 (Appendix C.1)."""
        latents = self.generate(grad=True)
        ref_latents = self.reference()
        rewards = self.reward_model(drpo_utils.decode_latents(self.pipe.vae, latents))
        loss = -rewards.mean() + 0.2 * (latents - ref_latents).square().mean()
        loss.backward()
        self.zero_grad()

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    # -- the unavoidable parts of a DrPO step, one at a time ------------------------------------

    def parts(self, repeats: int) -> dict[str, float]:
        latents = self.generate(grad=False)
        images = drpo_utils.decode_latents(self.pipe.vae, latents)
        config = self.ctx.config

        def generator_fwd_bwd():
            self.generate(grad=True).square().mean().backward()
            self.zero_grad()

        def reference_features():
            with torch.no_grad():
                self.features(self.reference())

        def feature_fwd_bwd():
            leaf = latents.clone().requires_grad_(True)
            sum(f.square().mean() for f in self.features(leaf).values()).backward()

        with torch.no_grad():
            features = self.features(latents)
            ref_features = self.features(self.reference())
        winners, losers = drpo_utils.sample_reward_pairs(torch.arange(float(len(latents))), self.args.num_pairs)

        def drift():
            for name, z in features.items():
                drpo_utils.preference_field(z, winners, losers, config)
                drpo_utils.reference_field(z, ref_features[name], config)

        @torch.no_grad()
        def reward_forward():
            self.reward_fn(images.cpu(), [PROMPT] * len(images))

        parts = {
            "generator forward+backward": generator_fwd_bwd,
            "reference forward + its features": reference_features,
            "reward forward": reward_forward,
            "decode + feature forward+backward": feature_fwd_bwd,
            "drift field": drift,
        }
        return {name: timed(fn, self.device, repeats) for name, fn in parts.items()}


def measure(args, method: str) -> dict:
    """Time and peak memory of one method, run in this (fresh) process."""
    bench = Bench(args)
    step = bench.drpo_step if method == "drpo" else bench.draft_step
    if bench.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    seconds = timed(step, bench.device, args.repeats)
    if bench.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    result = {"method": method, "seconds": seconds, "peak_bytes": peak}
    if method == "drpo":
        result["parts"] = bench.parts(args.repeats)
    return result


def run(args) -> dict:
    """Measure each method in its own subprocess (clean peak memory), then compare."""
    results = run_isolated("benchmarks.step_cost", "_method", ("drpo", "draft"), args)
    drpo, draft = results["drpo"], results["draft"]
    parts_sum = sum(drpo["parts"].values())
    return {
        "config": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "drpo_seconds": drpo["seconds"], "draft_seconds": draft["seconds"],
        "speedup": draft["seconds"] / drpo["seconds"],
        "drpo_peak_mb": drpo["peak_bytes"] / 2**20, "draft_peak_mb": draft["peak_bytes"] / 2**20,
        "memory_ratio": draft["peak_bytes"] / max(drpo["peak_bytes"], 1),
        "parts": drpo["parts"], "parts_sum": parts_sum, "step_over_parts": drpo["seconds"] / parts_sum,
    }


def report(result: dict) -> str:
    lines = [
        "| | DrPO | DRaFT |", "|---|---|---|",
        f"| update time (s) | {result['drpo_seconds']:.3f} | {result['draft_seconds']:.3f} |",
        f"| peak memory (MB) | {result['drpo_peak_mb']:.0f} | {result['draft_peak_mb']:.0f} |",
        f"| speedup (DRaFT time / DrPO time) | {result['speedup']:.2f}x | 1.00x |",
        "", "| DrPO part | seconds |", "|---|---|",
    ]
    lines += [f"| {name} | {seconds:.3f} |" for name, seconds in result["parts"].items()]
    lines += [f"| sum of parts | {result['parts_sum']:.3f} |",
              f"| DrPO step / sum of parts | {result['step_over_parts']:.2f} |"]
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="assets/tiny-sd-turbo")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--num_candidates", type=int, default=8)
    parser.add_argument("--num_pairs", type=int, default=4)
    parser.add_argument("--feature_extractor", default="image")
    parser.add_argument("--reward_width", type=int, default=256, help="Transformer width of the reward model.")
    parser.add_argument("--reward_depth", type=int, default=4, help="Transformer layers of the reward model.")
    parser.add_argument("--reward_resolution", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output_json", default=None)
    parser.add_argument("--_method", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args._method:
        print(json.dumps(measure(args, args._method)))
        return
    result = run(args)
    return publish(result, report(result), args.output_json)


if __name__ == "__main__":
    main()
