"""A latent dataset under a prefix of an object store (s3://, gs://), through fsspec.

Object stores have no rename and no hard link, but they have atomic conditional writes, and the protocol rests on
them: a record (claim, manifest, `latents.json`) is published with a create that succeeds only if the key does
not exist (S3 `If-None-Match: *`, s3fs's mode "xb"; GCS `ifGenerationMatch=0`), and a claim is taken over or
heartbeated with a write that succeeds only if it is unchanged (S3 `If-Match: ETAG`; GCS `ifGenerationMatch=N`).
A data file is written in place under a name no other attempt uses (`data/NAME.ATTEMPT.parquet`), so a process
whose claim was taken over can never overwrite the file that the winner's manifest names.

A conditional write retried after a lost answer finds its own write there and reports a conflict: so every
record holds its writer's run id and time, and a conflict whose stored bytes are ours is our success.

Retries (throttling, 5xx, resets) are botocore's and s3fs's (`DEFAULT_OPTIONS`); what outlasts them is raised.
"""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..utils.errors import StorageError, one_line
from .storage import CLAIM_DIR, DATA_SUFFIX, LAYOUT, DatasetStore, Seen, StagedData, data_key

# Per protocol: retries with backoff for throttling (503 SlowDown), 5xx and dropped connections, and no listing
# cache (a listing cached by one call would hide a manifest another process published since).
DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    "s3": {"use_listings_cache": False,
           "config_kwargs": {"retries": {"max_attempts": 10, "mode": "standard"},
                             "connect_timeout": 10, "read_timeout": 60}},
    "gs": {"use_listings_cache": False},
}
# Requests in flight at once when a reader goes over every shard (manifests, footers, the closing verification).
CONCURRENT_REQUESTS = 16
# pyarrow reads a footer and then column chunks: fetched in blocks of this size, not fsspec's 5-50 MB read-ahead.
READ_BLOCK = 1 << 20


def _protocol(fs) -> str:
    protocol = fs.protocol
    return protocol[0] if isinstance(protocol, (tuple, list)) else protocol


def store_options(url: str, options: dict | None) -> dict:
    """The fsspec options for `url`: this module's defaults for its protocol, updated by the caller's `options`."""
    import fsspec

    return _merged(fsspec.core.split_protocol(url)[0] or "file", options)


def _merged(protocol: str, options: dict | None) -> dict:
    merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in DEFAULT_OPTIONS.get(protocol, {}).items()}
    for key, value in (options or {}).items():
        nested = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = {**merged[key], **value} if nested else value
    return merged


