"""What one update costs: DrPO against DRaFT (reward backpropagation, Appendix C.1), in time and memory.

    python -m benchmarks.step_cost --mode=step      # one update of each, and the parts of a DrPO step
    python -m benchmarks.step_cost --mode=scaling   # time and peak memory against K, chunked and not
    python -m benchmarks.step_cost --mode=rewards   # the reward's size, up to ViT-H, at the paper's K = 24
    python -m benchmarks.step_cost --mode=latency   # a remote reward with a fixed latency, serial vs overlapped

Every update is the real one: the training script's StepContext and method (``drpo`` or ``draft``), its
loss pieces backpropagated as the training loop does. The reward is a ViT-shaped transformer with
random weights whose size is set by flags (only its cost matters); DrPO calls it under no_grad, DRaFT
backpropagates through it, the VAE decoder and the generator. Each measured variant runs in a fresh
process; peak memory is the high-water mark above what the process held before the update (CPU:
VmHWM after resetting it, ``harness.reset_peak``, with glibc told to hand freed blocks back at once;
GPU: ``max_memory_allocated``), and the peak of what autograd holds saved for backward
(``memory.SavedActivationPeak``: exact, allocator-independent; the part that grows with K).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import drpo_utils
from benchmarks.harness import peak_bytes, publish, reset_peak, run_isolated
from benchmarks.readme import save_result
from pipelines import candidates, features, lora_files, methods, runtime
from pipelines.inference import load_one_step_pipeline
from pipelines.memory import SavedActivationPeak

PROMPT = "a large red circle on the left"
REWARD_SIZES = {"ViT-B/16 (86M)": (768, 12), "ViT-L/16 (304M)": (1024, 24), "ViT-H/16 (632M)": (1280, 32)}


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


def timed(fn, device, repeats: int, warmup: bool = True) -> float:
    """Median wall time of fn() over ``repeats`` runs (after one warm-up run)."""
    if warmup:
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


def training_flags(args, method: str, chunk_size: int | None) -> list[str]:
    """The training flags of the measured update (the reward named here is replaced by the random ViT)."""
    return [f"--pretrained_model_name_or_path={args.model}", "--prompts_file=assets/tiny_prompts.txt",
            f"--num_candidates={args.num_candidates}", f"--num_pairs={args.num_pairs}", f"--method={method}",
            f"--feature_extractor={args.feature_extractor}",
            *(["--draft_ref_weight=0.05", "--draft_gradient=raw"] * (method == "draft")),
            *(["--drift_preset=paper"] * (method == "drpo")),  # as the tables were measured
            "--reward=pipelines.rewards.rules:color_match",
            *([f"--candidate_chunk_size={chunk_size}"] * bool(chunk_size))]


class Bench:
    """A training StepContext on the tiny model with a random ViT reward; runs real method updates."""

    def __init__(self, args, method: str = "drpo", chunk_size: int | None = None):
        from accelerate import Accelerator

        import train_drpo

        self.args, self.device = args, torch.device(args.device)
        torch.manual_seed(0)
        self.pipe = load_one_step_pipeline(args.model, device=self.device)
        runtime.prepare_frozen_models(self.pipe, self.device)
        settings = train_drpo.build_config(train_drpo.parse_args(training_flags(args, method, chunk_size)))
        settings = settings.resolved(model={"resolution": args.resolution})
        lora_files.add_lora(self.pipe.unet, settings.adapter)
        self.params = [p for p in self.pipe.unet.parameters() if p.requires_grad]
        self.reward_model = RandomRewardModel(args.reward_width, args.reward_depth, args.reward_resolution)
        self.reward_model = self.reward_model.to(self.device).eval().requires_grad_(False)
        feature_map = features.build_feature_map(args.feature_extractor).to(self.device)
        self.ctx = train_drpo.step_context(Accelerator(cpu=self.device.type == "cpu"), settings, self.pipe,
                                           self.pipe.unet, feature_map, self.reward_fn,
                                           methods.registered()[method], train_drpo.encode_prompts)

    def reward_fn(self, images, prompts):
        """A reward as the protocol says: images in, N scores out (with a graph when the images need one)."""
        return self.reward_model(images.to(self.device))

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def update(self):
        """One prompt's update as the training loop runs it: propose, then backpropagate every loss piece."""
        proposal = self.ctx.method.propose(self.ctx, PROMPT, torch.Generator().manual_seed(0))
        for loss, _ in self.ctx.method.update(self.ctx, proposal):
            loss.backward()
        self.zero_grad()

    def parts(self, repeats: int) -> dict[str, float]:
        """The unavoidable parts of a DrPO step, one at a time."""
        ctx, k = self.ctx, self.args.num_candidates
        condition = candidates.prompt_condition(ctx, PROMPT, k)
        noise = candidates.candidate_noise(ctx, k, torch.Generator().manual_seed(0))
        with torch.no_grad():
            latents = candidates.current_latents(ctx, condition, noise)
            images = drpo_utils.decode_latents(self.pipe.vae, latents)
            z = ctx.feature_map(latents, images if ctx.feature_map.needs_images else None)
            z_ref = candidates.reference_features(ctx, condition, noise)
        winners, losers = drpo_utils.sample_reward_pairs(torch.arange(float(k)), self.args.num_pairs)

        def generator_fwd_bwd():
            candidates.current_latents(ctx, condition, noise).square().mean().backward()
            self.zero_grad()

        def feature_fwd_bwd():
            leaf = latents.clone().requires_grad_(True)
            decoded = drpo_utils.decode_latents(self.pipe.vae, leaf) if ctx.feature_map.needs_images else None
            sum(f.square().mean() for f in ctx.feature_map(leaf, decoded).values()).backward()

        @torch.no_grad()
        def reference():
            candidates.reference_features(ctx, condition, noise)

        @torch.no_grad()
        def reward_forward():
            self.reward_fn(images, [PROMPT] * k)

        parts = {"generator forward+backward": generator_fwd_bwd, "reference forward + its features": reference,
                 "reward forward": reward_forward, "decode + feature forward+backward": feature_fwd_bwd,
                 "drift field": lambda: drpo_utils.drift_targets(z, z_ref, winners, losers, ctx.drift)}
        return {name: timed(fn, self.device, repeats) for name, fn in parts.items()}


