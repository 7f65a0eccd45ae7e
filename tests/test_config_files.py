"""``--config run.yaml``: values checked as the flags are, the command line over the file, unknown keys
named, the shipped recipes parse, and a run's own ``config.yaml`` reproduces it byte for byte."""

import glob
import os

import pytest
import train_drpo
import train_drpo_sdxl
from conftest import PROMPTS, ROOT, TINY_SD
from test_train import lora_tensors, train, training_args

from pipelines import evaluate, flags


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def parse(argv):
    return train_drpo.parse_args([f"--pretrained_model_name_or_path={TINY_SD}", "--reward=color_match",
                                  f"--prompts_file={PROMPTS}", *argv])


def refusal(argv, capsys):
    """The one-line message a refused flag set stops with (argparse's, or check_args' ValueError)."""
    with pytest.raises((SystemExit, ValueError)) as refused:
        parse(argv)
    return capsys.readouterr().err if refused.type is SystemExit else f"{refused.value}\n"


def test_the_command_line_overrides_the_file(tmp_path):
    config = write(tmp_path, "learning_rate: 1.0e-3\nrank: 8\nnum_candidates: 12\nmixed_precision: no\n"
                             "drift_radii: [0.05, 0.2]\ngradient_checkpointing: true\nlora_alpha: null\n")
    args = parse([f"--config={config}", "--learning_rate=2e-3"])
    assert (args.learning_rate, args.rank, args.num_candidates) == (2e-3, 8, 12)
    assert args.mixed_precision == "no"  # YAML 1.1 would read `no` as false; booleans are true / false only
    assert args.drift_radii == [0.05, 0.2] and args.gradient_checkpointing is True and args.lora_alpha is None
    # a drift flag from the file overrides its preset as one given on the command line does
    assert train_drpo.build_config(args).method.drift.radii == (0.05, 0.2)
    assert parse([f"--config={config}", "--rank=4"]).rank == 4 and parse([]).rank == 16


@pytest.mark.parametrize("text,message", [
    ("learning_rte: 1e-4\n", "unknown key 'learning_rte' (did you mean 'learning_rate'?)"),
    ("zzz: 1\n", "unknown key 'zzz' (keys are flag names without --)"),
    ("rank: 0\n", "argument --rank: must be a positive integer, got '0'"),
    ("num_candidates: 1\n", "--num_candidates (K) must be at least 2, got 1"),
    ("gradient_checkpointing: 1\n", "gradient_checkpointing is a switch: true or false, got 1"),
    ("- rank\n", "expected a mapping of flag names to values, got list"),
    ("rank: [\n", "not valid YAML"),
    ("config: other.yaml\n", "unknown key 'config'"),
])
def test_a_bad_file_is_refused_naming_the_key(tmp_path, capsys, text, message):
    error = refusal([f"--config={write(tmp_path, text)}"], capsys)
    assert message in error and error.count("\n") == 1, error


def test_an_unknown_key_is_refused_even_when_the_command_line_sets_it(tmp_path, capsys):
    config = write(tmp_path, "rank: 8\nranks: 4\n")
    assert "unknown key 'ranks'" in refusal([f"--config={config}", "--rank=2"], capsys)
    assert "cannot be read" in refusal([f"--config={tmp_path / 'missing.yaml'}"], capsys)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))))
def test_the_shipped_recipes_parse(path):
    """Every key of configs/*.yaml is a flag of the script its header names, and every value passes its check."""
    header = open(path).read()
    if "pipelines.evaluate" in header:
        namespace, given = flags.parse_with_config(evaluate.build_parser(), [f"--config={path}"])
    else:
        parser = (train_drpo_sdxl if "train_drpo_sdxl.py" in header else train_drpo).build_parser()
        namespace, given = flags.parse_with_config(parser, [f"--config={path}"])
        assert namespace.rank == 16 and namespace.mixed_precision == "bf16"
    assert namespace.pretrained_model_name_or_path.startswith("stabilityai/") and len(given) >= 6


