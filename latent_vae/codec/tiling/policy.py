"""The memory policy: whole-image coding or exact tiles, a strategy per level, from a memory budget."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from ...utils.option_values import BadValue, byte_size
from .executor import Step, last_reads, regions_needed, schedule
from .ops import HALF_NORM_CHUNK, Conv, Norm, area, full_region
from .program import Program, program_for

STRATEGIES = ("untiled", "keep", "recompute")
TILE_SIZES = (2048, 1024, 512, 256, 128, 64)  # candidates the policy tries, largest first
# "keep" is measured with tiles of 512 px (benchmarks/results/tiling_keep_cpu.md); with smaller tiles the halos and
# the per-tile overhead grow, unmeasured: automatic plans keep only with tiles this large.
KEEP_MIN_TILE = 512
# Calibration of the activation estimate against measured peaks (resident set on CPU, allocator peak on CUDA):
# allocator slack, convolution workspaces and the interpreter; see benchmarks/tiling.py.
ESTIMATE_SLACK = 1.2
BASE_BYTES = 600 * 2**20
# Exact tiles on CUDA (full tensors in host memory): the device's allocator peak over the estimate of what lives
# there, cuDNN workspaces and caching included (the largest of the recompute rows of tiling_cuda.json).
CUDA_TILES_SLACK = 1.45
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


def _pass_elements(ops, targets, sizes, channels, stored, copies_stored: bool, half: bool) -> int:
    """Peak elements of the temporaries of one `_run_pass`: the live results, plus the copies an op makes of its
    inputs (zero padding that differs between sides; crops of stored tensors that live on another device) and,
    in bf16/fp16 (`half`), a GroupNorm's two fp32 temporaries of up to HALF_NORM_CHUNK elements each."""
    needs = regions_needed(ops, targets, sizes)
    active = [op for op in ops if op.dst in needs and op.dst not in stored]
    last = last_reads(active)
    live, peak = {}, 0
    for i, op in enumerate(active):
        region = needs[op.dst]
        copies = sum(area(want) * channels[src] for src, want in zip(op.srcs, op.input_regions(region, sizes))
                     if (copies_stored and src in stored) or (isinstance(op, Conv) and op.pads_a_copy(region, sizes)))
        if half and isinstance(op, Norm):
            copies += 2 * 2 * min(HALF_NORM_CHUNK, area(region) * channels[op.dst])  # fp32: two half elements each
        live[op.dst] = area(region) * channels[op.dst]
        peak = max(peak, sum(live.values()) + copies)
        for src in op.srcs:
            if last.get(src) == i and src in live and src not in targets:
                del live[src]
    return peak


def _step_passes(step: Step, sizes: dict, tile: int) -> list[tuple[list, dict]]:
    """The passes a step runs, as (ops, targets); a tiled step's at its largest tile."""
    ops = list(step.ops)
    if not step.tiled:
        return [(ops, {name: full_region(sizes[name]) for name in step.outputs})]

    def box(name):
        return full_region((min(tile, sizes[name][0]), min(tile, sizes[name][1])))

    passes = [(ops[: ops.index(norm)], {norm.srcs[0]: box(norm.srcs[0])}) for norm in step.norm_passes]
    return passes + [(ops, {name: box(name)}) for name in step.outputs]