class ObjectStore(DatasetStore):
    """A latent dataset at URL (s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, or another fsspec URL with `single_writer`)."""

    stages_data = False

    def __init__(self, url: str, storage_options: dict | None = None, *, single_writer: bool = False) -> None:
        self.url = url.rstrip("/")
        self.storage_options = store_options(self.url, storage_options)
        self.fs = ProcessFileSystem(self.url, self.storage_options)
        self.root = self.fs._strip_protocol(self.url).rstrip("/")
        self.protocol = _protocol(self.fs)
        self.single_writer = single_writer
        self.conditions = _conditions(self.protocol)

    def full(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    # -- checks before any work ----------------------------------------------------------------------------------
    def check(self, *, write: bool) -> None:
        """The bucket is there and the credentials may read (and write) it; a store that would not honour the
        protocol's atomic create is refused unless a single writer was asserted. StorageError, one line, if not."""
        with storage_errors(self.where()):
            bucket = self.root.split("/", 1)[0]
            try:
                self.fs.info(bucket)  # raises for missing credentials or a denied permission too
            except FileNotFoundError:
                raise FileNotFoundError(errno.ENOENT, "The specified bucket does not exist", bucket) from None
            self.list("")  # may the credentials list the prefix?
            if write:
                self._check_writes()

    def _check_writes(self) -> None:
        probe = f"{CLAIM_DIR}/.probe-{uuid.uuid4().hex}"
        text = b"probe"
        try:
            self.write(probe, text)  # permission to write
            if self.single_writer:
                return
            atomic = self.conditions is not None and not self.conditions.publish(self, probe, b"other")
            if atomic:
                seen = self.seen(probe)
                atomic = not self.conditions.replace(self, probe, Seen(seen.content, seen.modified, '"0"'), b"x")
        finally:
            self.remove(probe)
        if not atomic:
            raise StorageError(f"{self.where()}: this store does not honour conditional writes (If-None-Match / "
                               "If-Match), which concurrent runs need to write each shard once; run a single "
                               "writer and say so with --single-writer (single_writer=True)")

    # -- records ---------------------------------------------------------------------------------------------------
    def read_bytes(self, key: str) -> bytes:
        return self.fs.cat_file(self.full(key))

    def exists(self, key: str) -> bool:
        return self.fs.exists(self.full(key))

    def seen(self, key: str) -> Seen | None:
        try:
            if self.conditions is not None:
                return self.conditions.seen(self, key)
            info = self.fs.info(self.full(key))
            return Seen(self.read_bytes(key), _timestamp(info), None)
        except FileNotFoundError:
            return None

    def write(self, key: str, data: bytes) -> None:
        self.fs.pipe_file(self.full(key), data)  # a PUT is atomic: readers see the old object or the new

    def publish(self, key: str, data: bytes) -> bool:
        if self.conditions is None:  # only with single_writer (checked up front)
            if self.exists(key):
                return False
            self.write(key, data)
            return True
        return self.conditions.publish(self, key, data)

    def take_over(self, key: str, seen: Seen, data: bytes) -> bool:
        if self.conditions is None:
            self.write(key, data)
            return True
        return self.conditions.replace(self, key, seen, data)

    def refresh(self, key: str, seen: Seen, data: bytes) -> Seen | None:
        # No mtime to touch: the claim is rewritten (its bytes change, so its ETag does), only if still ours.
        if not self.take_over(key, seen, data):
            return None
        return self.seen(key)

    def remove(self, key: str) -> None:
        try:
            self.fs.rm_file(self.full(key))
        except FileNotFoundError:
            pass

    def remove_if_unchanged(self, key: str, seen: Seen) -> bool:
        if self.conditions is None:
            self.remove(key)
            return True
        return self.conditions.remove(self, key, seen)

    def list(self, folder: str, suffix: str = "") -> list[str]:
        try:
            names = self.fs.ls(self.full(folder), detail=False, refresh=True)
        except FileNotFoundError:
            return []
        names = (n.rstrip("/").rsplit("/", 1)[-1] for n in names)
        return sorted(n for n in names if n.endswith(suffix) and not n.startswith("."))

    # -- data files ----------------------------------------------------------------------------------------------
    def new_data_file(self, shard: str, attempt: str) -> StagedData:
        key = data_key(f"{shard}.{attempt}-{uuid.uuid4().hex[:8]}{DATA_SUFFIX}")
        return StagedData(key, key, self.fs.open(self.full(key), "wb"))

    def close_data_file(self, staged: StagedData) -> None:
        staged.sink.close()  # completes the upload: the object exists whole from here on

    def open_input(self, key: str):
        return self.fs.open(self.full(key), "rb", block_size=READ_BLOCK, cache_type="readahead")

    def open_stream(self, key: str):
        return self.fs.open(self.full(key), "rb", block_size=8 << 20, cache_type="readahead")

    def map(self, function, items) -> list:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(CONCURRENT_REQUESTS, thread_name_prefix="store") as pool:
            return list(pool.map(function, items))

    # -- the folder ------------------------------------------------------------------------------------------------
    def foreign_entries(self) -> list[str]:
        return [n for n in self.list("") if n not in LAYOUT]

    def make_folders(self) -> None:
        pass  # an object store has no folders: a key's prefix is made with it


class ProcessFileSystem:
    """The fsspec file system of a URL, made again in each process that uses it: a client's event loop and
    connections survive neither a fork (DataLoader workers) nor pickling (spawned processes, Ray tasks)."""

    def __init__(self, url: str, storage_options: dict) -> None:
        self.url, self.storage_options = url, storage_options
        self._fs, self._pid = _file_system(url, storage_options), os.getpid()

    def __getattr__(self, name: str) -> Any:
        if self._pid != os.getpid():
            self._fs, self._pid = _file_system(self.url, self.storage_options), os.getpid()
        return getattr(self._fs, name)

    def __reduce__(self):
        return (ProcessFileSystem, (self.url, self.storage_options))


def file_system(url: str, storage_options: dict | None = None) -> ProcessFileSystem:
    """The file system of `url` with this module's defaults updated by `storage_options`."""
    return ProcessFileSystem(url, store_options(url, storage_options))


def _file_system(url: str, storage_options: dict):
    """fsspec's file system for `url`; StorageError naming the extra to install when its package is missing."""
    import fsspec

    protocol = fsspec.core.split_protocol(url)[0]
    try:
        return fsspec.core.url_to_fs(url, **storage_options)[0]
    except ImportError as error:
        extra = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}.get(protocol)
        hint = f"; pip install 'latent-vae[{extra}]'" if extra else ""
        raise StorageError(f"{url}: the {protocol}:// file system is not installed ({one_line(error)}){hint}") from None