def test_the_authors_recipe_file_holds_the_released_defaults():
    """configs/authors_sdxl_turbo.yaml: the released SDXL trainer's K, learning rate, lambda, accumulation,
    clipping, MAE features and estimator (docs/method.md, the recipe table)."""
    path = os.path.join(ROOT, "configs", "authors_sdxl_turbo.yaml")
    args, _ = flags.parse_with_config(train_drpo_sdxl.build_parser(), [f"--config={path}"])
    assert (args.num_candidates, args.learning_rate, args.ref_weight) == (16, 1e-5, 0.2)
    assert (args.gradient_accumulation_steps, args.max_grad_norm) == (8, 1.0)
    assert (args.feature_extractor, args.drift_preset) == ("vit_mae_released", "authors")


def test_evaluation_reads_a_config_file(tmp_path):
    config = write(tmp_path, f"pretrained_model_name_or_path: {TINY_SD}\nseeds: [0, 2]\nmetrics: color_match\n"
                             "bootstrap: 50\n")
    evaluation = evaluate.parse_args([f"--config={config}", "--bootstrap=60"])
    assert (evaluation.seeds, evaluation.metrics, evaluation.bootstrap) == ((0, 2), "color_match", 60)


def test_a_runs_config_yaml_reproduces_it(tmp_path):
    """The run folder's config.yaml (the resolved flags) is in the model card, and a run from it alone
    (a new output folder given on the command line) writes a byte-identical LoRA."""
    first = tmp_path / "first"
    config = write(tmp_path, "max_train_steps: 2\nlearning_rate: 1.0e-3\n")
    train("train_drpo.py", f"--config={config}", *training_args(TINY_SD, first, "--rank=4"))
    written = (first / "config.yaml").read_text()
    assert written.startswith("# The flags of this run") and "accelerate launch train_drpo.py --config" in written
    assert "max_train_steps: 2\n" in written and "rank: 4\n" in written and "hub_token" not in written
    assert "drift_preset: authors\n" in written  # a default that changed between versions is always recorded
    card = (first / "README.md").read_text()
    assert "## Training configuration" in card and "max_train_steps: 2\n" in card
    second = tmp_path / "second"
    train("train_drpo.py", f"--config={first / 'config.yaml'}", f"--output_dir={second}")
    assert (second / "config.yaml").read_text() == written.replace(str(first), str(second))
    first_lora, second_lora = lora_tensors(first), lora_tensors(second)
    assert first_lora.keys() == second_lora.keys()
    assert all(first_lora[key].equal(second_lora[key]) for key in first_lora)


def test_every_kind_of_flag_survives_the_round_trip_through_config_yaml(tmp_path):
    """The resolved flags written as config.yaml parse back to the same values: '|'-separated prompts, comma
    lists, switches, tokens-named flags that are no secret; run-management switches are left out."""
    from pipelines import cli

    parser = train_drpo.build_parser()
    argv = [f"--pretrained_model_name_or_path={TINY_SD}", "--reward=color_match", f"--prompts_file={PROMPTS}",
            "--validation_prompts=a red circle, large|a blue square", "--drift_radii=0.05,0.2",
            "--gradient_checkpointing", "--no-mask_self", "--overwrite_output_dir", f"--output_dir={tmp_path / 'run'}"]
    args = cli.parse_and_check(parser, argv)
    assert "overwrite_output_dir" not in args.run_config["flags"]  # how this run treated its folder, not its recipe
    from pipelines import hub

    hub.write_run_config(str(tmp_path), args.run_config)
    again = cli.parse_and_check(parser, [f"--config={tmp_path / 'config.yaml'}"])
    for key in ("validation_prompts", "drift_radii", "gradient_checkpointing", "mask_self", "output_dir", "reward"):
        assert getattr(again, key) == getattr(args, key), key
    assert again.validation_prompts == ["a red circle, large", "a blue square"]
    assert hub.public_flags({"judge_max_new_tokens": 12, "hub_token": "hf_x", "api_key": "k"}) == {
        "judge_max_new_tokens": 12}


def test_a_prefix_of_a_flag_is_no_flag(tmp_path, capsys):
    config = write(tmp_path, "rank: 8\n")
    assert "unrecognized arguments: --conf" in refusal([f"--conf={config}"], capsys)
    assert "unrecognized arguments: --learning_r" in refusal(["--learning_r=1e-3"], capsys)


def test_a_null_value_in_a_file_is_not_given(tmp_path):
    config = write(tmp_path, "hub_token: null\nrank: 8\n")  # hub_token given would be an idle flag without push
    assert parse([f"--config={config}"]).rank == 8
