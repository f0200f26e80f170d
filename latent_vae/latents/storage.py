"""Where a latent dataset lives: its folder's layout, and the few operations its exactly-once protocol needs.

One `DatasetStore` owns the layout (the names below); every module reads and writes the dataset through it,
so none joins a layout name onto a path. Two implementations:

- `LocalStore`: a folder of a POSIX file system. Records are published exclusively by a hard link; data files
  are written in staging/ and renamed into data/ once their manifest is in place.
- `ObjectStore` (`latent_vae.latents.object_store`): a prefix of an object store through fsspec (s3://, gs://).
  Records are published by the store's atomic create (`If-None-Match: *`) and changed only if unchanged
  (`If-Match: ETAG`); a data file is written in place under a name no other attempt uses, since nothing can be
  renamed there.

`open_store(url_or_path, storage_options)` picks one.

Layout (names relative to the dataset's root):

    latents.json                  how the dataset was made (`format.LatentInfo`)
    data/FILE.parquet             the rows of input shard NAME (FILE is NAME, or NAME.ATTEMPT on an object store)
    manifests/NAME.json           written when shard NAME is complete; names its data file
    claims/NAME.claim             held while a process works on NAME
    staging/                      a local store's shards being written
    failures.jsonl, summary.json  every failure and the last run's counts (written when a run completes)
"""

from __future__ import annotations

import errno
import importlib
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import IO, Any

from ..utils.atomic import (
    atomic_write_bytes,
    fsync_path,
    left_by_dead_process,
    publish_exclusive,
    unique_tmp_path,
)
from ..utils.errors import StorageFault

INFO_FILE = "latents.json"
SUMMARY_FILE = "summary.json"
FAILURES_FILE = "failures.jsonl"
DATA_DIR, MANIFEST_DIR, CLAIM_DIR, STAGING_DIR = "data", "manifests", "claims", "staging"
CLAIM_SUFFIX = ".claim"
LAYOUT = (INFO_FILE, SUMMARY_FILE, FAILURES_FILE, DATA_DIR, MANIFEST_DIR, CLAIM_DIR, STAGING_DIR)
DATA_SUFFIX = ".parquet"


def manifest_key(shard: str) -> str:
    return f"{MANIFEST_DIR}/{shard}.json"


def claim_key(shard: str) -> str:
    return f"{CLAIM_DIR}/{shard}{CLAIM_SUFFIX}"


def data_key(file: str) -> str:
    return f"{DATA_DIR}/{file}"


def shard_of_data_file(file: str) -> str:
    """'00012.parquet' or '00012.1f3a-9c.parquet' -> '00012' (shard names hold no dot: `sources._shard_name`)."""
    return file.split(".", 1)[0]


@dataclass(frozen=True)
class Seen:
    """A record as a reader saw it: its bytes, when it last changed (seconds since the epoch, by the store's clock)
    and the store's version of it (an object store's ETag; None on a local disk, where the bytes are compared)."""

    content: bytes
    modified: float
    version: str | None = None


@dataclass
class StagedData:
    """A data file being written: `key` is where its bytes go, `final` where they are once committed (the same
    key on an object store, which writes data in place under a name of its own)."""

    key: str
    final: str
    sink: IO[bytes]

    @property
    def file(self) -> str:
        return self.final.rsplit("/", 1)[-1]


class DatasetStore:
    """The operations of a latent dataset's folder (see the module docstring); keys are layout names."""

    url: str  # the dataset's root as the user gave it, for messages
    stages_data: bool  # True: data is written in staging/ and renamed into data/ after its manifest

    def where(self, key: str = "") -> str:
        """A key as the user reads it in a message: the root joined with the key."""
        return f"{self.url.rstrip('/')}/{key}" if key else self.url

    def check(self, *, write: bool) -> None:
        """Raise StorageError (one line) if the store cannot be read (or written) as the protocol needs."""

    # -- records: small JSON files ------------------------------------------------------------------------------
    def read_bytes(self, key: str) -> bytes:
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def seen(self, key: str) -> Seen | None:
        """The record's content and version, or None when there is none."""
        raise NotImplementedError

    def write(self, key: str, data: bytes) -> None:
        """Replace `key` whole (a reader sees the old bytes or the new, never half)."""
        raise NotImplementedError

    def publish(self, key: str, data: bytes) -> bool:
        """Create `key` only if it does not exist; of several concurrent publishers exactly one gets True."""
        raise NotImplementedError

    def take_over(self, key: str, seen: Seen, data: bytes) -> bool:
        """Replace `key` with `data` only if it is still what `seen` saw; of several, one gets True."""
        raise NotImplementedError

    def refresh(self, key: str, seen: Seen, data: bytes) -> Seen | None:
        """A heartbeat: mark `key` as changed now, if it is still `seen`; its new state, or None if it was taken."""
        raise NotImplementedError

    def remove(self, key: str) -> None:
        """Delete `key` (gone already is fine)."""
        raise NotImplementedError

    def remove_if_unchanged(self, key: str, seen: Seen) -> bool:
        raise NotImplementedError

    def list(self, folder: str, suffix: str = "") -> list[str]:
        """Names in `folder` ending in `suffix`, sorted (hidden names left out)."""
        raise NotImplementedError

    # -- data files ----------------------------------------------------------------------------------------------
    def new_data_file(self, shard: str, attempt: str) -> StagedData:
        """Open a data file for shard `shard` under a name no other attempt uses."""
        raise NotImplementedError

    def close_data_file(self, staged: StagedData) -> None:
        """Flush and close it: its bytes are durable once this returns."""
        raise NotImplementedError

    def move(self, key: str, final: str) -> None:
        """Rename `key` to `final` (only stores that stage data)."""
        raise NotImplementedError

    def open_input(self, key: str) -> Any:
        """What pyarrow reads a data file from, with range reads (a path, or a seekable file object)."""
        raise NotImplementedError

    def sha256(self, key: str) -> str:
        """The SHA-256 of a file's bytes, streamed."""
        import hashlib

        digest = hashlib.sha256()
        with self.open_stream(key) as stream:
            for block in iter(lambda: stream.read(1 << 22), b""):
                digest.update(block)
        return digest.hexdigest()

    def open_stream(self, key: str) -> IO[bytes]:
        """A file opened for reading from start to end."""
        raise NotImplementedError

    def map(self, function, items) -> list:
        """[function(item) for item in items]: one after the other on a local disk; on an object store many at once,
        since each is a request of tens of milliseconds (the manifests of 100k shards, one by one, take an hour)."""
        return [function(item) for item in items]

    # -- the folder ----------------------------------------------------------------------------------------------
    def foreign_entries(self) -> list[str]:
        """Top-level names that are not the layout's: a folder holding them is not a latent dataset."""
        raise NotImplementedError

    def make_folders(self) -> None:
        raise NotImplementedError

    def dead_leftovers(self, folder: str) -> list[str]:
        """Keys in `folder` that writers known to be dead left half-done (a local store's temporary files of
        this host's dead processes; an object store can tell none)."""
        return []


