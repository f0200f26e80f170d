"""Typed option values with their ranges: the one place that says what a count, a size in pixels, a factor,
a timeout, a memory budget or a device may be.

Each parser takes the text of a command-line flag (or a value from a config file or a Python caller) and
returns the typed value, or raises `BadValue` saying what was wanted and what was given. `BadValue` is both a
`ValueError` (for configs and Python callers) and an `argparse.ArgumentTypeError`, so as an argparse `type=`
its message is the error line, which names the option: `argument --batch-size: must be a positive integer,
got '0'`. The same parsers serve every command's flags, `PrecomputeOptions.validate` and the training config.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import short_repr

if TYPE_CHECKING:
    import torch

# Counts (images, steps, pixels, workers) above this are surely a typo, and some would overflow a C int later.
MAX_COUNT = 2**31 - 1
# A memory budget below this cannot hold one tile of any model: most likely a missing unit ("0.5" meant GB).
MIN_MEMORY = 1 << 20
MAX_MEMORY = 1 << 60  # 1 EiB: beyond any machine
MEMORY_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
                "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
DEVICE_NAMES = "cpu, cuda, cuda:N, mps or auto"


class BadValue(argparse.ArgumentTypeError, ValueError):
    """A value out of its range or of the wrong type; the message says what was wanted and what was given."""


@dataclass(frozen=True)
class Integer:
    """An integer in [low, high]: `Integer(1)` a positive count. Text must be decimal digits (no 1e3, no 2.0)."""

    low: int = 1
    high: int = MAX_COUNT
    wanted: str = ""

    def __call__(self, value: Any) -> int:
        number = None
        whole_float = isinstance(value, float) and math.isfinite(value) and value.is_integer()
        digits = isinstance(value, str) and re.fullmatch(r"\s*[+-]?[0-9]{1,30}\s*", value)  # ASCII: no "٣"
        if isinstance(value, int) and not isinstance(value, bool) or whole_float or digits:
            number = int(value)
        if number is None or not self.low <= number <= self.high:
            raise BadValue(f"must be {self.describe()}, got {short_repr(value, 40)}")
        return number

    def describe(self) -> str:
        if self.wanted:
            return self.wanted
        if self.low == 1 and self.high == MAX_COUNT:
            return "a positive integer"
        if self.low == 0 and self.high == MAX_COUNT:
            return "an integer of 0 or more"
        return f"an integer from {self.low} to {self.high}"


@dataclass(frozen=True)
class Real:
    """A finite number above `low` (or at least `low` when `inclusive`), at most `high`; never NaN or inf."""

    low: float = 0.0
    inclusive: bool = False
    high: float = math.inf
    wanted: str = ""

    def __call__(self, value: Any) -> float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value) if abs(value) < 1e308 else math.inf
        elif isinstance(value, str) and len(value) <= 64 and value.isascii():
            try:
                number = float(value)
            except ValueError:
                number = None
        above = number is not None and (number >= self.low if self.inclusive else number > self.low)
        if number is None or not math.isfinite(number) or not above or number > self.high:
            raise BadValue(f"must be {self.describe()}, got {short_repr(value, 40)}")
        return number

    def describe(self) -> str:
        if self.wanted:
            return self.wanted
        if self.low == 0:
            bound = "a finite number of 0 or more" if self.inclusive else "a positive finite number"
        else:
            bound = f"a finite number {'of at least' if self.inclusive else 'above'} {self.low:g}"
        return bound + (f", at most {self.high:g}" if math.isfinite(self.high) else "")


positive_int = Integer(1)
non_negative_int = Integer(0)  # 0 often means "no limit" or "all"
any_int = Integer(-(2**63), 2**64 - 1, "a 64-bit integer")  # a seed: what torch.manual_seed takes
# An image side (--resolution): a 32768 x 32768 image is a gigapixel, beyond which a number is a typo.
image_side = Integer(1, 1 << 15, "a side in pixels from 1 to 32768")
positive_float = Real(0.0)
factor = Real(1.0, inclusive=True)  # an upscaling or aspect limit: 1 means none
non_negative_float = Real(0.0, inclusive=True)
# Seconds to wait: positive and finite (time.sleep overflows on inf; a heartbeat at inf / 4 never beats).
timeout = Real(0.0, high=365 * 24 * 3600.0, wanted="a positive finite number of seconds, at most a year")


def byte_size(value: Any, minimum: int = MIN_MEMORY) -> int:
    """'4GB', '512MiB', '1.5 GiB' or a number of bytes -> bytes, from `minimum` (the command line's: 1 MiB) to
    MAX_MEMORY. NaN, inf, 400 digits and a fraction that rounds below the minimum (0.5 -> 0 bytes) are refused."""
    floor = "1MiB" if minimum == MIN_MEMORY else f"{minimum} byte" + ("s" if minimum != 1 else "")
    wanted = f"a memory size such as 4GB, 512MiB or a number of bytes, at least {floor}"
    if isinstance(value, int) and not isinstance(value, bool):
        number = float(value) if value < MAX_MEMORY else math.inf
    else:
        match = re.fullmatch(r"\s*([0-9]{1,30}(?:\.[0-9]{0,30})?|\.[0-9]{1,30})\s*([a-zA-Z]{0,3})\s*", str(value))
        if not match or match.group(2).lower() not in MEMORY_UNITS:
            raise BadValue(f"must be {wanted}, got {short_repr(value, 40)}")
        number = float(match.group(1)) * MEMORY_UNITS[match.group(2).lower()]
    if not math.isfinite(number) or number > MAX_MEMORY:
        raise BadValue(f"must be {wanted} and at most 1 EiB, got {short_repr(value, 40)}")
    if int(number) < minimum:
        raise BadValue(f"must be at least {floor}, got {short_repr(value, 40)}: {int(number)} bytes, too little for any "
                       "model (a missing unit? 0.5GB)")
    return int(number)


def resolve_device(value: Any) -> torch.device:
    """The one device check: None or 'auto' -> cuda, then mps, then cpu; any other device (text or torch.device)
    must exist on this machine, else `BadValue` (before any model is built or any output written)."""
    import torch

    if value is None or str(value).strip().lower() == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(str(value).strip().lower() if isinstance(value, str) else value)
    except (RuntimeError, TypeError):
        raise BadValue(f"must be a device ({DEVICE_NAMES}), got {short_repr(value, 40)}") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise BadValue(f"{short_repr(value, 40)}: this machine has no CUDA device (torch {torch.__version__}); use cpu")
        if resolved.index is not None and resolved.index >= count:
            raise BadValue(f"{short_repr(value, 40)}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise BadValue(f"{short_repr(value, 40)}: this machine has no MPS device; use cpu")
    return resolved


def device(value: Any) -> str:
    """A device option's text: one of DEVICE_NAMES, which must exist here (`resolve_device`)."""
    text = str(value).strip().lower()
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d{1,3})?", text):
        raise BadValue(f"must be a device ({DEVICE_NAMES}), got {short_repr(value, 40)}")
    resolve_device(text)
    return text


def optional(parse):
    """`parse`, letting None through (an option whose default is decided later)."""

    def parse_optional(value: Any):
        return None if value is None else parse(value)

    return parse_optional


def check_fields(obj: Any, rules: dict[str, Any], where: str = "") -> None:
    """Check attributes of a config dataclass against parsers: a bad one is a BadValue naming the field.
    `rules` maps a field name to a parser; a None value passes (fields whose default is decided later)."""
    for name, parse in rules.items():
        value = getattr(obj, name)
        if value is None:
            continue
        try:
            parse(value)
        except BadValue as error:
            raise BadValue(f"{where}{name} {error}") from None
