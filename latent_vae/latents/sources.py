"""The inputs of a precompute run, as input shards: the unit of work that a run claims, encodes and commits whole.

- WebDataset tar shards (img2dataset's default output; a path, a glob, a list or a folder of them): each
  tar file is a shard; a sample is the members sharing a key (`__key__`: the member name up to its first
  dot), its image from the jpg/jpeg/png/webp member, its caption from txt (or json's "caption"/"text").
- parquet files: each file is a shard; the image column holds 🤗 Image structs, encoded bytes (img2dataset's
  parquet output: a binary `jpg` column) or paths. Read with pyarrow, batch by batch: nothing is converted
  into the 🤗 datasets cache.
- a streamed 🤗 `datasets.IterableDataset`: its own shards (`n_shards`).
- an image folder, a `save_to_disk` folder, arrow files or a `datasets.Dataset`: virtual shards of
  `shard_size` rows in a stable order (sorted paths, row order), named `part-00000`, `part-00001`, ...

Every shard yields `Sample`s whose image is what `latent_vae.images.reading.load_image` reads (bytes, a path or a
`{"bytes", "path"}` dict): decoding happens later, in the run's DataLoader workers, through that one reader.
`open_saved_dataset` is also the reader of saved datasets that training uses.
"""

from __future__ import annotations

import glob
import hashlib
import io
import os
import re
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from ..images.reading import IMAGE_SUFFIXES
from ..utils.errors import StorageFault, one_line
from ..utils.file_boundary import json_or_none, parse_json, reading
from .locations import is_url
from .metadata import uniform_columns

TABLE_SUFFIXES = (".parquet", ".arrow")
# A shard read from an object store is fetched in blocks of this size as it is read: bounded memory, no local copy.
STREAM_BLOCK = 8 << 20
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# What `Dataset.save_to_disk` / `DatasetDict.save_to_disk` write at the top of their folder.
SAVED_MARKERS = ("state.json", "dataset_dict.json")
# Files in an image folder that describe images rather than being images.
METADATA_FILE = "metadata.jsonl"
CAPTION_SUFFIX = ".txt"
FOLDER_IMAGE_COLUMN = "image"
# WebDataset members, in order of preference for the image; the caption; the metadata passed through.
TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp") + tuple(
    s.lstrip(".") for s in IMAGE_SUFFIXES if s.lstrip(".") not in ("jpg", "jpeg", "png", "webp"))
TAR_CAPTION, TAR_JSON = "text", "json"
# Binary columns that hold encoded images in img2dataset-style parquet files.
BYTES_IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image", "img")
# A source column named `key` is the samples' key (img2dataset writes one), not a passthrough column.
KEY_COLUMN = "key"


@dataclass
class Sample:
    """One input: its key, its undecoded image (what `load_image` takes; None when missing), a name for
    messages, and the source's other columns (captions, labels) passed through unchanged."""

    key: str
    image: Any
    name: str
    passthrough: dict


@dataclass
class Source:
    """The inputs as shards. `passthrough` holds the 🤗 `Features` of the columns copied to every row."""

    shards: list  # TarShard | ParquetShard | RowRangeShard | StreamShard: each has `name` and `samples()`
    image_column: str
    key_column: str | None
    passthrough: Any  # datasets.Features
    description: str
    sharded: bool  # True: the input's own shards; False: virtual shards of shard_size rows
    # Of a virtual-sharded input: sha256 of its keys in order. Its shards are positions in that order, so a
    # rerun on a folder that has changed would skip or repeat images; the run refuses it instead.
    keys_digest: str | None = None


# -- shards ------------------------------------------------------------------------------------------------------


def _shard_name(path: str | Path) -> str:
    """'/data/00012.tar' -> '00012' (the output shard is named after its input shard)."""
    return Path(path).name.split(".")[0]


_MEMBER = re.compile(r"^((?:.*/|)[^./][^/]*?)\.([^/]*)$")  # WebDataset's rule: key = up to the first dot of the basename


