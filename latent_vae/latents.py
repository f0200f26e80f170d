"""Latent datasets on disk: the format `latent_vae.precompute` writes, and `load_latents` / `verify_latents` read.

A latent dataset DST is parquet shards (🤗 datasets reads them as they are), one per input shard, plus JSON:

    DST/latents.json                 how it was made: model fingerprint, normalisation, resolution, options,
                                     and the names of the input shards
    DST/data/NAME.parquet            the rows of input shard NAME (a tar file's stem, a parquet file's stem,
                                     `part-00000` for the virtual shards of a folder or Dataset)
    DST/manifests/NAME.json          written when shard NAME is complete: input shard, rows, failures,
                                     sha256 of the data file; a shard without one is not done
    DST/claims/NAME.claim            held while a process works on NAME (owner and heartbeat)
    DST/staging/                     shards being written (renamed into data/ once their manifest is in place)
    DST/failures.jsonl, summary.json  all failures and the last run's counts (written when a run completes)

One row per input image:

    key                   the input's identity (relative path, `__key__`, the source's `key` column or --key-column,
                          else `SHARD/ROW`, or the row index for a Dataset)
    mean, std             the raw posterior's mean and standard deviation (before normalisation), as the raw
                          little-endian bytes of `storage_dtype` (parquet has no bfloat16: bytes store bf16,
                          fp16 and fp32 alike, and read back without a per-element Python conversion)
    flip_mean, flip_std   the same for the horizontally mirrored image (with --flip only)
    latent_shape          [C, h, w] of the latent
    original_size         [H, W] of the image as read
    crop_coords_top_left  [top, left] of the crop in the resized image (SDXL's size conditioning)
    target_size           [H, W] of the crop that was encoded
    ...                   the source's other columns, unchanged (captions, labels)

Exactly once: a shard's manifest is published by an exclusive hard link, so of two processes that ever
finish the same shard (a second job started by mistake, a claim taken over from a process that was only
slow) one commits and the other drops its copy; the data file is renamed into place after that.
"""

from __future__ import annotations

import bisect
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

from .atomic import file_sha256, fsync_path, left_by_dead_process, publish_exclusive, unique_tmp_path
from .dtypes import dtype_name, resolve_dtype  # noqa: F401  (dtype_name: for the writer of latents.json)
from .stats import LatentNormalization

FORMAT_NAME = "latent-vae/latents"
FORMAT_VERSION = 2  # 2: one output shard per input shard, manifests, claims
INFO_FILE = "latents.json"
SUMMARY_FILE = "summary.json"
FAILURES_FILE = "failures.jsonl"
DATA_DIR, MANIFEST_DIR, CLAIM_DIR, STAGING_DIR = "data", "manifests", "claims", "staging"
LAYOUT = (INFO_FILE, SUMMARY_FILE, FAILURES_FILE, DATA_DIR, MANIFEST_DIR, CLAIM_DIR, STAGING_DIR)

# Columns the precompute writes; a source column with one of these names would be overwritten, so it is refused.
KEY, MEAN, STD, FLIP_MEAN, FLIP_STD = "key", "mean", "std", "flip_mean", "flip_std"
LATENT_SHAPE, ORIGINAL_SIZE, CROP_TOP_LEFT, TARGET_SIZE = (
    "latent_shape", "original_size", "crop_coords_top_left", "target_size")
RESERVED_COLUMNS = (KEY, MEAN, STD, FLIP_MEAN, FLIP_STD, LATENT_SHAPE, ORIGINAL_SIZE, CROP_TOP_LEFT, TARGET_SIZE)
MOMENT_COLUMNS = (MEAN, STD, FLIP_MEAN, FLIP_STD)
# What `load_latents` items carry in place of the raw moments.
LATENTS, FLIPPED = "latents", "flipped"

# A random read (a shuffled DataLoader) reads a whole row group: about this many bytes of latents each.
ROW_GROUP_BYTES = 256 << 10
# numpy dtype of the stored bytes: bfloat16 has no numpy type, so its bits travel as int16.
_NUMPY_STORAGE = {torch.bfloat16: np.dtype("<i2"), torch.float16: np.dtype("<f2"), torch.float32: np.dtype("<f4")}


