"""The file boundary: what a reader of JSON, YAML, parquet, zip/pickle or safetensors raises for a bad file
becomes the project's own error, naming the file and the reason, here and nowhere else.

Readers raise many things for a file that is not what it should be: `json` a JSONDecodeError, or a
RecursionError for deep nesting; pyarrow an ArrowInvalid (with no file name); zipfile a BadZipFile; YAML a
YAMLError; a number too large an OverflowError. Wrapped in `reading(path, what, error)`, each becomes
`error("PATH: not a readable WHAT (Type: reason)")`, which the commands print as one line (exit 2, or one
failed input). The project's own errors pass through unchanged. Where a damaged file is expected debris rather
than an error (a claim that a killed process published half), `json_or_none` says "not JSON" without raising.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

from .errors import CommandError, ConvertError, ImageError, ModelLoadError, one_line, printable

PROJECT_ERRORS = (CommandError, ConvertError, ImageError, ModelLoadError)


@cache
def reader_errors() -> tuple[type[BaseException], ...]:
    """What readers raise for a bad file (not for a bug of this program: keep the guarded code to the read)."""
    errors: list[type[BaseException]] = [
        ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError, RecursionError, EOFError,
        MemoryError, OSError, zipfile.BadZipFile, pickle.UnpicklingError, struct.error, zlib.error]
    for module, name in (("yaml", "YAMLError"), ("safetensors", "SafetensorError"), ("pyarrow", "ArrowException")):
        try:
            errors.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):  # an optional reader that is not installed raises nothing
            pass
    return tuple(errors)


def bad_file(path: str | os.PathLike, what: str, error: BaseException,
             kind: type[Exception] = ValueError) -> Exception:
    """The project's error for `error` raised while reading `path`: "PATH: not a readable WHAT (Type: reason)"."""
    name = printable(str(path))
    if isinstance(error, OSError) and error.strerror and not isinstance(error, zipfile.BadZipFile):
        return kind(f"{name}: cannot read ({error.strerror})")
    if isinstance(error, RecursionError):
        return kind(f"{name}: not a readable {what} (nested too deeply)")
    return kind(f"{name}: not a readable {what} ({one_line(error, with_type=True, limit=160)})")


@contextmanager
def reading(path: str | os.PathLike, what: str, kind: type[Exception] = ValueError) -> Iterator[None]:
    """Translate whatever reading `path` raises in the block into `kind` naming the file (see `bad_file`)."""
    try:
        yield
    except PROJECT_ERRORS:
        raise
    except reader_errors() as error:
        raise bad_file(path, what, error, kind) from None


def parse_json(text: str, where: str, kind: type[Exception] = ValueError, what: str = "JSON") -> Any:
    """JSON text from `where` (a file, a metadata field) -> its value; any failure is `kind` naming `where`."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise kind(f"{printable(where)}: not valid {what} ({'empty' if not text.strip() else error})") from None
    except (RecursionError, ValueError, TypeError) as error:  # deep nesting, a number past float range, ...
        raise bad_file(where, what, error, kind) from None


def json_or_none(content: str | bytes) -> Any:
    """The value of JSON `content`, or None when it is not JSON: for files that a killed writer may leave damaged,
    where a damaged file is debris to step over, not an error to report (a claim published half)."""
    try:
        return json.loads(content)
    except (RecursionError, ValueError, TypeError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None


def read_json(path: str | os.PathLike, kind: type[Exception] = ValueError, *, what: str = "JSON file",
              expect: type | None = dict) -> Any:
    """A JSON file's value (a JSON object by default: anything else is `kind` naming the file and what it holds)."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise bad_file(path, what, error, kind) from None
    return json_record(data, str(path), kind, what=what, expect=expect)


def json_record(data: bytes, where: str, kind: type[Exception] = ValueError, *, what: str = "JSON file",
                expect: type | None = dict) -> Any:
    """The value of a JSON file's bytes read from `where` (a path, or an object store's URL): as `read_json`."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise kind(f"{printable(where)}: not a text file") from None
    if not text.strip():
        raise kind(f"{printable(where)}: not valid JSON (empty file)")
    value = parse_json(text, where, kind)
    if expect is not None and not isinstance(value, expect):
        raise kind(f"{printable(where)}: {what} must hold a JSON object, got a {type(value).__name__}")
    return value
