"""Every bad flag value is refused by the parser, naming the flag and the value, before anything loads;
every numeric flag is declared with a checked type, so a new flag gets its check by its declaration."""

import json
import logging

import pytest
from conftest import PROMPTS, ROOT, TINY_SD, TINY_SDXL

import train_drpo
import train_drpo_sdxl
from pipelines import evaluate, flags
from pipelines.build_tiny_models import build_parser as tiny_models_parser
from pipelines.rewards import server

REWARDS = f"{ROOT}/tests/data/rewards.py"


def training(tmp_path, *extra, reward=True):
    return [f"--pretrained_model_name_or_path={TINY_SD}", f"--prompts_file={PROMPTS}", f"--output_dir={tmp_path}",
            "--feature_extractor=image", "--report_to=none", *(["--reward=color_match"] if reward else []), *extra]


def refusal(parse, argv, capsys) -> str:
    """The message ``parse(argv)`` refuses ``argv`` with: argparse's error line or the exception's text."""
    try:
        parse(argv)
    except SystemExit as exit_:
        assert exit_.code == 2
        return capsys.readouterr().err.strip().splitlines()[-1]
    except (ValueError, FileNotFoundError) as error:
        return str(error)
    raise AssertionError(f"{argv} was accepted")


TRAINING_CASES = [
    ("--learning_rate", "0"), ("--learning_rate", "-1e-4"), ("--learning_rate", "nan"), ("--rank", "0"),
    ("--rank", "-4"), ("--num_validation_seeds", "0"), ("--validation_prompts", "|"), ("--lr_scheduler", "bogus"),
    ("--seed", "-1"), ("--drift_radii", "abc"), ("--drift_radii", "0.1,nan"), ("--drift_radii", "0.1,-1"),
    ("--reward", ":score"), ("--reward", "score:"), ("--reward", "pickscorez"), ("--num_candidates", "1"),
    ("--max_train_steps", "0"), ("--gradient_accumulation_steps", "0"), ("--checkpointing_steps", "-1"),
    ("--lora_dropout", "1.5"), ("--adam_beta2", "1"), ("--max_grad_norm", "inf"), ("--reward_timeout", "0"),
    ("--candidate_chunk_size", "0"), ("--dpo_beta", "-1"), ("--grpo_sigma", "0"), ("--max_tied_steps", "-1"),
]


@pytest.mark.parametrize("flag,value", TRAINING_CASES)
@pytest.mark.parametrize("module", [train_drpo, train_drpo_sdxl])
def test_a_bad_training_flag_is_refused_naming_flag_and_value(tmp_path, capsys, module, flag, value):
    message = refusal(module.parse_args, training(tmp_path, f"{flag}={value}"), capsys)
    assert flag in message and value.strip("|") in message, message


def test_a_mixture_weight_that_is_not_finite_is_refused(tmp_path, capsys):
    message = refusal(train_drpo.parse_args, training(tmp_path, "--reward_weights=nan,1", reward=False)
                      + ["--reward=color_match,jpeg_compressibility"], capsys)
    assert "--reward_weights" in message and "nan,1" in message, message


def test_a_run_without_reward_is_refused(tmp_path, capsys):
    message = refusal(train_drpo.parse_args, training(tmp_path, reward=False), capsys)
    assert "--reward" in message and "required" in message, message


@pytest.mark.parametrize("extra,named", [
    (["--caption_column=text"], "--caption_column"), (["--max_train_samples=10"], "--max_train_samples"),
    (["--streaming"], "--streaming"), (["--lr_power=2"], "--lr_power"), (["--lr_warmup_steps=10"], "--lr_warmup_steps"),
    (["--lr_scheduler=cosine", "--lr_num_cycles=2"], "--lr_num_cycles"), (["--dpo_beta=3"], "--dpo_beta"),
    (["--overlap_reward"], "--overlap_reward"), (["--hub_model_id=me/x"], "--hub_model_id"),
    (["--prompt_column=text"], "--prompt_column"),
])
def test_a_flag_that_does_nothing_in_this_run_is_refused(tmp_path, capsys, extra, named):
    message = refusal(train_drpo.parse_args, training(tmp_path, *extra), capsys)
    assert named in message and "does nothing" in message, message


def test_flags_that_act_are_accepted(tmp_path):
    args = train_drpo.parse_args(training(tmp_path, "--method=dpo", "--dpo_beta=3", "--lr_scheduler=polynomial",
                                          "--lr_power=2", "--lr_warmup_steps=5", "--candidate_chunk_size=4",
                                          "--no-overlap_reward", "--validation_prompts=a red circle|a cat"))
    assert (args.dpo_beta, args.lr_power, args.validation_prompts) == (3.0, 2.0, ["a red circle", "a cat"])