def _open_input(path: str, fs) -> Any:
    """A local path as it is (readers open it themselves); a file of an fsspec file system opened for streaming:
    read in blocks of STREAM_BLOCK, so a shard never lands on the local disk."""
    if fs is None:
        return path
    url = fs.unstrip_protocol(path)
    with _faults(url):
        return _RemoteInput(fs.open(path, "rb", block_size=STREAM_BLOCK, cache_type="readahead"), url)


class _RemoteInput(io.RawIOBase):
    """A file of an object store whose read errors are StorageFaults: a dropped connection that outlasted the
    retries is the store's fault, not a damaged shard (tarfile and pyarrow would report it as one)."""

    def __init__(self, file, url: str) -> None:
        self.file, self.url = file, url

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        with _faults(self.url):
            data = self.file.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def read(self, size: int = -1) -> bytes:
        with _faults(self.url):
            return self.file.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.file.seek(offset, whence)

    def tell(self) -> int:
        return self.file.tell()

    @property
    def size(self) -> int:
        return self.file.size

    def close(self) -> None:
        self.file.close()
        super().close()


@contextmanager
def _faults(url: str) -> Iterator[None]:
    try:
        yield
    except Exception as error:
        raise StorageFault(f"{url}: {one_line(error, with_type=True)}") from error


class TarShard:
    """A WebDataset tar file, read in one forward pass (works for .tar.gz, on any file system and from an object
    store: `fs`, an fsspec file system, streams it)."""

    def __init__(self, path: str | Path, fs=None) -> None:
        self.path, self.name, self.fs = str(path), _shard_name(path), fs
        if fs is not None:
            self.path = fs.unstrip_protocol(self.path)

    def samples(self) -> Iterator[Sample]:
        source = _open_input(self.fs._strip_protocol(self.path), self.fs) if self.fs else None
        with tarfile.open(self.path, "r|*") if source is None else tarfile.open(fileobj=source, mode="r|*") as tar:
            key, members = None, {}
            for member in tar:
                match = _MEMBER.match(member.name) if member.isfile() else None
                if match is None:
                    continue
                if match.group(1) != key:
                    if key is not None:
                        yield self._sample(key, members)
                    key, members = match.group(1), {}
                members[match.group(2).lower()] = tar.extractfile(member).read()
            if key is not None:
                yield self._sample(key, members)

    def _sample(self, key: str, members: dict[str, bytes]) -> Sample:
        image = next((members[e] for e in TAR_IMAGE_EXTENSIONS if e in members), None)
        metadata = members[TAR_JSON].decode("utf-8", "replace") if TAR_JSON in members else None
        caption = members["txt"].decode("utf-8", "replace").strip() if "txt" in members else None
        if caption is None and metadata is not None:
            # a caption that is not text (a number, a dict) is stored as its JSON text (latents.metadata); a member
            # that is not JSON is kept as text
            parsed = json_or_none(metadata)
            caption = parsed.get("caption", parsed.get("text")) if isinstance(parsed, dict) else None
        return Sample(key, image, f"{self.path}:{key}", {TAR_CAPTION: caption, TAR_JSON: metadata})


class ParquetShard:
    """One parquet file, read batch by batch with pyarrow (a shard of millions of rows never sits in memory)."""

    def __init__(self, path: str | Path, image_column: str, key_column: str | None, columns: list[str],
                 fs=None) -> None:
        self.path, self.name, self.fs = str(path), _shard_name(path), fs
        self.image_column, self.key_column, self.columns = image_column, key_column, columns
        if fs is not None:
            self.path = fs.unstrip_protocol(self.path)

    def samples(self) -> Iterator[Sample]:
        import pyarrow.parquet as pq

        wanted = [self.image_column, *([self.key_column] if self.key_column else []), *self.columns]
        index = 0
        source = _open_input(self.fs._strip_protocol(self.path), self.fs) if self.fs else self.path
        for batch in pq.ParquetFile(source).iter_batches(batch_size=64, columns=list(dict.fromkeys(wanted))):
            for row in batch.to_pylist():
                key = str(row[self.key_column]) if self.key_column else f"{self.name}/{index}"
                yield Sample(key, row[self.image_column], f"{self.path}[{index}]", {c: row[c] for c in self.columns})
                index += 1