def measure(args) -> dict:
    """Time and peak memory of one update (``--_variant method[:chunk]``), in this fresh process."""
    method, _, chunk = args._variant.partition(":")
    bench = Bench(args, method, int(chunk) if chunk else None)
    bench.update()  # warm-up (kernel selection, allocator) outside the peak window
    before = reset_peak(bench.device)
    with SavedActivationPeak() as saved:
        seconds = timed(bench.update, bench.device, args.repeats, warmup=False)
    result = {"variant": args._variant, "seconds": seconds, "peak_bytes": peak_bytes(bench.device) - before,
              "saved_peak_bytes": saved.bytes}
    if method == "drpo" and args.mode == "step":
        result["parts"] = bench.parts(args.repeats)
    return result


def reward_alone(args) -> dict[str, float]:
    """The reward by itself on K images: forward under no_grad, and forward + backward to the images."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = RandomRewardModel(args.reward_width, args.reward_depth, args.reward_resolution).to(device).eval()
    model.requires_grad_(False)
    images = torch.rand(args.num_candidates, 3, args.resolution, args.resolution, device=device)

    @torch.no_grad()
    def forward():
        model(images)

    def forward_backward():
        model(images.clone().requires_grad_(True)).sum().backward()

    return {"forward": timed(forward, device, args.repeats), "forward_backward": timed(forward_backward, device,
                                                                                          args.repeats)}


def isolated(args, variants, **overrides) -> dict[str, dict]:
    """Each variant in its own process (its own peak memory), with ``overrides`` of the flags."""
    return run_isolated("benchmarks.step_cost", "_variant", variants, argparse.Namespace(**{**vars(args), **overrides}))


# ------------------------------------------------------------------------------------------------
# The four measurements
# ------------------------------------------------------------------------------------------------


def step(args) -> dict:
    results = isolated(args, ["drpo", "draft"])
    drpo, draft = results["drpo"], results["draft"]
    parts_sum = sum(drpo["parts"].values())
    return {"drpo_seconds": drpo["seconds"], "draft_seconds": draft["seconds"],
            "speedup": draft["seconds"] / drpo["seconds"], "drpo_peak_mb": drpo["peak_bytes"] / 2**20,
            "draft_peak_mb": draft["peak_bytes"] / 2**20, "parts": drpo["parts"], "parts_sum": parts_sum,
            "step_over_parts": drpo["seconds"] / parts_sum}


def render_step(result: dict) -> str:
    lines = ["| | DrPO | DRaFT |", "|---|---|---|",
             f"| update time (s) | {result['drpo_seconds']:.3f} | {result['draft_seconds']:.3f} |",
             f"| peak memory (MB) | {result['drpo_peak_mb']:.0f} | {result['draft_peak_mb']:.0f} |",
             f"| speedup (DRaFT time / DrPO time) | {result['speedup']:.2f}x | 1.00x |",
             "", "| DrPO part | seconds |", "|---|---|"]
    lines += [f"| {name} | {seconds:.3f} |" for name, seconds in result["parts"].items()]
    lines += [f"| sum of parts | {result['parts_sum']:.3f} |",
              f"| DrPO step / sum of parts | {result['step_over_parts']:.2f} |"]
    return "\n".join(lines)


VARIANTS = {"drpo": ("DrPO", "drpo"), "drpo_chunked": ("DrPO, C = {c}", "drpo:{c}"), "draft": ("DRaFT", "draft"),
            "draft_chunked": ("DRaFT, C = {c}", "draft:{c}")}


def scaling(args) -> dict:
    rows = {}
    for k in args.sweep:
        variants = {VARIANTS[key][0].format(c=args.chunk): VARIANTS[key][1].format(c=args.chunk)
                    for key in args.variants}
        results = isolated(args, list(variants.values()), num_candidates=k, num_pairs=min(args.num_pairs, k))
        rows[k] = {name: {"seconds": results[v]["seconds"], "peak_mb": results[v]["peak_bytes"] / 2**20,
                          "saved_mb": results[v]["saved_peak_bytes"] / 2**20} for name, v in variants.items()}
    return {"chunk": args.chunk, "rows": rows}


def render_scaling(result: dict) -> str:
    names = list(next(iter(result["rows"].values())))
    lines = ["| K | " + " | ".join(f"{n}: s / saved MB / RSS MB" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for k, row in result["rows"].items():
        cells = [f"{row[n]['seconds']:.2f} / {row[n]['saved_mb']:.0f} / {row[n]['peak_mb']:.0f}" for n in names]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    first, last = result["rows"][min(result["rows"])], result["rows"][max(result["rows"])]
    lines += ["", "Peak saved activations, largest K / smallest K: " + ", ".join(
        f"{n} {last[n]['saved_mb'] / first[n]['saved_mb']:.2f}x" for n in names) + "."]
    return "\n".join(lines)


def rewards(args) -> dict:
    rows = {}
    for name, (width, depth) in REWARD_SIZES.items():
        sized = dict(reward_width=width, reward_depth=depth)
        results = isolated(args, ["drpo", f"draft:{args.chunk}"], **sized)
        alone = reward_alone(argparse.Namespace(**{**vars(args), **sized}))
        draft = results[f"draft:{args.chunk}"]
        rows[name] = {"drpo_seconds": results["drpo"]["seconds"], "draft_seconds": draft["seconds"],
                      "drpo_peak_mb": results["drpo"]["peak_bytes"] / 2**20,
                      "draft_peak_mb": draft["peak_bytes"] / 2**20,
                      "reward_forward": alone["forward"], "reward_forward_backward": alone["forward_backward"]}
    return {"chunk": args.chunk, "num_candidates": args.num_candidates, "rows": rows}


def render_rewards(result: dict) -> str:
    lines = ["| reward model | DrPO update (s) | DRaFT update, C = {c} (s) | DRaFT / DrPO | reward forward (s) | "
             "reward fwd+bwd (s) | limit: fwd+bwd / fwd | peak MB DrPO / DRaFT |".format(c=result["chunk"]),
             "|---|---|---|---|---|---|---|---|"]
    for name, row in result["rows"].items():
        lines.append(f"| {name} | {row['drpo_seconds']:.2f} | {row['draft_seconds']:.2f} | "
                     f"{row['draft_seconds'] / row['drpo_seconds']:.2f}x | {row['reward_forward']:.2f} | "
                     f"{row['reward_forward_backward']:.2f} | "
                     f"{row['reward_forward_backward'] / row['reward_forward']:.2f}x | "
                     f"{row['drpo_peak_mb']:.0f} / {row['draft_peak_mb']:.0f} |")
    return "\n".join(lines)


def latency(args) -> dict:
    """Training steps against a reward server whose reward sleeps ``--latency`` seconds per call."""
    import os
    import tempfile
    import threading

    from benchmarks.harness import train_run
    from pipelines.rewards.server import build_server

    os.environ["DRPO_BENCH_LATENCY"] = str(args.latency)
    server = build_server("benchmarks.rewards:slow_brightness", port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/score"
    call = reward_call_seconds(url, args)  # the latency plus PNG encoding and HTTP, as the trainer sees it
    flags = [f"--pretrained_model_name_or_path={args.model}", "--prompts_file=assets/tiny_prompts.txt",
             f"--reward={url}", f"--feature_extractor={args.feature_extractor}",
             f"--num_candidates={args.num_candidates}",
             f"--num_pairs={args.num_pairs}", f"--gradient_accumulation_steps={args.accumulation}",
             f"--candidate_chunk_size={args.chunk}", f"--max_train_steps={args.steps}", "--validation_steps=0",
             "--seed=0", f"--checkpointing_steps={args.steps}", f"--resolution={args.resolution}",
             "--drift_preset=paper"]
    result = {}
    try:
        for name, extra in (("serial", ["--no-overlap_reward"]), ("overlapped", [])):
            with tempfile.TemporaryDirectory() as out:
                train_run("train_drpo.py", flags + extra, out)
                with open(os.path.join(out, "reward_history.jsonl")) as handle:
                    history = [json.loads(line) for line in handle]
            steady = history[1:] or history  # the first step pays for kernel selection and warm-up
            result[name] = {"step_seconds": sum(h["step_time"] for h in steady) / len(steady),
                            "reward_wait": sum(h["reward_wait"] for h in steady) / len(steady)}
    finally:
        server.shutdown()
        server.server_close()
    per_micro = {name: r["step_seconds"] / args.accumulation for name, r in result.items()}
    compute = per_micro["serial"] - call  # serial: every reward call, then the compute
    bound = max(call, compute)
    return {"latency": args.latency, "reward_call_seconds": call, "accumulation": args.accumulation,
            "compute_per_micro_step": compute, "per_micro_step": per_micro, "max_call_compute": bound,
            "overlapped_over_bound": per_micro["overlapped"] / bound, "runs": result}


def reward_call_seconds(url: str, args) -> float:
    """Median time of one call of the remote reward on one prompt's K images."""
    from pipelines.rewards import RemoteReward

    reward, images = RemoteReward(url), torch.rand(args.num_candidates, 3, args.resolution, args.resolution)
    return timed(lambda: reward(images, [PROMPT] * len(images)), torch.device("cpu"), 3)


