"""The DrPO-vs-DRaFT benchmark runs at tiny size (so it cannot rot) and reports consistent numbers."""

import math

from conftest import TINY_SD

from benchmarks.step_cost import main, parse_args


def test_step_cost_benchmark_runs_at_tiny_size(tmp_path):
    result = main(["--mode=step", f"--model={TINY_SD}", "--device=cpu", "--num_candidates=4", "--num_pairs=3",
                   "--reward_width=64", "--reward_depth=1", "--reward_resolution=32", "--repeats=1",
                   f"--output_json={tmp_path / 'bench.json'}"])
    assert result["drpo_seconds"] > 0 and result["draft_seconds"] > 0
    assert result["speedup"] == result["draft_seconds"] / result["drpo_seconds"]  # the same float division: exact
    assert set(result["parts"]) == {"generator forward+backward", "reference forward + its features",
                                    "reward forward", "decode + feature forward+backward", "drift field"}
    assert all(seconds > 0 for seconds in result["parts"].values())
    assert result["step_over_parts"] == result["drpo_seconds"] / sum(result["parts"].values())  # the same: exact
    assert result["drpo_peak_mb"] >= 0 and result["draft_peak_mb"] >= 0
    assert (tmp_path / "bench.json").is_file()


def test_chunked_step_needs_less_memory_than_the_one_pass(tmp_path):
    """--mode=scaling, reduced: K = 8 at 128 px, C = 2: the chunked DrPO update's peak is well below the one pass'."""
    from benchmarks.step_cost import render_scaling, scaling

    args = parse_args(["--mode=scaling", f"--model={TINY_SD}", "--device=cpu", "--resolution=128", "--sweep=8",
                       "--chunk=2", "--variants=drpo,drpo_chunked", "--reward_width=64", "--reward_depth=1",
                       "--reward_resolution=32", "--repeats=1"])
    row = scaling(args)["rows"][8]
    assert row["DrPO, C = 2"]["peak_mb"] < 0.6 * row["DrPO"]["peak_mb"], row
    assert row["DrPO, C = 2"]["saved_mb"] < 0.4 * row["DrPO"]["saved_mb"], row  # about C / K of the activations
    assert "DrPO, C = 2" in render_scaling({"rows": {8: row}})


def test_latency_benchmark_runs_reduced(tmp_path):
    """--mode=latency, reduced, so it cannot rot: serial and overlapped runs against a slow reward server.
    Its speed figures belong to the README; what overlap guarantees is tested without a clock in
    test_chunking.py (the order of events, and the serial LoRA)."""
    result = main(["--mode=latency", f"--model={TINY_SD}", "--num_candidates=4", "--num_pairs=3", "--latency=0.1",
                   "--accumulation=2", "--steps=1", "--chunk=2"])
    assert set(result["per_micro_step"]) == set(result["runs"]) == {"serial", "overlapped"}
    numbers = [result["compute_per_micro_step"], result["overlapped_over_bound"], *result["per_micro_step"].values()]
    assert all(math.isfinite(value) and value > 0 for value in numbers), result


def test_feature_memory_benchmark_runs_every_mode(tmp_path):
    from benchmarks.feature_memory import MODES
    from benchmarks.feature_memory import main as feature_memory

    result = feature_memory(["--device=cpu", "--num_candidates=4", "--num_pairs=3", "--latent_size=16",
                             "--base_channels=8", f"--output_json={tmp_path / 'memory.json'}"])
    modes = result["modes"]
    assert set(modes) == set(MODES) and (tmp_path / "memory.json").is_file()
    assert modes["drpo"]["latents_grad_norm"] > 0  # the loss reaches the latents through phi
    assert math.isclose(modes["drpo_checkpointing"]["latents_grad_norm"], modes["drpo"]["latents_grad_norm"],
                        rel_tol=1e-4)  # checkpointing recomputes the same function: measured 0
    assert modes["forward_only"]["latents_grad_norm"] == 0
    assert all(m["peak_mb"] >= 0 and m["feature_tensors"] == 50 for m in modes.values())


def test_ablation_grid_runs_reduced(tmp_path):
    """Two rows of the Table 3 grid, a few steps each: every column filled, the rows really differ."""
    from benchmarks.ablations import HELD_OUT, TRAINED, main, render

    result = main(["--max_train_steps=2", "--num_prompts=2", "--num_seeds=2", "--rows", "K = 8", "lambda = 1"])
    rows = {row["setting"]: row for row in result["rows"]}
    assert set(rows) == {"K = 8", "lambda = 1"}
    for row in rows.values():
        assert row["step_seconds"] > 0 and row["image_distance"] > 0
        assert {TRAINED, HELD_OUT} <= set(row) and row[TRAINED]["samples"] == 4
    assert rows["K = 8"][TRAINED]["lora_mean"] != rows["lambda = 1"][TRAINED]["lora_mean"]
    assert render(result).count("\n| ") == 2  # the two rows under the header