def _timestamp(info: dict) -> float:
    modified = info.get("LastModified") or info.get("mtime") or info.get("updated") or info.get("created")
    if hasattr(modified, "timestamp"):
        return modified.timestamp()
    if isinstance(modified, str):
        from datetime import datetime

        return datetime.fromisoformat(modified.replace("Z", "+00:00")).timestamp()
    return float(modified or 0.0)


# -- the conditional writes of each store -----------------------------------------------------------------------


class _S3Conditions:
    """S3 (and S3-compatible servers that honour them): If-None-Match / If-Match on PutObject and DeleteObject."""

    @staticmethod
    def _split(store: ObjectStore, key: str) -> tuple[str, str]:
        bucket, path = store.full(key).split("/", 1)
        return bucket, path

    def seen(self, store: ObjectStore, key: str) -> Seen:
        from fsspec.asyn import sync

        bucket, path = self._split(store, key)
        # One GET gives the bytes with their ETag: a HEAD then a GET could pair one version's ETag with another's bytes.
        response = store.fs.call_s3("get_object", Bucket=bucket, Key=path)
        body = response["Body"]
        try:
            content = sync(store.fs.loop, body.read)
        finally:
            body.close()
        return Seen(content, response["LastModified"].timestamp(), response["ETag"])

    def publish(self, store: ObjectStore, key: str, data: bytes) -> bool:
        bucket, path = self._split(store, key)
        try:
            store.fs.call_s3("put_object", Bucket=bucket, Key=path, Body=data, IfNoneMatch="*")
            return True
        except FileExistsError:
            return _ours(store, key, data)

    def replace(self, store: ObjectStore, key: str, seen: Seen, data: bytes) -> bool:
        bucket, path = self._split(store, key)
        try:
            store.fs.call_s3("put_object", Bucket=bucket, Key=path, Body=data, IfMatch=seen.version)
            return True
        except FileNotFoundError:  # removed meanwhile (released, or taken over and done)
            return False
        except OSError as error:
            if not _precondition_failed(error):
                raise
            return _ours(store, key, data)

    def remove(self, store: ObjectStore, key: str, seen: Seen) -> bool:
        bucket, path = self._split(store, key)
        return _delete_if_unchanged(lambda: store.fs.call_s3("delete_object", Bucket=bucket, Key=path,
                                                             IfMatch=seen.version))


