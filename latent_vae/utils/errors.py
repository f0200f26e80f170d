"""What can go wrong, and how it is told: the error types of bad input, the exit statuses every command shares,
and the one formatter of an error as one line.

Exit statuses: 0 everything done; 1 some inputs failed (each reported in one line naming it and the reason; every
good input still written); 2 the command could not run at all (bad arguments, an unloadable model, no inputs: one
line, no traceback); 3 an unexpected internal error, a bug (a one-line summary first, then the traceback).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

EXIT_OK = 0  # everything done
EXIT_SOME_FAILED = 1  # a batch ran, but some inputs failed (each reported); every good one was written
EXIT_BAD_INPUT = 2  # the whole command could not run (bad arguments, unloadable model, no inputs)
EXIT_INTERNAL_ERROR = 3  # an unexpected error: a bug in this program, reported with its traceback


class CommandError(ValueError):
    """A usage problem found while running a command; printed as one line."""


class StorageError(ValueError):
    """Where a command reads or writes refused or failed (a missing bucket, missing credentials, a denied
    permission, a full disk, a store's fault past its retries); the message names the place and what to do."""


class StorageFault(RuntimeError):
    """An object store's fault (throttling, 5xx, a dropped connection) that outlasted the retries while reading an
    input: the shard in flight is abandoned, never recorded as failed, so that a rerun reads it again."""


class ImageError(ValueError):
    """An input that is not a usable image; the message names it and says why."""


class ModelLoadError(ValueError):
    """A model source that cannot be loaded; the message says why and what to do."""


class ConvertError(ValueError):
    """A checkpoint that cannot be converted; the message names the file or the key and says why."""


class NonFiniteError(RuntimeError):
    """NaN or inf in latents or images: reduced precision overflowed (or the weights are broken)."""


class Fp16FixError(ValueError):
    """A model the fp16 transform (`latent_vae.fp16.rescale`) cannot prove it rescales exactly, or cannot bring into range."""


class PosteriorNoiseWarning(UserWarning):
    """A posterior sample would drown the latents (`latent_vae.codec.posterior`): use the mean, or retrain."""


# A message of several lines (a library's report) is kept whole on one line, but cut to this many characters.
MULTILINE_LIMIT = 400


def printable(text: str) -> str:
    """`text` with each control character (newline, tab, escape...) written as repr() writes it: a name that holds
    one stays on one line and cannot move the terminal's cursor."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def one_line(error: BaseException, *, with_type: bool = False, limit: int | None = None) -> str:
    """An error as one line: an OSError's file and reason; for an error re-raised from a DataLoader worker (its
    message carries the worker's traceback), the worker's own last line; else the message with its control
    characters escaped (`printable`: a newline in a file name, or in a library's message of several lines,
    stays on the line; the latter is cut to MULTILINE_LIMIT), or the type's name when there is none.
    `with_type` prefixes the type's name; `limit` cuts a long line."""
    if isinstance(error, OSError) and error.strerror:
        text = f"{printable(str(error.filename))}: {error.strerror}" if error.filename else error.strerror
    else:
        message = str(error).strip()
        lines = [line.strip() for line in message.splitlines() if line.strip()]
        if len(lines) > 1 and "Original Traceback" in message:
            text = printable(lines[-1].split(": ", 1)[-1])
        else:
            text = printable(message)
            if len(lines) > 1 and limit is None:
                limit = MULTILINE_LIMIT
    if limit is not None and len(text) > limit:
        text = text[: limit - 3] + "..."
    if with_type:
        return f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text or type(error).__name__


def input_failure(path: str | Path, error: BaseException) -> str:
    """One line naming the input and the reason (a full disk or a permission also names the file it hit)."""
    name = printable(str(path))
    if isinstance(error, OSError) and error.strerror:
        hit = error.filename and str(error.filename) != str(path)
        reason = error.strerror + (f" ({printable(str(error.filename))})" if hit else "")
    else:
        reason = one_line(error)
    return reason if reason.startswith(name) else f"{name}: {reason}"


def fp16_fix_advice(model: str | None, rescaled: bool) -> str:
    """What to do when a model overflows fp16: the command that rescales it into fp16's range with the same function
    (naming its folder when known); `rescaled`: it was rescaled already, so calibrate on more."""
    advice = (f"rescale the model once into fp16's range with the same function: `latent-vae fp16-fix --model "
              f"{model or 'MODEL'} --data IMAGES --out FIXED`, then use FIXED")
    if rescaled:
        advice += " (this model was rescaled already: calibrate on larger images or with more --headroom)"
    return advice


def short_repr(value: Any, limit: int = 60) -> str:
    """`repr(value)`, cut to `limit` characters: a value quoted inside a one-line message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# The reason pyarrow gives for a failed write ("Error writing bytes to file. Detail: [errno 28] No space left on
# device") is its detail.
_ERRNO_DETAIL = re.compile(r"\[errno (\d+)\] ([^\n]*)", re.IGNORECASE)


def storage_failure(where: str, error: BaseException) -> str:
    """One line for a write to `where` that failed in the middle of a run (a full disk, a quota, a permission, a
    store's fault past its retries): the file (the error's own, when it names one), the reason, and that the
    committed shards are kept."""
    reason = error.strerror if isinstance(error, OSError) and error.strerror else one_line(error)
    if isinstance(error, OSError) and error.filename:  # the file it hit, when the error knows it
        where = str(error.filename)
    detail = _ERRNO_DETAIL.search(reason)
    if detail:
        reason = detail.group(2).strip()
    return (f"{printable(where)}: {reason}; the shards committed so far are kept: run the same command again "
            "to resume (after freeing space or fixing the permission, if that was the cause)")
