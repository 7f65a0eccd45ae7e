"""Evaluate a one-step model and any number of LoRAs / finetuned UNets like the paper (Section 5.1,
Appendix B.2-B.4): fixed prompt sets and seeds, several metrics on the same images, bootstrap standard
errors over prompts, paired differences and win rates against the base, GenEval, a pairwise VLM judge.

    python -m pipelines.evaluate --pretrained_model_name_or_path stabilityai/sd-turbo \
        --lora drpo-sd-turbo --prompt_set pickapic_v2_test --seeds 0-4 \
        --metrics pickscore,clip,aesthetic,imagereward,hpsv2 --output_dir eval-pickapic

Images are generated once per (model, prompt, seed) (one step, guidance 0) and cached as PNG under
``--image_cache_dir``; every metric, the GenEval checker and the judge read them back from there, so
a later run that adds a metric, a model or the judge only generates what is missing. Under
``accelerate launch`` / ``torchrun`` the prompts (and the scoring batches) are split across processes
and gathered; only the main process writes the reports. See the README section "Evaluation".

The single-reward helpers (``reward_table``, ``summarize``, ``evaluate``) are ``pipelines/scoring.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys

import torch
from tqdm.auto import tqdm

from pipelines import flags, generators
from pipelines.cli import from_namespace
from pipelines.config import EvalConfig, ModelConfig
from pipelines.eval_cache import ImageCache, model_weights, parse_models, split_label
from pipelines.eval_report import summarize_run, write_reports
from pipelines.eval_tables import render_markdown
from pipelines.hub import public_flags, write_run_config
from pipelines.eval_sets import GENEVAL_IMAGES_PER_PROMPT, PROMPT_SETS, geneval_tag, load_prompt_set
from pipelines.inference import generate_images, load_one_step_pipeline
from pipelines.redact import public_text
from pipelines.rewards import (REWARDS, check_installed, check_reward_spec, hub_resources, is_url, load_reward,
                               probe_servers, score_candidates)



DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def release() -> None:
    """Free a metric model before the next is loaded."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def base_generator(evaluation: EvalConfig) -> ModelConfig:
    """The base model as the trainer's flags give it: with --base_unet and the scheduler flags, if any."""
    return ModelConfig(evaluation.pretrained_model_name_or_path, revision=evaluation.revision,
                       variant=evaluation.variant, unet=evaluation.base_unet, scheduler=evaluation.scheduler,
                       timestep_spacing=evaluation.timestep_spacing, prediction_type=evaluation.prediction_type,
                       timesteps=evaluation.timesteps, max_sequence_length=evaluation.max_sequence_length)


def check_generator(evaluation: EvalConfig) -> None:
    """From the base's config files (no weights): UNet flags need a UNet (not FLUX's transformer), and the
    scheduler takes the settings and timestep given."""
    from diffusers import DiffusionPipeline

    components = DiffusionPipeline.load_config(evaluation.pretrained_model_name_or_path, revision=evaluation.revision)
    unet_flags = [flag for flag, given in (("--base_unet", evaluation.base_unet), ("--unet", evaluation.unet),
                                           ("--scheduler", evaluation.scheduler),
                                           ("--timesteps", evaluation.timesteps)) if given]
    if "unet" not in components and unet_flags:
        raise ValueError(f"{', '.join(unet_flags)} apply to a UNet; {evaluation.pretrained_model_name_or_path} is a "
                         f"{components.get('_class_name')} without one")
    if "unet" in components and evaluation.max_sequence_length is not None:
        raise ValueError("--max_sequence_length applies to FLUX's T5 prompt encoding")
    generators.check_scheduler(base_generator(evaluation))


def generate_missing(evaluation: EvalConfig, models, prompts, seeds, cache: ImageCache, state) -> int:
    """Generate this process' share of the (model, prompt, seed) images the cache lacks; returns how many.
    Processes split the distinct prompts, so a repeated prompt's images are written by one process only."""
    mine = list(dict.fromkeys(prompts))[state.process_index::state.num_processes]
    todo = {model: [(p, [s for s in seeds if not cache.has(model, p, s)]) for p in mine] for model in models}
    todo = {model: [(p, missing) for p, missing in work if missing] for model, work in todo.items()}
    total = sum(len(missing) for work in todo.values() for _, missing in work)
    if total == 0:
        return 0
    dtype, generator = DTYPES[evaluation.mixed_precision], base_generator(evaluation)
    pipe = load_one_step_pipeline(evaluation.pretrained_model_name_or_path, dtype=dtype, device=state.device,
                                  call_arguments=generators.call_arguments(generator),
                                  **generators.pipeline_components(generator, dtype),
                                  **{k: v for k, v in (("revision", evaluation.revision),
                                                       ("variant", evaluation.variant)) if v})
    with tqdm(total=total, desc="generating", unit="image", disable=not state.is_main_process) as bar:
        for model, work in todo.items():
            if not work:
                continue
            bar.set_postfix_str(model.label)
            with model_weights(pipe, model, dtype, state.device):
                for prompt, missing in work:
                    images = generate_images(pipe, [prompt], missing, evaluation.resolution)
                    for seed, image in zip(missing, images):
                        cache.save(model, prompt, seed, image)
                    bar.update(len(missing))
    del pipe
    release()
    return total


