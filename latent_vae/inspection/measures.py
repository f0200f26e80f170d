"""How good a latent space is for diffusion: pure measures on latents, posteriors and decoded images.

- spectrum: the radially averaged power spectrum and its share of energy above half the Nyquist frequency
  (Skorokhodov et al. 2025, "Improving the Diffusability of Autoencoders": latents with more high-frequency
  energy than their image diffuse worse);
- per channel: KL of the posterior to N(0, 1) and active units (Burda et al. 2016, "Importance Weighted
  Autoencoders": a unit is active when its posterior mean varies across inputs);
- scale equivariance: decode(downsample(z)) against downsample(x), the quantity Skorokhodov et al. train;
- interpolation evenness and a PCA picture of a latent.

Tensors are NxCxHxW unless said otherwise; every reduction runs in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# "High frequency" in Skorokhodov et al.'s sense: above half the Nyquist frequency, in units of Nyquist.
HALF_NYQUIST = 0.5
# Burda et al.'s threshold on the variance (across inputs) of a unit's posterior mean. Their prior N(0, 1)
# fixes the units' scale; with a KL weight of 1e-6 nothing does here, so the variance is measured relative
# to the mean over channels (the units of a globally normalised latent, whose average channel has variance
# about 1). A channel is then active when it varies across images by at least 1% of an average channel.
ACTIVE_THRESHOLD = 0.01


def downsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Area downsampling by an integer factor (the mean of each factor x factor block): the one downsampling
    of images and latents for scale equivariance. At 2x it equals the paper's bilinear downsampling (a
    half-pixel bilinear sample is the mean of a 2x2 block); at 4x bilinear would skip pixels, the mean does not."""
    if factor < 1 or x.shape[-2] % factor or x.shape[-1] % factor:
        raise ValueError(f"cannot downsample {tuple(x.shape[-2:])} by {factor}: the sides must be multiples of it")
    return x if factor == 1 else F.avg_pool2d(x, factor)


# -- spectrum --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RadialSpectrum:
    """Power summed over rings of the frequency plane. Ring i holds the frequencies of radius r with
    edges[i] < r <= edges[i + 1], r in units of the Nyquist frequency (so r reaches sqrt(2) in the corners);
    the zero frequency (each channel's mean) is left out."""

    edges: tuple[float, ...]
    power: tuple[float, ...]  # summed |FFT|^2 (orthonormal) over every image, channel and frequency of the ring
    counts: tuple[int, ...]  # frequencies of the plane in each ring (one image, one channel)

    @property
    def mean_power(self) -> list[float]:
        """Power per frequency in each ring: the radially averaged power spectrum (an empty ring gives 0)."""
        return [p / c if c else 0.0 for p, c in zip(self.power, self.counts)]

    @property
    def centres(self) -> list[float]:
        return [(a + b) / 2 for a, b in zip(self.edges[:-1], self.edges[1:])]

    def _above(self, cutoff: float) -> list[bool]:
        if not any(math.isclose(edge, cutoff) for edge in self.edges):
            raise ValueError(f"{cutoff} is not a ring edge of this spectrum ({self.edges})")
        return [low >= cutoff - 1e-12 for low in self.edges[:-1]]

    def high_frequency_share(self, cutoff: float = HALF_NYQUIST) -> float | None:
        """Share of the power above `cutoff` (a ring edge); None for a signal without power (constant)."""
        total = sum(self.power)
        if total <= 0:
            return None
        return sum(p for p, high in zip(self.power, self._above(cutoff)) if high) / total

    def plane_share(self, cutoff: float = HALF_NYQUIST) -> float:
        """Share of the frequency plane above `cutoff`: white noise's expected high-frequency share."""
        return sum(c for c, high in zip(self.counts, self._above(cutoff)) if high) / sum(self.counts)


def ring_width(height: int, width: int) -> float:
    """The rings' width in units of Nyquist: about one frequency step of the shorter side, and half
    Nyquist always an edge (so the high-frequency share is a sum of whole rings)."""
    return HALF_NYQUIST / max(1, round(min(height, width) / 4))


def frequency_radius(height: int, width: int) -> torch.Tensor:
    """HxW radius of each `torch.fft.fft2` frequency, in units of the Nyquist frequency (0.5 cycles per pixel)."""
    fy = torch.fft.fftfreq(height, dtype=torch.float64)[:, None]
    fx = torch.fft.fftfreq(width, dtype=torch.float64)[None, :]
    return torch.sqrt(fy**2 + fx**2) / 0.5