def storage_dtype(name: str | torch.dtype) -> torch.dtype:
    """"bf16" / "fp16" / "fp32" (or the long names) -> the torch dtype latents are stored in."""
    dtype = resolve_dtype(name)
    if dtype not in _NUMPY_STORAGE:
        raise ValueError(f"latents are stored as bf16, fp16 or fp32, not {name}")
    return dtype


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
    max_upscale: float  # images needing more upscaling than this were refused as too small
    image_column: str
    key_column: str | None
    passthrough: list[str]  # source columns copied unchanged
    input_shards: list[str]  # every input shard's name: the dataset is complete when each has a manifest
    shard_size: int | None  # rows per virtual shard of an unsharded input (None: the input's own shards)
    input_digest: str | None = None  # sha256 of an unsharded input's keys: a changed folder is not continued
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


def create_or_check(out: Path, info: LatentInfo) -> None:
    """The first run records how the dataset is made; a later or concurrent run must make it the same way."""
    file = out / INFO_FILE
    if not file.is_file():
        # Ignoring our own folders: a concurrent run (another rank) may have created them a moment ago.
        if out.exists() and any(not p.name.startswith(".") and p.name not in LAYOUT for p in out.iterdir()):
            raise ValueError(f"{out} exists and is not a latent dataset: choose an empty or new folder")
        out.mkdir(parents=True, exist_ok=True)
        publish_exclusive(file, info.to_json())  # two runs starting together: the first one's record stands
    old, new = LatentInfo.read(out).settings(), info.settings()
    changed = [k for k in new if old.get(k) != new[k]]
    if changed:
        details = "; ".join(f"{k}: {_short(old.get(k))} -> {_short(new[k])}" for k in changed[:3])
        raise ValueError(f"{out} holds latents made differently ({details}); "
                         "rerun with the original settings and data to continue it, or choose another --out")
    for folder in (DATA_DIR, MANIFEST_DIR, CLAIM_DIR, STAGING_DIR):
        (out / folder).mkdir(exist_ok=True)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# -- writing shards ------------------------------------------------------------------------------------------


def output_features(passthrough, flip: bool):
    """The 🤗 Features of a latent dataset's rows (the passthrough columns keep theirs: a ClassLabel stays one)."""
    import datasets

    ints = datasets.List(datasets.Value("int32"))
    features = {KEY: datasets.Value("string"), MEAN: datasets.Value("binary"), STD: datasets.Value("binary")}
    if flip:
        features.update({FLIP_MEAN: datasets.Value("binary"), FLIP_STD: datasets.Value("binary")})
    features.update({LATENT_SHAPE: ints, ORIGINAL_SIZE: ints, CROP_TOP_LEFT: ints, TARGET_SIZE: ints})
    features.update(passthrough)
    return datasets.Features(features)