# ---------------------------------------------------------------------------------------------
# Scoring, GenEval and the judge, split across processes
# ---------------------------------------------------------------------------------------------


def my_batches(count: int, size: int, state) -> list[tuple[int, int]]:
    """This process' share of the [start, stop) batches of ``count`` prompt-major items. Every item is
    scored in the same batch whatever the number of processes, so results do not depend on it."""
    batches = [(start, min(start + size, count)) for start in range(0, count, size)]
    return batches[state.process_index::state.num_processes]


def gathered(items: list, state) -> list:
    if state.num_processes == 1:
        return items
    from accelerate.utils import gather_object

    return gather_object(items)


def metric_label(item: str) -> tuple[str, str]:
    """``name=spec`` or a spec: its registry name, its function name (``file.py:fn``) or the URL."""
    name, spec = split_label(item)
    if name:
        return name, spec
    if is_url(spec):
        return public_text(spec), spec  # a label is written everywhere: never with a credential
    if spec in REWARDS or ":" not in spec:
        return spec, spec
    return spec.rsplit(":", 1)[1], spec


def score_metrics(evaluation: EvalConfig, metrics: dict[str, str], models, prompts, seeds, cache, state) -> dict:
    """Raw scores {metric: {model label: float64 [prompts, seeds]}}; one metric model loaded at a time."""
    pairs = [(p, s) for p in prompts for s in seeds]
    scores = {}
    for metric, spec in metrics.items():
        reward = load_reward(spec, state.device)
        if hasattr(reward, "batch_size"):
            reward.batch_size = evaluation.metric_batch_size
        batches = my_batches(len(pairs), evaluation.metric_batch_size, state)
        local = []
        with tqdm(total=len(batches) * len(models), desc=f"scoring {metric}", unit="batch",
                  disable=not state.is_main_process) as bar:
            for model in models:
                for start, stop in batches:
                    images = cache.load(model, pairs[start:stop])
                    values = score_candidates(reward, images, [p for p, _ in pairs[start:stop]], metric).reported
                    local.append((model.label, start, values.tolist()))
                    bar.update()
        del reward
        release()
        table = {model.label: torch.zeros(len(pairs), dtype=torch.float64) for model in models}
        for label, start, values in gathered(local, state):
            table[label][start : start + len(values)] = torch.tensor(values, dtype=torch.float64)
        scores[metric] = {label: values.view(len(prompts), len(seeds)) for label, values in table.items()}
    return scores


def run_geneval(evaluation: EvalConfig, models, prompt_set, seeds, cache, state) -> dict[str, list[dict]]:
    """Per model, GenEval's per-image results (tag, correct, reasons) from our ``geneval`` checker."""
    from pipelines.rewards.geneval import GenEvalReward

    checker = GenEvalReward(evaluation.geneval_detector, evaluation.geneval_clip, device=state.device)
    prompts = prompt_set.prompts
    tags = [geneval_tag(record, prompt, checker) for record, prompt in zip(prompt_set.records, prompts)]
    pairs = [(i, j) for i in range(len(prompts)) for j in range(len(seeds))]
    batches = my_batches(len(pairs), evaluation.metric_batch_size, state)
    local = []
    with tqdm(total=len(batches) * len(models), desc="geneval", unit="batch", disable=not state.is_main_process) as bar:
        for model in models:
            for start, stop in batches:
                chunk = pairs[start:stop]
                images = cache.load(model, [(prompts[i], seeds[j]) for i, j in chunk])
                for (i, j), (passed, reasons) in zip(chunk, checker.verdicts(images, [prompts[i] for i, _ in chunk])):
                    local.append({"model": model.label, "prompt_index": i, "seed": seeds[j], "tag": tags[i],
                                  "prompt": prompts[i], "correct": bool(passed), "reason": "; ".join(reasons)})
                bar.update()
    del checker
    release()
    results = {model.label: [] for model in models}
    for record in sorted(gathered(local, state), key=lambda r: (r["prompt_index"], seeds.index(r["seed"]))):
        results[record.pop("model")].append(record)
    return results


