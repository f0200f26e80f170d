"""Exact tiled encode/decode: the same function as whole-image coding, in bounded memory.

diffusers' `enable_tiling()` codes each tile on its own (its own GroupNorm statistics) and blends the seams,
which changes the result. Here the encoder and decoder are read into a short program of operations
(convolution, GroupNorm + SiLU, nearest upsampling, additions, and untileable steps such as attention),
cut into levels at the resolution changes. Words, each with one meaning:

- whole image: the image and every tensor computed from it, uncut. Whole-image coding (`CodingPlan.whole`) is
  diffusers' own forward on it; every tiled result equals it up to fp32 summation order.
- full tensor: a register held over the whole image; full region: the region covering a register.
- level: the operations between two resolution changes; the unit a strategy is chosen for.
- untileable operation: one that reads all of its input at once (self-attention, a shortcut code); its level
  runs untiled.

Each level runs with one of three strategies:

- "untiled": every operation on full tensors, one pass (exact by definition).
- "keep": every intermediate is stored as a full tensor (in host memory on CUDA) and short chains of operations
  run tile by tile from it (on CUDA only one tile's working set is on the device). GroupNorm statistics come
  from the stored tensor, reduced over all tiles.
- "recompute": nothing is stored inside the level. One pass over all tiles per GroupNorm gathers its
  statistics (sum and squared deviations per sample and group, combined in float64), recomputing the
  tiles from the level's input; a last pass writes the output. Slow but bounded by one tile.

A tile carries the halo its convolutions see: each operation knows which input region an output region
needs, zeros are padded only at the true image border, and convolutions run with padding 0. So tiling only
changes the order of floating-point sums.

`plan_coding` is the one memory policy: whole-image coding when its estimate fits the budget, otherwise
exact tiles, choosing a strategy per level and the tile size (docs/tiling.md: the policy and its measurements).

Modules, imports pointing down: `ops` (operations and regions), `program` (reading a VAE into levels),
`executor` (running a program), `policy` (memory estimate and plans), `exact` (the entry points).
"""

from .exact import decode_exact, enable_exact_tiling, encode_exact
from .executor import run_program, tile_regions
from .policy import (
    CUDA_TILE_FROM_ELEMENTS,
    STRATEGIES,
    TILE_SIZES,
    CodingPlan,
    default_budget,
    estimate_bytes,
    parse_memory,
    plan_coding,
)
from .program import Program, decoder_program, encoder_program, program_for

__all__ = [
    "CUDA_TILE_FROM_ELEMENTS", "STRATEGIES", "TILE_SIZES", "CodingPlan", "Program", "decode_exact", "decoder_program",
    "default_budget", "enable_exact_tiling", "encode_exact", "encoder_program", "estimate_bytes", "parse_memory",
    "plan_coding", "program_for", "run_program", "tile_regions",
]