@pytest.mark.parametrize("content,line", [(b"a red circle\n\xff\xfe blue\n", 2),
                                          (b'{"prompt": "a"}\n{"prompt": "\xe9t\xe9"}\n', 2)])
def test_a_prompts_file_that_is_not_utf8_names_the_file_and_line(tmp_path, tmp_path_factory, content, line):
    inputs = tmp_path_factory.mktemp("inputs")  # not tmp_path, whose JSON files must all parse (conftest)
    path = inputs / ("prompts.jsonl" if content.startswith(b"{") else "prompts.txt")
    path.write_bytes(content)
    args = train_drpo.parse_args(training(tmp_path / "out", f"--prompts_file={path}"))

    def no_model_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad prompts file was reported")

    with pytest.raises(ValueError, match=rf"--prompts_file {path}, line {line}: not UTF-8"):
        train_drpo.main(args, load_pipeline=no_model_loading)


def test_a_huge_prompt_is_cut_with_a_warning_naming_its_line(tmp_path, caplog):
    from pipelines.prompts import MAX_PROMPT_CHARACTERS, load_prompts

    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\n" + "blue " * 400_000 + "\n")
    with caplog.at_level(logging.WARNING, logger="pipelines.prompts"):
        prompts = load_prompts(str(path))
    assert len(prompts[1]) == MAX_PROMPT_CHARACTERS and prompts[0] == "a red circle"
    assert f"{path}, line 2: a prompt of 1,999,999 characters" in caplog.text  # stripped


EVALUATION = [f"--pretrained_model_name_or_path={TINY_SD}", f"--prompts_file={PROMPTS}", "--metrics=color_match"]


@pytest.mark.parametrize("flag,value", [("--seeds", "a-b"), ("--seeds", "0,,1"), ("--seeds", "3-1"),
                                        ("--seeds", "1-2-3"), ("--seeds", "0-"), ("--metrics", "pickscorez"),
                                        ("--metrics", "color_match,:fn"), ("--lora", "/nowhere/lora"),
                                        ("--unet", "./missing-unet"), ("--bootstrap", "0"), ("--num_grids", "-2"),
                                        ("--max_prompts", "0")])
def test_a_bad_evaluation_flag_is_refused_before_anything_is_generated(capsys, flag, value):
    message = refusal(evaluate.parse_args, [*EVALUATION, f"{flag}={value}"], capsys)
    assert flag in message and value.split(",")[-1] in message, message


@pytest.mark.parametrize("build,argv,flag", [
    (server.build_parser, ["--reward=color_match", "--port=-1"], "--port"),
    (server.build_parser, ["--reward=color_match", "--max_batch=0"], "--max_batch"),
    (server.build_parser, ["--reward=color_match", "--max_request_mb=nan"], "--max_request_mb"),
    (evaluate.build_parser, ["--pretrained_model_name_or_path=x", "--judge_timeout=0"], "--judge_timeout"),
])
def test_a_bad_server_flag_is_refused(capsys, build, argv, flag):
    assert flag in refusal(build().parse_args, argv, capsys)


def parsers():
    return {"train_drpo": train_drpo.build_parser(), "train_drpo_sdxl": train_drpo_sdxl.build_parser(),
            "evaluate": evaluate.build_parser(), "reward server": server.build_parser(),
            "build_tiny_models": tiny_models_parser()}


def test_every_numeric_flag_has_a_checked_type():
    """A flag typed int / float / a lambda accepts 0, negatives, nan or inf silently: every typed flag uses one of
    pipelines.flags' checked types (or a named type of that module, e.g. a checked list)."""
    unchecked = []
    for name, parser in parsers().items():
        for action in parser._actions:
            kind = action.type
            if kind is None or kind is str or action.choices is not None:
                continue
            if kind not in flags.CHECKED_TYPES and getattr(kind, "__module__", "") != flags.__name__:
                unchecked.append(f"{name} {action.option_strings[0]}: {getattr(kind, '__name__', kind)}")
    assert unchecked == []


def test_explicit_flags_are_the_ones_on_the_command_line():
    parser = train_drpo.build_parser()
    given = flags.explicit_flags(parser, ["--pretrained_model_name_or_path=m", "--reward", "x", "--no-mask_self",
                                          "--gradient_checkpointing", "--learning_rate=1e-4"])
    assert given == {"pretrained_model_name_or_path", "reward", "mask_self", "gradient_checkpointing",
                     "learning_rate"}