class ShardWriter:
    """Streams the rows of one output shard into a staged parquet file, a row group at a time (a shard of
    10,000 1024-px latents never sits in memory); `finish` closes it and returns its checksum."""

    def __init__(self, out: Path, name: str, features) -> None:
        import pyarrow.parquet as pq

        self.name, self.schema = name, features.arrow_schema
        self.staged = unique_tmp_path(out / STAGING_DIR / f"{name}.parquet")
        self._writer = pq.ParquetWriter(str(self.staged), self.schema)
        self._buffer: list[dict] = []
        self._group_rows: int | None = None
        self.rows = 0

    def add(self, row: dict) -> None:
        if self._group_rows is None:  # row groups of about ROW_GROUP_BYTES: cheap random reads at any latent size
            size = sum(len(row[c]) for c in MOMENT_COLUMNS if c in row)
            self._group_rows = max(1, min(1024, ROW_GROUP_BYTES // max(1, size)))
        self._buffer.append(row)
        self.rows += 1
        if len(self._buffer) >= self._group_rows:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self._buffer:
            self._writer.write_table(pa.Table.from_pylist(self._buffer, schema=self.schema))
            self._buffer = []

    def finish(self) -> tuple[Path, str]:
        """(staged file, sha256): complete and on disk."""
        self._flush()
        self._writer.close()
        fsync_path(self.staged)
        return self.staged, file_sha256(self.staged)

    def abort(self) -> None:
        try:
            self._writer.close()
        finally:
            self.staged.unlink(missing_ok=True)


@dataclass
class Manifest:
    """What `manifests/NAME.json` records about a complete output shard."""

    input_shard: str  # NAME: the input shard it came from, and the output's name
    source: str  # where the input shard is (a path, or a description)
    rows: int
    failures: list[dict]  # {"key", "source", "reason", "message"} per input that could not be used
    sha256: str  # of data/NAME.parquet
    staged_file: str  # its name in staging/ before the rename (to finish a commit cut short by a kill)
    host: str = ""
    pid: int = 0
    run_id: str = ""
    written_at: float = 0.0

    @property
    def data_file(self) -> str:
        return f"{self.input_shard}.parquet"

    @classmethod
    def read(cls, file: Path) -> Manifest:
        return cls(**json.loads(file.read_text()))


def commit_shard(out: Path, manifest: Manifest, staged: Path) -> bool:
    """Publish a finished shard exactly once: the manifest first, exclusively; then the data renamed into data/.
    False (and the staged copy deleted) when another process committed this shard first."""
    if not publish_exclusive(out / MANIFEST_DIR / f"{manifest.input_shard}.json", json.dumps(asdict(manifest))):
        staged.unlink(missing_ok=True)
        return False
    data = out / DATA_DIR / manifest.data_file
    try:
        os.replace(staged, data)
    except FileNotFoundError:
        if not data.is_file():  # not a reader finishing our commit for us (shard_state): really lost
            raise
    fsync_path(out / DATA_DIR)
    return True


def shard_state(out: Path, name: str) -> str:
    """"complete", "missing" (no manifest: not done) or "broken" (a manifest whose data file is gone).
    A commit killed between its manifest and its rename is finished here."""
    manifest_file = out / MANIFEST_DIR / f"{name}.json"
    if not manifest_file.is_file():
        return "missing"
    data = out / DATA_DIR / f"{name}.parquet"
    if data.is_file():
        return "complete"
    try:
        staged = out / STAGING_DIR / Manifest.read(manifest_file).staged_file
        os.replace(staged, data)
    except (FileNotFoundError, ValueError, TypeError, json.JSONDecodeError):
        pass
    return "complete" if data.is_file() else "broken"


def clean_staging(out: Path) -> None:
    """Remove what killed processes of this host left in staging/ (their half-written shards); a staged file
    that a manifest names is first renamed into place (a commit cut short between its two steps)."""
    for file in (out / STAGING_DIR).glob(".*.tmp"):
        if left_by_dead_process(file):
            shard_state(out, file.name[1:].split(".parquet.", 1)[0])
            file.unlink(missing_ok=True)


def read_manifests(out: str | os.PathLike, names: list[str] | None = None) -> dict[str, Manifest]:
    """Manifests of the given shards (default: every one on disk), by shard name; shards not done are absent."""
    folder = Path(out) / MANIFEST_DIR
    files = [folder / f"{n}.json" for n in names] if names is not None else sorted(folder.glob("*.json"))
    return {f.stem: Manifest.read(f) for f in files if f.is_file()}


def read_failures(path: str | os.PathLike) -> list[dict]:
    """Every failure recorded in a latent dataset: dicts with key, source, reason and message."""
    return [f for m in read_manifests(path).values() for f in m.failures]


def read_summary(path: str | os.PathLike) -> dict | None:
    """The last completed run's counts, or None before a run has completed."""
    file = Path(path) / SUMMARY_FILE
    return json.loads(file.read_text()) if file.is_file() else None


@dataclass
class DatasetCounts:
    """What the committed shards hold, counted from their manifests."""

    shards: int
    shards_done: int
    rows: int
    failures: int
    failure_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.shards_done == self.shards


def count_dataset(path: str | os.PathLike) -> DatasetCounts:
    info = LatentInfo.read(path)
    manifests = read_manifests(path, info.input_shards)
    reasons = Counter(f["reason"] for m in manifests.values() for f in m.failures)
    done = sum(shard_state(Path(path), n) == "complete" for n in manifests)
    return DatasetCounts(len(info.input_shards), done, sum(m.rows for m in manifests.values()),
                         sum(reasons.values()), dict(reasons))


# -- verifying a dataset ---------------------------------------------------------------------------------------------


@dataclass
class VerifyReport:
    path: str
    shards: int
    shards_done: int
    rows: int
    failures: int
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        verdict = "OK" if self.ok else f"{len(self.problems)} problem(s)"
        return (f"{self.path}: {verdict}: {self.shards_done} of {self.shards} shards complete, {self.rows} rows, "
                f"{self.failures} failures" + (", every key once" if self.ok else ""))


def verify_latents(path: str | os.PathLike, *, checksums: bool = True) -> VerifyReport:
    """Check a latent dataset against its own records: every input shard has a manifest, every manifest's data
    file is there with its row count and sha256, no data file is unaccounted for, and every key (rows and
    failures together) occurs once. Problems are listed, one line each; ValueError if it is no latent dataset."""
    import pyarrow.parquet as pq

    out = Path(path)
    info = LatentInfo.read(out)
    problems: list[str] = []
    manifests = read_manifests(out, info.input_shards)
    missing = [n for n in info.input_shards if n not in manifests]
    if missing:
        problems.append(f"{len(missing)} shard(s) not done: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    key_hashes, rows, failures = [], 0, 0
    for name, manifest in manifests.items():
        data = out / DATA_DIR / manifest.data_file
        failures += len(manifest.failures)
        key_hashes.append(_hash_keys([f["key"] for f in manifest.failures]))
        if shard_state(out, name) != "complete":
            problems.append(f"{name}: manifest without its data file {data}")
            continue
        stored = pq.ParquetFile(data).metadata.num_rows
        rows += stored
        if stored != manifest.rows:
            problems.append(f"{name}: {stored} rows in {data.name}, the manifest says {manifest.rows}")
        if checksums and file_sha256(data) != manifest.sha256:
            problems.append(f"{name}: {data.name} does not match the manifest's sha256 (changed or corrupt)")
        key_hashes.append(_hash_keys(pq.read_table(data, columns=[KEY]).column(KEY).to_pylist()))
    named = {m.data_file for m in manifests.values()}
    orphans = sorted(p.name for p in (out / DATA_DIR).glob("*.parquet") if p.name not in named)
    if orphans:
        problems.append(f"{len(orphans)} data file(s) without a manifest: {', '.join(orphans[:5])}")
    duplicates = _duplicate_keys(out, manifests, np.concatenate(key_hashes) if key_hashes else np.zeros(0, np.uint64))
    if duplicates:
        problems.append(f"{len(duplicates)} key(s) occur more than once: {', '.join(map(str, duplicates[:5]))}")
    return VerifyReport(str(out), len(info.input_shards), len(manifests), rows, failures, problems)


def _hash_keys(keys: list[str]) -> np.ndarray:
    import pandas as pd

    return pd.util.hash_array(np.asarray(keys, dtype=object)) if keys else np.zeros(0, np.uint64)


def _duplicate_keys(out: Path, manifests: dict[str, Manifest], hashes: np.ndarray) -> list[str]:
    """Keys seen twice. 64-bit hashes sorted in numpy keep a billion keys in 8 GB; only the few hashes that
    repeat are looked up again as strings (to tell a true duplicate from a hash collision)."""
    import pyarrow.parquet as pq

    hashes = np.sort(hashes)
    repeated = set(hashes[1:][hashes[1:] == hashes[:-1]].tolist())
    if not repeated:
        return []
    seen: Counter = Counter()
    for manifest in manifests.values():
        keys = [f["key"] for f in manifest.failures]
        data = out / DATA_DIR / manifest.data_file
        if data.is_file():
            keys += pq.read_table(data, columns=[KEY]).column(KEY).to_pylist()
        seen.update(k for k, h in zip(keys, _hash_keys(keys).tolist()) if h in repeated)
    return sorted(k for k, n in seen.items() if n > 1)


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
    """A stored row -> {"latents": normalised float32 CxHxW, "key", size conditioning, passthrough columns...}."""

    def __init__(self, info: LatentInfo, *, sample: bool, flip_probability: float) -> None:
        self.dtype = info.dtype
        self.normalization = info.latent_normalization
        self.sample = sample
        self.flip_probability = flip_probability

    def __call__(self, row: dict) -> dict:
        flipped = self.flip_probability > 0 and random.random() < self.flip_probability
        prefix = "flip_" if flipped else ""
        shape = row[LATENT_SHAPE]
        raw = unpack(row[prefix + MEAN], shape, self.dtype)
        if self.sample:
            # A fresh draw on every read: the posterior's spread acts as augmentation, as on-the-fly encoding.
            raw = raw + unpack(row[prefix + STD], shape, self.dtype) * torch.randn_like(raw)
        item = {LATENTS: self.normalization.normalize(raw.unsqueeze(0))[0]}
        if self.flip_probability > 0:
            item[FLIPPED] = flipped
        item.update((c, v) for c, v in row.items() if c not in MOMENT_COLUMNS)
        return item


class _RowGroups:
    """The row groups of a list of parquet files, read in place (one group cached per process)."""

    def __init__(self, files: list[Path]) -> None:
        import pyarrow.parquet as pq

        self.files = [str(f) for f in files]
        self.groups: list[tuple[int, int]] = []  # (file, row group)
        self.starts: list[int] = []  # first global row of each group
        total = 0
        for number, file in enumerate(self.files):
            metadata = pq.read_metadata(file)
            for group in range(metadata.num_row_groups):
                self.groups.append((number, group))
                self.starts.append(total)
                total += metadata.row_group(group).num_rows
        self.rows = total
        self._cached: tuple[int, int, dict] | None = None  # (pid, group, columns)

    def read(self, group: int) -> dict[str, list]:
        import pyarrow.parquet as pq

        cached = self._cached
        if cached is None or cached[0] != os.getpid() or cached[1] != group:
            file, index = self.groups[group]
            table = pq.ParquetFile(self.files[file], memory_map=True).read_row_group(index)
            cached = self._cached = (os.getpid(), group, table.to_pydict())
        return cached[2]

    def locate(self, row: int) -> tuple[int, int]:
        group = bisect.bisect_right(self.starts, row) - 1
        return group, row - self.starts[group]


class LatentDataset(torch.utils.data.Dataset):
    """Random access to a latent dataset's rows, read in place from its parquet shards (no copy, no cache):
    item i reads its row group (about ROW_GROUP_BYTES), which stays cached for the next items."""

    def __init__(self, files: list[Path], transform: LatentTransform) -> None:
        self.parts, self.transform, self.files = _RowGroups(files), transform, files

    def __len__(self) -> int:
        return self.parts.rows

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} rows")
        group, offset = self.parts.locate(index % len(self))
        columns = self.parts.read(group)
        return self.transform({c: v[offset] for c, v in columns.items()})

    def column(self, name: str) -> list:
        """One stored column for every row, in order (read alone: no latents are decoded)."""
        import pyarrow.parquet as pq

        return [v for f in self.files for v in pq.read_table(f, columns=[name]).column(name).to_pylist()]

    @property
    def features(self):
        import datasets
        import pyarrow.parquet as pq

        return datasets.Features.from_arrow_schema(pq.read_schema(self.files[0]))


class StreamingLatents(torch.utils.data.IterableDataset):
    """The rows of a latent dataset as a stream, split across ranks and DataLoader workers: row groups are dealt
    round-robin to the `world_size x num_workers` readers, so every row is read exactly once per epoch.
    `shuffle` shuffles the order of row groups (the same way on every rank) and the rows within each."""

    def __init__(self, files: list[Path], transform: LatentTransform, *, rank: int, world_size: int,
                 shuffle: bool, seed: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.parts, self.transform = _RowGroups(files), transform
        self.rank, self.world_size, self.shuffle, self.seed, self.epoch = rank, world_size, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict]:
        worker = torch.utils.data.get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
        order = list(range(len(self.parts.groups)))
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        if self.shuffle:
            rng.shuffle(order)  # same seed on every rank: one permutation, dealt out below
        reader, readers = self.rank * workers + worker_id, self.world_size * workers
        local = random.Random(rng.random() + reader)
        for group in order[reader::readers]:
            columns = self.parts.read(group)
            rows = list(range(len(columns[KEY])))
            if self.shuffle:
                local.shuffle(rows)
            for offset in rows:
                yield self.transform({c: v[offset] for c, v in columns.items()})


def _distributed_position(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def load_latents(
    path: str | os.PathLike,
    model: Any = None,
    resolution: int | None = None,
    sample: bool = True,
    *,
    flip_probability: float | None = None,
    allow_incomplete: bool = False,
    streaming: bool = False,
    shuffle: bool = True,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
):
    """A precomputed latent dataset, ready for training, read in place from its parquet shards. Items are
    {"latents": normalised float32 CxHxW tensor, "key", size conditioning, passthrough columns...}.

    Args:
        path: the folder `precompute_latents` / `latent-vae precompute` wrote.
        model: the model training will decode with (LatentCodec, AutoencoderKL, folder, .safetensors or a
            fingerprint); if given, latents made by another model are an error.
        resolution: if given, latents made at another resolution are an error.
        sample: draw a fresh latent from the stored posterior (mean + std * noise) on every read; False gives the mean.
        flip_probability: chance of returning the mirrored image's latents (stored with --flip); default 0.5
            when they are stored, else 0. Items then carry "flipped".
        allow_incomplete: read the complete shards of a dataset whose precompute has not finished.
        streaming: an `IterableDataset` instead of random access: each rank (and each DataLoader worker) reads
            its own share of the row groups, for datasets larger than a node. `rank`/`world_size` default to
            torch.distributed's, else the RANK/WORLD_SIZE variables; `shuffle`/`seed` order the stream
            (`set_epoch` for a new order).

    Map-style (default): a `LatentDataset`; batch it with `DataLoader(dataset, batch_size=..., shuffle=True,
    collate_fn=collate_latents)`; items of different latent shapes (--buckets) cannot share a batch: see
    `BucketBatchSampler`.
    """
    info = LatentInfo.read(path)
    check_compatible(info, path, model=model, resolution=resolution)
    out = Path(path)
    manifests = read_manifests(out, info.input_shards)
    states = {name: shard_state(out, name) for name in manifests}
    done = [n for n in info.input_shards if states.get(n) == "complete"]
    if len(done) < len(info.input_shards) and not allow_incomplete:
        raise ValueError(f"{path}: {len(info.input_shards) - len(done)} of {len(info.input_shards)} shards are not done "
                         "(the precompute has not finished, or was killed); run the same command again to complete it, "
                         "or pass allow_incomplete=True")
    files = [out / DATA_DIR / manifests[n].data_file for n in done if manifests[n].rows > 0]
    if not files:
        raise ValueError(f"{path}: no latents (every input failed? see {out / FAILURES_FILE})")
    if flip_probability is None:
        flip_probability = 0.5 if info.flip else 0.0
    if not 0.0 <= flip_probability <= 1.0:
        raise ValueError(f"flip_probability must be in [0, 1], got {flip_probability}")
    if flip_probability > 0 and not info.flip:
        raise ValueError(f"{path}: no mirrored latents stored (precompute with --flip), so flip_probability must be 0")
    transform = LatentTransform(info, sample=sample, flip_probability=flip_probability)
    if streaming:
        rank, world_size = _distributed_position(rank, world_size)
        return StreamingLatents(files, transform, rank=rank, world_size=world_size, shuffle=shuffle, seed=seed)
    return LatentDataset(files, transform)


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

    def __init__(self, dataset: LatentDataset, batch_size: int, *, shuffle: bool = True, drop_last: bool = False,
                 seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.groups: dict[tuple, list[int]] = {}
        for index, shape in enumerate(dataset.column(LATENT_SHAPE)):  # the raw column: no latents decoded
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