def run_judge(evaluation: EvalConfig, models, prompts, seeds, cache, state) -> dict[str, list[dict]]:
    """Per candidate model, one judged pair (candidate vs base, same prompt and seed) per record."""
    from pipelines.judge import judge_pair, load_judge, shows_candidate_second

    judge = load_judge(evaluation.judge, evaluation.judge_model, state.device, DTYPES[evaluation.mixed_precision],
                       evaluation.judge_max_new_tokens, evaluation.judge_timeout)
    base, candidates = models[0], models[1:]
    pairs = [(i, j) for i in range(len(prompts)) for j in range(len(seeds))]
    mine = pairs[state.process_index::state.num_processes]
    local = []
    with tqdm(total=len(mine) * len(candidates), desc="judging", unit="pair", disable=not state.is_main_process) as bar:
        for model in candidates:
            for i, j in mine:
                prompt, seed = prompts[i], seeds[j]
                images = cache.load(model, [(prompt, seed)])[0], cache.load(base, [(prompt, seed)])[0]
                second = shows_candidate_second(evaluation.seed, model.label, prompt, seed)
                record = judge_pair(judge, images[0], images[1], prompt, second)
                local.append({"model": model.label, "prompt_index": i, "seed_index": j, "seed": seed, **record})
                bar.update()
    del judge
    release()
    results = {model.label: [] for model in candidates}
    for record in sorted(gathered(local, state), key=lambda r: (r["prompt_index"], r["seed_index"])):
        results[record.pop("model")].append(record)
    return results


def default_seeds(evaluation: EvalConfig) -> list[int]:
    """``--seeds``, else the paper's five matched seeds, or GenEval's four images per prompt."""
    if evaluation.seeds:
        return list(evaluation.seeds)
    return list(range(GENEVAL_IMAGES_PER_PROMPT if evaluation.geneval else 5))


def hub_needs(evaluation: EvalConfig) -> dict[str, list[str]]:
    """flag -> what the evaluation fetches from the Hub: the models, every metric's weights, GenEval's, the judge's."""
    from pipelines.downloads import is_local

    judge = evaluation.judge
    vlm = judge is not None and not is_url(judge) and ":" not in judge
    needs = {"--pretrained_model_name_or_path": [evaluation.pretrained_model_name_or_path],
             "--lora": [split_label(item)[1] for item in evaluation.lora],
             "--unet": [split_label(item)[1] for item in evaluation.unet],
             "--base_unet": [evaluation.base_unet] if evaluation.base_unet else [],
             "--metrics": [r for item in evaluation.metrics.split(",") if item.strip() not in ("", "none")
                           for r in hub_resources(metric_label(item.strip())[1])],
             "--geneval": [evaluation.geneval_detector, evaluation.geneval_clip] if evaluation.geneval else [],
             "--judge": [judge] if vlm else []}
    return {flag: [r for r in resources if not is_local(r)] for flag, resources in needs.items()}