def estimate_bytes(program: Program, size: tuple[int, int], batch: int, itemsize: int,
                   strategies: tuple[str, ...], tile: int, weights: int, host_storage: bool) -> int:
    """Peak memory of running `program` with these strategies, walking the executor's own `schedule`: the stored
    full tensors plus the largest pass of each step, calibrated.

    host_storage (CUDA): full tensors live in host memory; count what is on the device: the input, each pass's
    temporaries (crops of stored tensors copied to it) and, at the end, the output."""
    sizes, channels = program.sizes(*size), program.channels()
    full = {name: batch * itemsize * channels[name] * h * w for name, (h, w) in sizes.items()}
    stored, peak = {program.input}, 0
    for step in schedule(program, strategies):
        work = batch * itemsize * max(_pass_elements(ops, targets, sizes, channels, stored, host_storage, itemsize < 4)
                                      for ops, targets in _step_passes(step, sizes, tile))
        if host_storage:  # the caller's input, and the output once it is copied back
            held = full[program.input] + full[program.output]
        else:  # an untiled pass holds its outputs among its temporaries; a tiled step writes them into full tensors
            held = sum(full[name] for name in stored | (set(step.outputs) if step.tiled else set()))
        peak = max(peak, held + work)
        stored.update(step.outputs)
        stored.difference_update(step.frees)
    return int((CUDA_TILES_SLACK if host_storage else ESTIMATE_SLACK) * peak) + weights + BASE_BYTES


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

    def estimate(strategies, tile, host_storage=on_cuda):
        return estimate_bytes(program, size, batch, itemsize, strategies, tile, weights, host_storage)

    sizes, channels = program.sizes(*size), program.channels()
    too_big_untiled = [on_cuda and not level.untileable and max(
        channels[op.dst] * sizes[op.dst][0] * sizes[op.dst][1] for op in level.ops) >= CUDA_TILE_FROM_ELEMENTS
        for level in levels]
    # diffusers' forward keeps every tensor on the device: the all-untiled schedule with nothing on the host
    whole_bytes = int(estimate(all_untiled, 0, host_storage=False) * WHOLE_IMAGE_FACTOR["cuda" if on_cuda else "cpu"])
    if tile_size is None and strategy is None and whole_bytes <= budget and not any(too_big_untiled):
        return CodingPlan(True, all_untiled, 0, whole_bytes, budget)
    tiles = (tile_size,) if tile_size is not None else TILE_SIZES
    forced = tile_size is not None or strategy is not None
    if strategy is not None:
        options = (strategy,)
    elif forced:
        options = ("keep", "recompute")
    else:
        # Fastest first. On CPU "keep" is slower than an untiled level (benchmarks/results/tiling_keep_cpu.md) and
        # faster than "recompute" (tiling.md, tiling_encode.md, tiling_demo_model.md), at a peak between theirs. On
        # CUDA kept tensors live in host memory and the copies cost more than recomputing (tiling_cuda.md): an
        # expert's choice there.
        options = ("untiled", "recompute") if on_cuda else ("untiled", "keep", "recompute")
    # On CUDA kept intermediates live in host memory: they must fit there too.
    host_budget = default_budget(torch.device("cpu")) if on_cuda and "keep" in options else None
    fixed = tuple("untiled" if s.untileable else options[-1] for s in levels)

    def fits(strategies, tile):
        if estimate(strategies, tile) > budget:
            return False
        return host_budget is None or "keep" not in strategies or estimate_bytes(
            program, size, batch, itemsize, strategies, tile, 0, False) <= host_budget

    def fastest(tile):  # level by level, the fastest strategy that keeps the peak in budget
        strategies = list(fixed)
        for i, level in enumerate(levels):
            for option in options[:-1] if not level.untileable else ():
                if (option == "untiled" and too_big_untiled[i]
                        or option == "keep" and tile < KEEP_MIN_TILE and not forced):
                    continue
                trial = tuple(strategies[:i]) + (option,) + tuple(strategies[i + 1 :])
                if fits(trial, tile):
                    strategies[i] = option
                    break
        return tuple(strategies)

    # Every tile size whose slowest plan fits; the one whose plan recomputes fewest levels, then keeps fewest,
    # then has the largest tiles (fewer halos). The smallest tile is tried even when nothing fits.
    candidates = [(fastest(tile), tile) for tile in tiles if tile == tiles[-1] or fits(fixed, tile)]
    fitting = [(s, tile) for s, tile in candidates if estimate(s, tile) <= budget] or candidates[-1:]
    strategies, tile = min(fitting, key=lambda c: (c[0].count("recompute"), c[0].count("keep"), -c[1]))
    needed = estimate(strategies, tile)
    if needed > budget and not forced:
        raise ValueError(f"max_memory {_gib(budget)} is too small to {direction} a {batch}x{size[0]}x{size[1]} "
                         f"input even in exact tiles (needs about {_gib(needed)}): raise it or use smaller batches")
    return CodingPlan(False, strategies, tile, needed, budget)
