"""Running a program level by level: untiled, or tile by tile from stored full tensors."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Step:
    """One step of a run: `ops` write `outputs` as full tensors, in one untiled pass or tile by tile.

    A tiled step first gathers the statistics of the GroupNorms in `norm_passes` (one pass over the tiles of each
    one's input); as it writes `outputs[i]` it gathers those of the GroupNorms in `gathers[i]` (the later readers
    of that output). After the step the stored tensors in `frees` are dropped: no later step reads them."""

    ops: tuple[Op, ...]
    outputs: tuple[str, ...]
    tiled: bool
    norm_passes: tuple[Norm, ...]
    gathers: tuple[tuple[Norm, ...], ...]
    frees: tuple[str, ...]


def schedule(program: Program, strategies: tuple[str, ...]) -> list[Step]:
    """The steps that run `program` with a strategy per level: what the executor runs and the policy estimates.

    "untiled" (and an untileable level): one step, one pass on full tensors. "recompute": one tiled step
    writing only the level's outputs. "keep": a tiled step per chain (a GroupNorm, the convolution reading it and
    the residual addition after it), so that every chain's result is stored and normalised tensors and bare
    convolution outputs are not."""
    readers: dict[str, int] = {}
    norms_reading: dict[str, list[Norm]] = {}
    for op in program.ops:
        for src in op.srcs:
            readers[src] = readers.get(src, 0) + 1
        if isinstance(op, Norm):
            norms_reading.setdefault(op.srcs[0], []).append(op)
    last_read = last_reads(program.ops)
    known: set[Norm] = set()  # GroupNorms whose statistics exist before the step
    stored = {program.input}
    steps, done = [], 0
    for index, (level, strategy) in enumerate(zip(program.levels, strategies)):
        if strategy == "untiled" or level.untileable:
            parts = [(level.ops, _level_outputs(program, index), False)]
        elif strategy == "keep":
            parts = [(chain, [chain[-1].dst], True) for chain in _chains(level.ops, readers)]
        else:
            parts = [(level.ops, _level_outputs(program, index), True)]
        for ops, outputs, tiled in parts:
            norms = [op for op in ops if isinstance(op, Norm)]
            norm_passes, gathers = (), ()
            if tiled:
                norm_passes = tuple(op for op in norms if op not in known)
                known.update(norm_passes)
                gathers = tuple(tuple(op for op in norms_reading.get(name, []) if op not in known) for name in outputs)
                known.update(op for group in gathers for op in group)
            else:
                known.update(norms)  # an untiled GroupNorm computes its statistics from its full input
            done += len(ops)
            stored.update(outputs)
            frees = tuple(sorted(name for name in stored if last_read.get(name, -1) < done and name != program.output))
            stored.difference_update(frees)
            steps.append(Step(tuple(ops), tuple(outputs), tiled, norm_passes, gathers, frees))
    return steps


def run_program(program: Program, x: torch.Tensor, strategies: tuple[str, ...], tile_size: int,
                storage: torch.device) -> torch.Tensor:
    """Run `program` on `x` with a strategy per level and tiles of `tile_size`; full tensors live on `storage`."""
    sizes, channels = program.sizes(*x.shape[-2:]), program.channels()
    ctx = RunContext(device=x.device, batch=x.shape[0], dtype=x.dtype)
    channels_last = x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    stored = {program.input: x}
    for step in schedule(program, strategies):
        if step.tiled:
            _run_tiled(step, stored, sizes, channels, ctx, tile_size, storage, memory_format)
        else:
            results = _run_pass(list(step.ops), stored, {o: full_region(sizes[o]) for o in step.outputs}, sizes, ctx)
            stored.update({name: t.to(storage) for name, t in results.items()})
        for name in step.frees:
            del stored[name]
    return stored[program.output]


def _run_tiled(step: Step, stored, sizes, channels, ctx, tile, storage, memory_format) -> None:
    """Run a tiled step: the statistics of its GroupNorms first, then each output tile by tile (gathering, as
    each output tile is written, the statistics of the GroupNorms that will read it)."""
    ops = list(step.ops)
    for norm in step.norm_passes:
        acc = None
        for region in tile_regions(sizes[norm.srcs[0]], tile):
            t = _run_pass(ops[: ops.index(norm)], stored, {norm.srcs[0]: region}, sizes, ctx)[norm.srcs[0]]
            acc = combine_stats(acc, tile_stats(t, norm.norm.num_groups))
        ctx.stats[norm] = finish_stats(acc, norm.norm.eps)
    for name, norms in zip(step.outputs, step.gathers):
        full = torch.empty((ctx.batch, channels[name], *sizes[name]), dtype=ctx.dtype, device=storage,
                           memory_format=memory_format if channels[name] > 1 else torch.contiguous_format)
        acc = {op: None for op in norms}
        for region in tile_regions(sizes[name], tile):
            out = _run_pass(ops, stored, {name: region}, sizes, ctx)[name]
            for op in norms:
                acc[op] = combine_stats(acc[op], tile_stats(out, op.norm.num_groups))
            crop(full, full_region(sizes[name]), region).copy_(out)
        for op in norms:
            ctx.stats[op] = finish_stats(acc[op], op.norm.eps)
        stored[name] = full
