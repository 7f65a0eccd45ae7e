"""Offline preference data (Section 4, "Offline variant"; Appendix B "Offline preference data").

Records in the Pick-a-Pic v2 layout: a caption, two encoded images and ``label_0`` (1: image 0 is
preferred, 0: image 1 is, 0.5: a tie). They are read with ``datasets`` (streamed with ``--streaming``,
record by record), checked, grouped by caption (a prompt may carry several pairs), and each pair's
chosen and rejected image is encoded once into the run's preference space (phi, or the raw latent
for DPO). The encodings go to an on-disk cache keyed by everything they depend on, so a second epoch
or a second run reads them instead of encoding again.

Bad data never stops a run mid-way: every record is checked while the cache is built, before the
first step; undecodable images, missing captions, ties (no preference) and unknown labels are
counted, logged and skipped; images of another mode or size are converted. A dataset without a
single usable pair stops at start-up.
"""

from __future__ import annotations

import collections
import hashlib
import io
import itertools
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from PIL import Image, ImageOps

from pipelines import files, flags
from pipelines.config import DataConfig, TrainingConfig
from pipelines.content import sha256_file

logger = logging.getLogger(__name__)

LAYOUT = {"caption_column": "caption", "image_0_column": "jpg_0", "image_1_column": "jpg_1",
          "label_0_column": "label_0"}  # flag -> Pick-a-Pic v2 column
SHARD_PAIRS = 1024  # pairs per cache file
CACHE_FORMAT = 2  # 2: keyed by content, files checksummed
INDEX, STAGING_PREFIX = "index.json", ".building-"


def add_flags(parser) -> None:
    group = parser.add_argument_group("offline DrPO (--preference_dataset; Section 4 \"Offline variant\", Appendix B)")
    group.add_argument("--preference_dataset", default=None,
                       help="Train offline on preference pairs instead of reward-ranked candidates: a Hub dataset id "
                            "(yuvalkirstain/pickapic_v2) or a local folder datasets reads (e.g. parquet files), in the "
                            "Pick-a-Pic v2 layout. --dataset_split picks the split; --reward then only scores the "
                            "final check.")
    for flag, column in LAYOUT.items():
        group.add_argument(f"--{flag}", default=column,
                           help=f"Column of --preference_dataset (Pick-a-Pic v2: {column}).")
    group.add_argument("--streaming", action="store_true",
                       help="Stream --preference_dataset record by record (no download or Arrow copy of the whole "
                            "set).")
    group.add_argument("--max_train_samples", type=flags.positive_int, default=None,
                       help="Read only the first N records of --preference_dataset.")
    group.add_argument("--feature_cache_dir", default=None,
                       help="Where encoded preference pairs are cached (default: $HF_HOME/drpo-features).")
    group.add_argument("--offline_neighbours", type=flags.non_negative_int, default=0,
                       help="Also use the pairs of the N captions nearest in text-embedding cosine (the paper's "
                            "\"larger pair neighborhoods\" for sparse data; 0, the paper's setting: the prompt's own).")


# ---------------------------------------------------------------------------------------------
# Reading and checking records
# ---------------------------------------------------------------------------------------------


def open_dataset(data: DataConfig, cache_dir: str | None = None, streaming: bool | None = None):
    """--preference_dataset's split, its layout columns checked; streamed with --streaming (or
    ``streaming=True``: the start-up check, which reads no more than the schema)."""
    import datasets

    streaming = data.streaming if streaming is None else streaming
    dataset = datasets.load_dataset(data.preference_dataset, split=data.dataset_split, streaming=streaming,
                                    cache_dir=cache_dir)
    features = dataset.features or {}  # a streamed json/csv set may not know its features
    columns = list(features) or dataset.column_names or list(next(iter(dataset), {}))
    wanted = {flag: getattr(data, flag) for flag in LAYOUT}
    missing = {flag: column for flag, column in wanted.items() if column not in columns}
    if missing:
        raise ValueError(f"--preference_dataset {data.preference_dataset!r} has no column "
                         + ", ".join(f"{column!r} (--{flag})" for flag, column in missing.items())
                         + f"; its columns are {columns}")
    for flag in ("image_0_column", "image_1_column"):  # undecoded: a broken image is counted, not raised
        if isinstance(features.get(wanted[flag]), datasets.Image):
            dataset = dataset.cast_column(wanted[flag], datasets.Image(decode=False))
    return dataset


