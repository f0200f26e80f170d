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

from __future__ import annotations

import itertools
import math
import os
import re
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D
from torch import nn

from .residual import channel_resize, channel_to_space, space_to_channel, thumbnail_code, thumbnail_image

Region = tuple[int, int, int, int]  # (top, bottom, left, right), half-open, in a register's own pixels
Strategy = Literal["whole", "keep", "recompute"]
STRATEGIES = ("whole", "keep", "recompute")
TILE_SIZES = (2048, 1024, 512, 256, 128, 64)  # candidates the policy tries, largest first
# Calibration of the activation estimate against measured peaks (resident set on CPU, allocator peak on CUDA):
# allocator slack, convolution workspaces and the interpreter; see benchmarks/tiling.py.
ESTIMATE_SLACK = 1.2
BASE_BYTES = 600 * 2**20
# diffusers' untiled forward holds more at its peak than this executor's liveness count of the same program
# (calibrated on the whole-image rows of benchmarks/results/tiling*.json: resident sets on CPU, allocator
# peaks on CUDA; the larger of the two CUDA rows sets its factor).
WHOLE_PATH_FACTOR = {"cpu": 1.35, "cuda": 1.6}
# On CUDA a tensor of one image with 2**31 elements or more (128 channels at 4096x4096) is past 32-bit indexing
# (a batch can be split under it, one image cannot; our reading, not profiled): the whole 4096x4096 f16c16
# decode was slower than exact tiles (benchmarks/results/tiling_cuda.md). Such levels are tiled on CUDA.
CUDA_WHOLE_ELEMENTS = 2**31
# Elements of fp32 temporaries a bf16/fp16 GroupNorm makes at a time (64 MiB each).
HALF_NORM_CHUNK = 2**24


# -- operations -------------------------------------------------------------------------------------


def _full(size: tuple[int, int]) -> Region:
    return (0, size[0], 0, size[1])


def _union(a: Region | None, b: Region) -> Region:
    if a is None:
        return b
    return (min(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), max(a[3], b[3]))


def _crop(x: torch.Tensor, have: Region, want: Region) -> torch.Tensor:
    return x[..., want[0] - have[0] : want[1] - have[0], want[2] - have[2] : want[3] - have[2]]


def _area(region: Region) -> int:
    return (region[1] - region[0]) * (region[3] - region[2])


@dataclass(eq=False)
class Op:
    """One step of the program: `dst` from `srcs`; subclasses say which input regions an output region needs."""

    srcs: tuple[str, ...]
    dst: str
    channels: int  # of dst
    whole_only: bool = field(default=False, init=False)

    def out_size(self, sizes: dict) -> tuple[int, int]:
        return sizes[self.srcs[0]]

    def input_regions(self, region: Region, sizes: dict) -> list[Region]:
        return [region for _ in self.srcs]

    def apply(self, inputs: list[torch.Tensor], region: Region, sizes: dict, ctx: _Context, inplace: bool):
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

    def apply(self, inputs, region, sizes, ctx, inplace):
        (_, _, top, bottom), (_, _, left, right) = self._windows(region, sizes)
        x, conv = inputs[0], self.conv
        if top == bottom == left == right:  # symmetric zeros: let the convolution pad (no copy)
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
            if region != _full(sizes[self.srcs[0]]):
                raise RuntimeError("internal: GroupNorm statistics missing for a tile")
            ctx.stats[self] = _finish_stats(_tile_stats(x, self.norm.num_groups), self.norm.eps)
        mean, rstd = ctx.stats[self]
        n, c = x.shape[:2]
        per_channel = c // self.norm.num_groups
        mean = mean.repeat_interleave(per_channel, 1)
        var = rstd.pow(-2).sub(self.norm.eps).clamp_min(0).repeat_interleave(per_channel, 1)
        weight, bias = (self.norm.weight, self.norm.bias) if self.norm.affine else (None, None)
        if x.dtype != torch.float32:
            # bf16/fp16: normalise in fp32 as GroupNorm does, then round once; a few groups at a time, so that
            # the fp32 temporaries stay small (for a whole level they would be four times its bytes, which the
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


