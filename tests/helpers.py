"""What several test files share: the tiny preset, photo-like images, and tolerances that hold on any CPU.

Why tolerances live in one place: PyTorch, oneDNN and MKL pick their kernels by the CPU's instruction set
(AVX-512, AVX2, SSE; `ATEN_CPU_CAPABILITY`, `ONEDNN_MAX_CPU_ISA` and `MKL_ENABLE_INSTRUCTIONS` force a set),
and each set sums in its own order. An absolute tolerance tuned on one CPU (1e-5 on values of order 1) then
fails on another. So every comparison here is relative to the numbers compared: the error as a fraction of
the reference's largest value or of its norm, or measured against a second summation order of the same
computation (a yardstick), and bf16's thresholds follow from bf16's rounding and the depth of the computation.
"""

from __future__ import annotations

import math

import numpy as np
import torch

TINY = "f16c16-tiny"

FP32_UNIT = 2.0**-24
"""fp32's unit roundoff: one rounding moves a value by at most this fraction of itself."""

BF16_UNIT = 2.0**-8
"""bf16's unit roundoff (8 significant bits)."""

FP32_REORDER = 2e-5
"""How far an fp32 result of these tiny networks may move, as a fraction of the reference's largest value, when
the same sums run in another order (other kernels, memory layout, batch size, tiling, diffusers' layers against
LDM's). Measured up to 3.5e-6 across the AVX-512, AVX2 and baseline kernel sets (LDM checkpoint conversion,
decoded values up to about 3): a 6x margin. It is about 300 fp32 roundings of the largest value, of the order
of sqrt(depth x reduction length) roundings for 30 layers of 3x3 convolutions over 512 channels. A real bug (a
weight mapped wrongly, a missing term, per-tile statistics) moves results by 1e-3 to 1e-1 of their range."""

FP32_OP = 64 * FP32_UNIT
"""The same for a short chain of elementwise or averaging operations (a normalisation and its inverse, a mean,
a resize): 64 roundings of the largest value, about 4e-6 of it."""


def smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 HxWx3 with smooth gradients and blobs: more like a photo than white noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _ in range(3):
        fy, fx, phase = rng.uniform(0.01, 0.08, 2).tolist() + [rng.uniform(0, 6.28)]
        channels.append(0.5 + 0.4 * np.sin(fy * y + fx * x + phase))
    return (np.stack(channels, -1) * 255).clip(0, 255).astype(np.uint8)


def _as_float64(value) -> torch.Tensor:
    return torch.as_tensor(np.asarray(value) if not torch.is_tensor(value) else value).detach().double()


def max_error(actual, expected) -> float:
    """max |actual - expected| as a fraction of max |expected| (0 when both are all zero)."""
    actual, expected = _as_float64(actual), _as_float64(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    error = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    return error / scale if scale > 0 else error


def relative_error(actual, expected) -> float:
    """||actual - expected|| / ||expected|| (L2 over all values, in float64)."""
    actual, expected = _as_float64(actual), _as_float64(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = expected.norm().item()
    error = (actual - expected).norm().item()
    return error / scale if scale > 0 else error


def assert_close(actual, expected, tolerance: float = FP32_REORDER) -> None:
    """actual equals expected up to `tolerance` of expected's largest value (default: fp32 summation order)."""
    error = max_error(actual, expected)
    assert error <= tolerance, f"max |actual - expected| = {error:.3g} of max |expected| (tolerance {tolerance:.3g})"


def assert_within_reordering(actual, expected, yardstick, floor: float = 16 * FP32_UNIT) -> None:
    """actual is as close to expected as the same computation in another summation order (the yardstick: e.g.
    channels_last, another batch split) is, within 2x; `floor` (a fraction of max |expected|, a few fp32
    roundings) stands in where the yardstick's kernels happen to round identically."""
    error, reorder = max_error(actual, expected), max_error(yardstick, expected)
    assert error <= 2 * reorder + floor, f"error {error:.3g} against the yardstick's {reorder:.3g} (of max |expected|)"


def bf16_tolerance(depth: int) -> float:
    """Relative error of a tensor computed through `depth` bf16-rounded layers (forward and backward count
    apart): independent roundings add like a random walk, sqrt(depth) * 2^-8."""
    return math.sqrt(depth) * BF16_UNIT