def decode_image(value) -> Image.Image | None:
    """Encoded bytes, a datasets Image dict ({"bytes", "path"}) or a PIL image; None if it does not decode."""
    try:
        if isinstance(value, Image.Image):
            return value
        if isinstance(value, dict) and not value.get("bytes"):
            with open(value["path"], "rb") as handle:
                value = handle.read()
        elif isinstance(value, dict):
            value = value["bytes"]
        image = Image.open(io.BytesIO(value))
        image.load()
        return image
    except Exception:  # noqa: BLE001 - any failure to decode is the same bad record
        return None


def to_pixels(image: Image.Image, resolution: int, counts: collections.Counter) -> torch.Tensor:
    """[3, R, R] in [0, 1]: converted to RGB, resized (shorter side) and centre-cropped to the training size."""
    if image.mode != "RGB":
        counts["converted to RGB"] += 1
        image = image.convert("RGB")
    if image.size != (resolution, resolution):
        counts["resized"] += 1
        image = ImageOps.fit(image, (resolution, resolution), Image.Resampling.BICUBIC)
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(resolution, resolution, 3)
    return pixels.permute(2, 0, 1).float() / 255


@dataclass
class PreferencePair:
    caption: str
    chosen: torch.Tensor  # [3, R, R] in [0, 1]
    rejected: torch.Tensor


def checked_pair(record: dict, data: DataConfig, resolution: int, counts: collections.Counter) -> PreferencePair | None:
    """The record's (caption, chosen, rejected), or None (counted by reason) when it carries no usable pair."""
    caption = record.get(data.caption_column)
    if not isinstance(caption, str) or not caption.strip():
        counts["missing caption"] += 1
        return None
    try:
        label = float(record.get(data.label_0_column))
    except (TypeError, ValueError):
        label = float("nan")
    if label == 0.5:
        counts["tie (no preference)"] += 1
        return None
    if label not in (0.0, 1.0):
        counts["label not 0, 0.5 or 1"] += 1
        return None
    images = [decode_image(record.get(getattr(data, flag))) for flag in ("image_0_column", "image_1_column")]
    if any(image is None for image in images):
        counts["undecodable image"] += 1
        return None
    first, second = (to_pixels(image, resolution, counts) for image in images)
    chosen, rejected = (first, second) if label == 1.0 else (second, first)
    return PreferencePair(caption.strip(), chosen, rejected)


def checked_pairs(records: Iterable[dict], data: DataConfig, resolution: int,
                  counts: collections.Counter) -> Iterator[PreferencePair]:
    for record in itertools.islice(records, data.max_train_samples):
        counts["records"] += 1
        pair = checked_pair(record, data, resolution, counts)
        if pair is not None:
            counts["pairs used"] += 1
            yield pair


# ---------------------------------------------------------------------------------------------
# The feature cache
# ---------------------------------------------------------------------------------------------


def cache_key(config: TrainingConfig, space: str) -> dict:
    """Everything the cached encodings depend on, by content (``pipelines.content``): the model's files or
    Hub commit (its VAE and the feature map read them), the feature network's weights, resolution,
    preference space, precision, and the dataset's files or commit with its split, columns and record cap."""
    from pipelines.content import source_key

    model, data, setup = config.model, config.data, config.method
    vae, weights = model.pretrained_vae_model_name_or_path, setup.feature_extractor_path
    return {
        "format": CACHE_FORMAT, "model": source_key(model.pretrained_model_name_or_path, model.revision),
        "variant": model.variant, "vae": None if vae is None else source_key(vae),
        "feature_weights": None if weights is None else source_key(weights),
        "resolution": model.resolution, "space": space, "mixed_precision": config.run.mixed_precision,
        "dataset": source_key(data.preference_dataset, repo_type="dataset"), "split": data.dataset_split,
        "max_train_samples": data.max_train_samples, "columns": [getattr(data, flag) for flag in LAYOUT],
    }


def cache_root(data: DataConfig) -> str:
    if data.feature_cache_dir is not None:
        return data.feature_cache_dir
    from huggingface_hub import constants

    return os.path.join(constants.HF_HOME, "drpo-features")


def cache_folder(data: DataConfig, key: dict) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return os.path.join(cache_root(data), digest)