class LocalStore(DatasetStore):
    """A latent dataset in a folder of a local (or POSIX shared) file system."""

    stages_data = True

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser()
        self.url = str(root)

    def path(self, key: str) -> Path:
        return self.root / key

    def where(self, key: str = "") -> str:
        return str(self.root / key) if key else self.url

    def read_bytes(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def seen(self, key: str) -> Seen | None:
        path = self.path(key)
        try:
            return Seen(path.read_bytes(), path.stat().st_mtime)
        except FileNotFoundError:
            return None

    def write(self, key: str, data: bytes) -> None:
        atomic_write_bytes(self.path(key), data)

    def publish(self, key: str, data: bytes) -> bool:
        return publish_exclusive(self.path(key), data.decode("utf-8"))

    def remove_if_unchanged(self, key: str, seen: Seen) -> bool:
        path = self.path(key)
        aside = unique_tmp_path(path).with_suffix(".stale")
        try:
            os.rename(path, aside)  # of several processes, one moves it
        except FileNotFoundError:
            return False
        if aside.read_bytes() != seen.content:  # a fresh record was created between the look and the rename
            try:
                os.link(aside, path)  # put it back
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return True

    def take_over(self, key: str, seen: Seen, data: bytes) -> bool:
        # No compare-and-swap on a file system: moved aside (one process can), then published exclusively.
        if not self.remove_if_unchanged(key, seen) and self.exists(key):
            return False
        return self.publish(key, data)

    def refresh(self, key: str, seen: Seen, data: bytes) -> Seen | None:
        try:
            os.utime(self.path(key))  # the mtime is the heartbeat: one system call, nothing rewritten
        except FileNotFoundError:
            return None
        return seen

    def remove(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def list(self, folder: str, suffix: str = "") -> list[str]:
        directory = self.path(folder)
        if not directory.is_dir():
            return []
        return sorted(p.name for p in directory.iterdir() if p.name.endswith(suffix) and not p.name.startswith("."))

    def new_data_file(self, shard: str, attempt: str) -> StagedData:
        staged = unique_tmp_path(self.path(STAGING_DIR) / f"{shard}{DATA_SUFFIX}")
        return StagedData(f"{STAGING_DIR}/{staged.name}", data_key(f"{shard}{DATA_SUFFIX}"), open(staged, "xb"))

    def close_data_file(self, staged: StagedData) -> None:
        staged.sink.close()
        fsync_path(self.path(staged.key))

    def move(self, key: str, final: str) -> None:
        os.replace(self.path(key), self.path(final))
        fsync_path(self.path(final).parent)

    def open_input(self, key: str) -> str:
        return str(self.path(key))

    def open_stream(self, key: str) -> IO[bytes]:
        return open(self.path(key), "rb")

    def foreign_entries(self) -> list[str]:
        if not self.root.exists():
            return []
        if not self.root.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(self.root))
        return sorted(p.name for p in self.root.iterdir() if not p.name.startswith(".") and p.name not in LAYOUT)

    def make_folders(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for folder in (DATA_DIR, MANIFEST_DIR, CLAIM_DIR, STAGING_DIR):
            self.path(folder).mkdir(exist_ok=True)

    def dead_leftovers(self, folder: str) -> list[str]:
        # Only this host's dead processes' files can be told from a live writer's (their names hold host and pid).
        files = sorted(self.path(folder).glob(".*.tmp"))
        return [f"{folder}/{file.name}" for file in files if left_by_dead_process(file)]


@cache
def store_errors() -> tuple[type[BaseException], ...]:
    """What a store raises when it fails (not when it answers no): OSError (a disk; s3fs's translations), a
    StorageFault, and the transport errors of the object-store clients that are installed (botocore's, aiohttp's)."""
    errors: list[type[BaseException]] = [OSError, StorageFault, TimeoutError]
    for module, name in (("botocore.exceptions", "BotoCoreError"), ("aiohttp", "ClientError")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # a client that is not installed raises nothing
            pass
    return tuple(errors)