class _GCSConditions:
    """Google Cloud Storage: generation preconditions (`ifGenerationMatch`), through gcsfs's requests."""

    def seen(self, store: ObjectStore, key: str) -> Seen:
        info = store.fs.info(store.full(key))
        generation = str(info.get("generation"))
        content = store.fs.cat_file(f"{store.full(key)}#{generation}") if store.fs.version_aware else \
            store.read_bytes(key)
        return Seen(content, _timestamp(info), generation)

    def publish(self, store: ObjectStore, key: str, data: bytes) -> bool:
        return self._upload(store, key, data, "0")

    def replace(self, store: ObjectStore, key: str, seen: Seen, data: bytes) -> bool:
        return self._upload(store, key, data, seen.version)

    def remove(self, store: ObjectStore, key: str, seen: Seen) -> bool:
        bucket, path = store.full(key).split("/", 1)
        return _delete_if_unchanged(lambda: store.fs.call("DELETE", "b/{}/o/{}", bucket, path,
                                                          ifGenerationMatch=seen.version))

    def _upload(self, store: ObjectStore, key: str, data: bytes, generation: str | None) -> bool:
        from urllib.parse import quote

        bucket, path = store.full(key).split("/", 1)
        try:
            store.fs.call("POST", f"{store.fs._location}/upload/storage/v1/b/{quote(bucket)}/o", name=path,
                          uploadType="media", ifGenerationMatch=generation, data=data, json_out=True)
            return True
        except (FileExistsError, OSError) as error:
            if not isinstance(error, FileExistsError) and not _precondition_failed(error):
                raise
            return _ours(store, key, data)


def _conditions(protocol: str):
    if protocol in ("s3", "s3a"):
        return _S3Conditions()
    if protocol in ("gs", "gcs"):
        return _GCSConditions()
    return None


def _precondition_failed(error: BaseException) -> bool:
    """Whether a write was refused by its condition (HTTP 412), as s3fs and gcsfs raise it."""
    cause = error.__cause__ or error
    response = getattr(cause, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code in ("PreconditionFailed", "412") or status == 412
    return "412" in str(error) or "precondition" in str(error).lower() or "pre-condition" in str(error).lower()


def _delete_if_unchanged(delete) -> bool:
    """Run a conditional DELETE; False when the object is gone or changed since it was seen (the precondition)."""
    try:
        delete()
        return True
    except FileNotFoundError:
        return False
    except OSError as error:
        if _precondition_failed(error):
            return False
        raise


def _ours(store: ObjectStore, key: str, data: bytes) -> bool:
    """After a refused conditional write: whether the stored bytes are ours (a retry of a write that had landed)."""
    try:
        return store.read_bytes(key) == data
    except FileNotFoundError:
        return False


@contextmanager
def storage_errors(where: str) -> Iterator[None]:
    """What an object store raises for a missing bucket, missing credentials, a denied permission or an
    unreachable endpoint becomes one StorageError naming `where` and what to do."""
    try:
        yield
    except StorageError:
        raise
    except Exception as error:
        message = describe_storage_error(error)
        if message is None:
            raise
        raise StorageError(f"{where}: {message}") from None


def describe_storage_error(error: BaseException) -> str | None:
    """One line for a store's refusal (what to do included), or None for an error that is not one."""
    names = {type(e).__name__ for e in (error, error.__cause__, error.__context__) if e is not None}
    text = str(error)
    if "NoCredentialsError" in names or "unable to locate credentials" in text.lower():
        return ("no credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE or "
                "~/.aws/credentials; GOOGLE_APPLICATION_CREDENTIALS for gs://; or pass --storage-options)")
    if names & {"EndpointConnectionError", "ClientConnectorError", "ConnectTimeoutError"} or \
            isinstance(error, ConnectionError):
        return (f"cannot reach the store ({one_line(error)}); check AWS_ENDPOINT_URL or the endpoint in "
                "--storage-options")
    if isinstance(error, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        return "access denied: the credentials may not read or write here (check their permissions on the bucket)"
    if isinstance(error, FileNotFoundError) and "bucket" in text.lower():
        return "no such bucket (create it, or check its name and the endpoint)"
    return None