class ShardWriter:
    """Encoded pairs appended in files of SHARD_PAIRS rows (``pairs-00000.safetensors``, ...)."""

    def __init__(self, folder: str):
        self.folder, self.rows, self.shards = folder, 0, 0
        self.buffer: dict[str, list[torch.Tensor]] = collections.defaultdict(list)

    def add(self, chosen: dict, rejected: dict) -> range:
        start = self.rows
        for side, tensors in (("chosen", chosen), ("rejected", rejected)):
            for name, value in tensors.items():
                self.buffer[f"{side}/{name}"].extend(value.detach().float().cpu())
        self.rows += len(next(iter(chosen.values())))
        while len(next(iter(self.buffer.values()))) >= SHARD_PAIRS:
            self.flush(SHARD_PAIRS)
        return range(start, self.rows)

    def flush(self, count: int | None = None) -> None:
        from safetensors.torch import save_file

        if not self.buffer or not next(iter(self.buffer.values())):
            return
        count = count or len(next(iter(self.buffer.values())))
        save_file({name: torch.stack(rows[:count]) for name, rows in self.buffer.items()},
                  os.path.join(self.folder, f"pairs-{self.shards:05d}.safetensors"))
        for rows in self.buffer.values():
            del rows[:count]
        self.shards += 1


def build_cache(folder: str, key: dict, pairs: Iterable[PreferencePair], encode: Callable[[torch.Tensor], dict],
                embed_caption: Callable[[str], torch.Tensor], counts: collections.Counter, batch_size: int = 8) -> None:
    """Encode every pair (``encode``: images [B, 3, R, R] -> {name: [B, ...]}) and every caption's text
    embedding into ``folder``, written in a staging folder and renamed into place when complete (an
    interrupted build leaves no cache behind)."""
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=os.path.dirname(folder))
    try:
        writer, groups, embeddings = ShardWriter(staging), {}, []

        def encode_batch(batch: list[PreferencePair]) -> None:
            encoded = encode(torch.stack([p.chosen for p in batch] + [p.rejected for p in batch]))
            chosen = {name: value[:len(batch)] for name, value in encoded.items()}
            rejected = {name: value[len(batch):] for name, value in encoded.items()}
            for pair, row in zip(batch, writer.add(chosen, rejected)):
                if pair.caption not in groups:
                    groups[pair.caption] = []
                    embeddings.append(embed_caption(pair.caption).float().cpu())
                groups[pair.caption].append(row)

        for batch in iter(lambda: list(itertools.islice(pairs, batch_size)), []):
            encode_batch(batch)
        if not groups:
            raise ValueError(f"--preference_dataset {key['dataset']!r} holds no usable preference pair "
                             f"({describe_counts(counts)})")
        writer.flush()
        from safetensors.torch import save_file

        save_file({"embeddings": torch.stack(embeddings)}, os.path.join(staging, "captions.safetensors"))
        checksums = {name: sha256_file(os.path.join(staging, name)) for name in sorted(os.listdir(staging))}
        files.write_json(os.path.join(staging, INDEX), {
            "key": key, "pairs": writer.rows, "shard_pairs": SHARD_PAIRS, "counts": dict(counts),
            "checksums": checksums, "groups": [{"caption": caption, "rows": rows} for caption, rows in groups.items()]})
        try:
            os.rename(staging, folder)
        except OSError:  # another process finished the same cache first: keep theirs
            shutil.rmtree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def describe_counts(counts) -> str:
    return ", ".join(f"{name}: {number}" for name, number in sorted(counts.items())) or "no records"