def radial_spectrum(signals: torch.Tensor) -> RadialSpectrum:
    """The radially averaged power spectrum of NxCxHxW signals (each image's channel mean removed first)."""
    if signals.ndim != 4:
        raise ValueError(f"signals must be NxCxHxW, got shape {tuple(signals.shape)}")
    height, width = signals.shape[-2:]
    x = signals.detach().to("cpu", torch.float64)
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    power = torch.fft.fft2(x, norm="ortho").abs().pow(2).sum(dim=(0, 1))  # HxW
    radius = frequency_radius(height, width)
    step = ring_width(height, width)
    rings = math.ceil(radius.max().item() / step - 1e-9)
    # ring i holds edges[i] < r <= edges[i + 1]: ceil(r / step) - 1 (the tolerance keeps r = k * step in ring k - 1)
    index = (torch.ceil(radius / step - 1e-9) - 1).long().clamp(0, rings - 1)
    keep = radius > 0  # the zero frequency carries the mean, removed above
    ring_power = torch.zeros(rings, dtype=torch.float64).index_add_(0, index[keep], power[keep])
    ring_counts = torch.bincount(index[keep], minlength=rings)
    edges = tuple(i * step for i in range(rings + 1))
    return RadialSpectrum(edges, tuple(ring_power.tolist()), tuple(int(c) for c in ring_counts.tolist()))


