"""Latent datasets: the on-disk format written by `latent_vae.precompute` and `load_latents` to read it back.

A latent dataset DST is a 🤗 datasets dataset stored as parquet shards, plus two JSON files:

    DST/latents.json              how it was made: model fingerprint, normalisation, resolution, options
    DST/data/train-RRRRR-SSSSS.parquet   shard SSSSS of rank RRRRR (any number of ranks and runs)
    DST/failures/RRRRR-SSSSS.jsonl       inputs that could not be used, with the reason
    DST/failures.jsonl            all failures in one file (written when a run completes)
    DST/summary.json              counts of the last completed run; absent while a run is in progress

One row per input image:

    key                   the input's identity (relative path for a folder, row index or --key-column otherwise)
    mean, std             the raw posterior's mean and standard deviation (before normalisation), as the raw
                          little-endian bytes of `storage_dtype` (parquet has no bfloat16: bytes store bf16,
                          fp16 and fp32 alike, and read back without a per-element Python conversion)
    flip_mean, flip_std   the same for the horizontally mirrored image (with --flip only)
    latent_shape          [C, h, w] of the latent
    original_size         [H, W] of the image as read
    crop_coords_top_left  [top, left] of the crop in the resized image (SDXL's size conditioning)
    target_size           [H, W] of the crop that was encoded
    ...                   the source's other columns, unchanged (captions, labels)

`datasets.load_dataset("parquet", data_dir=f"{DST}/data")` reads the raw rows; `load_latents(DST)` gives the
dataset a diffusion model trains on: normalised latents, checked against the model and resolution.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .stats import LatentNormalization

FORMAT_NAME = "latent-vae/latents"
FORMAT_VERSION = 1
INFO_FILE = "latents.json"
SUMMARY_FILE = "summary.json"
FAILURES_FILE = "failures.jsonl"
DATA_DIR = "data"
FAILURES_DIR = "failures"

# Columns the precompute writes; a source column with one of these names would be overwritten, so it is refused.
KEY, MEAN, STD, FLIP_MEAN, FLIP_STD = "key", "mean", "std", "flip_mean", "flip_std"
LATENT_SHAPE, ORIGINAL_SIZE, CROP_TOP_LEFT, TARGET_SIZE = (
    "latent_shape", "original_size", "crop_coords_top_left", "target_size")
RESERVED_COLUMNS = (KEY, MEAN, STD, FLIP_MEAN, FLIP_STD, LATENT_SHAPE, ORIGINAL_SIZE, CROP_TOP_LEFT, TARGET_SIZE)
# What `load_latents` items carry in place of the raw moments.
LATENTS, FLIPPED = "latents", "flipped"

STORAGE_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                  "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}
# numpy dtype of the stored bytes: bfloat16 has no numpy type, so its bits travel as int16.
_NUMPY_STORAGE = {torch.bfloat16: np.dtype("<i2"), torch.float16: np.dtype("<f2"), torch.float32: np.dtype("<f4")}


def storage_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        if name not in _NUMPY_STORAGE:
            raise ValueError(f"latents are stored as bf16, fp16 or fp32, not {name}")
        return name
    if name not in STORAGE_DTYPES:
        raise ValueError(f"unknown storage dtype {name!r}; choose bf16, fp16 or fp32")
    return STORAGE_DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def pack(tensor: torch.Tensor, dtype: torch.dtype) -> list[bytes]:
    """float N x ... -> one little-endian byte string per item, in the storage dtype"""
    values = tensor.detach().to(dtype).cpu().contiguous()
    if dtype == torch.bfloat16:
        values = values.view(torch.int16)
    array = values.numpy().astype(_NUMPY_STORAGE[dtype], copy=False)  # astype: little-endian on any machine
    return [item.tobytes() for item in array]


def unpack(data: bytes, shape: tuple[int, ...] | list[int], dtype: torch.dtype) -> torch.Tensor:
    """bytes written by `pack` -> float32 tensor of `shape`"""
    array = np.frombuffer(data, dtype=_NUMPY_STORAGE[dtype]).astype(_NUMPY_STORAGE[dtype].newbyteorder("="))
    tensor = torch.from_numpy(array)
    if dtype == torch.bfloat16:
        tensor = tensor.view(torch.bfloat16)
    return tensor.float().reshape(tuple(shape))


# -- what the dataset records about itself ---------------------------------------------------------------


@dataclass
class LatentInfo:
    """Everything `latents.json` records: what produced the latents and how to read them."""

    fingerprint: str  # latent_vae.model_fingerprint of the model (weights, architecture, normalisation)
    normalization: dict  # LatentNormalization.to_config() of that model
    latent_channels: int
    downsampling_factor: int
    resolution: int  # the side of the square crop, or the side of the buckets' common area
    buckets: list[list[int]] | None  # [[H, W], ...] when bucketing, else None (square crops)
    flip: bool  # whether mirrored latents are stored
    storage_dtype: str  # "bfloat16", "float16" or "float32": the dtype of the bytes in mean/std
    encode_dtype: str  # the dtype the encoder ran in
    tile_size: int | None  # tiled encoding above this size (None: whole images)
    max_upscale: float  # images needing more upscaling than this were refused as too small
    image_column: str
    key_column: str | None
    passthrough: list[str]  # source columns copied unchanged
    model_source: str | None = None  # how the model was named (for people; the fingerprint is what counts)
    data_source: str | None = None  # what SRC was (for people)
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION
    # Facts that do not have to match for a rerun to continue a dataset.
    _COSMETIC = ("model_source", "data_source")

    @property
    def dtype(self) -> torch.dtype:
        return storage_dtype(self.storage_dtype)

    @property
    def latent_normalization(self) -> LatentNormalization:
        return LatentNormalization.from_config(self.normalization)

    def settings(self) -> dict:
        """The fields that decide the rows' contents: a rerun must match them to add to the same dataset."""
        return {k: v for k, v in asdict(self).items() if k not in self._COSMETIC}

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def read(cls, path: str | os.PathLike) -> LatentInfo:
        folder = Path(path)
        file = folder / INFO_FILE
        if not file.is_file():
            raise ValueError(f"{folder}: not a latent dataset (no {INFO_FILE}); make one with `latent-vae precompute`")
        data = json.loads(file.read_text())
        if data.get("format") != FORMAT_NAME or data.get("version") != FORMAT_VERSION:
            raise ValueError(f"{file}: format {data.get('format')!r} version {data.get('version')!r}, "
                             f"this package reads {FORMAT_NAME!r} version {FORMAT_VERSION}")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def atomic_write_text(path: Path, text: str) -> None:
    """Write-then-rename: a reader (or a rerun after SIGKILL) sees the old file or the new one, never half."""
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def shard_files(path: str | os.PathLike) -> list[Path]:
    """Committed parquet shards (temporary files start with a dot and are never listed)."""
    return sorted((Path(path) / DATA_DIR).glob("train-*.parquet"))