def run(evaluation: EvalConfig) -> dict | None:
    """The whole evaluation; returns the metrics.json content on the main process (None elsewhere)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from pipelines.downloads import check_available

    check_available(hub_needs(evaluation))  # every model's and metric's weights, before any image is generated
    check_generator(evaluation)

    # as Accelerator does: without cpu=True, torchrun on a CPU-only machine gives N unconnected processes
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.accelerator.is_available())
    models = parse_models(evaluation.lora, evaluation.unet)
    if evaluation.judge and len(models) < 2:
        raise ValueError("--judge compares models with the base: give at least one --lora or --unet")
    seeds = default_seeds(evaluation)
    specs = dict(metric_label(item) for item in evaluation.metrics.split(",")
                 if item.strip() and item.strip() != "none")
    os.makedirs(evaluation.output_dir, exist_ok=True)
    if state.is_main_process:  # the resolved flags, reusable as --config
        changed = flags.changed_flags(build_parser(), dataclasses.asdict(evaluation))
        write_run_config(evaluation.output_dir, {"script": "-m pipelines.evaluate", "flags": public_flags(changed)})
    prompt_set = load_prompt_set(evaluation.prompts_file, evaluation.dataset_name, evaluation.dataset_split,
                                 evaluation.prompt_column, evaluation.prompt_set, evaluation.max_prompts,
                                 evaluation.unique_prompts)
    prompts = prompt_set.prompts
    cache = ImageCache(evaluation.image_cache_dir or os.path.join(evaluation.output_dir, "images"),
                       evaluation.pretrained_model_name_or_path, evaluation.resolution, evaluation.mixed_precision,
                       evaluation.revision, evaluation.variant, generators.cache_key(base_generator(evaluation)))
    if state.is_main_process:
        for model in models:
            cache.describe_folder(model)
    state.wait_for_everyone()
    generated = generate_missing(evaluation, models, prompts, seeds, cache, state)
    print(f"process {state.process_index + 1}/{state.num_processes}: generated {generated} images", file=sys.stderr)
    state.wait_for_everyone()
    scores = score_metrics(evaluation, specs, models, prompts, seeds, cache, state)
    geneval = run_geneval(evaluation, models, prompt_set, seeds, cache, state) if evaluation.geneval else None
    judged = run_judge(evaluation, models, prompts, seeds, cache, state) if evaluation.judge else None
    if not state.is_main_process:
        state.wait_for_everyone()
        return None
    result = summarize_run(evaluation, models, prompt_set, seeds, specs, scores, geneval, judged)
    write_reports(evaluation, result, models, prompts, seeds, scores, geneval, judged, cache)
    print(render_markdown(result))
    state.wait_for_everyone()
    return result


def add_model_flags(parser) -> None:
    models = parser.add_argument_group("models")
    models.add_argument("--pretrained_model_name_or_path", required=True,
                        help="The base one-step model (Hub id or folder), evaluated as 'base'.")
    models.add_argument("--revision", default=None, help="Revision of the base model on the Hub.")
    models.add_argument("--variant", default=None, help="Weights variant of the base model (e.g. fp16).")
    models.add_argument("--lora", nargs="*", action="extend", default=[],
                        help="LoRAs to evaluate: folders, .safetensors files or Hub ids, each as [name=]path; "
                             "the name defaults to the folder's base name (or the Hub id).")
    models.add_argument("--unet", nargs="*", action="extend", default=[],
                        help="Finetuned UNets to evaluate: [name=]folder of a UNet2DConditionModel (or of a "
                             "pipeline with a unet/ subfolder).")
    generators.add_generator_flags(parser, unet_flag="--base_unet")
    models.add_argument("--max_sequence_length", type=flags.positive_int, default=None,
                        help="FLUX: T5 tokens of the prompt, as the LoRA was trained (default: schnell's 256).")


def add_prompt_flags(parser) -> None:
    data = parser.add_argument_group("prompts and seeds")
    data.add_argument("--prompt_set", choices=sorted(PROMPT_SETS), default=None,
                      help="A preset prompt set: pickapic_v2_test, parti_prompts, hpdv2_test (downloaded on first "
                           "use), geneval, pickscore_test (shipped in assets/prompts/).")
    data.add_argument("--prompts_file", default=None, help="A .txt (one prompt per line) or .jsonl prompts file.")
    data.add_argument("--dataset_name", default=None,
                      help="A datasets dataset (Hub id, local data folder or save_to_disk folder) to read prompts "
                           "from.")
    data.add_argument("--dataset_split", default="test", help="Split of --dataset_name.")
    data.add_argument("--prompt_column", default="prompt", help="Column (or .jsonl key) holding the prompt.")
    data.add_argument("--max_prompts", type=flags.positive_int, default=None, help="Evaluate only the first N prompts.")
    data.add_argument("--unique_prompts", action="store_true", help="Drop repeated prompts (presets say if they do).")
    data.add_argument("--seeds", type=flags.seed_list, default=None,
                      help="Seeds, '0-4' or '0,1,2'; one image per (prompt, seed) and model. Default 0-4 "
                           "(five matched seeds), 0-3 with --geneval (GenEval's 4 images per prompt).")
    data.add_argument("--resolution", type=flags.positive_int, default=None,
                      help="Image size (default: the model's own).")
    data.add_argument("--mixed_precision", choices=sorted(DTYPES), default="no",
                      help="dtype of the generator and the judge (fp16 / bf16) or float32 ('no').")


def add_metric_flags(parser) -> None:
    scoring = parser.add_argument_group("metrics")
    scoring.add_argument("--metrics", default="pickscore,clip,aesthetic,imagereward,hpsv2",
                         help="Comma-separated metrics, each any --reward spec of the trainer (a name, "
                              "file.py:function, module:function, a URL), optionally as name=spec; 'none' for none.")
    scoring.add_argument("--metric_batch_size", type=flags.positive_int, default=16,
                         help="Images per metric / GenEval call.")
    scoring.add_argument("--bootstrap", type=flags.positive_int, default=1000,
                         help="Bootstrap resamples of the prompts.")
    scoring.add_argument("--seed", type=flags.seed, default=0,
                         help="Seed of the bootstrap and of the judge's A/B order.")
    scoring.add_argument("--raw_scores", action="store_true",
                         help="Report raw scores instead of the paper's scale (CLIP, HPS v2 x100; ImageReward x10).")
    scoring.add_argument("--geneval", action="store_true",
                         help="Score GenEval's tasks with the geneval checker (prompts: GenEval's metadata).")
    scoring.add_argument("--geneval_detector", default="facebook/mask2former-swin-small-coco-instance",
                         help="Detector of the GenEval checker (Mask2Former, Hub id or folder).")
    scoring.add_argument("--geneval_clip", default="openai/clip-vit-large-patch14",
                         help="CLIP model of the GenEval colour classifier (Hub id or folder).")
    scoring.add_argument("--judge", default=None,
                         help="Pairwise judge of each model vs the base: a transformers VLM id or folder (Qwen3-VL, "
                              "Qwen2.5-VL), openai:<base_url> (an OpenAI-compatible server: vllm serve, SGLang; key "
                              "from $OPENAI_API_KEY), or file.py:function.")
    scoring.add_argument("--judge_model", default=None,
                         help="The model name an openai:<base_url> judge serves (e.g. Qwen/Qwen3-VL-8B-Instruct).")
    scoring.add_argument("--judge_timeout", type=flags.positive_float, default=300.0,
                         help="Seconds one judgement may take over an openai: judge, retries included.")
    scoring.add_argument("--judge_max_new_tokens", type=flags.positive_int, default=64,
                         help="Longest judge answer, in tokens.")


def add_output_flags(parser) -> None:
    output = parser.add_argument_group("output")
    output.add_argument("--output_dir", default="evaluation", help="Where metrics.json, metrics.md, grids, plot go.")
    output.add_argument("--image_cache_dir", default=None,
                        help="Image cache, shareable between evaluations (default: <output_dir>/images).")
    output.add_argument("--num_grids", type=flags.count_or_all, default=16,
                        help="Per-prompt image grids to write (-1: all).")


def build_parser() -> argparse.ArgumentParser:
    """The evaluation's flags, group by group."""
    parser = flags.Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    flags.add_config_flag(parser)
    for add_flags in (add_model_flags, add_prompt_flags, add_metric_flags, add_output_flags):
        add_flags(parser)
    return parser


