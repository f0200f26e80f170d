"""Shared by the benchmark scripts: FLOP counts, peak memory, the matmul peak, device and dtype flags."""

from __future__ import annotations

import argparse
import ctypes
import re
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.report import synchronize
from latent_vae.utils.dtypes import resolve_dtype
from latent_vae.utils.option_values import resolve_device


def add_device_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when available)")
    parser.add_argument("--dtype", default="fp32", help="fp32 (the reference), bf16 or fp16")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def device_and_dtype(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    return device, dtype


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of `fn()` (matmuls and convolutions, multiply-add = 2), by torch's own counter.

    Run it on meta-device modules and inputs to count sizes far too big to execute."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# -- peak memory -----------------------------------------------------------------------------------------

_libc = None


def _cpu_memory_setup() -> None:
    """Make freed tensors leave the process: allocations over 1 MiB get their own mmap (returned on free),
    so the resident-set peak of a call measures that call, not what an earlier call left in malloc's pool."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL("libc.so.6")
        _libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB (also stops glibc raising it dynamically)
    _libc.malloc_trim(0)


def _vm(field: str) -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", status).group(1)) / 1024  # MiB


class PeakMemory:
    """Peak memory (MiB) that a block adds above what was in use when it started.

    CUDA: torch's allocator statistics. CPU (Linux): the process's resident-set high-water mark, reset
    through /proc/self/clear_refs; it includes everything the block allocates, torch or not. `mib` is
    None where neither is available."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.mib: float | None = None

    def __enter__(self) -> "PeakMemory":
        synchronize(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            try:
                _cpu_memory_setup()
                Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
                self._start = _vm("VmRSS")
            except (OSError, AttributeError):
                self._start = None
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        if self.device.type == "cuda":
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20 - self._start
        elif self._start is not None:
            self.mib = _vm("VmHWM") - self._start


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


# -- the matmul peak -------------------------------------------------------------------------------------


def matmul_probe(device: torch.device, dtype: torch.dtype, *, size: int | None = None) -> Callable[[float], float]:
    """A function `probe(seconds)` -> best GFLOP/s of a square matmul over that many seconds: what this
    machine's dense math can do. The best call, not the median: it is a ceiling, and a shared machine only
    ever lowers it. Probe between the measurements it is compared with, so both see the same load."""
    size = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)  # warm-up
    synchronize(device)

    def probe(seconds: float = 1.0) -> float:
        best = float("inf")
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline or best == float("inf"):
            start = time.perf_counter()
            torch.mm(a, b)
            synchronize(device)
            best = min(best, time.perf_counter() - start)
        return 2 * size**3 / best / 1e9

    return probe


def result_name(benchmark: str, device: torch.device) -> str:
    """Results file stem: `NAME` for the CPU run, `NAME_cuda` for a GPU run, so neither overwrites the other."""
    return benchmark if device.type == "cpu" else f"{benchmark}_{device.type}"