class RowRangeShard:
    """Rows [start, stop) of a datasets.Dataset (memory-mapped arrow): a virtual shard of an unsharded input.
    With `fs` (an image folder on an object store) the image column holds URLs, fetched as the rows are read."""

    def __init__(self, name: str, dataset, start: int, stop: int, image_column: str, keys: list[str] | None,
                 columns: list[str], where: str, fs=None) -> None:
        self.name, self.dataset, self.start, self.stop = name, dataset, start, stop
        self.image_column, self.keys, self.columns, self.where, self.fs = image_column, keys, columns, where, fs

    def samples(self) -> Iterator[Sample]:
        for begin in range(self.start, self.stop, 64):
            chunk = self.dataset[begin:min(begin + 64, self.stop)]
            for offset, image in enumerate(chunk[self.image_column]):
                index = begin + offset
                path = image.get("path") if isinstance(image, dict) else None
                if self.fs is not None and path:
                    with _faults(path):
                        image = {"bytes": self.fs.cat_file(self.fs._strip_protocol(path)), "path": path}
                yield Sample(self.keys[index] if self.keys else str(index), image, path or f"{self.where}[{index}]",
                             {c: chunk[c][offset] for c in self.columns})


class StreamShard:
    """Shard `index` of a streamed datasets.IterableDataset (`IterableDataset.shard`: whole data files)."""

    def __init__(self, dataset, index: int, count: int, image_column: str, key_column: str | None,
                 columns: list[str]) -> None:
        self.dataset, self.index, self.count, self.name = dataset, index, count, f"stream-{index:05d}"
        self.image_column, self.key_column, self.columns = image_column, key_column, columns

    def samples(self) -> Iterator[Sample]:
        for number, row in enumerate(self.dataset.shard(num_shards=self.count, index=self.index)):
            key = str(row[self.key_column]) if self.key_column else f"{self.name}/{number}"
            yield Sample(key, row[self.image_column], f"{self.name}[{number}]", {c: row[c] for c in self.columns})


# -- opening a source ----------------------------------------------------------------------------------------------


