"""The operations of an exact-tiling program: which input region an output region needs, and how to compute it.

A region is a (top, bottom, left, right) box in a register's own pixels. GroupNorm statistics are gathered per
tile and combined (Chan et al.), so a tile is normalised by the statistics of the whole image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ...models.residual import channel_resize, channel_to_space, space_to_channel

Region = tuple[int, int, int, int]  # (top, bottom, left, right), half-open, in a register's own pixels
# Elements of fp32 temporaries a bf16/fp16 GroupNorm makes at a time (64 MiB each).
HALF_NORM_CHUNK = 2**24


def full_region(size: tuple[int, int]) -> Region:
    """The region that covers all of a register of this size."""
    return (0, size[0], 0, size[1])


def union(a: Region | None, b: Region) -> Region:
    if a is None:
        return b
    return (min(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), max(a[3], b[3]))


def crop(x: torch.Tensor, have: Region, want: Region) -> torch.Tensor:
    return x[..., want[0] - have[0] : want[1] - have[0], want[2] - have[2] : want[3] - have[2]]


def area(region: Region) -> int:
    return (region[1] - region[0]) * (region[3] - region[2])


@dataclass(eq=False)
class Op:
    """One step of the program: `dst` from `srcs`; subclasses say which input regions an output region needs."""

    srcs: tuple[str, ...]
    dst: str
    channels: int  # of dst
    untileable: bool = field(default=False, init=False)

    def out_size(self, sizes: dict) -> tuple[int, int]:
        return sizes[self.srcs[0]]

    def input_regions(self, region: Region, sizes: dict) -> list[Region]:
        return [region for _ in self.srcs]

    def apply(self, inputs: list[torch.Tensor], region: Region, sizes: dict, ctx: RunContext, inplace: bool):
        raise NotImplementedError


def _conv_window(a: int, b: int, stride: int, pad_lo: int, kernel: int, size: int) -> tuple[int, int, int, int]:
    """Output rows [a, b) of a convolution read input rows [start, end) (clipped) plus zero rows before/after."""
    start, end = a * stride - pad_lo, (b - 1) * stride - pad_lo + kernel
    lo, hi = max(start, 0), min(end, size)
    return lo, hi, lo - start, end - hi


@dataclass(eq=False)
class Conv(Op):
    conv: nn.Conv2d = None
    pad_lo: int = 0  # zeros before (top/left) and after (bottom/right) the input, as the module pads it
    pad_hi: int = 0

    def _axes(self):
        (kh, kw), (sh, sw) = self.conv.kernel_size, self.conv.stride
        return (kh, sh), (kw, sw)

    def out_size(self, sizes):
        (kh, sh), (kw, sw) = self._axes()
        h, w = sizes[self.srcs[0]]
        return ((h + self.pad_lo + self.pad_hi - kh) // sh + 1, (w + self.pad_lo + self.pad_hi - kw) // sw + 1)

    def _windows(self, region, sizes):
        (kh, sh), (kw, sw) = self._axes()
        h, w = sizes[self.srcs[0]]
        rows = _conv_window(region[0], region[1], sh, self.pad_lo, kh, h)
        cols = _conv_window(region[2], region[3], sw, self.pad_lo, kw, w)
        return rows, cols

    def input_regions(self, region, sizes):
        rows, cols = self._windows(region, sizes)
        return [(rows[0], rows[1], cols[0], cols[1])]

    def pads_a_copy(self, region, sizes) -> bool:
        """Whether computing `region` pads a copy of the input: zeros differ between sides (else the convolution
        pads them itself, with no copy)."""
        (_, _, top, bottom), (_, _, left, right) = self._windows(region, sizes)
        return not top == bottom == left == right

    def apply(self, inputs, region, sizes, ctx, inplace):
        (_, _, top, bottom), (_, _, left, right) = self._windows(region, sizes)
        x, conv = inputs[0], self.conv
        if not self.pads_a_copy(region, sizes):
            return F.conv2d(x, conv.weight, conv.bias, conv.stride, top)
        return F.conv2d(F.pad(x, (left, right, top, bottom)), conv.weight, conv.bias, conv.stride, 0)


@dataclass(eq=False)
class Norm(Op):
    """GroupNorm with statistics over the whole image (per sample and group), then SiLU if `silu`."""

    norm: nn.GroupNorm = None
    silu: bool = True

    def apply(self, inputs, region, sizes, ctx, inplace):
        x = inputs[0]
        if self not in ctx.stats:
            if region != full_region(sizes[self.srcs[0]]):
                raise RuntimeError("internal: GroupNorm statistics missing for a tile")
            ctx.stats[self] = finish_stats(tile_stats(x, self.norm.num_groups), self.norm.eps)
        mean, rstd = ctx.stats[self]
        n, c = x.shape[:2]
        per_channel = c // self.norm.num_groups
        mean = mean.repeat_interleave(per_channel, 1)
        var = rstd.pow(-2).sub(self.norm.eps).clamp_min(0).repeat_interleave(per_channel, 1)
        weight, bias = (self.norm.weight, self.norm.bias) if self.norm.affine else (None, None)
        if x.dtype != torch.float32:
            # bf16/fp16: normalise in fp32 as GroupNorm does, then round once; a few groups at a time, so that
            # the fp32 temporaries stay small (for an untiled level they would be four times its bytes, which the
            # memory policy does not count)
            out = x if inplace else torch.empty_like(x)
            step = max(per_channel, HALF_NORM_CHUNK // (n * x[0, 0].numel()) // per_channel * per_channel)
            for lo in range(0, c, step):
                hi = min(c, lo + step)
                part = F.batch_norm(
                    x[:, lo:hi].float().reshape(1, n * (hi - lo), *x.shape[2:]), mean[:, lo:hi].flatten().float(),
                    var[:, lo:hi].flatten().float(), None if weight is None else weight[lo:hi].float().repeat(n),
                    None if bias is None else bias[lo:hi].float().repeat(n), False, 0.0, self.norm.eps)
                out[:, lo:hi] = part.reshape(n, hi - lo, *x.shape[2:])
        elif n == 1:
            # (x - mean) / sqrt(var + eps) * weight + bias, GroupNorm's formula, in one fused pass: batch_norm
            # in inference mode with the group statistics as running statistics, channel by channel
            out = F.batch_norm(x, mean[0].float(), var[0].float(), weight, bias, False, 0.0, self.norm.eps)
        else:
            scale = rstd.repeat_interleave(per_channel, 1)
            if weight is not None:
                scale = scale * weight
            out = x.sub_(mean.to(x.dtype).view(n, c, 1, 1)) if inplace else x - mean.to(x.dtype).view(n, c, 1, 1)
            out.mul_(scale.to(x.dtype).view(n, c, 1, 1))
            if bias is not None:
                out.add_(bias.view(1, c, 1, 1))
        return F.silu(out, inplace=True) if self.silu else out


def tile_stats(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(mean, M2, count) per sample and group of one tile, in float64 for combining. GroupNorm's own kernel
    gives them fastest (with eps 0 its rstd is exactly 1/std); it also normalises, which is discarded."""
    n, c, h, w = x.shape
    count = c // groups * h * w
    if x.dtype != torch.float32:
        # the kernel returns bf16/fp16 statistics for a bf16/fp16 input (whole-image GroupNorm keeps them in
        # fp32): take them from fp32 copies, a few groups at a time, as Norm.apply normalises
        per_group = count * n
        step = max(1, HALF_NORM_CHUNK // per_group)
        parts = [tile_stats(x[:, g * c // groups:min(groups, g + step) * c // groups].float(), min(step, groups - g))
                 for g in range(0, groups, step)]
        return torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1), count
    if x.stride() != (h * w * c, 1, w * c, c):
        x = x.contiguous()  # the kernel takes dense NCHW or NHWC, not a cropped view
    _, mean, rstd = torch.ops.aten.native_group_norm(x, None, None, n, c, h * w, groups, 0.0)
    return mean.double().view(n, groups), rstd.double().view(n, groups).pow(-2) * count, count


def combine_stats(a, b):
    """Chan et al.'s parallel combination of (mean, M2, count)."""
    if a is None:
        return b
    (mean_a, m2_a, n_a), (mean_b, m2_b, n_b) = a, b
    n = n_a + n_b
    delta = mean_b - mean_a
    return mean_a + delta * (n_b / n), m2_a + m2_b + delta * delta * (n_a * n_b / n), n


def finish_stats(stats, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    mean, m2, count = stats
    return mean, torch.rsqrt(m2 / count + eps)


@dataclass(eq=False)
class UpsampleNearest(Op):
    def out_size(self, sizes):
        h, w = sizes[self.srcs[0]]
        return (2 * h, 2 * w)

    def input_regions(self, region, sizes):
        return [(region[0] // 2, (region[1] - 1) // 2 + 1, region[2] // 2, (region[3] - 1) // 2 + 1)]

    def apply(self, inputs, region, sizes, ctx, inplace):
        (top, _, left, _), = self.input_regions(region, sizes)
        up = F.interpolate(inputs[0], scale_factor=2.0, mode="nearest")
        return up[..., region[0] - 2 * top : region[1] - 2 * top, region[2] - 2 * left : region[3] - 2 * left]


@dataclass(eq=False)
class Add(Op):
    """dst = (srcs[0] + shortcut(srcs[1])) / scale; a shortcut with fewer channels adds to the first ones (the code
    on the posterior mean). shortcut: None, "resize" (channel averaging/repeating), "s2c" (fold 2x2 space into
    channels, as a stage shortcut around a downsampler) or "c2s" (the inverse, around an upsampler)."""

    shortcut: str | None = None
    shortcut_channels: int = 0
    scale: float = 1.0

    def input_regions(self, region, sizes):
        if self.shortcut == "s2c":
            other = (2 * region[0], 2 * region[1], 2 * region[2], 2 * region[3])
        elif self.shortcut == "c2s":
            other = UpsampleNearest.input_regions(self, region, sizes)[0]
        else:
            other = region
        return [region, other]

    def apply(self, inputs, region, sizes, ctx, inplace):
        x, other = inputs
        if self.shortcut == "resize":
            other = channel_resize(other, self.shortcut_channels)
        elif self.shortcut == "s2c":
            other = space_to_channel(other, self.shortcut_channels, 2)
        elif self.shortcut == "c2s":
            top, left = region[0] // 2, region[2] // 2
            other = channel_to_space(other, self.shortcut_channels, 2)
            other = other[..., region[0] - 2 * top : region[1] - 2 * top, region[2] - 2 * left : region[3] - 2 * left]
        other = other.to(x.dtype)
        if other.shape[1] < x.shape[1]:
            k = other.shape[1]
            out = torch.cat([x[:, :k] + other, x[:, k:]], dim=1)
        else:
            out = x.add_(other) if inplace else x + other
        return out if self.scale == 1 else out.div_(self.scale)


@dataclass(eq=False)
class Untileable(Op):
    """A step that reads all of its inputs at once (self-attention, a shortcut code): it cannot be cut into
    tiles, so its level always runs untiled."""

    fn: Callable = None
    size_fn: Callable = None

    def __post_init__(self):
        self.untileable = True

    def out_size(self, sizes):
        return self.size_fn(sizes[self.srcs[0]]) if self.size_fn else sizes[self.srcs[0]]

    def input_regions(self, region, sizes):
        return [full_region(sizes[s]) for s in self.srcs]

    def apply(self, inputs, region, sizes, ctx, inplace):
        return self.fn(*inputs)


@dataclass
class RunContext:
    """What the operations of one run share: where tiles are computed, and the GroupNorm statistics gathered."""

    device: torch.device
    batch: int
    dtype: torch.dtype
    stats: dict = field(default_factory=dict)  # Norm -> (mean, rstd) per sample and group
