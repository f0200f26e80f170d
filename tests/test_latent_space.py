"""latent_vae.inspection.measures and `inspect`'s report: measures of a latent space on constructed latents whose
answers are known, on the untrained thumbnail code, and the self-contained page."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, smooth_image
from PIL import Image

from latent_vae import LatentCodec, build_vae
from latent_vae.images.reading import pil_to_tensor
from latent_vae.inspection.measures import (
    ACTIVE_THRESHOLD,
    HALF_NYQUIST,
    channel_activity,
    channel_stats,
    downsample,
    equivariance_factors,
    gaussian_kl,
    interpolation_evenness,
    latent_pca,
    pca_rgb,
    radial_spectrum,
    scale_equivariance_pair,
)
from latent_vae.models.residual import luma_grid

THUMB = "f16c16-small-thumb"


def waves(size: int, frequencies: list[tuple[int, int]]) -> torch.Tensor:
    """1x1xSxS sum of cosines with (fy, fx) whole cycles across the image."""
    y, x = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64), indexing="ij")
    total = sum(torch.cos(2 * math.pi * (fy * y + fx * x) / size + 0.7 * i) for i, (fy, fx) in enumerate(frequencies))
    return total[None, None]


# -- spectrum ---------------------------------------------------------------------------------------------


def test_pure_low_frequency_content_has_no_energy_above_half_nyquist():
    size = 32  # Nyquist is 16 cycles; half Nyquist 8
    spectrum = radial_spectrum(waves(size, [(1, 0), (2, 3), (0, 5)]))
    share = spectrum.high_frequency_share()
    assert 0 <= share < 1e-9  # float64 FFT rounding, relative to a total of order 1
    # and content only above half Nyquist has all of it (a checkerboard is the Nyquist frequency itself)
    assert radial_spectrum(waves(size, [(16, 16), (9, 0)])).high_frequency_share() > 1 - 1e-9


def test_white_noise_share_is_the_share_of_the_frequency_plane_above_half_nyquist():
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(64, 4, 32, 32, generator=generator, dtype=torch.float64)
    spectrum = radial_spectrum(noise)
    expected = spectrum.plane_share()
    # the rings' own count of frequencies above the cutoff, against the count from the radius directly
    fy, fx = torch.meshgrid(torch.fft.fftfreq(32), torch.fft.fftfreq(32), indexing="ij")
    radius = torch.sqrt(fy**2 + fx**2) / 0.5
    assert expected == pytest.approx(int((radius > HALF_NYQUIST).sum()) / (32 * 32 - 1), rel=1e-12)
    # the share of a sum of |FFT|^2 over n values: each power is exponential, conjugate pairs are equal,
    # so n / 2 independent terms and a standard deviation of sqrt(2 p (1 - p) / n)
    sigma = math.sqrt(2 * expected * (1 - expected) / noise.numel())
    assert abs(spectrum.high_frequency_share() - expected) < 5 * sigma


def test_a_constant_signal_has_no_spectrum_and_the_rings_cover_the_plane():
    assert radial_spectrum(torch.full((2, 3, 8, 8), 0.7)).high_frequency_share() is None
    spectrum = radial_spectrum(torch.randn(1, 1, 12, 20))
    assert sum(spectrum.counts) == 12 * 20 - 1  # every frequency but zero, once
    assert HALF_NYQUIST in spectrum.edges


# -- channels -------------------------------------------------------------------------------------------------


def test_a_channel_constant_across_images_is_inactive_even_with_a_spatial_pattern():
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(6, 4, 8, 8, generator=generator)
    latents[:, 1] = waves(8, [(1, 2)])[0, 0].float()  # the same picture in every image: carries no information
    latents[:, 3] = 5.0
    activity = channel_activity(latents)
    assert activity[1] == 0 and activity[3] == 0
    assert (activity[[0, 2]] > ACTIVE_THRESHOLD).all()
    stats = channel_stats(latents, latents, torch.zeros_like(latents))
    assert stats.active == [True, False, True, False] and stats.active_count == 2


def test_untrained_thumbnail_code_leaves_its_unused_channels_inactive_and_its_luma_active():
    codec = LatentCodec(build_vae(THUMB, seed=0))
    images = torch.stack([pil_to_tensor(Image.fromarray(smooth_image(64, 64, seed=s))) for s in range(6)])
    encoded = codec.encode(images, return_dict=True)
    stats = channel_stats(encoded.latents, encoded.mean, encoded.logvar)
    luma = luma_grid(codec.latent_channels) ** 2  # 9 luma samples, then Cb and Cr, then 5 channels left at zero
    assert luma == 9
    assert all(stats.active[:luma])
    assert not any(stats.active[luma + 2 :]) and len(stats.active[luma + 2 :]) == 5
    assert all(share is None for share in stats.high_frequency_share[luma + 2 :])


def test_posterior_std_is_the_geometric_mean_and_goes_through_the_normalisation():
    mean = torch.zeros(2, 2, 4, 4)
    logvar = torch.full_like(mean, math.log(4.0))  # std 2 everywhere in channel 0 ...
    logvar[:, 1] = math.log(4.0)
    logvar[0, 1, 0, 0] = 20.0  # ... and in channel 1 but at one position, which barely moves a geometric mean
    stats = channel_stats(mean, mean, logvar, normalised_std=lambda std: 3 * std)
    assert stats.posterior_std[0] == pytest.approx(2.0, rel=1e-6)
    assert stats.posterior_std_normalised[0] == pytest.approx(6.0, rel=1e-6)
    expected = math.exp((31 * math.log(2.0) + 10.0) / 32)  # exp of the mean of log std
    assert stats.posterior_std[1] == pytest.approx(expected, rel=1e-6)


def test_kl_of_a_standard_normal_posterior_is_zero_and_matches_torch_otherwise():
    zeros = torch.zeros(2, 4, 3, 3, dtype=torch.float64)
    assert torch.equal(gaussian_kl(zeros, zeros), zeros)
    generator = torch.Generator().manual_seed(2)
    mean, logvar = torch.randn(2, 4, 3, 3, generator=generator), torch.randn(2, 4, 3, 3, generator=generator)
    reference = torch.distributions.kl_divergence(torch.distributions.Normal(mean, torch.exp(0.5 * logvar)),
                                                  torch.distributions.Normal(0.0, 1.0))
    assert torch.allclose(gaussian_kl(mean, logvar), reference, rtol=1e-5, atol=1e-6 * reference.abs().max().item())


# -- scale equivariance ------------------------------------------------------------------------------------


def test_downsample_is_the_block_mean_and_at_2x_the_papers_bilinear():
    x = torch.randn(2, 3, 8, 12)
    assert_close(downsample(x, 4)[0, 0, 0, 0], x[0, 0, :4, :4].mean())
    bilinear = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
    assert_close(downsample(x, 2), bilinear)
    with pytest.raises(ValueError, match="multiples"):
        downsample(x, 5)


def test_scale_equivariance_pair_is_equal_for_an_equivariant_decoder():
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    mix = torch.tensor([[0.5, 0.2, 0.1], [0.1, 0.7, -0.2], [0.3, -0.1, 0.9]])
    # a pointwise linear code (factor 1): averaging commutes with it, so decoding a downsampled latent is exact
    latents = torch.einsum("oc,nchw->nohw", mix, images)
    decode = lambda z: torch.einsum("oc,nchw->nohw", torch.linalg.inv(mix), z)
    reference, decoded = scale_equivariance_pair(decode, latents, images, 2)
    assert reference.shape == (2, 3, 8, 8)
    assert_close(decoded, reference)
    # a perfect autoencoder that is not equivariant: a pointwise cube, decoded by the cube root
    cube_root = lambda z: z.sign() * z.abs().pow(1 / 3)
    assert_close(cube_root(images.pow(3)), images)
    _, bent = scale_equivariance_pair(cube_root, images.pow(3), images, 2)
    assert (bent - reference).abs().max() > 0.1


def test_equivariance_factors_need_room_in_the_latent():
    assert equivariance_factors(16, 16) == [2, 4]
    assert equivariance_factors(4, 4) == [2]
    assert equivariance_factors(6, 8) == [2]
    assert equivariance_factors(2, 2) == []


# -- interpolation and pictures --------------------------------------------------------------------------


def test_a_straight_blend_is_even_and_a_jump_is_not():
    a, b = torch.zeros(3, 8, 8), torch.ones(3, 8, 8)
    blend = torch.stack([torch.lerp(a, b, t / 7) for t in range(8)])
    assert interpolation_evenness(blend).variation < 1e-6
    jump = torch.stack([a] * 4 + [b] * 4)
    evenness = interpolation_evenness(jump)
    assert evenness.max_over_mean == pytest.approx(7.0) and evenness.variation > 2


def test_pca_of_a_rank_one_latent_has_one_component_and_its_picture_follows_the_pattern():
    pattern = torch.linspace(-1, 1, 16).reshape(4, 4)
    latent = torch.tensor([1.0, -2.0, 0.5, 3.0])[:, None, None] * pattern
    _, shares = latent_pca(latent)
    assert shares[0] == pytest.approx(1.0, abs=1e-9) and sum(shares) == pytest.approx(1.0, abs=1e-9)
    red = pca_rgb(latent)[..., 0].flatten().int()
    assert red.shape == (16,) and (red.diff() >= 0).all() and red[0] == 0 and red[-1] == 255
    assert (pca_rgb(latent)[..., 1:] == 128).all()  # flat components are mid-grey


# -- the report -------------------------------------------------------------------------------------------


def test_inspect_report_is_self_contained_and_its_json_holds_the_numbers(tmp_path):
    from latent_vae.inspection.html import write_report
    from latent_vae.inspection.report import inspect_codec

    images = torch.stack([pil_to_tensor(Image.fromarray(smooth_image(64, 64, seed=s))) for s in range(4)])
    codecs = {"thumb": LatentCodec(build_vae(THUMB, seed=0)), "tiny": LatentCodec(build_vae("f16c16-tiny", seed=0))}
    inspections = [inspect_codec(codec, images, label=label, source=label, interpolation_steps=4, progress=False)
                   for label, codec in codecs.items()]
    page, report = write_report(tmp_path, inspections, data="synthetic", image_names=[f"{i}.png" for i in range(4)],
                                resolution=64)
    html = page.read_text()
    assert not re.search(r"""(src|href)=["'](?!data:|#)""", html)  # nothing to fetch: opens from disk anywhere
    assert html.count("data:image/png;base64,") >= 2 * 4  # reconstructions, equivariance, interpolation, PCA
    numbers = json.loads(report.read_text())
    thumb = numbers["models"][0]
    assert [m["label"] for m in numbers["models"]] == ["thumb", "tiny"]
    assert thumb["channels"]["active_count"] == 11 and thumb["latent_shape"] == [16, 4, 4]
    assert list(thumb["scale_equivariance"]) == ["2x"]
    assert thumb["channels"]["kl"] == pytest.approx(inspections[0].channels.kl)
    psnr_text = f"{thumb['reconstruction']['psnr_mean']:.2f} dB"
    assert psnr_text in html  # the page shows the numbers of the JSON
    assert np.isfinite(thumb["spectrum"]["latent"]["high_frequency_share"])