def test_sdxl_script_refuses_the_same(tmp_path, capsys):
    argv = [f"--pretrained_model_name_or_path={TINY_SDXL}", *training(tmp_path)[1:], "--rank=0"]
    assert "--rank" in refusal(train_drpo_sdxl.parse_args, argv, capsys)


def test_every_json_a_strict_parser_reads():
    """files.write_json refuses NaN instead of writing a file that is not JSON."""
    from pipelines import files

    with pytest.raises(ValueError):
        files.write_json("/nonexistent/never-written.json", {"x": float("nan")})
    assert json.loads(json.dumps(files.finite_or_none({"a": [1.0, float("inf")]}))) == {"a": [1.0, None]}


def test_an_undefined_figure_is_null_with_its_reason():
    import torch

    from pipelines.scoring import describe_change, summarize

    base = torch.tensor([[0.1, 0.2], [0.3, 0.5]])
    unchanged = summarize(base, base.clone())  # a LoRA that changes nothing
    assert unchanged["z_paired"] is None and "changes no score" in unchanged["z_paired_undefined"]
    assert unchanged["effect_size"] == 0.0
    flat = summarize(torch.zeros(2, 2), torch.ones(2, 2))  # a reward that does not vary across seeds
    assert flat["effect_size"] is None and "does not vary" in flat["effect_size_undefined"]
    assert "effect size undefined: the base reward does not vary" in describe_change(flat)
    json.loads(json.dumps(flat, allow_nan=False))  # standard JSON


def test_final_metrics_and_the_harness_share_one_standard_error():
    """summarize (final_metrics.json, the benchmarks) reports the evaluation harness's standard error: the
    bootstrap over prompts, which tracks the analytic SE of a mean of per-prompt means,
    std(prompt means, ddof 0) / sqrt(P); one prompt has none."""
    import torch

    from pipelines.eval_stats import bootstrap_indices, mean_and_se, paired_difference
    from pipelines.scoring import summarize

    torch.manual_seed(0)
    base = torch.rand(40, 3)
    tuned = base + 0.1 + 0.05 * torch.rand(40, 3)
    result = summarize(base, tuned)
    indices = bootstrap_indices(40, 1000, 0)
    assert result["base_se"] == mean_and_se(base, indices)["se"]
    assert result["change_se"] == paired_difference(base, tuned, indices)["delta_se"]
    analytic = (tuned - base).double().mean(1).std(unbiased=False) / 40**0.5
    assert abs(result["change_se"] / analytic.item() - 1) < 0.1, (result["change_se"], analytic)
    assert result["z_paired"] == result["change"] / result["change_se"]
    one_prompt = summarize(base[:1], tuned[:1])
    assert one_prompt["z_paired"] is None and "fewer than two prompts" in one_prompt["z_paired_undefined"]


def test_help_imports_nothing_heavy():
    """--help and every refused flag answer before diffusers, transformers, peft or accelerate are imported."""
    import subprocess
    import sys

    code = ("import sys, train_drpo_sdxl; train_drpo_sdxl.build_parser()\n"
            "from pipelines import evaluate; evaluate.build_parser()\n"
            "heavy = ('diffusers', 'transformers', 'peft', 'accelerate', 'datasets', 'torchvision', 'open_clip',\n"
            "         'matplotlib', 'huggingface_hub')\n"
            "print(sorted(m for m in heavy if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("argv,message", [
    (["--learning_rate=0"], "train_drpo.py: error: argument --learning_rate: must be a positive finite number, got '0'"),
    (["--prompts_file=/nonexistent/prompts.txt"], "error: --prompts_file '/nonexistent/prompts.txt' does not exist"),
])
def test_a_user_error_under_accelerate_launch_is_one_line(tmp_path, argv, message):
    """Under ``accelerate launch --quiet`` (the README's commands), a refused input prints one line of ours and
    nothing of the launcher's but its configuration notice, and the status is not 0."""
    import os
    import subprocess
    import sys

    launcher = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--quiet", "--cpu",
                "--num_processes=1", "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no",
                "--num_cpu_threads_per_process=2"]
    result = subprocess.run([*launcher, os.path.join(ROOT, "train_drpo.py"), *training(tmp_path), *argv], cwd=ROOT,
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and len(lines) == 1 and lines[0].startswith(message), result.stderr
