"""Writing a latent dataset's shards: the row schema, a streaming parquet writer, and the commit protocol that
publishes each shard exactly once: the manifest first, by the store's exclusive create; then, on a store that
stages data (a local disk), the data file renamed into place. On an object store the data file was written in
place under a name of its own, which the manifest names."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict

from ..utils.errors import StorageError, storage_failure
from .format import (
    CROP_TOP_LEFT,
    FLIP_MEAN,
    FLIP_STD,
    KEY,
    LATENT_SHAPE,
    MEAN,
    MOMENT_COLUMNS,
    ORIGINAL_SIZE,
    ROW_GROUP_BYTES,
    STD,
    TARGET_SIZE,
    Manifest,
)
from .storage import (
    DATA_DIR,
    DATA_SUFFIX,
    STAGING_DIR,
    DatasetStore,
    data_key,
    manifest_key,
    shard_of_data_file,
    store_errors,
)


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


class _HashingSink:
    """A binary file that hashes what goes through it: the data file's sha256 without reading it back."""

    def __init__(self, sink) -> None:
        self.sink, self.digest, self.position, self.closed = sink, hashlib.sha256(), 0, False

    def write(self, data) -> int:
        data = bytes(data)
        self.sink.write(data)
        self.digest.update(data)
        self.position += len(data)
        return len(data)

    def tell(self) -> int:
        return self.position

    def flush(self) -> None:
        self.sink.flush()

    def close(self) -> None:
        self.closed = True  # the store closes the real file: that is when its bytes become durable

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False


class ShardWriter:
    """Streams the rows of one output shard into a new data file of the store, a row group at a time (a shard of
    10,000 1024-px latents never sits in memory); `finish` closes it and returns its checksum. A write the storage
    refuses (a full disk, a quota, a permission, a store's fault past its retries) is a StorageError naming the
    file and saying that the committed shards are kept."""

    def __init__(self, store: DatasetStore, name: str, features, attempt: str = "") -> None:
        import pyarrow.parquet as pq

        self.store, self.name, self.schema = store, name, features.arrow_schema
        with self._storage(store.where(f"{STAGING_DIR if store.stages_data else DATA_DIR}/{name}")):
            self.staged = store.new_data_file(name, attempt)
        self._sink = _HashingSink(self.staged.sink)
        with self._storage():
            self._writer = pq.ParquetWriter(self._sink, self.schema)
        self._buffer: list[dict] = []
        self._group_rows: int | None = None
        self.rows = 0

    def _storage(self, where: str | None = None):
        return storage_failures(where or self.store.where(self.staged.key))

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
            table = pa.Table.from_pylist(self._buffer, schema=self.schema)
            with self._storage():
                self._writer.write_table(table)
            self._buffer = []

    def finish(self):
        """(the staged data file, sha256): complete and durable."""
        self._flush()
        with self._storage():
            self._writer.close()
            self.store.close_data_file(self.staged)
        return self.staged, self._sink.digest.hexdigest()

    def abort(self) -> None:
        try:
            try:
                self._writer.close()
            finally:
                self.staged.sink.close()
        except (*store_errors(), ValueError):
            pass  # a file that could not be written cannot be closed cleanly either: it is removed below
        finally:
            try:
                self.store.remove(self.staged.key)
            except store_errors():
                pass  # the store is failing: a later run removes the file (a data file no manifest names)


@contextmanager
def storage_failures(where: str) -> Iterator[None]:
    """An OSError while writing `where` (a full disk, a quota, a permission, a store's fault that outlasted its
    retries) becomes one StorageError naming it and saying what is kept."""
    try:
        yield
    except StorageError:
        raise
    except store_errors() as error:
        raise StorageError(storage_failure(where, error)) from error


def commit_shard(store: DatasetStore, manifest: Manifest, staged) -> bool:
    """Publish a finished shard exactly once: the manifest first, exclusively; then (a store that stages data) the
    data renamed into data/. False (and our data file deleted) when another process committed this shard first."""
    if not store.publish(manifest_key(manifest.input_shard), json.dumps(asdict(manifest)).encode()):
        store.remove(staged.key)
        return False
    if staged.key != staged.final:
        try:
            store.move(staged.key, staged.final)
        except FileNotFoundError:
            if not store.exists(staged.final):  # not a reader finishing our commit for us (shard_state): really lost
                raise
    return True


def shard_state(store: DatasetStore, name: str) -> str:
    """"complete", "missing" (no manifest: not done) or "broken" (a manifest whose data file is gone).
    A commit killed between its manifest and its rename is finished here."""
    try:
        manifest = Manifest.read(store, name)
    except FileNotFoundError:
        return "missing"
    except (ValueError, TypeError):
        manifest = None
    data = data_key(manifest.data_file if manifest else f"{name}{DATA_SUFFIX}")
    if store.exists(data):
        return "complete"
    if manifest is not None and manifest.staged_file and store.stages_data:
        try:
            store.move(f"{STAGING_DIR}/{manifest.staged_file}", data)
        except FileNotFoundError:
            pass
    return "complete" if store.exists(data) else "broken"


def clean_staging(store: DatasetStore) -> None:
    """Remove what killed processes of this host left in staging/ (their half-written shards); a staged file
    that a manifest names is first renamed into place (a commit cut short between its two steps)."""
    for key in store.dead_leftovers(STAGING_DIR):
        shard_state(store, key.rsplit("/", 1)[-1][1:].split(DATA_SUFFIX + ".", 1)[0])
        store.remove(key)


def remove_orphans(store: DatasetStore, committed: dict[str, str]) -> list[str]:
    """On a store that writes data in place: remove the data files of committed shards that their manifest does
    not name (written by an attempt that lost the commit, or was killed before it; no reader can use them).
    `committed`: shard -> its manifest's data file. The names removed."""
    if store.stages_data:
        return []
    removed = []
    for file in store.list(DATA_DIR, DATA_SUFFIX):
        shard = shard_of_data_file(file)
        if shard in committed and committed[shard] != file:
            store.remove(data_key(file))
            removed.append(file)
    return removed
