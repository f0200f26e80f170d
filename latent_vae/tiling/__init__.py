"""Exact tiled encode/decode: the same function as whole-image coding, in bounded memory.

diffusers' `enable_tiling()` codes each tile on its own (its own GroupNorm statistics) and blends the seams,
which changes the result. Here the encoder and decoder are read into a short program of operations
(convolution, GroupNorm + SiLU, nearest upsampling, additions, and whole-tensor steps such as attention),
cut into segments at the resolution changes. Each segment runs one of three ways:

- "whole": every operation on the whole tensor (exact by definition; the attention levels always run so).
- "keep": operation by operation; each full intermediate is stored in host memory and every operation runs
  tile by tile from it (on CUDA only one tile's working set is on the device). GroupNorm statistics come from
  the stored tensor, reduced over all tiles.
- "recompute": nothing is stored inside the segment. One pass over all tiles per GroupNorm gathers its
  statistics (sum and squared deviations per sample and group, combined in float64), recomputing the
  tiles from the segment's input; a last pass writes the output. Slow but bounded by one tile.

A tile carries the halo its convolutions see: each operation knows which input region an output region
needs, zeros are padded only at the true image border, and convolutions run with padding 0. So tiling only
changes the order of floating-point sums.

`plan_coding` is the one memory policy: whole-image coding (diffusers' own untiled path) when its estimate
fits the budget, otherwise exact tiles, choosing whole / keep / recompute per segment and the tile size.
"""

from .exact import decode_exact, enable_exact_tiling, encode_exact
from .executor import run_program, tile_regions
from .policy import (
    CUDA_WHOLE_ELEMENTS,
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
    "CUDA_WHOLE_ELEMENTS", "STRATEGIES", "TILE_SIZES", "CodingPlan", "Program", "decode_exact", "decoder_program",
    "default_budget", "enable_exact_tiling", "encode_exact", "encoder_program", "estimate_bytes", "parse_memory",
    "plan_coding", "program_for", "run_program", "tile_regions",
]
