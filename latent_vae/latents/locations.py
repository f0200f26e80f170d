"""Where a latent dataset is: a local path or a URL, and the store that reads and writes it there."""

from __future__ import annotations

import os
from typing import Any

from .object_store import ObjectStore
from .storage import DatasetStore, LocalStore


def is_url(location: Any) -> bool:
    """Whether `location` names a place through fsspec (s3://, gs://, memory://...) rather than a local path."""
    return isinstance(location, str) and "://" in location and not location.startswith("file://")


def open_store(location: str | os.PathLike | DatasetStore, storage_options: dict | None = None, *,
               single_writer: bool = False) -> DatasetStore:
    """The store of a latent dataset at a local path or a URL (s3://BUCKET/PREFIX, gs://...). `storage_options`
    go to the fsspec file system (credentials, endpoint); `single_writer` allows a store without an atomic create."""
    if isinstance(location, DatasetStore):
        return location
    if is_url(location):
        return ObjectStore(str(location), storage_options, single_writer=single_writer)
    text = str(location)
    return LocalStore(text[len("file://"):] if text.startswith("file://") else location)
