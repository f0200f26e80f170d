"""The measuring helpers behind the pipeline benchmarks: they must measure what they claim."""

from __future__ import annotations

import math

import torch
from helpers import FP32_OP, assert_close

from benchmarks.measure import PeakMemory, count_flops
from latent_vae.images.metrics import bicubic_equal_values, equal_values_size


def test_bicubic_baseline_keeps_as_many_values_as_the_latent():
    h, w = equal_values_size(320, 480, 16 * 20 * 30)  # an f16c16 latent of a 320x480 image
    assert 3 * h * w <= 16 * 20 * 30 and math.isclose(3 * h * w, 16 * 20 * 30, rel_tol=0.05)
    assert math.isclose(w / h, 1.5, rel_tol=0.05)
    image = torch.rand(3, 320, 480) * 2 - 1
    out = bicubic_equal_values(image, 16 * 20 * 30)
    assert out.shape == image.shape and out.min() >= -1 and out.max() <= 1
    flat = torch.full((3, 64, 64), 0.3)  # a constant image survives resampling (its weights sum to 1)
    assert_close(bicubic_equal_values(flat, 3 * 8 * 8), flat, FP32_OP)


def test_flops_counted_on_meta_and_peak_memory():
    with torch.device("meta"):
        conv = torch.nn.Conv2d(4, 8, 3, padding=1)
        x = torch.empty(1, 4, 16, 16)
    assert count_flops(lambda: conv(x)) == 2 * 4 * 8 * 9 * 16 * 16
    with PeakMemory(torch.device("cpu")) as memory:
        block = torch.ones(64, 2**20)  # 256 MiB, touched
        del block
    if memory.mib is not None:  # Linux only
        assert 200 < memory.mib < 400, memory.mib
