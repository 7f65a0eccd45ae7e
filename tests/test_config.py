"""Typed configs: every flag lands in exactly one config field, each field declares whether it changes the
run's result (the resume fingerprint is made of those), configs are frozen, and a method registered from
this file alone trains through train_drpo.main (methods are plug-ins)."""

import dataclasses
import json
import os

import pytest
import torch
from conftest import PROMPTS, TINY_SD

import train_drpo
import train_drpo_sdxl
from pipelines import candidates, config, drift_flags, flags, methods


def training_flags(output_dir, *extra):
    return [f"--pretrained_model_name_or_path={TINY_SD}", f"--prompts_file={PROMPTS}", f"--output_dir={output_dir}",
            "--reward=color_match", "--feature_extractor=image", "--resolution=64", "--num_candidates=4",
            "--num_pairs=3", "--seed=0", "--report_to=none", "--validation_steps=0", "--num_validation_seeds=1",
            *extra]


def config_fields() -> dict[str, dataclasses.Field]:
    found = {}
    for part in dataclasses.fields(config.TrainingConfig):
        found.update({item.name: item for item in dataclasses.fields(getattr(config, part.type))})
    return found


@pytest.mark.parametrize("module", [train_drpo, train_drpo_sdxl])
def test_every_flag_is_a_classified_config_field(module):
    """A new flag must be given a field (and with it a place in, or out of, the run's fingerprint): a drift
    flag builds MethodConfig.drift, a method's own flag its options, every other flag the field of its name."""
    fields = config_fields()
    options = {item.name for method in methods.registered().values() if method.options
               for item in dataclasses.fields(method.options)}
    flags_given = {action.dest for action in module.build_parser()._actions if action.option_strings
                   and action.dest not in ("help", "config")}  # --config only supplies the other flags' values
    unclassified = flags_given - set(fields) - options - set(drift_flags.DRIFT_FIELDS)
    assert unclassified == set()
    assert all(isinstance(item.metadata.get("result"), bool) for item in fields.values())


def test_the_fingerprint_holds_the_fields_that_change_the_result(tmp_path):
    settings = train_drpo.build_config(train_drpo.parse_args(training_flags(tmp_path, "--method=dpo", "--dpo_beta=3")))
    record = config.run_record(settings, prompt_encoding="sd", num_processes=1)
    assert record["seed"] == 0 and record["learning_rate"] == 1e-4 and record["dpo_beta"] == 3.0  # result fields
    assert record["drift"]["radii"] == [0.02, 0.05, 0.2]  # the default (authors) preset's
    assert record["drift"]["pairing"] == "top_bottom" and record["num_processes"] == 1
    assert not {"output_dir", "max_train_steps", "report_to", "candidate_chunk_size", "hub_token"} & set(record)
    json.loads(json.dumps(record, allow_nan=False))  # standard JSON (an infinite self_penalty is "inf")


def test_configs_are_frozen_and_resolved_values_are_built_not_written_back(tmp_path):
    args = train_drpo.parse_args([a for a in training_flags(tmp_path) if not a.startswith("--resolution")])
    settings = train_drpo.build_config(args)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.model.resolution = 64
    resolved = settings.resolved(model={"resolution": 64})
    assert (resolved.model.resolution, settings.model.resolution, args.resolution) == (64, None, None)
    assert resolved.method is settings.method  # the untouched parts are shared


# ---------------------------------------------------------------------------------------------
# A method from this file alone
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PullOptions:
    toy_pull_weight: float = flags.option(1.0, flags.positive_float, "Weight of the pull toward the best candidate.")


def pull_update(ctx: candidates.StepContext, cand: candidates.Candidates):
    """Regress every candidate's latent onto the best-ranked one (a toy, not a method to use)."""
    scores, _ = ctx.scorer.result(cand.scores)
    best = cand.latents[scores.ranking.argmax()].detach().float()
    k = ctx.num_candidates

    def loss_of_rows(rows):
        latents = candidates.current_latents(ctx, candidates.rows_of(cand.condition, rows), cand.noise[rows])
        return ctx.options.toy_pull_weight * (latents.float() - best).square().flatten(1).mean(1).sum() / k

    loss = yield from candidates.loss_pieces(ctx, k, loss_of_rows)
    return {"loss": loss, "reward_mean": scores.reported.mean().item(), "reward_std": scores.reported.std().item()}


def pull_propose(ctx, prompt, rng):
    return candidates.candidates(ctx, prompt, rng, grad=False)


@pytest.fixture
def toy_method():
    method = methods.register(methods.Method("toy_pull", "pull toward the best candidate (a test's toy)",
                                             pull_propose, pull_update, options=PullOptions))
    yield method
    methods.REGISTRY.pop(method.name)


def test_a_method_registered_from_a_test_file_trains_one_step(tmp_path, toy_method):
    from conftest import reset_accelerate_state
    from safetensors.torch import load_file

    args = train_drpo.parse_args(training_flags(tmp_path, "--method=toy_pull", "--toy_pull_weight=2",
                                                "--max_train_steps=1", "--learning_rate=1e-2"))
    assert train_drpo.build_config(args).method.options == PullOptions(toy_pull_weight=2.0)
    reset_accelerate_state()
    train_drpo.main(args)
    reset_accelerate_state()
    lora = load_file(os.path.join(tmp_path, "pytorch_lora_weights.safetensors"))
    assert any("lora.up" in key and value.abs().sum() > 0 for key, value in lora.items())  # B moved from 0
    history = json.loads((tmp_path / "reward_history.jsonl").read_text().splitlines()[0])
    assert history["loss"] > 0 and torch.isfinite(torch.tensor(history["loss"]))
    assert "method `toy_pull` (pull toward the best candidate" in (tmp_path / "README.md").read_text()
    with pytest.raises(ValueError, match="--toy_pull_weight does nothing in this run"):  # its flag is its own
        train_drpo.parse_args(training_flags(tmp_path / "other", "--toy_pull_weight=2", "--method=dpo"))
