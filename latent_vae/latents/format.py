"""Latent datasets: the format `latent_vae.latents.precompute` writes, and `load_latents` / `verify_latents` read.

A latent dataset DST (a folder, or a prefix of an object store: `latent_vae.latents.storage` owns the layout) is
parquet shards (🤗 datasets reads them as they are), one per input shard, plus JSON:

    DST/latents.json                 how it was made: model fingerprint, normalisation, resolution, options,
                                     and the names of the input shards
    DST/data/NAME.parquet            the rows of input shard NAME (a tar file's stem, a parquet file's stem,
                                     `part-00000` for the virtual shards of a folder or Dataset); on an object
                                     store NAME.ATTEMPT.parquet, the attempt that committed it
    DST/manifests/NAME.json          written when shard NAME is complete: input shard, rows, failures,
                                     its data file and that file's sha256; a shard without one is not done
    DST/claims/NAME.claim            held while a process works on NAME (owner and heartbeat)
    DST/staging/                     a local folder's shards being written (renamed into data/ once their
                                     manifest is in place)
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

Exactly once: a shard's manifest is published by the store's exclusive create (a hard link; an object store's
`If-None-Match: *`), so of two processes that ever finish the same shard (a second job started by mistake, a
claim taken over from a process that was only slow) one commits and the other drops its copy.
"""


from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..models.normalization import LatentNormalization
from ..utils.dtypes import resolve_dtype
from ..utils.errors import short_repr
from ..utils.file_boundary import bad_file, json_record
from .locations import open_store
from .storage import (  # noqa: F401 -- the layout's names, read from here too
    CLAIM_DIR,
    DATA_DIR,
    FAILURES_FILE,
    INFO_FILE,
    LAYOUT,
    MANIFEST_DIR,
    STAGING_DIR,
    SUMMARY_FILE,
    DatasetStore,
    manifest_key,
)

FORMAT_NAME = "latent-vae/latents"
FORMAT_VERSION = 2  # 2: one output shard per input shard, manifests, claims

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
    # The posterior's noise over the dataset (`PosteriorStats.record()` of every manifest), recorded when a run
    # completes; the manifests hold the sums it comes from.
    posterior: dict | None = None
    # Facts that do not have to match for a rerun to continue a dataset.
    _COSMETIC = ("model_source", "data_source", "posterior")

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
    def read(cls, path: str | os.PathLike | DatasetStore) -> LatentInfo:
        store = open_store(path)
        try:
            data = read_record(store, INFO_FILE, "latent dataset record")
        except FileNotFoundError:
            raise ValueError(f"{store.where()}: not a latent dataset (no {INFO_FILE}); make one with "
                             "`latent-vae precompute`") from None
        file = store.where(INFO_FILE)
        if data.get("format") != FORMAT_NAME or data.get("version") != FORMAT_VERSION:
            raise ValueError(f"{file}: format {short_repr(data.get('format'))} version {short_repr(data.get('version'))}, "
                             f"this package reads {FORMAT_NAME!r} version {FORMAT_VERSION}")
        return _record(cls, data, file)


def read_record(store: DatasetStore, key: str, what: str) -> dict:
    """One of the dataset's JSON records; FileNotFoundError when there is none, ValueError naming a bad one."""
    try:
        data = store.read_bytes(key)
    except FileNotFoundError:
        raise
    except OSError as error:
        raise bad_file(store.where(key), what, error) from None
    return json_record(data, store.where(key), what=what)


def create_or_check(store: DatasetStore, info: LatentInfo) -> None:
    """The first run records how the dataset is made; a later or concurrent run must make it the same way."""
    if not store.exists(INFO_FILE):
        # Ignoring our own folders: a concurrent run (another rank) may have created them a moment ago.
        if store.foreign_entries():
            raise ValueError(f"{store.where()} exists and is not a latent dataset: choose an empty or new folder")
        store.make_folders()
        store.publish(INFO_FILE, info.to_json().encode())  # two runs starting together: the first one's record stands
    old, new = LatentInfo.read(store).settings(), info.settings()
    changed = [k for k in new if old.get(k) != new[k]]
    if changed:
        details = "; ".join(f"{k}: {short_repr(old.get(k))} -> {short_repr(new[k])}" for k in changed[:3])
        raise ValueError(f"{store.where()} holds latents made differently ({details}); "
                         "rerun with the original settings and data to continue it, or choose another --out")
    store.make_folders()


@dataclass
class Manifest:
    """What `manifests/NAME.json` records about a complete output shard."""

    input_shard: str  # NAME: the input shard it came from, and the output's name
    source: str  # where the input shard is (a path, or a description)
    rows: int
    failures: list[dict]  # {"key", "source", "reason", "message"} per input that could not be used
    sha256: str  # of its data file
    staged_file: str  # the data file's name in staging/ before the rename (to finish a commit cut short by a kill)
    host: str = ""
    pid: int = 0
    run_id: str = ""
    written_at: float = 0.0
    data_file: str = ""  # its name in data/: NAME.parquet, or NAME.ATTEMPT.parquet on an object store
    posterior: dict | None = None  # its rows' `PosteriorStats.record()`: how noisy a posterior sample is

    def __post_init__(self) -> None:
        self.data_file = self.data_file or f"{self.input_shard}.parquet"

    @classmethod
    def read(cls, store: DatasetStore, name: str) -> Manifest:
        """Shard `name`'s manifest; FileNotFoundError when the shard is not done."""
        key = manifest_key(name)
        return _record(cls, read_record(store, key, "shard manifest"), store.where(key))


def _record(cls, data: dict, file: str):
    """A record dataclass from a JSON object; a missing field, or one of the wrong type, is a ValueError naming the
    file and the field (a damaged or hand-edited record must not pass as a sound one)."""
    import types
    import typing

    hints = typing.get_type_hints(cls)
    known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and not k.startswith("_")}
    for name, value in known.items():
        hint = hints[name]
        members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        kinds = tuple(typing.get_origin(k) or k for k in members)
        kinds += (int,) if float in kinds else ()  # JSON writes 2.0 as 2.0, but a hand-written 2 is a float too
        if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
            raise ValueError(f"{file}: {name} is {short_repr(value)}, not a {' or '.join(k.__name__ for k in kinds)}")
    try:
        return cls(**known)
    except TypeError as error:  # a field missing
        raise ValueError(f"{file}: not a complete record ({error})") from None


def read_manifests(out: str | os.PathLike | DatasetStore, names: list[str] | None = None) -> dict[str, Manifest]:
    """Manifests of the given shards (default: every one in the store), by shard name; shards not done are absent."""
    store = open_store(out)
    if names is None:
        names = [file.removesuffix(".json") for file in store.list(MANIFEST_DIR, ".json")]

    def read(name: str) -> Manifest | None:
        try:
            return Manifest.read(store, name)
        except FileNotFoundError:
            return None

    return {name: manifest for name, manifest in zip(names, store.map(read, names)) if manifest is not None}


def read_failures(path: str | os.PathLike | DatasetStore) -> list[dict]:
    """Every failure recorded in a latent dataset: dicts with key, source, reason and message."""
    return [f for m in read_manifests(path).values() for f in m.failures]


def read_summary(path: str | os.PathLike | DatasetStore) -> dict | None:
    """The last completed run's counts, or None before a run has completed."""
    store = open_store(path)
    try:
        return read_record(store, SUMMARY_FILE, "run summary")
    except FileNotFoundError:
        return None