def open_source(data: Any, *, image_column: str | None = None, key_column: str | None = None,
                caption_column: str = "text", split: str | None = None, shard_size: int = 512,
                reserved: tuple[str, ...] = (), storage_options: dict | None = None) -> Source:
    """SRC -> Source: tar shards, parquet/arrow files (a path, a glob, a list or a folder of them), a
    save_to_disk folder, an image folder, or a datasets.Dataset / DatasetDict / IterableDataset; paths may be URLs
    of an object store (s3://, gs://: tar and parquet shards, image folders; `storage_options` for fsspec).
    `reserved`: column names the output writes itself; a source column with one of them is refused."""
    import datasets

    if is_url(data) or isinstance(data, (list, tuple)) and data and all(is_url(d) for d in data):
        return _remote_source(data, image_column, key_column, caption_column, shard_size, reserved, storage_options)

    if isinstance(data, datasets.IterableDataset):
        return _stream_source(data, image_column, key_column, reserved)
    if isinstance(data, (datasets.Dataset, datasets.DatasetDict)):
        dataset = pick_split(data, split, "the dataset")
        return _dataset_source(dataset, image_column, key_column, shard_size, reserved, type(data).__name__)
    if isinstance(data, (list, tuple)) and data and all(isinstance(d, (str, os.PathLike)) for d in data):
        return _files_source([Path(d) for d in data], image_column, key_column, shard_size, reserved,
                             f"{len(data)} files")
    if not isinstance(data, (str, os.PathLike)):
        raise ValueError(f"unsupported data source of type {type(data).__name__}: pass an image folder, tar shards, "
                         "parquet or arrow files, a datasets folder, or a datasets Dataset / IterableDataset")
    text = str(data)
    if any(c in text for c in "*?["):
        files = [Path(p) for p in sorted(glob.glob(os.path.expanduser(text)))]
        if not files:
            raise ValueError(f"{text}: matches no files")
        return _files_source(files, image_column, key_column, shard_size, reserved, text)
    path = Path(text).expanduser()
    if not path.exists():
        raise ValueError(f"{text}: no such file or folder")
    if path.is_file():
        return _files_source([path], image_column, key_column, shard_size, reserved, text)
    if any((path / marker).is_file() for marker in SAVED_MARKERS):
        dataset = pick_split(datasets.load_from_disk(str(path)), split, text)
        return _dataset_source(dataset, image_column, key_column, shard_size, reserved, text)
    entries = [p for p in path.rglob("*") if p.is_file() and not _hidden(p, path)]
    has_images = any(p.suffix.lower() in IMAGE_SUFFIXES for p in entries)
    shard_files = sorted(p for p in entries if p.name.endswith(TAR_SUFFIXES) or p.suffix in TABLE_SUFFIXES)
    if shard_files and not has_images:
        return _files_source(shard_files, image_column, key_column, shard_size, reserved, text)
    return _folder_source(path, caption_column, shard_size, reserved)


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _remote_source(data, image_column, key_column, caption_column, shard_size, reserved,
                   storage_options: dict | None) -> Source:
    """Tar or parquet shards (a URL, a glob or a list of them, or a prefix holding them) or an image folder on an
    object store. Nothing is downloaded here: files are listed, and shards are streamed when they are read."""
    from .object_store import file_system, storage_errors

    urls = list(data) if isinstance(data, (list, tuple)) else [data]
    where = urls[0] if len(urls) == 1 else f"{len(urls)} files"
    fs = file_system(urls[0], storage_options)
    with storage_errors(where):
        files: list[str] = []
        for url in urls:
            path = fs._strip_protocol(url)
            if any(c in url for c in "*?["):
                matched = sorted(fs.glob(path))
                if not matched:
                    raise ValueError(f"{url}: matches no files")
                files += matched
            elif fs.isfile(path):
                files.append(path)
            elif fs.isdir(path):
                entries = [p for p in sorted(fs.find(path)) if not _hidden(PurePosixPath(p), PurePosixPath(path))]
                if not any(PurePosixPath(p).suffix.lower() in IMAGE_SUFFIXES for p in entries):
                    files += [p for p in entries
                              if p.endswith(TAR_SUFFIXES) or PurePosixPath(p).suffix in TABLE_SUFFIXES]
                else:
                    return _folder_source(PurePosixPath(path), caption_column, shard_size, reserved, fs, url)
            else:
                raise ValueError(f"{url}: no such file or folder")
    return _files_source([PurePosixPath(f) for f in files], image_column, key_column, shard_size, reserved, where, fs)


def _files_source(files: list[Path], image_column, key_column, shard_size, reserved, where: str, fs=None) -> Source:
    kinds = {"tar" if f.name.endswith(TAR_SUFFIXES) else f.suffix for f in files}
    if kinds == {"tar"}:
        return _tar_source(files, reserved, where, fs)
    if kinds == {".parquet"}:
        return _parquet_source(files, image_column, key_column, reserved, where, fs)
    if fs is not None:
        raise ValueError(f"{where}: expected .tar or .parquet files (one kind), or an image folder, on an object store; "
                         f"got {', '.join(sorted(kinds))}")
    if kinds == {".arrow"}:
        return _dataset_source(read_table_files(files, where), image_column, key_column, shard_size, reserved, where)
    raise ValueError(f"{where}: expected .tar, .parquet or .arrow files (one kind), or an image folder; "
                     f"got {', '.join(sorted(kinds))}")


def _unique_names(shards: list, where: str) -> list:
    seen: dict[str, str] = {}
    for shard in shards:
        if shard.name in seen:
            raise ValueError(f"{where}: two input shards are both named {shard.name!r} ({seen[shard.name]} and "
                             f"{shard.path}); output shards are named after input shards, so rename one")
        seen[shard.name] = shard.path
    return shards