class PreferenceStore:
    """A built cache: the captions (the run's prompts) and, per caption, its encoded chosen / rejected
    features, read from the memory-mapped files when drawn."""

    def __init__(self, folder: str, neighbours: int = 0):
        from safetensors import safe_open
        from safetensors.torch import load_file

        with open(os.path.join(folder, INDEX), encoding="utf-8") as handle:  # verified by load_store
            index = json.load(handle)
        self.folder, self.counts, self.num_pairs = folder, index["counts"], index["pairs"]
        self.shard_pairs = index["shard_pairs"]
        self.captions = [group["caption"] for group in index["groups"]]
        self.rows = [group["rows"] for group in index["groups"]]
        self.group_of = {caption: number for number, caption in enumerate(self.captions)}
        self.shards = [safe_open(os.path.join(folder, f"pairs-{n:05d}.safetensors"), "pt")
                       for n in range(-(-self.num_pairs // self.shard_pairs))]
        embeddings = load_file(os.path.join(folder, "captions.safetensors"))["embeddings"]
        self.neighbours = nearest_captions(embeddings, neighbours)

    def pair_rows(self, caption: str) -> list[int]:
        """The caption's own pairs, then those of its --offline_neighbours nearest captions."""
        group = self.group_of[caption]
        return [row for g in (group, *self.neighbours[group]) for row in self.rows[g]]

    def pairs(self, caption: str, max_pairs: int, rng: torch.Generator, device) -> tuple[dict, dict, int]:
        """(A+, A-) for ``caption``: {name: [P, ...]} each, at most ``max_pairs`` drawn with ``rng``."""
        rows = self.pair_rows(caption)
        if len(rows) > max_pairs:
            rows = [rows[i] for i in torch.randperm(len(rows), generator=rng)[:max_pairs].tolist()]
        tensors = collections.defaultdict(list)
        for row in rows:
            shard = self.shards[row // self.shard_pairs]
            for name in shard.keys():
                tensors[name].append(shard.get_slice(name)[row % self.shard_pairs])
        sides = {"chosen": {}, "rejected": {}}
        for name, values in tensors.items():
            side, feature = name.split("/", 1)
            sides[side][feature] = torch.stack(values).to(device)
        return sides["chosen"], sides["rejected"], len(rows)


def nearest_captions(embeddings: torch.Tensor, count: int) -> list[list[int]]:
    """For every caption, the ``count`` others nearest in cosine similarity (none when count is 0)."""
    if count == 0 or len(embeddings) < 2:
        return [[] for _ in range(len(embeddings))]
    unit = torch.nn.functional.normalize(embeddings.flatten(1), dim=1)
    nearest = []
    for start in range(0, len(unit), 4096):  # [4096, G] similarities at a time
        similarity = unit[start:start + 4096] @ unit.T
        similarity[torch.arange(len(similarity)), torch.arange(start, start + len(similarity))] = -float("inf")
        nearest.extend(similarity.topk(min(count, len(unit) - 1), dim=1).indices.tolist())
    return nearest


class CacheError(RuntimeError):
    """A cache folder that is incomplete or whose files do not match their checksums."""


def verified_index(folder: str) -> dict:
    """The cache's index, after checking every file against the SHA-256 it was written with (hashing the
    whole cache: ~0.5 GB/s, paid once per run, so a shard altered on disk is never trained on)."""
    try:
        with open(os.path.join(folder, INDEX), encoding="utf-8") as handle:
            index = json.load(handle)
    except (OSError, ValueError) as error:
        raise CacheError(f"feature cache {folder}: {INDEX} is missing or damaged ({error})") from error
    for name, digest in index.get("checksums", {}).items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path) or sha256_file(path) != digest:
            raise CacheError(f"feature cache {folder}: {name} is missing or does not match its checksum")
    if "checksums" not in index:
        raise CacheError(f"feature cache {folder} has no checksums (written by an older version)")
    return index


def remove_stale_staging(root: str) -> None:
    """Staging folders of builds whose process is gone (killed mid-build) are removed."""
    if not os.path.isdir(root):
        return
    for name in os.listdir(root):
        if name.startswith(STAGING_PREFIX):
            owner = name.removeprefix(STAGING_PREFIX).split("-", 1)[0]
            if not owner.isdigit() or not process_alive(int(owner)):
                logger.info(f"removing {os.path.join(root, name)}, left by an interrupted cache build")
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def discard_if_damaged(folder: str) -> None:
    """A cache folder that fails its checks is named, removed, and so built again."""
    if not os.path.isdir(folder):
        return
    try:
        verified_index(folder)
    except CacheError as error:
        logger.warning(f"{error}: removing it and encoding the dataset again")
        doomed = f"{folder}.damaged-{os.getpid()}"
        os.replace(folder, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def load_store(config: TrainingConfig, space: str, encode: Callable, embed_caption: Callable,
               main_process: bool) -> PreferenceStore:
    """The cache for this run (built now by the main process if absent or damaged), opened. Logs the data
    counts."""
    data = config.data
    key = cache_key(config, space)
    folder = cache_folder(data, key)
    if main_process:
        remove_stale_staging(cache_root(data))
        discard_if_damaged(folder)
    if main_process and not os.path.isdir(folder):
        counts = collections.Counter()
        logger.info(f"encoding --preference_dataset {data.preference_dataset} into {folder}")
        from tqdm.auto import tqdm

        records = tqdm(open_dataset(data, config.model.cache_dir), desc="encoding preference pairs", unit="record")
        build_cache(folder, key, checked_pairs(records, data, config.model.resolution, counts), encode, embed_caption,
                    counts)
    store = PreferenceStore(folder, data.offline_neighbours)
    logger.info(f"preference data {folder}: {len(store.captions)} prompts, {store.num_pairs} pairs "
                f"({describe_counts(store.counts)})")
    return store
