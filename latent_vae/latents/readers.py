"""Reading a latent dataset back for training: `load_latents` (map-style or streaming), its collate function and
a sampler of same-shape batches."""

from __future__ import annotations

import bisect
import math
import os
import random
from collections.abc import Iterator
from typing import Any

import torch

from ..codec.posterior import warn_if_noisy
from .format import (
    FAILURES_FILE,
    FLIPPED,
    KEY,
    LATENT_SHAPE,
    LATENTS,
    MEAN,
    MOMENT_COLUMNS,
    STD,
    LatentInfo,
    read_manifests,
    unpack,
)
from .locations import open_store
from .provenance import check_made_by
from .storage import DatasetStore, data_key
from .verify import dataset_posterior
from .writer import shard_state


def check_compatible(info: LatentInfo, path: str | os.PathLike, *, model: Any = None,
                     resolution: int | None = None) -> None:
    """A stale cache is a silent bug: refuse latents made by another model or at another resolution."""
    if model is not None:
        check_made_by(model, info.fingerprint, path, made_by=info.model_source or "unnamed",
                      what_to_do="recompute them with `latent-vae precompute --model ...` or load them with the "
                      "model that made them")
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
    """The row groups of a dataset's data files, read in place (one group cached per process): on an object store
    by range reads of the footer and of the group's column chunks, never the whole file."""

    def __init__(self, store: DatasetStore, files: list[str]) -> None:
        import pyarrow.parquet as pq

        self.store, self.files = store, files
        self.groups: list[tuple[int, int]] = []  # (file, row group)
        self.starts: list[int] = []  # first global row of each group
        total = 0
        footers = store.map(lambda file: pq.ParquetFile(store.open_input(file)).metadata, self.files)
        for number, metadata in enumerate(footers):
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
            source = self.store.open_input(self.files[file])
            table = pq.ParquetFile(source, memory_map=isinstance(source, str)).read_row_group(index)
            cached = self._cached = (os.getpid(), group, table.to_pydict())
        return cached[2]

    def locate(self, row: int) -> tuple[int, int]:
        group = bisect.bisect_right(self.starts, row) - 1
        return group, row - self.starts[group]


class LatentDataset(torch.utils.data.Dataset):
    """Random access to a latent dataset's rows, read in place from its parquet shards (no copy, no cache):
    item i reads its row group (about ROW_GROUP_BYTES), which stays cached for the next items."""

    def __init__(self, store: DatasetStore, files: list[str], transform: LatentTransform) -> None:
        self.parts, self.transform, self.store, self.files = _RowGroups(store, files), transform, store, files

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

        return [v for f in self.files
                for v in pq.read_table(self.store.open_input(f), columns=[name]).column(name).to_pylist()]

    @property
    def features(self):
        import datasets
        import pyarrow.parquet as pq

        return datasets.Features.from_arrow_schema(pq.ParquetFile(self.store.open_input(self.files[0])).schema_arrow)


class StreamingLatents(torch.utils.data.IterableDataset):
    """The rows of a latent dataset as a stream, split across ranks and DataLoader workers: row groups are dealt
    round-robin to the `world_size x num_workers` readers, so every row is read exactly once per epoch.
    `shuffle` shuffles the order of row groups (the same way on every rank) and the rows within each."""

    def __init__(self, store: DatasetStore, files: list[str], transform: LatentTransform, *, rank: int,
                 world_size: int, shuffle: bool, seed: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.parts, self.transform = _RowGroups(store, files), transform
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
    storage_options: dict | None = None,
):
    """A precomputed latent dataset, ready for training, read in place from its parquet shards. Items are
    {"latents": normalised float32 CxHxW tensor, "key", size conditioning, passthrough columns...}.

    Args:
        path: the folder or URL (s3://BUCKET/PREFIX, gs://...) `precompute_latents` / `latent-vae precompute` wrote.
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
        storage_options: for a URL, the fsspec file system's options (default: credentials and endpoint from
            the standard places: AWS_* variables, AWS_ENDPOINT_URL, ~/.aws, GOOGLE_APPLICATION_CREDENTIALS).

    Map-style (default): a `LatentDataset`; batch it with `DataLoader(dataset, batch_size=..., shuffle=True,
    collate_fn=collate_latents)`; items of different latent shapes (--buckets) cannot share a batch: see
    `BucketBatchSampler`.
    """
    out = open_store(path, storage_options)
    out.check(write=False)
    info = LatentInfo.read(out)
    check_compatible(info, path, model=model, resolution=resolution)
    manifests = read_manifests(out, info.input_shards)
    states = dict(zip(manifests, out.map(lambda name: shard_state(out, name), list(manifests))))
    done = [n for n in info.input_shards if states.get(n) == "complete"]
    if len(done) < len(info.input_shards) and not allow_incomplete:
        raise ValueError(f"{path}: {len(info.input_shards) - len(done)} of {len(info.input_shards)} shards are not done "
                         "(the precompute has not finished, or was killed); run the same command again to complete it, "
                         "or pass allow_incomplete=True")
    files = [data_key(manifests[n].data_file) for n in done if manifests[n].rows > 0]
    if not files:
        raise ValueError(f"{path}: no latents (every input failed? see {out.where(FAILURES_FILE)})")
    if flip_probability is None:
        flip_probability = 0.5 if info.flip else 0.0
    if not 0.0 <= flip_probability <= 1.0:
        raise ValueError(f"flip_probability must be in [0, 1], got {flip_probability}")
    if flip_probability > 0 and not info.flip:
        raise ValueError(f"{path}: no mirrored latents stored (precompute with --flip), so flip_probability must be 0")
    if sample:  # a posterior that is mostly noise would feed the noise to a diffusion model without a word
        noise = dataset_posterior({n: manifests[n] for n in done}).noise_ratio()
        warn_if_noisy(noise, info.model_source or info.fingerprint, where=out.where(),
                      advice="read the means instead (load_latents(..., sample=False))")
    transform = LatentTransform(info, sample=sample, flip_probability=flip_probability)
    if streaming:
        rank, world_size = _distributed_position(rank, world_size)
        return StreamingLatents(out, files, transform, rank=rank, world_size=world_size, shuffle=shuffle, seed=seed)
    return LatentDataset(out, files, transform)


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
