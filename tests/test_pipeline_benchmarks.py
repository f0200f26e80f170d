"""The measuring helpers behind the pipeline benchmarks: they must measure what they claim."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.codec_speed import inplace_resnets
from benchmarks.measure import PeakMemory, count_flops
from benchmarks.quality import bicubic_equal_values, equal_values_side
from latent_vae import build_vae


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models are latency-bound: on a shared 2-core machine a second thread only adds waiting.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_inplace_resnets_are_bit_exact():
    """The proposed codec speed-up changes memory traffic, never a number."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 48) * 2 - 1
    plain, fast = build_vae("f16c16-tiny", seed=0).eval(), build_vae("f16c16-tiny", seed=0).eval()
    assert inplace_resnets(fast) > 0
    with torch.inference_mode():
        z_plain, z_fast = plain.encode(x).latent_dist.mode(), fast.encode(x).latent_dist.mode()
        assert torch.equal(z_plain, z_fast)
        assert torch.equal(plain.decode(z_plain).sample, fast.decode(z_fast).sample)
    # With gradients on, the original forward runs, so training through the model still works.
    fast.decode(z_fast.clone().requires_grad_()).sample.mean().backward()


def test_bicubic_baseline_keeps_as_many_values_as_the_latent():
    h, w = equal_values_side(320, 480, 16 * 20 * 30)  # an f16c16 latent of a 320x480 image
    assert math.isclose(3 * h * w, 16 * 20 * 30, rel_tol=0.05) and math.isclose(w / h, 1.5, rel_tol=0.05)
    image = torch.rand(3, 320, 480) * 2 - 1
    out = bicubic_equal_values(image, 16 * 20 * 30)
    assert out.shape == image.shape and out.min() >= -1 and out.max() <= 1
    flat = torch.zeros(3, 64, 64)  # a constant image survives resampling
    assert torch.allclose(bicubic_equal_values(flat, 3 * 8 * 8), flat, atol=1e-6)


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
