"""Running a program level by level: untiled, or tile by tile from stored full tensors."""

from __future__ import annotations

import itertools
import math

import torch

from .ops import (
    Norm,
    Op,
    Region,
    RunContext,
    combine_stats,
    crop,
    finish_stats,
    full_region,
    tile_stats,
    union,
)
from .program import Program


def tile_regions(size: tuple[int, int], tile: int) -> list[Region]:
    """A grid of about `tile` x `tile` regions covering `size` (even splits; they need not divide it)."""
    def cuts(n):
        parts = max(1, math.ceil(n / tile))
        return [round(i * n / parts) for i in range(parts + 1)]
    rows, cols = cuts(size[0]), cuts(size[1])
    return [(r0, r1, c0, c1) for r0, r1 in itertools.pairwise(rows) for c0, c1 in itertools.pairwise(cols)]


def regions_needed(ops: list[Op], targets: dict[str, Region], sizes: dict) -> dict[str, Region]:
    """The region of every register that computing `targets` needs (walking the ops backwards)."""
    needs = dict(targets)
    for op in reversed(ops):
        if op.dst not in needs:
            continue
        for src, region in zip(op.srcs, op.input_regions(needs[op.dst], sizes)):
            needs[src] = union(needs.get(src), region)
    return needs


def last_reads(ops: list[Op]) -> dict[str, int]:
    """Register -> position in `ops` of the last op that reads it (after which it can be freed)."""
    last = {}
    for i, op in enumerate(ops):
        for src in op.srcs:
            last[src] = i
    return last


def _run_pass(ops, stored: dict, targets: dict[str, Region], sizes, ctx) -> dict[str, torch.Tensor]:
    """Compute `targets` (register -> region) from the stored full tensors, holding only tile-sized temporaries."""
    needs = regions_needed(ops, targets, sizes)
    active = [op for op in ops if op.dst in needs and op.dst not in stored]
    last_use = last_reads(active)
    live: dict[str, tuple[torch.Tensor, Region]] = {}
    for i, op in enumerate(active):
        region = needs[op.dst]
        inputs = []
        for src, want in zip(op.srcs, op.input_regions(region, sizes)):
            if src in live:
                tensor, have = live[src]
            else:
                tensor, have = stored[src], full_region(sizes[src])
            inputs.append(crop(tensor, have, want).to(ctx.device, non_blocking=True))
        first = op.srcs[0]
        inplace = first in live and last_use.get(first) == i and first not in targets and op.srcs.count(first) == 1
        live[op.dst] = (op.apply(inputs, region, sizes, ctx, inplace), region)
        for src in set(op.srcs):
            if last_use.get(src) == i and src in live and src not in targets:
                del live[src]
    return {name: crop(*(live[name] if name in live else (stored[name], full_region(sizes[name]))), region)
            for name, region in targets.items()}


def _level_outputs(program: Program, index: int) -> list[str]:
    """Registers made in level `index` that later levels (or the caller) read."""
    made = {op.dst for op in program.levels[index].ops}
    later = {src for level in program.levels[index + 1 :] for op in level.ops for src in op.srcs}
    return [name for name in made if name in later or name == program.output]


def run_program(program: Program, x: torch.Tensor, strategies: tuple[str, ...], tile_size: int,
                storage: torch.device) -> torch.Tensor:
    """Run `program` on `x` with a strategy per level and tiles of `tile_size`; full tensors live on `storage`."""
    sizes = program.sizes(*x.shape[-2:])
    ctx = RunContext(device=x.device, batch=x.shape[0], dtype=x.dtype)
    for op in program.ops:
        if isinstance(op, Norm):
            ctx.norms_reading.setdefault(op.srcs[0], []).append(op)
    readers = {}
    for op in program.ops:
        for src in op.srcs:
            readers[src] = readers.get(src, 0) + 1
    channels_last = x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    last_read = last_reads(program.ops)  # positions in the program

    def forget(stored, done):  # drop stored tensors that no op after position `done` reads
        for name in [n for n in stored if last_read.get(n, -1) <= done and n != program.output]:
            del stored[name]

    stored = {program.input: x}
    position = 0
    for index, (level, strategy) in enumerate(zip(program.levels, strategies)):
        outputs = _level_outputs(program, index)
        if strategy == "untiled" or level.untileable:
            results = _run_pass(level.ops, stored, {o: full_region(sizes[o]) for o in outputs}, sizes, ctx)
            stored.update({name: t.to(storage) for name, t in results.items()})
        elif strategy == "keep":
            # Store the intermediates in full and run short chains of ops tile by tile: a GroupNorm, the
            # convolution reading it and the residual addition after it, so that normalised tensors and bare
            # convolution outputs are never stored.
            offset = 0
            for chain in _chains(level.ops, readers):
                _tiled(chain, stored, [chain[-1].dst], sizes, ctx, tile_size, storage, memory_format, program)
                offset += len(chain)
                forget(stored, position + offset - 1)
        else:
            _tiled(level.ops, stored, outputs, sizes, ctx, tile_size, storage, memory_format, program)
        position += len(level.ops)
        forget(stored, position - 1)
    return stored[program.output]


def _chains(ops: list[Op], readers: dict) -> list[list[Op]]:
    """Split ops into chains whose inner results have a single reader (the next op), each chain starting at a
    GroupNorm or where a result is read twice: a GroupNorm needs its input's statistics, hence stored."""
    chains: list[list[Op]] = []
    for op in ops:
        last = chains[-1][-1] if chains else None
        if (last is not None and not isinstance(op, Norm) and op.srcs[0] == last.dst and readers.get(last.dst) == 1
                and not op.untileable):
            chains[-1].append(op)
        else:
            chains.append([op])
    return chains


def _tiled(ops, stored, outputs, sizes, ctx, tile, storage, memory_format, program):
    """Compute `outputs` of `ops` tile by tile: first the statistics of every GroupNorm, then the outputs
    (gathering, as each output tile is written, the statistics of the GroupNorms that will read it)."""
    for i, op in enumerate(ops):
        if isinstance(op, Norm) and op not in ctx.stats:
            acc = None
            for region in tile_regions(sizes[op.srcs[0]], tile):
                t = _run_pass(ops[:i], stored, {op.srcs[0]: region}, sizes, ctx)[op.srcs[0]]
                acc = combine_stats(acc, tile_stats(t, op.norm.num_groups))
            ctx.stats[op] = finish_stats(acc, op.norm.eps)
    channels = program.channels()
    batch, dtype = ctx.batch, ctx.dtype
    for name in outputs:
        full = torch.empty((batch, channels[name], *sizes[name]), dtype=dtype, device=storage,
                           memory_format=memory_format if channels[name] > 1 else torch.contiguous_format)
        norms = [op for op in ctx.norms_reading.get(name, []) if op not in ctx.stats]
        acc = {op: None for op in norms}
        for region in tile_regions(sizes[name], tile):
            out = _run_pass(ops, stored, {name: region}, sizes, ctx)[name]
            for op in norms:
                acc[op] = combine_stats(acc[op], tile_stats(out, op.norm.num_groups))
            crop(full, full_region(sizes[name]), region).copy_(out)
        for op in norms:
            ctx.stats[op] = finish_stats(acc[op], op.norm.eps)
        stored[name] = full