def _tar_source(files: list[Path], reserved, where: str, fs=None) -> Source:
    import datasets

    features = datasets.Features({TAR_CAPTION: datasets.Value("string"), TAR_JSON: datasets.Value("string")})
    _check_clashes(list(features), reserved, where)
    shards = _unique_names([TarShard(f, fs) for f in files], where)
    return Source(shards, "jpg/jpeg/png/webp member", "__key__", features, where, sharded=True)


def _parquet_source(files: list[Path], image_column, key_column, reserved, where: str, fs=None) -> Source:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    # The first file's schema stands for all of them: reading every footer up front would cost minutes on a
    # shared file system with 100k shards; a file that differs fails when its shard is read.
    with reading(files[0], "parquet file"):
        schema = pq.read_schema(_open_input(str(files[0]), fs))
    try:
        features = datasets.Features.from_arrow_schema(schema)
    except (TypeError, ValueError, pa.ArrowException) as error:
        raise ValueError(f"{files[0]}: unsupported parquet schema ({error})") from None
    if image_column is None:
        images = [c for c, f in features.items() if isinstance(f, datasets.Image)]
        if not images:
            images = [c for c in schema.names if c in BYTES_IMAGE_COLUMNS and (
                pa.types.is_binary(schema.field(c).type) or pa.types.is_large_binary(schema.field(c).type))]
        image_column = _only_image_column(images, schema.names, where)
    _check_column(image_column, schema.names, where)
    kind = schema.field(image_column).type
    if not (isinstance(features[image_column], datasets.Image) or pa.types.is_binary(kind)
            or pa.types.is_large_binary(kind) or pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ValueError(f"column {image_column!r} holds {kind}, not images, image bytes or image paths")
    key_column = _key_column(key_column, schema.names, where)
    columns = [c for c in schema.names if c not in (image_column, KEY_COLUMN)]
    _check_clashes(columns, reserved, where)
    shards = _unique_names([ParquetShard(f, image_column, key_column, columns, fs) for f in files], where)
    return Source(shards, image_column, key_column, datasets.Features({c: features[c] for c in columns}), where,
                  sharded=True)


def _dataset_source(dataset, image_column, key_column, shard_size: int, reserved, where: str, fs=None) -> Source:
    import datasets

    if image_column is None:
        image_column = _only_image_column(
            [c for c, f in dataset.features.items() if isinstance(f, datasets.Image)], dataset.column_names, where)
    _check_column(image_column, dataset.column_names, where)
    feature = dataset.features[image_column]
    if not (isinstance(feature, datasets.Image) or getattr(feature, "dtype", None) in ("string", "large_string")):
        raise ValueError(f"column {image_column!r} holds {feature}, not images or image paths")
    # Undecoded images: workers decode them through load_image, and a corrupt one fails its row, not the run.
    dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    key_column = _key_column(key_column, dataset.column_names, where)
    keys = None
    if key_column is not None:
        keys = [str(k) for k in dataset[key_column]]
        if len(set(keys)) != len(keys):  # known before the run: refused up front, naming a repeated key
            seen: set[str] = set()
            repeated = next(k for k in keys if k in seen or seen.add(k))
            raise ValueError(f"{where}: key column {key_column!r} has repeated values (e.g. {repeated!r}): keys must "
                             "be unique; name a column of unique ids with --key-column")
    columns = [c for c in dataset.column_names if c not in (image_column, KEY_COLUMN)]
    _check_clashes(columns, reserved, where)
    if len(dataset) == 0:
        raise ValueError(f"{where}: no rows")
    digits = max(5, len(str((len(dataset) - 1) // shard_size)))
    shards = [RowRangeShard(f"part-{start // shard_size:0{digits}d}", dataset, start,
                            min(start + shard_size, len(dataset)), image_column, keys, columns, where, fs)
              for start in range(0, len(dataset), shard_size)]
    digest = hashlib.sha256("\n".join(keys if keys else [str(len(dataset))]).encode()).hexdigest()
    return Source(shards, image_column, key_column, datasets.Features({c: dataset.features[c] for c in columns}),
                  where, sharded=False, keys_digest=digest)


def _stream_source(dataset, image_column, key_column, reserved) -> Source:
    import datasets

    features = dataset.features or dataset._resolve_features().features
    if image_column is None:
        image_column = _only_image_column([c for c, f in features.items() if isinstance(f, datasets.Image)],
                                          list(features), "the streamed dataset")
    _check_column(image_column, list(features), "the streamed dataset")
    if isinstance(features[image_column], datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    key_column = _key_column(key_column, list(features), "the streamed dataset")
    columns = [c for c in features if c not in (image_column, KEY_COLUMN)]
    _check_clashes(columns, reserved, "the streamed dataset")
    count = dataset.n_shards
    shards = [StreamShard(dataset, i, count, image_column, key_column, columns) for i in range(count)]
    return Source(shards, image_column, key_column, datasets.Features({c: features[c] for c in columns}),
                  f"IterableDataset ({count} shards)", sharded=True)


def _folder_source(folder: Path, caption_column: str, shard_size: int, reserved, fs=None, where: str = "") -> Source:
    import datasets

    rows = _folder_rows(folder, caption_column, fs)
    where = where or str(folder)
    if not rows[FOLDER_IMAGE_COLUMN]:
        raise ValueError(f"{where}: an empty folder (no images, tar shards, parquet or arrow files)")
    dataset = datasets.Dataset.from_dict(rows).cast_column(FOLDER_IMAGE_COLUMN, datasets.Image(decode=False))
    return _dataset_source(dataset, FOLDER_IMAGE_COLUMN, "file_name", shard_size, reserved, where, fs)


class _Listing:
    """An image folder's files and their text, on the local disk or (`fs`) on an object store."""

    def __init__(self, folder: Path, fs=None) -> None:
        self.fs = fs
        found = (PurePosixPath(p) for p in fs.find(str(folder))) if fs else (p for p in folder.rglob("*") if p.is_file())
        self.files = sorted(p for p in found if not _hidden(p, folder))
        self.present = set(self.files)

    def text(self, path: Path) -> str:
        return self.fs.cat_file(str(path)).decode("utf-8") if self.fs else path.read_text()

    def identity(self, path: Path) -> Path:
        return PurePosixPath(os.path.normpath(str(path))) if self.fs else path.resolve()

    def url(self, path: Path) -> str:
        return self.fs.unstrip_protocol(str(path)) if self.fs else str(path)


def _folder_rows(folder: Path, caption_column: str, fs=None) -> dict[str, list]:
    """An image folder as columns: every file but captions, metadata and hidden files is an input (a file
    that turns out not to be an image is listed as a failure, not silently ignored)."""
    listing = _Listing(folder, fs)
    files = [p for p in listing.files if p.name != METADATA_FILE and p.suffix.lower() != CAPTION_SUFFIX]
    # metadata.jsonl anywhere, file_name relative to its own folder (🤗 imagefolder's convention).
    metadata: dict[Path, dict] = {}
    for meta_file in [p for p in listing.files if p.name == METADATA_FILE]:
        for number, line in enumerate(listing.text(meta_file).splitlines(), 1):
            if not line.strip():
                continue
            entry = parse_json(line, f"{meta_file}:{number}")
            if not isinstance(entry, dict) or "file_name" not in entry:
                raise ValueError(f"{meta_file}:{number}: each line needs a \"file_name\"")
            metadata[listing.identity(meta_file.parent / entry.pop("file_name"))] = entry
    columns = ["file_name"] + sorted({k for entry in metadata.values() for k in entry} - {"file_name"})
    has_captions = any(p.with_suffix(CAPTION_SUFFIX) in listing.present for p in files)
    if has_captions and caption_column not in columns:
        columns.append(caption_column)
    rows: dict[str, list] = {FOLDER_IMAGE_COLUMN: [], **{c: [] for c in columns}}
    for path in files:
        entry = metadata.get(listing.identity(path), {})
        rows[FOLDER_IMAGE_COLUMN].append(listing.url(path))
        rows["file_name"].append(path.relative_to(folder).as_posix())
        for column in columns[1:]:
            rows[column].append(entry.get(column))
        caption_file = path.with_suffix(CAPTION_SUFFIX)
        if has_captions and rows[caption_column][-1] is None and caption_file in listing.present:
            rows[caption_column][-1] = listing.text(caption_file).strip()
    return uniform_columns(rows)  # a column of mixed types (3 and "cat") becomes JSON text: data, never an error


def _only_image_column(candidates: list[str], columns: list[str], where: str) -> str:
    if len(candidates) != 1:
        found = f"image columns {', '.join(candidates)}" if candidates else "no image column"
        raise ValueError(f"{where} has {found} (columns: {', '.join(columns)}): name the image column with "
                         "--image-column")
    return candidates[0]


def _check_column(column: str, columns: list[str], where: str) -> None:
    if column not in columns:
        raise ValueError(f"{where} has no column {column!r} (columns: {', '.join(columns)})")


def _key_column(key_column: str | None, columns: list[str], where: str) -> str | None:
    if key_column is None:
        return KEY_COLUMN if KEY_COLUMN in columns else None
    if key_column not in columns:
        raise ValueError(f"{where} has no key column {key_column!r} (columns: {', '.join(columns)})")
    return key_column


def _check_clashes(columns: list[str], reserved: tuple[str, ...], where: str) -> None:
    clashes = [c for c in columns if c in reserved]
    if clashes:
        raise ValueError(f"{where}: column(s) {', '.join(clashes)} clash with the latent dataset's own columns "
                         f"({', '.join(reserved)}); rename them first")


# -- saved datasets, for training -----------------------------------------------------------------------------------


def open_saved_dataset(path: str | Path, split: str | None = None, cache_dir: str | None = None):
    """A datasets.Dataset for a save_to_disk folder, a .parquet/.arrow file, or a folder holding such files and
    no images; None for anything else (an image folder). ValueError names what is wrong (a bad suffix, a
    split that is not there)."""
    import datasets

    path = Path(path).expanduser()
    if path.is_file():
        return read_table_files([path], str(path), cache_dir)
    if any((path / marker).is_file() for marker in SAVED_MARKERS):
        return pick_split(datasets.load_from_disk(str(path)), split, str(path))
    tables = sorted(p for p in path.rglob("*") if p.suffix in TABLE_SUFFIXES)
    if tables and not any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.rglob("*")):
        return read_table_files(tables, str(path), cache_dir)
    return None


def read_table_files(files: list[Path], where: str, cache_dir: str | None = None):
    """One datasets.Dataset from .parquet files or from .arrow files (not a mix)."""
    import datasets

    if not files:
        raise ValueError(f"{where}: matches no files")
    suffixes = {f.suffix for f in files}
    if suffixes == {".parquet"}:
        return datasets.Dataset.from_parquet([str(f) for f in files], cache_dir=cache_dir)
    if suffixes == {".arrow"}:
        return datasets.concatenate_datasets([datasets.Dataset.from_file(str(f)) for f in files])
    raise ValueError(f"{where}: expected .parquet or .arrow files (or an image folder), got {', '.join(sorted(suffixes))}")


def pick_split(dataset, split: str | None, where: str):
    """The split of a DatasetDict (default: "train", or the only one); a Dataset is returned as it is."""
    import datasets

    if not isinstance(dataset, datasets.DatasetDict):
        return dataset
    if split is None:
        if "train" in dataset or len(dataset) == 1:
            split = "train" if "train" in dataset else next(iter(dataset))
        else:
            raise ValueError(f"{where} has splits {', '.join(dataset)}: choose one with --split")
    if split not in dataset:
        raise ValueError(f"{where} has no split {split!r} (it has {', '.join(dataset)})")
    return dataset[split]