def failure_files(path: str | os.PathLike) -> list[Path]:
    return sorted((Path(path) / FAILURES_DIR).glob("[0-9]*.jsonl"))


def read_failures(path: str | os.PathLike) -> list[dict]:
    """Every failure recorded in a latent dataset: dicts with key, source, reason and message."""
    failures = []
    for file in failure_files(path):
        failures += [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    return failures


def read_summary(path: str | os.PathLike) -> dict | None:
    """The last completed run's counts, or None while a run is in progress (or was killed)."""
    file = Path(path) / SUMMARY_FILE
    return json.loads(file.read_text()) if file.is_file() else None


@dataclass
class DatasetCounts:
    """What is on disk now, counted from the committed files themselves."""

    rows: int = 0
    unique_keys: int = 0
    shards: int = 0
    failures: int = 0
    failure_reasons: dict[str, int] = field(default_factory=dict)
    keys: set[str] = field(default_factory=set, repr=False)
    failed_keys: set[str] = field(default_factory=set, repr=False)

    @property
    def done_keys(self) -> set[str]:
        return self.keys | self.failed_keys


def count_dataset(path: str | os.PathLike) -> DatasetCounts:
    """Rows, keys and failures committed so far: the record of done inputs a rerun skips."""
    import pyarrow.parquet as pq

    counts = DatasetCounts()
    for file in shard_files(path):
        keys = pq.read_table(file, columns=[KEY]).column(KEY).to_pylist()
        counts.rows += len(keys)
        counts.keys.update(keys)
        counts.shards += 1
    failures = read_failures(path)
    counts.failures = len(failures)
    counts.failed_keys = {f["key"] for f in failures}
    counts.failure_reasons = dict(Counter(f["reason"] for f in failures))
    counts.unique_keys = len(counts.keys)
    return counts


# -- reading latents back for training ---------------------------------------------------------------------


def _fingerprint_of(model: Any) -> str:
    """A model given any way (LatentCodec, AutoencoderKL, folder, .safetensors, fingerprint string) -> fingerprint"""
    from diffusers import AutoencoderKL

    from .codec import LatentCodec
    from .model import load_vae, model_fingerprint

    if isinstance(model, LatentCodec):
        return model.fingerprint
    if isinstance(model, AutoencoderKL):
        return model_fingerprint(model)
    is_hex16 = isinstance(model, str) and len(model) == 16 and all(c in "0123456789abcdef" for c in model)
    if is_hex16 and not Path(model).exists():  # a fingerprint, not a folder that happens to look like one
        return model
    return model_fingerprint(load_vae(model))


def check_compatible(info: LatentInfo, path: str | os.PathLike, *, model: Any = None,
                     resolution: int | None = None) -> None:
    """A stale cache is a silent bug: refuse latents made by another model or at another resolution."""
    if model is not None:
        fingerprint = _fingerprint_of(model)
        if fingerprint != info.fingerprint:
            raise ValueError(
                f"{path}: latents were made by model {info.fingerprint} ({info.model_source or 'unnamed'}), "
                f"not by the given model {fingerprint}; recompute them with `latent-vae precompute --model ...` "
                "or load them with the model that made them")
    if resolution is not None and int(resolution) != info.resolution:
        raise ValueError(f"{path}: latents were made at resolution {info.resolution}, not {resolution}; "
                         f"recompute them with `latent-vae precompute --resolution {resolution}`")


class LatentTransform:
    """datasets transform: stored rows -> {"latents": normalised float32 CxHxW, passthrough columns...}.

    A class rather than a closure so that DataLoader workers can pickle it.
    """

    def __init__(self, info: LatentInfo, *, sample: bool, flip_probability: float) -> None:
        self.dtype = info.dtype
        self.normalization = info.latent_normalization
        self.sample = sample
        self.flip_probability = flip_probability

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        n = len(batch[KEY])
        out: dict[str, list] = {LATENTS: []}
        flips = [self.flip_probability > 0 and random.random() < self.flip_probability for _ in range(n)]
        for i in range(n):
            prefix = "flip_" if flips[i] else ""
            shape = batch[LATENT_SHAPE][i]
            raw = unpack(batch[prefix + MEAN][i], shape, self.dtype)
            if self.sample:
                # A fresh draw on every read: the posterior's spread acts as augmentation, as on-the-fly encoding.
                raw = raw + unpack(batch[prefix + STD][i], shape, self.dtype) * torch.randn_like(raw)
            out[LATENTS].append(self.normalization.normalize(raw.unsqueeze(0))[0])
        if self.flip_probability > 0:
            out[FLIPPED] = flips
        for column, values in batch.items():
            if column not in (MEAN, STD, FLIP_MEAN, FLIP_STD):
                out[column] = values
        return out


def load_latents(
    path: str | os.PathLike,
    model: Any = None,
    resolution: int | None = None,
    sample: bool = True,
    *,
    flip_probability: float | None = None,
    allow_incomplete: bool = False,
    cache_dir: str | os.PathLike | None = None,
):
    """A precomputed latent dataset, ready for training: a `datasets.Dataset` whose items are
    {"latents": normalised float32 CxHxW tensor, "key", size conditioning, passthrough columns...}.

    Args:
        path: the folder `precompute_latents` / `latent-vae precompute` wrote.
        model: the model training will decode with (LatentCodec, AutoencoderKL, folder, .safetensors or a
            fingerprint); if given, latents made by another model are an error.
        resolution: if given, latents made at another resolution are an error.
        sample: draw a fresh latent from the stored posterior (mean + std * noise) on every read; False gives the mean.
        flip_probability: chance of returning the mirrored image's latents (stored with --flip); default 0.5
            when they are stored, else 0. Items then carry "flipped".
        allow_incomplete: read a dataset whose last precompute run did not finish (otherwise an error).
        cache_dir: 🤗 datasets cache for the converted shards (default: the datasets cache).

    Batch with `DataLoader(dataset, batch_size=..., collate_fn=collate_latents)`; items of different latent
    shapes (--buckets) cannot share a batch: see `BucketBatchSampler`.
    """
    import datasets

    info = LatentInfo.read(path)
    check_compatible(info, path, model=model, resolution=resolution)
    if read_summary(path) is None and not allow_incomplete:
        raise ValueError(f"{path}: the precompute run that writes it has not finished (or was killed); "
                         "run the same command again to complete it, or pass allow_incomplete=True")
    shards = shard_files(path)
    if not shards:
        raise ValueError(f"{path}: no latents (every input failed? see {Path(path) / FAILURES_FILE})")
    if flip_probability is None:
        flip_probability = 0.5 if info.flip else 0.0
    if not 0.0 <= flip_probability <= 1.0:
        raise ValueError(f"flip_probability must be in [0, 1], got {flip_probability}")
    if flip_probability > 0 and not info.flip:
        raise ValueError(f"{path}: no mirrored latents stored (precompute with --flip), so flip_probability must be 0")
    dataset = datasets.load_dataset("parquet", data_files=[str(s) for s in shards], split="train",
                                    cache_dir=str(cache_dir) if cache_dir else None)
    dataset.set_transform(LatentTransform(info, sample=sample, flip_probability=flip_probability))
    return dataset


def collate_latents(items: list[dict]) -> dict:
    """DataLoader collate_fn for `load_latents` items: latents stacked into NxCxhxw, every other column a list
    (torch's default collate refuses None, which a caption missing from metadata.jsonl is)."""
    batch = {key: [item[key] for item in items] for key in items[0]}
    batch[LATENTS] = torch.stack(batch[LATENTS])
    return batch


class BucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of indices whose latents share one shape (aspect-ratio buckets), shuffled per epoch.

    `DataLoader(dataset, batch_sampler=BucketBatchSampler(dataset, 16))`; call `set_epoch` for a new order.
    """

    def __init__(self, dataset, batch_size: int, *, shuffle: bool = True, drop_last: bool = False, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        shapes = dataset.with_format(None)[LATENT_SHAPE]  # the raw column: no latents are decoded for this
        self.groups: dict[tuple, list[int]] = {}
        for index, shape in enumerate(shapes):
            self.groups.setdefault(tuple(shape), []).append(index)
        self.batch_size, self.shuffle, self.drop_last, self.seed, self.epoch = batch_size, shuffle, drop_last, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        rng = random.Random(self.seed + self.epoch)
        batches = []
        for indices in self.groups.values():
            indices = list(indices)
            if self.shuffle:
                rng.shuffle(indices)
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start:start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        round_ = math.floor if self.drop_last else math.ceil
        return sum(round_(len(g) / self.batch_size) for g in self.groups.values())

