"""Atomic writes: a reader, or a rerun after a crash (even SIGKILL or a power cut), finds the old file or
the new one under its name, never a half-written one.

The pattern is always the same: write beside the target under a temporary name, flush it to disk
(fsync), rename over the target (atomic on POSIX), then fsync the folder so the rename itself survives.
A file's temporary name is unique to the writing process, so concurrent writers (several precompute
runs on one output folder, on several hosts) never write into each other's temporary file.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import os
import shutil
import socket
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

TMP_SUFFIX = ".tmp"


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file, or a folder's entries, to disk."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if os.path.isdir(path) else 0)
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def unique_tmp_path(path: str | os.PathLike) -> Path:
    """A hidden temporary name beside `path`, unique to this process: `.NAME.HOST.PID.RANDOM.tmp` (the host
    and pid let a later run tell a dead writer's leftovers from a live writer's file)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")


def left_by_dead_process(file: str | os.PathLike) -> bool:
    """Whether `file` is a `unique_tmp_path` of a process of this host that is gone (safe to remove)."""
    try:
        head, pid, _, suffix = Path(file).name.rsplit(".", 3)
    except ValueError:
        return False
    if "." + suffix != TMP_SUFFIX or not pid.isdigit() or not head.endswith("." + socket.gethostname()):
        return False
    return not pid_alive(int(pid))


def pid_alive(pid: int) -> bool:
    """Whether a process of this host has this pid (a reused pid counts as alive: the safe side)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


def fsync_tree(folder: str | os.PathLike) -> None:
    """Flush every file under `folder`, and the folders' entries, to disk (before a rename publishes it)."""
    for root, _, files in os.walk(folder):
        for name in files:
            fsync_path(os.path.join(root, name))
        fsync_path(root)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `path` for any writer (safetensors, parquet, PIL, ...); when the
    block ends without an error the file is fsynced and renamed to `path`, else it is removed."""
    path = Path(path)
    tmp = unique_tmp_path(path)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def publish_exclusive(path: str | os.PathLike, text: str) -> bool:
    """Write `text` to `path` only if no one has: the whole file or nothing, and of several concurrent
    writers exactly one wins (a hard link fails when the name exists, where a rename would silently
    replace it). True if this call wrote it."""
    path = Path(path)
    tmp = unique_tmp_path(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        fsync_path(tmp)
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent)
    return True


@contextmanager
def atomic_directory(path: str | os.PathLike, *, replace: bool = True) -> Iterator[Path]:
    """Yields an empty temporary folder beside `path`; when the block ends without an error every file in
    it is fsynced and the folder renamed to `path` (an existing folder `path` is replaced when `replace`, else
    it is an error; an existing file is never replaced). On an error the temporary folder is removed and `path`
    is untouched. The temporary and set-aside folders have `unique_tmp_path` names: no folder of the user's
    beside `path` is ever written or removed, and those of killed writers are cleaned up."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(errno.EEXIST, "exists and is not a folder, so it is not replaced by one", str(path))
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.*{TMP_SUFFIX}"):
        if left_by_dead_process(leftover):  # left by a writer that was killed
            shutil.rmtree(leftover, ignore_errors=True)
    tmp = unique_tmp_path(path)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        fsync_tree(tmp)
        if path.exists():
            if not replace or not path.is_dir():
                raise FileExistsError(errno.EEXIST, "already exists", str(path))
            # A rename cannot replace a non-empty folder: move the old one aside first, so that
            # `path` is missing for an instant at most and never half-written.
            old = unique_tmp_path(path)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(path.parent)


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, read in 4 MiB blocks: recorded when a file is written, compared when it
    is read back, it tells a complete file from a truncated or damaged one."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