# -- posterior and channels ------------------------------------------------------------------------------


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) of each value, in nats (the VAE's KL term, before any sum)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)


def channel_activity(posterior_mean: torch.Tensor) -> torch.Tensor:
    """C values: the variance across images of each latent value's posterior mean, averaged over positions
    (Burda et al.'s unit activity, a latent channel being a unit repeated over space), relative to the mean
    over channels. Needs at least 2 images; all zero when nothing varies."""
    if posterior_mean.shape[0] < 2:
        raise ValueError("active units need the posterior means of at least 2 images")
    variance = posterior_mean.detach().to("cpu", torch.float64).var(dim=0, unbiased=False).mean(dim=(-2, -1))
    average = variance.mean()
    return variance / average if average > 0 else torch.zeros_like(variance)


@dataclass(frozen=True)
class ChannelStats:
    """One value per latent channel (lists of C), over every image and position."""

    mean: list[float]  # of the normalised latent (what a diffusion model sees)
    std: list[float]  # of the normalised latent
    kl: list[float]  # nats per latent value, raw posterior against N(0, 1)
    # sqrt of the posterior variance, raw units: the geometric mean over values (exp of half the mean log-variance),
    # which a few positions of extreme log-variance (an encoder outside its training data) do not dominate
    posterior_std: list[float]
    posterior_std_normalised: list[float]  # the same through the normalisation: noise in a diffusion model's units
    activity: list[float]  # `channel_activity`
    active: list[bool]  # activity above ACTIVE_THRESHOLD
    high_frequency_share: list[float | None]  # of the normalised latent (None: a channel without variation)

    @property
    def active_count(self) -> int:
        return sum(self.active)


def channel_stats(normalised: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor,
                  normalised_std: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  threshold: float = ACTIVE_THRESHOLD) -> ChannelStats:
    """Per-channel statistics of N latents: `normalised` (the codec's output), the raw posterior `mean` and
    `logvar`; `normalised_std` maps a raw std tensor (NxCxhxw) to normalised units (default: unchanged)."""
    z = normalised.detach().to("cpu", torch.float64)
    mean64, logvar64 = (t.detach().to("cpu", torch.float64) for t in (mean, logvar))
    std = torch.exp(0.5 * logvar64)
    std_normalised = normalised_std(std) if normalised_std is not None else std
    per_channel = lambda t: t.transpose(0, 1).reshape(t.shape[1], -1)
    activity = channel_activity(mean64)
    shares = [radial_spectrum(z[:, c : c + 1]).high_frequency_share() for c in range(z.shape[1])]
    return ChannelStats(
        mean=per_channel(z).mean(1).tolist(), std=per_channel(z).std(1, unbiased=False).tolist(),
        kl=per_channel(gaussian_kl(mean64, logvar64)).mean(1).tolist(),
        posterior_std=per_channel(std).log().mean(1).exp().tolist(),
        posterior_std_normalised=per_channel(std_normalised.to(torch.float64).abs()).log().mean(1).exp().tolist(),
        activity=activity.tolist(), active=(activity > threshold).tolist(), high_frequency_share=shares,
    )


# -- scale equivariance ----------------------------------------------------------------------------------


def equivariance_factors(latent_height: int, latent_width: int, candidates: tuple[int, ...] = (2, 4),
                         min_side: int = 2) -> list[int]:
    """The downsampling factors a latent of this size can be measured at: each side a multiple of the factor
    and at least `min_side` latent pixels after it."""
    return [f for f in candidates
            if latent_height % f == 0 and latent_width % f == 0 and min(latent_height, latent_width) // f >= min_side]


def scale_equivariance_pair(decode_raw: Callable[[torch.Tensor], torch.Tensor], raw_latents: torch.Tensor,
                            images: torch.Tensor, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(downsample(x), decode(downsample(z))) for raw latents z of images x: what a scale-equivariant decoder
    makes equal. `decode_raw` maps raw latents to images in [-1, 1]."""
    small_images = downsample(images, factor)
    decoded = decode_raw(downsample(raw_latents, factor))
    return small_images, decoded[..., : small_images.shape[-2], : small_images.shape[-1]].to(small_images.device)


# -- interpolation and pictures --------------------------------------------------------------------------


@dataclass(frozen=True)
class Evenness:
    steps: list[float]  # RMS pixel change (pixels in [-1, 1]) between consecutive frames
    variation: float  # std / mean of the steps: 0 when the image changes evenly along the path
    max_over_mean: float  # the largest step over the mean: a jump shows here

    def to_dict(self) -> dict:
        return {"steps": self.steps, "variation": self.variation, "max_over_mean": self.max_over_mean}


def interpolation_evenness(frames: torch.Tensor) -> Evenness:
    """How evenly decoded frames (Tx3xHxW, T >= 3, endpoints included) change along a latent path."""
    if frames.shape[0] < 3:
        raise ValueError(f"evenness needs at least 3 frames, got {frames.shape[0]}")
    x = frames.detach().to("cpu", torch.float64)
    steps = (x[1:] - x[:-1]).pow(2).flatten(1).mean(1).sqrt()
    mean = steps.mean()
    if mean == 0:
        return Evenness(steps.tolist(), 0.0, 1.0)
    return Evenness(steps.tolist(), float(steps.std(unbiased=False) / mean), float(steps.max() / mean))


def latent_pca(latent: torch.Tensor, components: int = 3) -> tuple[torch.Tensor, list[float]]:
    """A Cxhxw latent's first principal components over its positions: (components x h x w scores, the share of
    variance each explains). Signs are fixed so that each component's largest loading is positive."""
    c, h, w = latent.shape
    x = latent.detach().to("cpu", torch.float64).reshape(c, h * w).T  # positions x channels
    x = x - x.mean(0, keepdim=True)
    _, singular, vh = torch.linalg.svd(x, full_matrices=False)
    k = min(components, vh.shape[0])
    loadings = vh[:k]
    largest = loadings.gather(1, loadings.abs().argmax(1, keepdim=True))
    signs = torch.where(largest >= 0, 1.0, -1.0).to(loadings.dtype)
    scores = (x @ (loadings * signs).T).T.reshape(k, h, w)
    energy = singular.pow(2)
    shares = (energy[:k] / energy.sum()).tolist() if energy.sum() > 0 else [0.0] * k
    if k < components:  # fewer channels (or positions) than components: pad with flat ones
        scores = torch.cat([scores, scores.new_zeros(components - k, h, w)])
        shares += [0.0] * (components - k)
    return scores, shares


def pca_rgb(latent: torch.Tensor) -> torch.Tensor:
    """uint8 hxwx3: a latent's first three principal components as red, green and blue, each stretched over
    its 1st to 99th percentile (a flat one, e.g. of a latent of rank below 3, is mid-grey)."""
    scores, _ = latent_pca(latent, 3)
    flat = scores.flatten(1)
    low, high = torch.quantile(flat, 0.01, dim=1), torch.quantile(flat, 0.99, dim=1)
    span = (high - low)[:, None, None]
    flat_component = span <= 1e-5 * span.max()  # float32 rounding noise of a latent of lower rank
    unit = torch.where(flat_component, torch.full_like(scores, 0.5), (scores - low[:, None, None]) / span.clamp_min(1e-300))
    return unit.clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0)