def render_latency(result: dict) -> str:
    per = result["per_micro_step"]
    return "\n".join([
        "| scoring | seconds per micro-step | trainer waited for the reward (s per step) |", "|---|---|---|",
        f"| serial | {per['serial']:.2f} | {result['runs']['serial']['reward_wait']:.2f} |",
        f"| overlapped | {per['overlapped']:.2f} | {result['runs']['overlapped']['reward_wait']:.2f} |",
        "", f"The reward sleeps {result['latency']:.1f} s per call; a call as the trainer sees it (with PNG "
            f"encoding and HTTP) takes L = {result['reward_call_seconds']:.2f} s; the compute is "
            f"{result['compute_per_micro_step']:.2f} s per micro-step; {result['accumulation']} micro-steps per "
            f"optimiser step. Overlapped = {result['overlapped_over_bound']:.2f} x max(L, compute) per micro-step "
            f"(serial: L + compute)."])


MODES = {"step": (step, render_step), "scaling": (scaling, render_scaling), "rewards": (rewards, render_rewards),
         "latency": (latency, render_latency)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="step", choices=sorted(MODES), help="Which measurement (see above).")
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
    parser.add_argument("--chunk", type=int, default=4, help="C of the chunked variants.")
    parser.add_argument("--sweep", type=lambda v: [int(x) for x in v.split(",")], default=[8, 16, 24, 32],
                        help="K values of --mode=scaling.")
    parser.add_argument("--variants", type=lambda v: v.split(","), default=list(VARIANTS),
                        help=f"Updates of --mode=scaling, among {', '.join(VARIANTS)}.")
    parser.add_argument("--latency", type=float, default=2.0, help="Seconds the remote reward sleeps per call.")
    parser.add_argument("--accumulation", type=int, default=4, help="Micro-steps per step in --mode=latency.")
    parser.add_argument("--steps", type=int, default=3, help="Optimiser steps in --mode=latency.")
    parser.add_argument("--output_json", default=None)
    parser.add_argument("--update_readme", action="store_true", help="Rewrite this mode's README table.")
    parser.add_argument("--_variant", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args._variant:
        print(json.dumps(measure(args)))
        return None
    run, render = MODES[args.mode]
    result = {"config": {k: v for k, v in vars(args).items() if not k.startswith("_")}, **run(args)}
    markdown = render(result)
    if args.update_readme:
        save_result(f"step_cost_{args.mode}", result, markdown, update_readme=True)
    return publish(result, markdown, args.output_json)


if __name__ == "__main__":
    main()
