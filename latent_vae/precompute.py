"""`latent-vae precompute`: encode a dataset's images once into a latent dataset (format: `latent_vae.latents`).

How the run is organised, and why:
- Images are read, resized and cropped in DataLoader workers while the main process encodes batches:
  decoding overlaps encoding, so the encoder sets the pace.
- Every input has a key. Rank r of W takes inputs i with i % W == r, so ranks never share an input
  whatever the timing, and each rank writes its own shards (`torchrun`/`accelerate launch`).
- A shard is written to a hidden temporary file and renamed into place: it exists whole or not at all.
  The record of done inputs is the committed shards and failure files themselves, so after SIGKILL the
  same command skips exactly the committed inputs and redoes the rest: nothing lost, nothing twice.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from . import latents as fmt
from .datasets_on_disk import open_saved_dataset, pick_split, read_table_files
from .images import to_rgb

# Files in an image folder that describe images rather than being images.
METADATA_FILE = "metadata.jsonl"
CAPTION_SUFFIX = ".txt"
FOLDER_IMAGE_COLUMN = "image"


@dataclass
class PrecomputeOptions:
    """Everything a precompute run can be told besides the model, the data and the output folder."""

    resolution: int = 1024  # side of the square crop, or of the buckets' common area
    buckets: bool = False  # aspect-ratio buckets of about resolution**2 pixels instead of square crops
    bucket_step: int | None = None  # bucket sides are multiples of this (default: the model's downsampling factor)
    max_aspect: float = 4.0  # the most elongated bucket (long side / short side)
    flip: bool = False  # also store the latents of the horizontally mirrored image
    dtype: str = "bf16"  # storage dtype of mean/std: bf16, fp16 or fp32
    encode_dtype: str = "fp32"  # the encoder's dtype (bf16 is much faster on recent GPUs)
    device: str | None = None  # default: this process's accelerator (cuda:LOCAL_RANK under torchrun), else cpu
    batch_size: int = 8  # images per encoder forward pass (twice that with flip)
    num_workers: int | None = None  # DataLoader workers decoding images (default: the CPUs this process can spare)
    shard_size: int = 512  # rows per parquet shard: the most work a kill can lose
    max_upscale: float = 1.0  # images needing more upscaling than this to fill the crop are skipped as too small
    tile_size: int | None = None  # encode images larger than this in tiles (bounds memory); None: whole images
    channels_last: bool = False
    image_column: str | None = None  # for datasets sources: the image column (default: the only Image column)
    key_column: str | None = None  # for datasets sources: a column of unique ids (default: the row index)
    caption_column: str = "text"  # for image folders: the column `.txt` captions go to (as diffusers' scripts)
    split: str | None = None  # for a saved DatasetDict: which split (default: train, or the only one)
    cache_dir: str | None = None  # 🤗 datasets cache for parquet sources
    progress: bool = True

    def validate(self) -> None:
        if self.resolution < 1:
            raise ValueError(f"resolution must be positive, got {self.resolution}")
        for name in ("batch_size", "shard_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_upscale < 1.0:
            raise ValueError(f"max_upscale must be at least 1.0 (1.0: never upscale), got {self.max_upscale}")
        if self.max_aspect < 1.0:
            raise ValueError(f"max_aspect must be at least 1.0, got {self.max_aspect}")
        fmt.storage_dtype(self.dtype)


# -- sources -------------------------------------------------------------------------------------------------


@dataclass
class Source:
    """The inputs: a datasets.Dataset whose image column is undecoded ({"bytes", "path"}), with one key per row."""

    dataset: Any  # datasets.Dataset
    image_column: str
    keys: list[str]
    key_column: str | None
    description: str

    @property
    def passthrough(self) -> list[str]:
        return [c for c in self.dataset.column_names if c != self.image_column]


def _folder_rows(folder: Path, caption_column: str) -> dict[str, list]:
    """An image folder as columns: every file but captions, metadata and hidden files is an input (a file
    that turns out not to be an image is listed as a failure, not silently ignored)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts)
                   and p.name != METADATA_FILE and p.suffix.lower() != CAPTION_SUFFIX)
    # metadata.jsonl anywhere, file_name relative to its own folder (🤗 imagefolder's convention).
    metadata: dict[Path, dict] = {}
    for meta_file in sorted(folder.rglob(METADATA_FILE)):
        for number, line in enumerate(meta_file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{meta_file}:{number}: not JSON ({error.msg})") from None
            if not isinstance(entry, dict) or "file_name" not in entry:
                raise ValueError(f"{meta_file}:{number}: each line needs a \"file_name\"")
            metadata[(meta_file.parent / entry.pop("file_name")).resolve()] = entry
    columns = ["file_name"] + sorted({k for entry in metadata.values() for k in entry} - {"file_name"})
    has_captions = any(p.with_suffix(CAPTION_SUFFIX).is_file() for p in files)
    if has_captions and caption_column not in columns:
        columns.append(caption_column)
    rows: dict[str, list] = {FOLDER_IMAGE_COLUMN: [], **{c: [] for c in columns}}
    for path in files:
        entry = metadata.get(path.resolve(), {})
        rows[FOLDER_IMAGE_COLUMN].append(str(path))
        rows["file_name"].append(path.relative_to(folder).as_posix())
        for column in columns[1:]:
            rows[column].append(entry.get(column))
        caption_file = path.with_suffix(CAPTION_SUFFIX)
        if has_captions and rows[caption_column][-1] is None and caption_file.is_file():
            rows[caption_column][-1] = caption_file.read_text().strip()
    return rows


def open_source(data: Any, options: PrecomputeOptions) -> Source:
    """SRC -> Source: an image folder, a save_to_disk folder, parquet/arrow files (a path, a glob or a list),
    or a datasets.Dataset / DatasetDict."""
    import datasets

    if isinstance(data, (datasets.Dataset, datasets.DatasetDict)):
        return _dataset_source(pick_split(data, options.split, "the dataset"), options, f"{type(data).__name__}")
    if isinstance(data, (str, os.PathLike)):
        text = str(data)
        if any(c in text for c in "*?["):
            files = [Path(p) for p in sorted(glob.glob(text))]
            return _dataset_source(read_table_files(files, text, options.cache_dir), options, text)
        path = Path(text).expanduser()
        if not path.exists():
            raise ValueError(f"{text}: no such file or folder")
        dataset = open_saved_dataset(path, options.split, options.cache_dir)
        if dataset is not None:
            return _dataset_source(dataset, options, text)
        rows = _folder_rows(path, options.caption_column)
        if not rows[FOLDER_IMAGE_COLUMN]:
            raise ValueError(f"{text}: an empty folder (no images, parquet or arrow files)")
        dataset = datasets.Dataset.from_dict(rows).cast_column(FOLDER_IMAGE_COLUMN, datasets.Image(decode=False))
        return Source(dataset, FOLDER_IMAGE_COLUMN, rows["file_name"], "file_name", text)
    if isinstance(data, (list, tuple)) and data and all(isinstance(d, (str, os.PathLike)) for d in data):
        files = [Path(d) for d in data]
        return _dataset_source(read_table_files(files, str(data[0]), options.cache_dir), options, f"{len(data)} files")
    raise ValueError(f"unsupported data source of type {type(data).__name__}: pass an image folder, a datasets "
                     "folder, parquet or arrow files, or a datasets.Dataset")


def _dataset_source(dataset, options: PrecomputeOptions, description: str) -> Source:
    import datasets

    image_columns = [c for c, f in dataset.features.items() if isinstance(f, datasets.Image)]
    column = options.image_column
    if column is None:
        if len(image_columns) != 1:
            found = f"image columns {', '.join(image_columns)}" if image_columns else "no Image column"
            raise ValueError(f"{description} has {found} (columns: {', '.join(dataset.column_names)}): "
                             "name the image column with --image-column")
        column = image_columns[0]
    if column not in dataset.column_names:
        raise ValueError(f"{description} has no column {column!r} (columns: {', '.join(dataset.column_names)})")
    feature = dataset.features[column]
    if not (isinstance(feature, datasets.Image) or getattr(feature, "dtype", None) in ("string", "large_string")):
        raise ValueError(f"column {column!r} holds {feature}, not images or image paths")
    # Undecoded images: workers decode them, and a corrupt one becomes a failure of its row, not a crash.
    for name in image_columns:
        dataset = dataset.cast_column(name, datasets.Image(decode=False))
    if column not in image_columns:
        dataset = dataset.cast_column(column, datasets.Image(decode=False))
    clashes = [c for c in dataset.column_names if c in fmt.RESERVED_COLUMNS and c != column]
    if clashes:
        raise ValueError(f"{description}: column(s) {', '.join(clashes)} clash with the latent dataset's own "
                         f"columns ({', '.join(fmt.RESERVED_COLUMNS)}); rename them first")
    if options.key_column is not None:
        if options.key_column not in dataset.column_names:
            raise ValueError(f"{description} has no key column {options.key_column!r}")
        keys = [str(k) for k in dataset[options.key_column]]
        if len(set(keys)) != len(keys):
            raise ValueError(f"key column {options.key_column!r} has repeated values: keys must be unique")
    else:
        keys = [str(i) for i in range(len(dataset))]
    if not keys:
        raise ValueError(f"{description}: no rows")
    return Source(dataset, column, keys, options.key_column, description)


# -- preprocessing --------------------------------------------------------------------------------------------


def make_buckets(resolution: int, step: int, max_aspect: float = 4.0) -> list[tuple[int, int]]:
    """(H, W) buckets of at most resolution**2 pixels, sides multiples of `step`, from 1:max_aspect to max_aspect:1
    (SDXL's recipe: for each width, the tallest height that keeps the area)."""
    if resolution % step:
        raise ValueError(f"resolution {resolution} is not a multiple of the bucket step {step}")
    area = resolution * resolution
    buckets = set()
    for width in range(step, int(resolution * math.sqrt(max_aspect)) + step, step):
        height = (area // width) // step * step
        if height >= step and max(width / height, height / width) <= max_aspect + 1e-9:
            buckets.add((height, width))
    return sorted(buckets, key=lambda hw: hw[1] / hw[0])


def nearest_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest (in log ratio, so 2:1 and 1:2 are equally far from 1:1)."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda hw: abs(math.log(hw[1] / hw[0]) - ratio))


@dataclass(frozen=True)
class Crop:
    target: tuple[int, int]  # (H, W) encoded
    box: tuple[float, float, float, float]  # (left, top, right, bottom) in the original image
    scale: float  # resize factor original -> target
    top_left: tuple[int, int]  # (top, left) of the crop in the resized image: SDXL's crops_coords_top_left


def centre_crop(height: int, width: int, target: tuple[int, int]) -> Crop:
    """Resize so the image covers `target`, then cut the middle out."""
    th, tw = target
    scale = max(th / height, tw / width)
    box_w, box_h = tw / scale, th / scale
    # Clamped: rounding can put the box a hair outside the image, which Pillow refuses.
    left, top = max(0.0, (width - box_w) / 2), max(0.0, (height - box_h) / 2)
    box = (left, top, min(float(width), left + box_w), min(float(height), top + box_h))
    return Crop(target, box, scale, (round(top * scale), round(left * scale)))


class SkipImage(Exception):
    """An input that cannot be used; `reason` is one short word for counting."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def open_image(value: dict | str) -> Image.Image:
    """An undecoded datasets Image ({"bytes", "path"}) or a path -> RGB PIL image, fully decoded."""
    data, path = (value.get("bytes"), value.get("path")) if isinstance(value, dict) else (None, value)
    if data is None:
        if not path:
            raise SkipImage("missing", "no image (neither bytes nor a path)")
        if not os.path.isfile(path):
            raise SkipImage("missing", f"{path}: no such file")
        if os.path.getsize(path) == 0:
            raise SkipImage("empty", "empty file")
        source: Any = path
    else:
        if len(data) == 0:
            raise SkipImage("empty", "empty image bytes")
        source = io.BytesIO(data)
    try:
        with Image.open(source) as image:
            image.load()
            image = ImageOps.exif_transpose(image)  # camera photos are stored sideways with a rotation tag
            return to_rgb(image)
    except UnidentifiedImageError:
        raise SkipImage("unsupported", "not an image, or an image format Pillow cannot read") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise SkipImage("corrupt", f"corrupt or truncated image ({error})") from None


class PreprocessedImages(torch.utils.data.Dataset):
    """Row i of the pending list -> its resized, cropped pixels (uint8 3xHxW), or why it was skipped.

    Runs in DataLoader workers. uint8 crosses the process boundary: 4x less than float.
    """

    def __init__(self, source: Source, indices: list[int], options: PrecomputeOptions,
                 buckets: list[tuple[int, int]] | None) -> None:
        self.dataset = source.dataset
        self.image_column = source.image_column
        self.keys = source.keys
        self.indices = indices
        self.options = options
        self.buckets = buckets

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict:
        index = self.indices[position]
        row = self.dataset[index]
        value = row.pop(self.image_column)
        item = {"key": self.keys[index], "source": _describe(value, index), "passthrough": row}
        try:
            image = open_image(value)
            width, height = image.size
            target = (nearest_bucket(height, width, self.buckets) if self.buckets
                      else (self.options.resolution, self.options.resolution))
            crop = centre_crop(height, width, target)
            if crop.scale > self.options.max_upscale + 1e-9:
                raise SkipImage("too_small", f"{width}x{height} is too small for {target[1]}x{target[0]} "
                                f"(needs {crop.scale:.2f}x upscaling, at most {self.options.max_upscale:g}x allowed)")
            pixels = image.resize((target[1], target[0]), Image.Resampling.LANCZOS, box=crop.box, reducing_gap=3.0)
        except SkipImage as skip:
            return {**item, "ok": False, "reason": skip.reason, "message": str(skip)}
        return {**item, "ok": True, "pixels": torch.from_numpy(np.asarray(pixels).copy()).permute(2, 0, 1),
                "original_size": [height, width], "crop_coords_top_left": list(crop.top_left),
                "target_size": list(target)}


def _describe(value: Any, index: int) -> str:
    path = value.get("path") if isinstance(value, dict) else value
    return str(path) if path else f"row {index}"


def _passthrough_collate(item: dict) -> dict:
    """No batching in the loader (batches are formed per bucket in the main process); keep items as they are."""
    return item


# -- output ---------------------------------------------------------------------------------------------------


class ShardWriter:
    """Buffers rows and failures of one rank and commits them atomically, failures first.

    A kill between the two renames leaves failures committed and rows not: the rows' inputs are redone in
    a later shard, the failed inputs are not retried. Either way each input ends up recorded once.
    Writing happens on one background thread (pyarrow releases the GIL), so the encoder does not wait for the
    disk; one thread keeps the commits in order, and at most one shard waits behind the one being written.
    """

    def __init__(self, out: Path, rank: int, features) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.out, self.rank, self.features = out, rank, features
        (out / fmt.DATA_DIR).mkdir(parents=True, exist_ok=True)
        (out / fmt.FAILURES_DIR).mkdir(parents=True, exist_ok=True)
        prefix_data, prefix_fail = f"train-{rank:05d}-", f"{rank:05d}-"
        used = [int(p.stem.rsplit("-", 1)[1]) for p in fmt.shard_files(out) if p.name.startswith(prefix_data)]
        used += [int(p.stem.rsplit("-", 1)[1]) for p in fmt.failure_files(out) if p.name.startswith(prefix_fail)]
        self.sequence = max(used, default=-1) + 1
        self.rows: list[dict] = []
        self.failures: list[dict] = []
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self._pending = None

    def commit(self) -> None:
        """Hand the buffered rows and failures to the writer thread (waits only if a shard is still in flight)."""
        if not self.rows and not self.failures:
            return
        self._wait()
        self._pending = self._thread.submit(self._write, f"{self.rank:05d}-{self.sequence:05d}", self.rows,
                                            self.failures)
        self.rows, self.failures = [], []
        self.sequence += 1

    def close(self) -> None:
        """Commit what is buffered and wait until it is on disk."""
        self.commit()
        self._wait()
        self._thread.shutdown()

    def _wait(self) -> None:
        if self._pending is not None:
            self._pending.result()  # re-raises a failed write (disk full...) here, in the main thread
            self._pending = None

    def _write(self, name: str, rows: list[dict], failures: list[dict]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if failures:
            lines = "".join(json.dumps(f) + "\n" for f in failures)
            fmt.atomic_write_text(self.out / fmt.FAILURES_DIR / f"{name}.jsonl", lines)
        if rows:
            final = self.out / fmt.DATA_DIR / f"train-{name}.parquet"
            tmp = final.with_name(f".tmp-{final.name}")
            table = pa.Table.from_pylist(rows, schema=self.features.arrow_schema)
            with open(tmp, "wb") as f:
                pq.write_table(table, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)


def output_features(source: Source, flip: bool):
    import datasets

    ints = datasets.List(datasets.Value("int32"))
    features = {fmt.KEY: datasets.Value("string"), fmt.MEAN: datasets.Value("binary"),
                fmt.STD: datasets.Value("binary")}
    if flip:
        features.update({fmt.FLIP_MEAN: datasets.Value("binary"), fmt.FLIP_STD: datasets.Value("binary")})
    features.update({fmt.LATENT_SHAPE: ints, fmt.ORIGINAL_SIZE: ints, fmt.CROP_TOP_LEFT: ints, fmt.TARGET_SIZE: ints})
    for column in source.passthrough:
        features[column] = source.dataset.features[column]
    return datasets.Features(features)


# -- the run --------------------------------------------------------------------------------------------------


@dataclass
class PrecomputeSummary:
    """What a run did (this run) and what the dataset holds (all runs so far)."""

    out: str
    inputs: int  # inputs in the source
    rows: int  # latents in the dataset
    failures: int  # inputs listed in the failures file
    failure_reasons: dict[str, int]
    duplicates: int  # rows whose key appears more than once (0 unless something is badly wrong)
    encoded_this_run: int
    failed_this_run: int
    skipped_done: int  # inputs already in the dataset before this run
    seconds: float
    images_per_second: float  # encoded this run / seconds of the encoding loop, all ranks together
    world_size: int = 1

    @property
    def complete(self) -> bool:
        return self.rows - self.duplicates + self.failures == self.inputs

    def line(self) -> str:
        """One line for a terminal."""
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(self.failure_reasons.items()))
        text = (f"{self.rows} latents ({self.encoded_this_run} this run, {self.skipped_done} inputs already done), "
                f"{self.failures} failed{f' ({reasons})' if reasons else ''} of {self.inputs} inputs -> {self.out}"
                f"  [{self.images_per_second:.1f} img/s, {self.seconds:.1f} s, {self.world_size} process(es)]")
        if self.failures:
            text += f"\nfailures listed in {Path(self.out) / fmt.FAILURES_FILE}"
        return text


def _make_codec(model: Any, options: PrecomputeOptions, device: torch.device):
    from diffusers import AutoencoderKL

    from .codec import LatentCodec
    from .model import load_vae

    per_call = options.batch_size * (2 if options.flip else 1)
    if isinstance(model, LatentCodec):
        return model, None  # used as configured by the caller (device, dtype, tiling)
    vae = model if isinstance(model, AutoencoderKL) else load_vae(model)
    source = str(model) if isinstance(model, (str, os.PathLike)) else None
    codec = LatentCodec(vae, device=device, dtype=options.encode_dtype, max_batch_size=per_call,
                        tile_size=options.tile_size, channels_last=options.channels_last)
    return codec, source


def _encode_batch(codec, items: list[dict], flip: bool, dtype: torch.dtype) -> list[dict]:
    """Preprocessed items of one size -> output rows (passthrough columns included)."""
    pixels = torch.stack([item["pixels"] for item in items]).to(codec.device, non_blocking=True)
    pixels = pixels.float().div_(127.5).sub_(1.0)
    if flip:  # one forward pass for both: the mirrored images ride in the same batch
        pixels = torch.cat([pixels, pixels.flip(-1)])
    out = codec.encode(pixels, return_dict=True)
    std = torch.exp(0.5 * out.logvar)
    n = len(items)
    means, stds = fmt.pack(out.mean, dtype), fmt.pack(std, dtype)
    shape = list(out.mean.shape[1:])
    rows = []
    for i, item in enumerate(items):
        row = {fmt.KEY: item["key"], fmt.MEAN: means[i], fmt.STD: stds[i], fmt.LATENT_SHAPE: shape,
               fmt.ORIGINAL_SIZE: item["original_size"], fmt.CROP_TOP_LEFT: item["crop_coords_top_left"],
               fmt.TARGET_SIZE: item["target_size"], **item["passthrough"]}
        if flip:
            row[fmt.FLIP_MEAN], row[fmt.FLIP_STD] = means[n + i], stds[n + i]
        rows.append(row)
    return rows


def _default_workers(local_world_size: int) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(16, cpus // max(1, local_world_size) - 1))


def _check_or_write_info(out: Path, info: fmt.LatentInfo) -> None:
    """The first run records how the dataset is made; a rerun must make it the same way to add to it."""
    file = out / fmt.INFO_FILE
    if file.is_file():
        existing = fmt.LatentInfo.read(out)
        old, new = existing.settings(), info.settings()
        changed = [k for k in new if old.get(k) != new[k]]
        if changed:
            details = "; ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in changed[:3])
            raise ValueError(f"{out} holds latents made differently ({details}); "
                             "rerun with the original settings to continue it, or choose another --out")
        return
    if out.exists() and any(p for p in out.iterdir() if not p.name.startswith(".")):
        raise ValueError(f"{out} exists and is not a latent dataset: choose an empty or new folder")
    out.mkdir(parents=True, exist_ok=True)
    fmt.atomic_write_text(file, info.to_json())


def precompute_latents(
    model: Any,
    data: Any,
    out: str | os.PathLike,
    resolution: int = 1024,
    buckets: bool = False,
    flip: bool = False,
    dtype: str = "bf16",
    batch_size: int = 8,
    num_workers: int | None = None,
    **options: Any,
) -> PrecomputeSummary:
    """Encode every image of `data` once into a latent dataset at `out` (read it with `load_latents`).

    Args:
        model: a preset name, model folder or .safetensors file, an AutoencoderKL, or a LatentCodec (used as is).
        data: an image folder (recursive; captions from metadata.jsonl or .txt beside images), a save_to_disk
            folder, parquet or arrow files (path, glob or list), or a datasets.Dataset.
        out: the output folder; running the same call again continues an interrupted run.
        resolution, buckets, flip, dtype, batch_size, num_workers, **options: see `PrecomputeOptions`.

    Under `torchrun` / `accelerate launch` every process takes its share of the inputs; all write into `out`.
    """
    from accelerate import PartialState
    from tqdm.auto import tqdm

    opts = PrecomputeOptions(resolution=resolution, buckets=buckets, flip=flip, dtype=dtype,
                             batch_size=batch_size, num_workers=num_workers)
    for name, value in options.items():
        if name not in PrecomputeOptions.__dataclass_fields__:
            raise ValueError(f"unknown precompute option {name!r}; known: {', '.join(PrecomputeOptions.__dataclass_fields__)}")
        setattr(opts, name, value)
    opts.validate()
    out = Path(out)
    wanted = torch.device(opts.device) if opts.device else None
    state = PartialState(cpu=wanted is not None and wanted.type == "cpu")
    device = wanted or state.device
    if device.type == "cuda" and device.index is None and state.device.type == "cuda":
        device = state.device  # plain "cuda" under torchrun: this process's own GPU

    source = open_source(data, opts)
    codec, model_source = _make_codec(model, opts, device)
    device = codec.device  # a LatentCodec passed in keeps its own device
    factor = codec.downsampling_factor
    step = opts.bucket_step or factor
    if step % factor:
        raise ValueError(f"bucket_step {step} is not a multiple of the model's downsampling factor {factor}")
    if opts.resolution % factor:
        raise ValueError(f"resolution {opts.resolution} is not a multiple of the model's downsampling factor {factor}")
    bucket_list = make_buckets(opts.resolution, step, opts.max_aspect) if opts.buckets else None
    storage = fmt.storage_dtype(opts.dtype)
    info = fmt.LatentInfo(
        fingerprint=codec.fingerprint, normalization=codec.normalization.to_config(),
        latent_channels=codec.latent_channels, downsampling_factor=factor, resolution=opts.resolution,
        buckets=[list(b) for b in bucket_list] if bucket_list else None, flip=opts.flip,
        storage_dtype=fmt.dtype_name(storage), encode_dtype=fmt.dtype_name(codec.dtype), tile_size=codec.tile_size,
        max_upscale=opts.max_upscale, image_column=source.image_column, key_column=source.key_column,
        passthrough=source.passthrough, model_source=model_source, data_source=source.description)

    with state.main_process_first():
        if state.is_main_process:
            _check_or_write_info(out, info)
            (out / fmt.SUMMARY_FILE).unlink(missing_ok=True)  # in progress: readers refuse until it is back
            for tmp in (out / fmt.DATA_DIR).glob(".tmp-*"):  # a killed run's half-written shards
                tmp.unlink()
        else:
            _check_or_write_info(out, info)

    # The done record is the committed files: read before choosing work, after the main process tidied up.
    done = fmt.count_dataset(out).done_keys
    mine = range(state.process_index, len(source.keys), state.num_processes)
    pending = [i for i in mine if source.keys[i] not in done]
    skipped_done = len(mine) - len(pending)

    writer = ShardWriter(out, state.process_index, output_features(source, opts.flip))
    workers = opts.num_workers if opts.num_workers is not None else _default_workers(
        int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    loader = torch.utils.data.DataLoader(
        PreprocessedImages(source, pending, opts, bucket_list), batch_size=None, shuffle=False,
        num_workers=workers, collate_fn=_passthrough_collate, pin_memory=device.type == "cuda",
        # enough images in flight for two batches, so the encoder never waits for a decode
        prefetch_factor=max(2, math.ceil(2 * opts.batch_size / workers)) if workers else None)
    groups: dict[tuple[int, ...], list[dict]] = {}
    encoded = failed = 0
    progress = tqdm(total=len(pending), unit="img", desc="precompute", dynamic_ncols=True,
                    disable=not (opts.progress and state.is_local_main_process))

    def flush(size: tuple[int, ...]) -> None:
        nonlocal encoded
        items = groups.pop(size)
        writer.rows += _encode_batch(codec, items, opts.flip, storage)
        encoded += len(items)
        progress.update(len(items))
        if len(writer.rows) >= opts.shard_size:
            writer.commit()

    start = time.perf_counter()
    for item in loader:
        if not item["ok"]:
            failed += 1
            writer.failures.append({"key": item["key"], "source": item["source"], "reason": item["reason"],
                                    "message": item["message"]})
            progress.update(1)
            progress.set_postfix(failed=failed, refresh=False)
            if len(writer.failures) >= opts.shard_size:
                writer.commit()
            continue
        size = tuple(item["pixels"].shape)
        groups.setdefault(size, []).append(item)
        if len(groups[size]) == opts.batch_size:
            flush(size)
        elif sum(len(g) for g in groups.values()) >= 4 * opts.batch_size:
            # Many buckets each short of a batch: encode the fullest rather than hold images without bound.
            flush(max(groups, key=lambda k: len(groups[k])))
    for size in list(groups):
        flush(size)
    writer.close()
    seconds = time.perf_counter() - start
    progress.close()

    from accelerate.utils import gather_object

    state.wait_for_everyone()
    per_rank = gather_object([(encoded, failed, skipped_done, seconds)]) if state.num_processes > 1 else [
        (encoded, failed, skipped_done, seconds)]
    counts = fmt.count_dataset(out)
    wall = max(r[3] for r in per_rank)
    summary = PrecomputeSummary(
        out=str(out), inputs=len(source.keys), rows=counts.rows, failures=counts.failures,
        failure_reasons=counts.failure_reasons, duplicates=counts.rows - counts.unique_keys,
        encoded_this_run=sum(r[0] for r in per_rank), failed_this_run=sum(r[1] for r in per_rank),
        skipped_done=sum(r[2] for r in per_rank), seconds=wall,
        images_per_second=sum(r[0] for r in per_rank) / wall if wall > 0 else 0.0, world_size=state.num_processes)
    if state.is_main_process:
        failures = fmt.read_failures(out)
        fmt.atomic_write_text(out / fmt.FAILURES_FILE, "".join(json.dumps(f) + "\n" for f in failures))
        if summary.complete:
            fmt.atomic_write_text(out / fmt.SUMMARY_FILE, json.dumps(asdict(summary), indent=2))
    state.wait_for_everyone()
    return summary


# -- command line -----------------------------------------------------------------------------------------------


def add_precompute_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `latent-vae precompute`."""
    defaults = PrecomputeOptions()
    p = parser
    p.add_argument("--model", required=True, help="preset name, diffusers model folder or .safetensors file")
    p.add_argument("--data", required=True, help="image folder, datasets folder (save_to_disk), parquet/arrow file(s) or glob")
    p.add_argument("--out", required=True, help="output folder; the same command again continues an interrupted run")
    p.add_argument("--resolution", type=int, default=defaults.resolution, help="crop side, or the buckets' side of equal area")
    p.add_argument("--buckets", action="store_true", help="aspect-ratio buckets (SDXL-style) instead of square centre crops")
    p.add_argument("--bucket-step", type=int, default=None, help="bucket sides are multiples of this (default: the model's factor)")
    p.add_argument("--max-aspect", type=float, default=defaults.max_aspect, help="most elongated bucket")
    p.add_argument("--flip", action="store_true", help="also store the latents of the mirrored image")
    p.add_argument("--dtype", default=defaults.dtype, choices=["bf16", "fp16", "fp32"], help="storage dtype of mean and std")
    p.add_argument("--encode-dtype", default=defaults.encode_dtype, choices=["fp32", "bf16", "fp16"], help="encoder dtype")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: this process's accelerator)")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="images per encoder call")
    p.add_argument("--num-workers", type=int, default=None, help="DataLoader workers decoding images")
    p.add_argument("--shard-size", type=int, default=defaults.shard_size, help="rows per parquet shard")
    p.add_argument("--max-upscale", type=float, default=defaults.max_upscale,
                   help="skip images needing more upscaling than this (1: never upscale)")
    p.add_argument("--tile-size", type=int, default=None, help="encode images larger than this in tiles")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory layout (often faster)")
    p.add_argument("--image-column", default=None, help="datasets sources: the image column")
    p.add_argument("--key-column", default=None, help="datasets sources: a column of unique ids (default: row index)")
    p.add_argument("--caption-column", default=defaults.caption_column, help="image folders: column for .txt captions")
    p.add_argument("--split", default=None, help="saved DatasetDict: the split to encode")
    p.add_argument("--cache-dir", default=None, help="🤗 datasets cache for parquet sources")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_precompute(args: argparse.Namespace) -> int:
    """`latent-vae precompute`: 0 when every input is accounted for; bad input is one line on stderr and 2."""
    try:
        summary = precompute_latents(
            args.model, args.data, args.out, resolution=args.resolution, buckets=args.buckets, flip=args.flip,
            dtype=args.dtype, batch_size=args.batch_size, num_workers=args.num_workers,
            bucket_step=args.bucket_step, max_aspect=args.max_aspect, encode_dtype=args.encode_dtype,
            device=args.device, shard_size=args.shard_size, max_upscale=args.max_upscale, tile_size=args.tile_size,
            channels_last=args.channels_last, image_column=args.image_column, key_column=args.key_column,
            caption_column=args.caption_column, split=args.split, cache_dir=args.cache_dir,
            progress=not args.no_progress)
    except ValueError as error:  # ImageError and ModelLoadError are ValueErrors too
        print(f"latent-vae precompute: error: {error}", file=sys.stderr)
        return 2
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(summary.line())
    return 0 if summary.complete else 1


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m latent_vae.precompute ...` (also under torchrun / accelerate launch)."""
    parser = argparse.ArgumentParser(prog="latent-vae precompute", description=__doc__.splitlines()[0])
    add_precompute_arguments(parser)
    return run_precompute(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