def missing_local_path(path: str) -> bool:
    """A --lora / --unet that names a file or folder which does not exist (offline, any missing name does:
    it cannot be a Hub id)."""
    if os.path.exists(path):
        return False
    looks_local = path.startswith(("/", ".", "~")) or path.endswith(".safetensors") or path.count("/") > 1
    return looks_local or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def check_config(evaluation: EvalConfig) -> None:
    """Every metric spec, model path and the judge checked before anything loads or is generated."""
    from pipelines.judge import check_judge

    for item in evaluation.metrics.split(","):
        if item.strip() and item.strip() != "none":
            check_reward_spec(metric_label(item.strip())[1], None, flag="--metrics")
            probe_servers(metric_label(item.strip())[1])
    check_judge(evaluation.judge, evaluation.judge_model)
    if evaluation.geneval:
        check_installed("geneval", "--geneval")
    generators.check_generator_flags(evaluation.base_unet, evaluation.scheduler, base_generator(evaluation)
                                     .scheduler_overrides, evaluation.timesteps)
    for model in parse_models(evaluation.lora, evaluation.unet)[1:]:
        if missing_local_path(model.path):
            offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
            raise ValueError(f"--{model.kind} {model.path!r}: no such file or folder"
                             + (" (HF_HUB_OFFLINE is set, so it is no Hub id either)" if offline else ""))


def parse_args(argv=None) -> EvalConfig:
    """The flags as an EvalConfig, every metric and model path checked before anything loads."""
    parser = build_parser()
    evaluation = from_namespace(EvalConfig, flags.parse_with_config(parser, argv)[0])
    try:
        check_config(evaluation)
    except (ValueError, OSError) as error:
        parser.error(str(error))
    return evaluation


def main(argv=None):
    return run(parse_args(argv))


def command() -> None:
    """``python -m pipelines.evaluate`` / ``drpo-evaluate``: an input error ends in one line."""
    from pipelines.cli import run_reporting_user_errors

    run_reporting_user_errors(main)


if __name__ == "__main__":
    command()
