"""Writing a latent dataset's shards: the row schema, a streaming parquet writer, and the commit protocol that
publishes each shard exactly once (manifest first, by an exclusive hard link; then the data renamed into place)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from ..utils.atomic import file_sha256, fsync_path, left_by_dead_process, publish_exclusive, unique_tmp_path
from .format import (
    CROP_TOP_LEFT,
    DATA_DIR,
    FLIP_MEAN,
    FLIP_STD,
    KEY,
    LATENT_SHAPE,
    MANIFEST_DIR,
    MEAN,
    MOMENT_COLUMNS,
    ORIGINAL_SIZE,
    ROW_GROUP_BYTES,
    STAGING_DIR,
    STD,
    TARGET_SIZE,
    Manifest,
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
    except (FileNotFoundError, ValueError, TypeError):
        pass
    return "complete" if data.is_file() else "broken"


def clean_staging(out: Path) -> None:
    """Remove what killed processes of this host left in staging/ (their half-written shards); a staged file
    that a manifest names is first renamed into place (a commit cut short between its two steps)."""
    for file in (out / STAGING_DIR).glob(".*.tmp"):
        if left_by_dead_process(file):
            shard_state(out, file.name[1:].split(".parquet.", 1)[0])
            file.unlink(missing_ok=True)


