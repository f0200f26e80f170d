"""The memory policy: whole-image coding or exact tiles, a strategy per level, from a memory budget."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from ..values import BadValue, byte_size
from .executor import last_reads, regions_needed
from .ops import Conv, Norm, area, full_region
from .program import Program, program_for

STRATEGIES = ("untiled", "keep", "recompute")
TILE_SIZES = (2048, 1024, 512, 256, 128, 64)  # candidates the policy tries, largest first
# Calibration of the activation estimate against measured peaks (resident set on CPU, allocator peak on CUDA):
# allocator slack, convolution workspaces and the interpreter; see benchmarks/tiling.py.
ESTIMATE_SLACK = 1.2
BASE_BYTES = 600 * 2**20
# diffusers' untiled forward holds more at its peak than this executor's liveness count of the same program
# (calibrated on the whole-image rows of benchmarks/results/tiling*.json: resident sets on CPU, allocator
# peaks on CUDA; the larger of the two CUDA rows sets its factor).
WHOLE_IMAGE_FACTOR = {"cpu": 1.35, "cuda": 1.6}
# On CUDA a tensor of one image with 2**31 elements or more (128 channels at 4096x4096) is past 32-bit indexing
# (a batch can be split under it, one image cannot; our reading, not profiled): whole-image coding of a 4096x4096
# f16c16 decode measured slower than exact tiles (benchmarks/results/tiling_cuda.md). Such levels are tiled on CUDA.
CUDA_TILE_FROM_ELEMENTS = 2**31


@dataclass(frozen=True)
class CodingPlan:
    """How to code one batch. `whole`: whole-image coding, diffusers' own forward (no program, no tiles). Otherwise
    this package's executor runs the program with a strategy per level ("untiled", "keep", "recompute") and tiles
    of `tile_size` pixels."""

    whole: bool
    strategies: tuple[str, ...] = ()
    tile_size: int = 0
    estimated_bytes: int = 0
    budget_bytes: int | None = None

    def describe(self) -> str:
        if self.whole:
            return f"whole image (estimated {_gib(self.estimated_bytes)})"
        kinds = {s: self.strategies.count(s) for s in STRATEGIES if s in self.strategies}
        return (f"exact tiles of {self.tile_size} px ({', '.join(f'{n} {k}' for k, n in kinds.items())} levels; "
                f"estimated {_gib(self.estimated_bytes)})")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def parse_memory(value: str | int | None) -> int | None:
    """'4GB', '512MiB', '1.5 GiB' or a number of bytes -> bytes; None stays None (the default budget). Parsed by
    `values.byte_size`, the command line's parser, without its 1MiB floor (a caller may plan any budget); NaN,
    inf, 400 digits or a fraction that rounds to 0 bytes is a ValueError naming max_memory."""
    if value is None:
        return None
    try:
        return byte_size(value, minimum=1)
    except BadValue as error:
        raise ValueError(f"max_memory {error}") from None


def default_budget(device: torch.device) -> int:
    """Most of the free accelerator memory, or of the RAM still available on CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # What PyTorch's caching allocator holds but no tensor uses is free to this process too; without it
        # the budget would shrink after the first batch and later batches of the same size would tile.
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(0.9 * (free + cached))
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return int(0.75 * info["MemAvailable"])
    except (OSError, KeyError, ValueError):
        return int(0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _pass_bytes(ops, targets, sizes, channels, batch, itemsize, stored) -> int:
    """Peak bytes of the temporaries of one `_run_pass` (input crops are views on CPU, copies on CUDA)."""
    needs = regions_needed(ops, targets, sizes)
    active = [op for op in ops if op.dst in needs and op.dst not in stored]
    last = last_reads(active)
    live, peak = {}, 0
    for i, op in enumerate(active):
        region = needs[op.dst]
        padded = sum(area(r) * channels[s] for s, r in zip(op.srcs, op.input_regions(region, sizes))
                     if isinstance(op, Conv) or s in stored)
        live[op.dst] = area(region) * channels[op.dst]
        peak = max(peak, sum(live.values()) + padded)
        for src in op.srcs:
            if last.get(src) == i and src in live and src not in targets:
                del live[src]
    return peak * batch * itemsize


def estimate_bytes(program: Program, size: tuple[int, int], batch: int, itemsize: int,
                   strategies: tuple[str, ...], tile: int, weights: int, on_device_only: bool) -> int:
    """Peak memory of running `program` with these strategies: stored tensors + working set, calibrated.
    `on_device_only` (CUDA with host storage): count only what lives on the device in tiled levels."""
    sizes, channels = program.sizes(*size), program.channels()
    full = {name: batch * itemsize * channels[name] * s[0] * s[1] for name, s in sizes.items()}
    last = last_reads(program.ops)
    last[program.output] = len(program.ops)
    live = {program.input: full[program.input]}
    peak, position = 0, 0
    for level, strategy in zip(program.levels, strategies):
        tiled = strategy != "untiled" and not level.untileable
        count_stored = not (tiled and on_device_only)
        if not tiled or strategy == "keep":
            for op in level.ops:
                work = 0
                if tiled:
                    tile_targets = {op.dst: full_region((min(tile, sizes[op.dst][0]), min(tile, sizes[op.dst][1])))}
                    work = _pass_bytes([op], tile_targets, sizes, channels, batch, itemsize, set(op.srcs))
                elif isinstance(op, Conv) and op.pad_lo != op.pad_hi:
                    work = full[op.srcs[0]]  # the padded copy of the input
                live[op.dst] = full[op.dst]
                peak = max(peak, (sum(live.values()) if count_stored else 0) + work)
                for src in op.srcs:
                    if last.get(src) == position and src in live:
                        del live[src]
                position += 1
        else:
            stored = set(live)
            work = 0
            for i, op in enumerate(level.ops):
                if isinstance(op, Norm) or i == len(level.ops) - 1:
                    name = op.srcs[0] if isinstance(op, Norm) else op.dst
                    box = (min(tile, sizes[name][0]), min(tile, sizes[name][1]))
                    ops = level.ops[:i] if isinstance(op, Norm) else level.ops
                    work = max(work, _pass_bytes(ops, {name: full_region(box)}, sizes, channels, batch, itemsize, stored))
            outputs = [op.dst for op in level.ops if last.get(op.dst, -1) >= position + len(level.ops)
                       or op.dst == program.output]
            for name in outputs:
                live[name] = full[name]
            peak = max(peak, (sum(live.values()) if count_stored else 0) + work)
            position += len(level.ops)
            for name in list(live):
                if last.get(name, -1) < position and name != program.output:
                    del live[name]
    return int(ESTIMATE_SLACK * peak) + weights + BASE_BYTES


def plan_coding(vae: nn.Module, direction: str, shape: tuple[int, ...], *, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu", max_memory: str | int | None = None,
                tile_size: int | None = None, strategy: str | None = None) -> CodingPlan:
    """The one policy: whole-image coding when its estimated peak fits `max_memory`, else exact tiles.

    shape: the input's N x C x H x W (an image batch to encode, a raw latent batch to decode).
    max_memory: bytes, "4GB", "512MiB"; None: most of the free device memory (CPU: of the available RAM).
    tile_size / strategy ("keep" or "recompute"): expert overrides that force exact tiling.
    """
    device = torch.device(device)
    budget = parse_memory(max_memory)
    if budget is None:
        budget = default_budget(device)
    if strategy is not None and strategy not in ("keep", "recompute"):
        raise ValueError(f"unknown tiling strategy {strategy!r}; choose keep or recompute")
    if tile_size is not None and tile_size < 8:
        raise ValueError(f"tile_size must be at least 8 pixels, got {tile_size}")
    program = program_for(vae, direction)
    batch, size = shape[0], tuple(shape[-2:])
    itemsize = torch.empty((), dtype=dtype).element_size()
    weights = sum(p.numel() * p.element_size() for p in vae.parameters())
    on_cuda = device.type == "cuda"
    levels = program.levels
    all_untiled = ("untiled",) * len(levels)

    def estimate(strategies, tile):
        return estimate_bytes(program, size, batch, itemsize, strategies, tile, weights, on_cuda)

    sizes, channels = program.sizes(*size), program.channels()
    too_big_untiled = [on_cuda and not level.untileable and max(
        channels[op.dst] * sizes[op.dst][0] * sizes[op.dst][1] for op in level.ops) >= CUDA_TILE_FROM_ELEMENTS
        for level in levels]
    whole_bytes = int(estimate(all_untiled, 0) * WHOLE_IMAGE_FACTOR["cuda" if on_cuda else "cpu"])
    if tile_size is None and strategy is None and whole_bytes <= budget and not any(too_big_untiled):
        return CodingPlan(True, all_untiled, 0, whole_bytes, budget)
    tiles = (tile_size,) if tile_size is not None else TILE_SIZES
    forced = tile_size is not None or strategy is not None
    if strategy is not None:
        options = (strategy,)
    elif forced:
        options = ("keep", "recompute")
    else:
        # On CPU "keep" holds what "untiled" holds, so it never helps. On CUDA it holds it in host memory, and the
        # copies cost more than recomputing (benchmarks/results/tiling_cuda.md): an expert's choice there.
        options = ("untiled", "recompute")
    # On CUDA kept intermediates live in host memory: they must fit there too.
    host_budget = default_budget(torch.device("cpu")) if on_cuda and "keep" in options else None
    fixed = tuple("untiled" if s.untileable else options[-1] for s in levels)

    def fits(strategies, tile):
        if estimate(strategies, tile) > budget:
            return False
        return host_budget is None or "keep" not in strategies or estimate_bytes(
            program, size, batch, itemsize, strategies, tile, 0, False) <= host_budget

    for tile in tiles:
        if not fits(fixed, tile) and tile != tiles[-1]:
            continue
        strategies = list(fixed)
        for i, level in enumerate(levels):  # the fastest strategy per level that keeps the peak in budget
            for option in options[:-1] if not level.untileable else ():
                if option == "untiled" and too_big_untiled[i]:
                    continue
                trial = tuple(strategies[:i]) + (option,) + tuple(strategies[i + 1 :])
                if fits(trial, tile):
                    strategies[i] = option
                    break
        strategies = tuple(strategies)
        needed = estimate(strategies, tile)
        if needed > budget and not forced:
            raise ValueError(f"max_memory {_gib(budget)} is too small to {direction} a {batch}x{size[0]}x{size[1]} "
                             f"input even in exact tiles (needs about {_gib(needed)}): raise it or use smaller "
                             "batches")
        return CodingPlan(False, strategies, tile, needed, budget)
    raise AssertionError("unreachable")
