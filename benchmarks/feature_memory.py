"""Peak memory of the feature map phi inside one DrPO loss, for K candidates (Section 4.1, Eqs. 15-17).

    python -m benchmarks.feature_memory --num_candidates 24 --latent_size 64 --base_channels 256

DrPO needs phi three times per prompt: the K queries Z (differentiable: the loss backpropagates
through phi into the generator), the K reference features R of the frozen base model, and the
preference supports A+/A- (rows of sg(Z)). Only the queries need activations kept for backward, so
``drpo_step`` runs phi once with gradient (the queries; the supports are rows of their detached
copy) and once under ``no_grad`` (the reference). Each mode runs in a fresh subprocess and reports
its peak memory above what was in use before the measured pass (weights; after one tiny warm-up pass
through the same path, so one-time imports and kernel set-up are not counted): resident memory on the
CPU (Linux), allocated memory on a GPU:

- ``drpo``: the loss as trained;
- ``drpo_checkpointing``: the same with ``--gradient_checkpointing`` for the feature network;
- ``forward_only``: both passes under no_grad, no backward (the floor: weights and one pass).

The feature map is the latent-MAE at its real configuration (``--base_channels 256``: the paper's
340M encoder) or a narrower stand-in, with random weights; SD-Turbo at 512 px has 64x64x4 latents.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

import drpo_utils
from benchmarks.harness import peak_bytes, publish, reset_peak, run_isolated
from pipelines import features
from pipelines.latent_mae import LatentMAEEncoder

MODES = ("drpo", "drpo_checkpointing", "forward_only")


def random_latent_mae(folder: str, base_channels: int, feature_extractor: str) -> features.FeatureMap:
    """A latent-MAE feature map with random weights, loaded through the converted-weights path."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    encoder = LatentMAEEncoder(base_channels)
    path = os.path.join(folder, "encoder.safetensors")
    save_file(encoder.state_dict(), path, metadata={"model_config": json.dumps(encoder.config)})
    return features.build_feature_map(feature_extractor, path)


def measure(args) -> dict:
    """One DrPO loss (forward + backward through phi) for K candidates, in this fresh process."""
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as folder:
        feature_map = random_latent_mae(folder, args.base_channels, args.feature_extractor).to(device)
    if args._mode == "drpo_checkpointing":
        feature_map.enable_gradient_checkpointing()
    one_loss(feature_map, args._mode, 2, 8, 1, device)  # warm-up: one-time imports and kernel set-up
    before = reset_peak(device)
    result = one_loss(feature_map, args._mode, args.num_candidates, args.latent_size, args.num_pairs, device)
    return {"mode": args._mode, "peak_mb": (peak_bytes(device) - before) / 2**20, **result}


def one_loss(feature_map, mode: str, k: int, size: int, num_pairs: int, device) -> dict:
    """Reference features under no_grad, query features (with gradient unless forward_only), DrPO loss, backward."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(k, 4, size, size, generator=generator).to(device).requires_grad_(True)
    ref_latents = torch.randn(k, 4, size, size, generator=generator).to(device)
    winners, losers = drpo_utils.sample_reward_pairs(torch.arange(float(k)), num_pairs, generator)
    start = time.perf_counter()
    with torch.no_grad():
        ref_features = feature_map(ref_latents)
    with torch.set_grad_enabled(mode != "forward_only"):
        features = feature_map(latents)
        loss, _ = drpo_utils.drpo_loss(features, ref_features, winners.to(device), losers.to(device),
                                       drpo_utils.DriftConfig())
    if loss.requires_grad:
        loss.backward()
    return {"seconds": time.perf_counter() - start, "feature_tensors": len(features),
            "feature_dims": sum(f[0].numel() for f in features.values()),
            "latents_grad_norm": 0.0 if latents.grad is None else latents.grad.norm().item()}


def run(args) -> dict:
    modes = run_isolated("benchmarks.feature_memory", "_mode", MODES, args)
    return {"config": {k: v for k, v in vars(args).items() if not k.startswith("_")}, "modes": modes}


def report(result: dict) -> str:
    lines = ["| mode | peak memory (MB) | seconds |", "|---|---|---|"]
    lines += [f"| {m} | {r['peak_mb']:.0f} | {r['seconds']:.1f} |" for m, r in result["modes"].items()]
    first = next(iter(result["modes"].values()))
    lines.append(f"\n{first['feature_tensors']} feature tensors, {first['feature_dims']} dimensions per candidate")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num_candidates", type=int, default=24, help="K (paper: 24).")
    parser.add_argument("--num_pairs", type=int, default=12, help="M (paper: 12).")
    parser.add_argument("--latent_size", type=int, default=64, help="Latent side: 64 for SD-Turbo at 512 px.")
    parser.add_argument("--base_channels", type=int, default=256, help="latent-MAE width (256: the paper's 340M).")
    parser.add_argument("--feature_extractor", default="latent_mae",
                        choices=["latent_mae", "latent_mae1", "latent_mae2", "latent_mae3"])
    parser.add_argument("--output_json", default=None)
    parser.add_argument("--_mode", default=None, choices=MODES, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args._mode:
        print(json.dumps(measure(args)))
        return None
    result = run(args)
    return publish(result, report(result), args.output_json)


if __name__ == "__main__":
    main()