def _tile_stats(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(mean, M2, count) per sample and group of one tile, in float64 for combining. GroupNorm's own kernel
    gives them fastest (with eps 0 its rstd is exactly 1/std); it also normalises, which is discarded."""
    n, c, h, w = x.shape
    if x.stride() != (h * w * c, 1, w * c, c):
        x = x.contiguous()  # the kernel takes dense NCHW or NHWC, not a cropped view
    _, mean, rstd = torch.ops.aten.native_group_norm(x, None, None, n, c, h * w, groups, 0.0)
    count = c // groups * h * w
    return mean.double().view(n, groups), rstd.double().view(n, groups).pow(-2) * count, count


def _combine_stats(a, b):
    """Chan et al.'s parallel combination of (mean, M2, count)."""
    if a is None:
        return b
    (mean_a, m2_a, n_a), (mean_b, m2_b, n_b) = a, b
    n = n_a + n_b
    delta = mean_b - mean_a
    return mean_a + delta * (n_b / n), m2_a + m2_b + delta * delta * (n_a * n_b / n), n


def _finish_stats(stats, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
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
class Whole(Op):
    """A step that needs whole tensors (self-attention, a shortcut code): runs once, on the whole image."""

    fn: Callable = None
    size_fn: Callable = None

    def __post_init__(self):
        self.whole_only = True

    def out_size(self, sizes):
        return self.size_fn(sizes[self.srcs[0]]) if self.size_fn else sizes[self.srcs[0]]

    def input_regions(self, region, sizes):
        return [_full(sizes[s]) for s in self.srcs]

    def apply(self, inputs, region, sizes, ctx, inplace):
        return self.fn(*inputs)


# -- reading a VAE into a program -------------------------------------------------------------------


@dataclass
class Segment:
    ops: list[Op]

    @property
    def whole_only(self) -> bool:
        return any(op.whole_only for op in self.ops)


@dataclass
class Program:
    """The encoder (image -> posterior moments after quant_conv) or decoder (raw latent -> image) as segments."""

    segments: list[Segment]
    input: str
    output: str
    input_channels: int

    @property
    def ops(self) -> list[Op]:
        return [op for segment in self.segments for op in segment.ops]

    def sizes(self, height: int, width: int) -> dict:
        sizes = {self.input: (height, width)}
        for op in self.ops:
            sizes[op.dst] = op.out_size(sizes)
        return sizes

    def channels(self) -> dict:
        channels = {self.input: self.input_channels}
        channels.update({op.dst: op.channels for op in self.ops})
        return channels


class _Builder:
    def __init__(self):
        self.segments: list[Segment] = [Segment([])]
        self.count = 0

    def cut(self) -> None:
        if self.segments[-1].ops:
            self.segments.append(Segment([]))

    def add(self, op: Op) -> str:
        self.segments[-1].ops.append(op)
        return op.dst

    def name(self) -> str:
        self.count += 1
        return f"r{self.count}"

    def conv(self, x: str, conv: nn.Module, extra_pad: int = 0) -> str:
        if not isinstance(conv, nn.Conv2d) or conv.groups != 1 or conv.dilation != (1, 1):
            raise ValueError(f"exact tiling supports plain Conv2d layers, got {type(conv).__name__}")
        pad = conv.padding
        if isinstance(pad, str) or pad[0] != pad[1] or conv.padding_mode != "zeros":
            raise ValueError(f"exact tiling supports square zero padding, got {pad!r} ({conv.padding_mode})")
        return self.add(Conv((x,), self.name(), conv.out_channels, conv=conv, pad_lo=pad[0], pad_hi=pad[0] + extra_pad))

    def norm(self, x: str, norm: nn.Module, channels: int, silu: bool = True) -> str:
        if type(norm) is not nn.GroupNorm:
            raise ValueError(f"exact tiling supports GroupNorm, got {type(norm).__name__}")
        return self.add(Norm((x,), self.name(), channels, norm=norm, silu=silu))

    def resnet(self, x: str, block: nn.Module, channels: int) -> tuple[str, int]:
        if not isinstance(block, ResnetBlock2D):
            raise ValueError(f"exact tiling supports ResnetBlock2D, got {type(block).__name__}")
        if block.upsample is not None or block.downsample is not None or block.time_emb_proj is not None:
            raise ValueError("exact tiling supports ResnetBlock2D without time embedding or resampling")
        if not isinstance(block.nonlinearity, nn.SiLU) or block.time_embedding_norm not in ("default", "group"):
            raise ValueError("exact tiling supports ResnetBlock2D with SiLU and default normalisation")
        h = self.norm(x, block.norm1, channels)
        h = self.conv(h, block.conv1)
        out_channels = block.conv1.out_channels
        h = self.norm(h, block.norm2, out_channels)
        h = self.conv(h, block.conv2)
        shortcut = self.conv(x, block.conv_shortcut) if block.conv_shortcut is not None else x
        return self.add(Add((h, shortcut), self.name(), out_channels, scale=block.output_scale_factor)), out_channels

    def attention(self, x: str, attn: nn.Module, channels: int) -> str:
        if not isinstance(attn, Attention):
            raise ValueError(f"exact tiling supports diffusers Attention, got {type(attn).__name__}")
        return self.add(Whole((x,), self.name(), channels, fn=attn))

    def block(self, x: str, block: nn.Module, channels: int) -> tuple[str, int]:
        """The resnets (and attentions) of a down/up/mid block."""
        attentions = getattr(block, "attentions", None) or []
        if type(block).__name__.startswith("UNetMidBlock"):
            x, channels = self.resnet(x, block.resnets[0], channels)
            for attn, resnet in zip(attentions, block.resnets[1:]):
                if attn is not None:
                    x = self.attention(x, attn, channels)
                x, channels = self.resnet(x, resnet, channels)
            return x, channels
        for i, resnet in enumerate(block.resnets):
            x, channels = self.resnet(x, resnet, channels)
            if i < len(attentions):
                x = self.attention(x, attentions[i], channels)
        return x, channels

    def downsample(self, x: str, down: nn.Module) -> str:
        if not isinstance(down, Downsample2D) or not down.use_conv or down.norm is not None:
            raise ValueError(f"exact tiling supports Downsample2D with a convolution, got {type(down).__name__}")
        return self.conv(x, down.conv, extra_pad=1 if down.padding == 0 else 0)

    def upsample(self, x: str, up: nn.Module, channels: int) -> str:
        if (not isinstance(up, Upsample2D) or up.use_conv_transpose or not up.interpolate or up.norm is not None
                or not up.use_conv):
            raise ValueError(f"exact tiling supports Upsample2D (nearest x2, conv), got {type(up).__name__}")
        x = self.add(UpsampleNearest((x,), self.name(), channels))
        return self.conv(x, up.conv if up.name == "conv" else up.Conv2d_0)


def _supported(module: nn.Module, name: str) -> None:
    for sub in module.modules():
        kind = type(sub).__name__
        if kind in ("SpatialNorm", "AdaGroupNorm", "FirDownsample2D", "FirUpsample2D", "KDownsample2D",
                    "KUpsample2D"):
            raise ValueError(f"exact tiling does not support {kind} (in the {name})")


def encoder_program(vae: nn.Module) -> Program:
    """image -> posterior moments (what `vae._encode` returns)."""
    encoder = vae.encoder
    _supported(encoder, "encoder")
    shortcut = getattr(encoder, "shortcut", None)  # a ResidualAutoencoderKL's ShortcutEncoder
    b = _Builder()
    x = "x"
    latent_channels = encoder.conv_out.out_channels // 2
    code = None
    if shortcut in ("global", "thumbnail"):
        factor = encoder.factor
        fn = (lambda t: thumbnail_code(t, latent_channels, factor)) if shortcut == "thumbnail" else (
            lambda t: space_to_channel(t, latent_channels, factor))
        code = b.add(Whole((x,), b.name(), latent_channels, fn=fn,
                           size_fn=lambda s: (s[0] // factor, s[1] // factor)))
        b.cut()
    stage = shortcut == "stage"
    channels = encoder.conv_in.out_channels
    h = b.conv(x, encoder.conv_in)
    if stage:
        h = b.add(Add((h, x), b.name(), channels, shortcut="resize", shortcut_channels=channels))
    for block in encoder.down_blocks:
        block_input = h
        h, channels = b.block(h, block, channels)
        if block.downsamplers is not None:
            h = b.downsample(h, block.downsamplers[0])
            if stage:
                h = b.add(Add((h, block_input), b.name(), channels, shortcut="s2c", shortcut_channels=channels))
            b.cut()  # store the lower-resolution tensor
    h, channels = b.block(h, encoder.mid_block, channels)
    out = b.norm(h, encoder.conv_norm_out, channels, silu=isinstance(encoder.conv_act, nn.SiLU))
    if not isinstance(encoder.conv_act, nn.SiLU):
        raise ValueError(f"exact tiling supports SiLU activations, got {type(encoder.conv_act).__name__}")
    out = b.conv(out, encoder.conv_out)
    if stage:
        out = b.add(Add((out, h), b.name(), 2 * latent_channels, shortcut="resize", shortcut_channels=latent_channels))
    elif code is not None:
        out = b.add(Add((out, code), b.name(), 2 * latent_channels))
    if vae.quant_conv is not None:
        out = b.conv(out, vae.quant_conv)
    return Program(b.segments, x, out, encoder.conv_in.in_channels)


def decoder_program(vae: nn.Module) -> Program:
    """raw latent -> image (what `vae._decode` returns as `sample`)."""
    decoder = vae.decoder
    _supported(decoder, "decoder")
    shortcut = getattr(decoder, "shortcut", None)
    b = _Builder()
    z = "z"
    if vae.post_quant_conv is not None:
        z = b.conv(z, vae.post_quant_conv)
    image_channels = decoder.conv_out.out_channels
    image_shortcut = None
    if shortcut in ("global", "thumbnail"):
        factor = decoder.factor
        fn = (lambda t: thumbnail_image(t, factor)) if shortcut == "thumbnail" else (
            lambda t: channel_to_space(t, image_channels, factor))
        image_shortcut = b.add(Whole((z,), b.name(), image_channels, fn=fn,
                                     size_fn=lambda s: (s[0] * factor, s[1] * factor)))
    stage = shortcut == "stage"
    channels = decoder.conv_in.out_channels
    h = b.conv(z, decoder.conv_in)
    if stage:
        h = b.add(Add((h, z), b.name(), channels, shortcut="resize", shortcut_channels=channels))
    h, channels = b.block(h, decoder.mid_block, channels)
    for block in decoder.up_blocks:
        block_input = h
        h, channels = b.block(h, block, channels)
        if block.upsamplers is not None:
            b.cut()  # store the lower-resolution tensor
            h = b.upsample(h, block.upsamplers[0], channels)
            if stage:
                h = b.add(Add((h, block_input), b.name(), channels, shortcut="c2s", shortcut_channels=channels))
    if not isinstance(decoder.conv_act, nn.SiLU):
        raise ValueError(f"exact tiling supports SiLU activations, got {type(decoder.conv_act).__name__}")
    out = b.norm(h, decoder.conv_norm_out, channels)
    out = b.conv(out, decoder.conv_out)
    if stage:
        out = b.add(Add((out, h), b.name(), image_channels, shortcut="resize", shortcut_channels=image_channels))
    elif image_shortcut is not None:
        out = b.add(Add((out, image_shortcut), b.name(), image_channels))
    return Program(b.segments, "z", out, decoder.conv_in.in_channels if vae.post_quant_conv is None
                   else vae.post_quant_conv.in_channels)


def program_for(vae: nn.Module, direction: str) -> Program:
    if direction not in ("encode", "decode"):
        raise ValueError(f"unknown direction {direction!r}; choose encode or decode")
    key = f"_exact_tiling_{direction}_program"
    program = getattr(vae, key, None)  # built once per model: it only holds references to its modules
    if program is None:
        program = encoder_program(vae) if direction == "encode" else decoder_program(vae)
        object.__setattr__(vae, key, program)  # not a submodule, not in the state dict
    return program


# -- running a program --------------------------------------------------------------------------------


@dataclass
class _Context:
    device: torch.device
    batch: int
    dtype: torch.dtype
    stats: dict = field(default_factory=dict)
    norms_reading: dict = field(default_factory=dict)  # register -> the Norm ops that read it


def tile_regions(size: tuple[int, int], tile: int) -> list[Region]:
    """A grid of about `tile` x `tile` regions covering `size` (even splits; they need not divide it)."""
    def cuts(n):
        parts = max(1, math.ceil(n / tile))
        return [round(i * n / parts) for i in range(parts + 1)]
    rows, cols = cuts(size[0]), cuts(size[1])
    return [(r0, r1, c0, c1) for r0, r1 in itertools.pairwise(rows) for c0, c1 in itertools.pairwise(cols)]


def _needs(ops: list[Op], targets: dict[str, Region], sizes: dict) -> dict[str, Region]:
    """The region of every register that computing `targets` needs (walking the ops backwards)."""
    needs = dict(targets)
    for op in reversed(ops):
        if op.dst not in needs:
            continue
        for src, region in zip(op.srcs, op.input_regions(needs[op.dst], sizes)):
            needs[src] = _union(needs.get(src), region)
    return needs


def _last_reads(ops: list[Op]) -> dict[str, int]:
    """Register -> position in `ops` of the last op that reads it (after which it can be freed)."""
    last = {}
    for i, op in enumerate(ops):
        for src in op.srcs:
            last[src] = i
    return last


def _run_pass(ops, stored: dict, targets: dict[str, Region], sizes, ctx) -> dict[str, torch.Tensor]:
    """Compute `targets` (register -> region) from the stored full tensors, holding only tile-sized temporaries."""
    needs = _needs(ops, targets, sizes)
    active = [op for op in ops if op.dst in needs and op.dst not in stored]
    last_use = _last_reads(active)
    live: dict[str, tuple[torch.Tensor, Region]] = {}
    for i, op in enumerate(active):
        region = needs[op.dst]
        inputs = []
        for src, want in zip(op.srcs, op.input_regions(region, sizes)):
            if src in live:
                tensor, have = live[src]
            else:
                tensor, have = stored[src], _full(sizes[src])
            inputs.append(_crop(tensor, have, want).to(ctx.device, non_blocking=True))
        first = op.srcs[0]
        inplace = first in live and last_use.get(first) == i and first not in targets and op.srcs.count(first) == 1
        live[op.dst] = (op.apply(inputs, region, sizes, ctx, inplace), region)
        for src in set(op.srcs):
            if last_use.get(src) == i and src in live and src not in targets:
                del live[src]
    return {name: _crop(*(live[name] if name in live else (stored[name], _full(sizes[name]))), region)
            for name, region in targets.items()}


def _segment_outputs(program: Program, index: int) -> list[str]:
    """Registers made in segment `index` that later segments (or the caller) read."""
    made = {op.dst for op in program.segments[index].ops}
    later = {src for segment in program.segments[index + 1 :] for op in segment.ops for src in op.srcs}
    return [name for name in made if name in later or name == program.output]


def run_program(program: Program, x: torch.Tensor, plan: CodingPlan, storage: torch.device) -> torch.Tensor:
    """Run `program` on `x` with the per-segment strategies of `plan`; full tensors live on `storage`."""
    sizes = program.sizes(*x.shape[-2:])
    ctx = _Context(device=x.device, batch=x.shape[0], dtype=x.dtype)
    for op in program.ops:
        if isinstance(op, Norm):
            ctx.norms_reading.setdefault(op.srcs[0], []).append(op)
    readers = {}
    for op in program.ops:
        for src in op.srcs:
            readers[src] = readers.get(src, 0) + 1
    channels_last = x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    last_read = _last_reads(program.ops)  # positions in the whole program

    def forget(stored, done):  # drop stored tensors that no op after position `done` reads
        for name in [n for n in stored if last_read.get(n, -1) <= done and n != program.output]:
            del stored[name]

    stored = {program.input: x}
    position = 0
    for index, (segment, strategy) in enumerate(zip(program.segments, plan.strategies)):
        outputs = _segment_outputs(program, index)
        if strategy == "whole" or segment.whole_only:
            results = _run_pass(segment.ops, stored, {o: _full(sizes[o]) for o in outputs}, sizes, ctx)
            stored.update({name: t.to(storage) for name, t in results.items()})
        elif strategy == "keep":
            # Store the intermediates in full and run short chains of ops tile by tile: a GroupNorm, the
            # convolution reading it and the residual addition after it, so that normalised tensors and bare
            # convolution outputs are never stored.
            offset = 0
            for chain in _chains(segment.ops, readers):
                _tiled(chain, stored, [chain[-1].dst], sizes, ctx, plan.tile_size, storage, memory_format, program)
                offset += len(chain)
                forget(stored, position + offset - 1)
        else:
            _tiled(segment.ops, stored, outputs, sizes, ctx, plan.tile_size, storage, memory_format, program)
        position += len(segment.ops)
        forget(stored, position - 1)
    return stored[program.output]


def _chains(ops: list[Op], readers: dict) -> list[list[Op]]:
    """Split ops into chains whose inner results have a single reader (the next op), each chain starting at a
    GroupNorm or where a result is read twice: a GroupNorm needs its input's statistics, hence stored."""
    chains: list[list[Op]] = []
    for op in ops:
        last = chains[-1][-1] if chains else None
        if (last is not None and not isinstance(op, Norm) and op.srcs[0] == last.dst and readers.get(last.dst) == 1
                and not op.whole_only):
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
                acc = _combine_stats(acc, _tile_stats(t, op.norm.num_groups))
            ctx.stats[op] = _finish_stats(acc, op.norm.eps)
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
                acc[op] = _combine_stats(acc[op], _tile_stats(out, op.norm.num_groups))
            _crop(full, _full(sizes[name]), region).copy_(out)
        for op in norms:
            ctx.stats[op] = _finish_stats(acc[op], op.norm.eps)
        stored[name] = full


# -- the memory policy ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CodingPlan:
    """How to code one batch: `whole` (diffusers' untiled path) or exact tiles with a strategy per segment."""

    whole: bool
    strategies: tuple[str, ...] = ()
    tile_size: int = 0
    estimated_bytes: int = 0
    budget_bytes: int | None = None

    def describe(self) -> str:
        if self.whole:
            return f"whole image (estimated {_gib(self.estimated_bytes)})"
        kinds = {s: self.strategies.count(s) for s in STRATEGIES if s in self.strategies}
        return (f"exact tiles of {self.tile_size} px ({', '.join(f'{n} {k}' for k, n in kinds.items())} segments; "
                f"estimated {_gib(self.estimated_bytes)})")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(value: str | int | None) -> int | None:
    """'4GB', '512MiB', '1.5 GiB' or a number of bytes -> bytes; None stays None (the default budget)."""
    if value is None or isinstance(value, int) and not isinstance(value, bool):
        if value is not None and value <= 0:
            raise ValueError(f"max_memory must be positive, got {value}")
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"max_memory must look like 4GB, 512MiB or a number of bytes, got {value!r}")
    number = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if number <= 0:
        raise ValueError(f"max_memory must be positive, got {value!r}")
    return int(number)


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
    needs = _needs(ops, targets, sizes)
    active = [op for op in ops if op.dst in needs and op.dst not in stored]
    last = _last_reads(active)
    live, peak = {}, 0
    for i, op in enumerate(active):
        region = needs[op.dst]
        padded = sum(_area(r) * channels[s] for s, r in zip(op.srcs, op.input_regions(region, sizes))
                     if isinstance(op, Conv) or s in stored)
        live[op.dst] = _area(region) * channels[op.dst]
        peak = max(peak, sum(live.values()) + padded)
        for src in op.srcs:
            if last.get(src) == i and src in live and src not in targets:
                del live[src]
    return peak * batch * itemsize


def estimate_bytes(program: Program, size: tuple[int, int], batch: int, itemsize: int,
                   strategies: tuple[str, ...], tile: int, weights: int, on_device_only: bool) -> int:
    """Peak memory of running `program` with these strategies: stored tensors + working set, calibrated.
    `on_device_only` (CUDA with host storage): count only what lives on the device in tiled segments."""
    sizes, channels = program.sizes(*size), program.channels()
    full = {name: batch * itemsize * channels[name] * s[0] * s[1] for name, s in sizes.items()}
    last = _last_reads(program.ops)
    last[program.output] = len(program.ops)
    live = {program.input: full[program.input]}
    peak, position = 0, 0
    for segment, strategy in zip(program.segments, strategies):
        tiled = strategy != "whole" and not segment.whole_only
        count_stored = not (tiled and on_device_only)
        if not tiled or strategy == "keep":
            for op in segment.ops:
                work = 0
                if tiled:
                    tile_targets = {op.dst: _full((min(tile, sizes[op.dst][0]), min(tile, sizes[op.dst][1])))}
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
            for i, op in enumerate(segment.ops):
                if isinstance(op, Norm) or i == len(segment.ops) - 1:
                    name = op.srcs[0] if isinstance(op, Norm) else op.dst
                    box = (min(tile, sizes[name][0]), min(tile, sizes[name][1]))
                    ops = segment.ops[:i] if isinstance(op, Norm) else segment.ops
                    work = max(work, _pass_bytes(ops, {name: _full(box)}, sizes, channels, batch, itemsize, stored))
            outputs = [op.dst for op in segment.ops if last.get(op.dst, -1) >= position + len(segment.ops)
                       or op.dst == program.output]
            for name in outputs:
                live[name] = full[name]
            peak = max(peak, (sum(live.values()) if count_stored else 0) + work)
            position += len(segment.ops)
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
    segments = program.segments
    whole = ("whole",) * len(segments)

    def estimate(strategies, tile):
        return estimate_bytes(program, size, batch, itemsize, strategies, tile, weights, on_cuda)

    sizes, channels = program.sizes(*size), program.channels()
    too_big_whole = [on_cuda and not segment.whole_only and max(
        channels[op.dst] * sizes[op.dst][0] * sizes[op.dst][1] for op in segment.ops) >= CUDA_WHOLE_ELEMENTS
        for segment in segments]
    whole_bytes = int(estimate(whole, 0) * WHOLE_PATH_FACTOR["cuda" if on_cuda else "cpu"])
    if tile_size is None and strategy is None and whole_bytes <= budget and not any(too_big_whole):
        return CodingPlan(True, whole, 0, whole_bytes, budget)
    tiles = (tile_size,) if tile_size is not None else TILE_SIZES
    forced = tile_size is not None or strategy is not None
    if strategy is not None:
        options = (strategy,)
    elif forced:
        options = ("keep", "recompute")
    else:
        # On CPU "keep" holds what "whole" holds, so it never helps. On CUDA it holds it in host memory, and the
        # copies cost more than recomputing (benchmarks/results/tiling_cuda.md): an expert's choice there.
        options = ("whole", "recompute")
    # On CUDA kept intermediates live in host memory: they must fit there too.
    host_budget = default_budget(torch.device("cpu")) if on_cuda and "keep" in options else None
    fixed = tuple("whole" if s.whole_only else options[-1] for s in segments)

    def fits(strategies, tile):
        if estimate(strategies, tile) > budget:
            return False
        return host_budget is None or "keep" not in strategies or estimate_bytes(
            program, size, batch, itemsize, strategies, tile, 0, False) <= host_budget

    for tile in tiles:
        if not fits(fixed, tile) and tile != tiles[-1]:
            continue
        strategies = list(fixed)
        for i, segment in enumerate(segments):  # the fastest strategy per segment that keeps the peak in budget
            for option in options[:-1] if not segment.whole_only else ():
                if option == "whole" and too_big_whole[i]:
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


# -- entry points ----------------------------------------------------------------------------------------


@torch.inference_mode()
def encode_exact(vae: nn.Module, x: torch.Tensor, plan: CodingPlan) -> torch.Tensor:
    """images N x C x H x W -> posterior moments, as `vae._encode(x)` computes them whole."""
    storage = torch.device("cpu") if x.device.type == "cuda" else x.device
    return run_program(program_for(vae, "encode"), x, plan, storage).to(x.device)


@torch.inference_mode()
def decode_exact(vae: nn.Module, z: torch.Tensor, plan: CodingPlan) -> torch.Tensor:
    """raw latents (before post_quant_conv) -> images, as `vae._decode(z).sample` computes them whole."""
    storage = torch.device("cpu") if z.device.type == "cuda" else z.device
    return run_program(program_for(vae, "decode"), z, plan, storage).to(z.device)


def enable_exact_tiling(vae: nn.Module, max_memory: str | int | None = None, *, tile_size: int | None = None,
                        strategy: str | None = None) -> nn.Module:
    """Make a diffusers VAE's `encode`/`decode` choose whole-image or exact tiled coding from `max_memory`, so
    that pipelines (DiTPipeline, StableDiffusionPipeline, ...) code large images in bounded memory without
    seams and with the same result. Replaces diffusers' approximate tiling on this instance; returns `vae`."""
    parse_memory(max_memory)  # fail now on a malformed budget
    program_for(vae, "encode"), program_for(vae, "decode")  # fail now on an unsupported model
    vae.disable_tiling()
    cls = type(vae)

    def plan(direction, x):
        return plan_coding(vae, direction, tuple(x.shape), dtype=x.dtype, device=x.device, max_memory=max_memory,
                           tile_size=tile_size, strategy=strategy)

    def _encode(self, x):
        p = plan("encode", x)
        return cls._encode(self, x) if p.whole else encode_exact(self, x, p)

    def _decode(self, z, return_dict=True):
        p = plan("decode", z)
        if p.whole:
            return cls._decode(self, z, return_dict=return_dict)
        image = decode_exact(self, z, p)
        return DecoderOutput(sample=image) if return_dict else (image,)

    vae._encode = types.MethodType(_encode, vae)
    vae._decode = types.MethodType(_decode, vae)
    return vae
