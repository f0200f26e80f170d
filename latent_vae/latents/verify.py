"""Counting and verifying a latent dataset against its own records (`latent-vae precompute --verify`)."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ..codec.posterior import PosteriorStats, warn_if_noisy
from ..utils.errors import one_line
from .format import KEY, LatentInfo, Manifest, read_manifests
from .locations import open_store
from .storage import DATA_DIR, DATA_SUFFIX, DatasetStore, data_key
from .writer import shard_state


@dataclass
class DatasetCounts:
    """What the committed shards hold, counted from their manifests."""

    shards: int
    shards_done: int
    rows: int
    failures: int
    failure_reasons: dict[str, int] = field(default_factory=dict)
    posterior: PosteriorStats = field(default_factory=PosteriorStats)

    @property
    def complete(self) -> bool:
        return self.shards_done == self.shards


def dataset_posterior(manifests: dict[str, Manifest]) -> PosteriorStats:
    """The posterior's noise over every committed row: the manifests' sums added up."""
    total = PosteriorStats()
    for manifest in manifests.values():
        total = total.merge(PosteriorStats.from_record(manifest.posterior))
    return total


def count_dataset(path: str | os.PathLike | DatasetStore) -> DatasetCounts:
    store = open_store(path)
    info = LatentInfo.read(store)
    manifests = read_manifests(store, info.input_shards)
    reasons = Counter(f["reason"] for m in manifests.values() for f in m.failures)
    done = sum(shard_state(store, n) == "complete" for n in manifests)
    return DatasetCounts(len(info.input_shards), done, sum(m.rows for m in manifests.values()),
                         sum(reasons.values()), dict(reasons), dataset_posterior(manifests))


@dataclass
class VerifyReport:
    path: str
    shards: int
    shards_done: int
    rows: int
    failures: int
    problems: list[str]
    posterior_noise: float | None = None  # `PosteriorStats.noise_ratio` over every row (None: not recorded)

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        verdict = "OK" if self.ok else f"{len(self.problems)} problem(s)"
        noise = "" if self.posterior_noise is None else f", posterior noise {self.posterior_noise:.3g}"
        return (f"{self.path}: {verdict}: {self.shards_done} of {self.shards} shards complete, {self.rows} rows, "
                f"{self.failures} failures" + (", every key once" if self.ok else "") + noise)


def verify_latents(path: str | os.PathLike | DatasetStore, *, checksums: bool = True,
                   storage_options: dict | None = None, posterior_warning: bool = True) -> VerifyReport:
    """Check a latent dataset against its own records: every input shard has a manifest, every manifest's data
    file is there with its row count and sha256, no data file is unaccounted for, and every key (rows and
    failures together) occurs once. Problems are listed, one line each; ValueError if it is no latent dataset.
    The posterior's noise is reported too, with a PosteriorNoiseWarning when a sample would be mostly noise."""

    out = open_store(path, storage_options)
    out.check(write=False)
    info = LatentInfo.read(out)
    problems: list[str] = []
    manifests, damaged = {}, set()
    def read(name: str) -> Manifest | str | None:  # a damaged manifest is a problem of the dataset, not a stop
        try:
            return Manifest.read(out, name)
        except FileNotFoundError:
            return None
        except ValueError as error:
            return one_line(error)

    for name, found in zip(info.input_shards, out.map(read, info.input_shards)):
        if isinstance(found, str):
            problems.append(found)
            damaged.add(name)
        elif found is not None:
            manifests[name] = found
    missing = [n for n in info.input_shards if n not in manifests and n not in damaged]
    if missing:
        problems.append(f"{len(missing)} shard(s) not done: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    key_hashes, rows, failures = [], 0, 0
    checked = out.map(lambda item: _check_shard(out, *item, checksums=checksums), list(manifests.items()))
    for manifest, (shard_problems, stored, keys) in zip(manifests.values(), checked):
        failures += len(manifest.failures)
        key_hashes.append(_hash_keys([f["key"] for f in manifest.failures]))
        problems += shard_problems
        rows += stored
        key_hashes.append(keys)
    named = {m.data_file for m in manifests.values()}
    orphans = [f for f in out.list(DATA_DIR, DATA_SUFFIX) if f not in named]
    if orphans:  # on an object store: what attempts that lost (or were killed) wrote; a complete run removes them
        problems.append(f"{len(orphans)} data file(s) without a manifest: {', '.join(orphans[:5])}")
    duplicates = _duplicate_keys(out, manifests, np.concatenate(key_hashes) if key_hashes else np.zeros(0, np.uint64))
    if duplicates:
        problems.append(f"{len(duplicates)} key(s) occur more than once: {', '.join(map(str, duplicates[:5]))}")
    noise = dataset_posterior(manifests).noise_ratio()
    if posterior_warning:
        warn_if_noisy(noise, info.model_source or info.fingerprint, where=out.where(),
                      advice="train on its means (load_latents(..., sample=False))")
    return VerifyReport(out.where(), len(info.input_shards), len(manifests), rows, failures, problems, noise)


def _hash_keys(keys: list[str]) -> np.ndarray:
    import pandas as pd

    return pd.util.hash_array(np.asarray(keys, dtype=object)) if keys else np.zeros(0, np.uint64)


def _check_shard(out: DatasetStore, name: str, manifest: Manifest, *,
                 checksums: bool) -> tuple[list[str], int, np.ndarray]:
    """One committed shard against its manifest: (problems, rows stored, hashes of its keys)."""
    import pyarrow.parquet as pq

    data = data_key(manifest.data_file)
    if shard_state(out, name) != "complete":
        return [f"{name}: manifest without its data file {out.where(data)}"], 0, np.zeros(0, np.uint64)
    problems = []
    stored = pq.ParquetFile(out.open_input(data)).metadata.num_rows
    if stored != manifest.rows:
        problems.append(f"{name}: {stored} rows in {manifest.data_file}, the manifest says {manifest.rows}")
    if checksums and out.sha256(data) != manifest.sha256:
        problems.append(f"{name}: {manifest.data_file} does not match the manifest's sha256 (changed or corrupt)")
    return problems, stored, _hash_keys(_keys(out, data))


def _keys(store: DatasetStore, key: str) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(store.open_input(key), columns=[KEY]).column(KEY).to_pylist()


def _duplicate_keys(out: DatasetStore, manifests: dict[str, Manifest], hashes: np.ndarray) -> list[str]:
    """Keys seen twice. 64-bit hashes sorted in numpy keep a billion keys in 8 GB; only the few hashes that
    repeat are looked up again as strings (to tell a true duplicate from a hash collision)."""

    hashes = np.sort(hashes)
    repeated = set(hashes[1:][hashes[1:] == hashes[:-1]].tolist())
    if not repeated:
        return []
    seen: Counter = Counter()
    for manifest in manifests.values():
        keys = [f["key"] for f in manifest.failures]
        data = data_key(manifest.data_file)
        if out.exists(data):
            keys += _keys(out, data)
        seen.update(k for k, h in zip(keys, _hash_keys(keys).tolist()) if h in repeated)
    return sorted(k for k, n in seen.items() if n > 1)


