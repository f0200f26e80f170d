"""The posterior q(z|x) of a KL-VAE, measured and (optionally) fixed.

A latent dataset samples the posterior by default (as Stable Diffusion's training does with
`latent_dist.sample()`): that is only sound where the posterior's spread is small beside the latent's own
variation, at the sizes where the model is used. `measure_posterior` scores it on images; `hold_logvar`
makes the spread a constant of the weights, so it holds at every size by construction.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from latent_vae.codec.posterior import PosteriorStats
from latent_vae.images.metrics import psnr
from latent_vae.inspection.measures import gaussian_kl


@dataclass
class PosteriorReport:
    """What `measure_posterior` found over a set of images of one size."""

    psnr_mean: float  # decode(posterior mean), dB, mean over images
    psnr_sample: float  # decode(one posterior sample), dB, mean over images
    logvar_mean: float
    logvar_max: float
    kl_per_value: float  # KL(q || N(0, 1)) per latent value, nats
    # How far a sample lies from its mean against the spread of the means across images and positions, as
    # `precompute` records it (latent_vae.codec.posterior): over all channels, and per channel (None for a channel
    # whose mean never varies, such as a shortcut model's spare channels before training fills them)
    noise_ratio: float | None
    channel_noise_ratios: list[float | None] = field(default_factory=list)

    @property
    def sample_gap(self) -> float:
        """dB the sample loses against the mean (positive: the sample is worse)."""
        return self.psnr_mean - self.psnr_sample

    @property
    def worst_channel_noise_ratio(self) -> float | None:
        """The largest noise ratio of a channel whose means vary; None if none does."""
        return max((r for r in self.channel_noise_ratios if r is not None), default=None)


@dataclass
class _Sums:
    """Running sums over images, so that large images go through one at a time."""

    psnr_mean: list[float] = field(default_factory=list)
    psnr_sample: list[float] = field(default_factory=list)
    values: int = 0
    logvar: float = 0.0
    logvar_max: float = float("-inf")
    kl: float = 0.0
    channels: PosteriorStats = field(default_factory=PosteriorStats)

    def add(self, mean: torch.Tensor, logvar: torch.Tensor) -> None:
        mean, logvar = mean.double(), logvar.double()
        self.channels.update(mean, (0.5 * logvar).exp())
        self.values += mean.numel()
        self.logvar += logvar.sum().item()
        self.logvar_max = max(self.logvar_max, logvar.max().item())
        self.kl += gaussian_kl(mean, logvar).sum().item()

    def report(self) -> PosteriorReport:
        average = lambda xs: sum(xs) / len(xs)
        return PosteriorReport(psnr_mean=average(self.psnr_mean), psnr_sample=average(self.psnr_sample),
                               logvar_mean=self.logvar / self.values, logvar_max=self.logvar_max,
                               kl_per_value=self.kl / self.values, noise_ratio=self.channels.noise_ratio(),
                               channel_noise_ratios=self.channels.record()["channel_noise_ratios"])


@torch.no_grad()
def measure_posterior(vae: nn.Module, images: Iterable[torch.Tensor], *, seed: int = 0,
                      device: torch.device | str = "cpu") -> PosteriorReport:
    """Encode each batch of `images` (Nx3xHxW in [-1, 1]; one size), decode the posterior mean and one posterior
    sample (noise drawn from `seed`), and score both against the image; the latents' statistics too."""
    generator = torch.Generator().manual_seed(seed)
    sums = _Sums()
    for batch in images:
        batch = batch.to(device)
        posterior = vae.encode(batch).latent_dist  # diffusers clamps logvar to [-30, 20]
        mean, logvar = posterior.mean.float(), posterior.logvar.float()
        noise = torch.randn(mean.shape, generator=generator).to(mean)
        sample = mean + (0.5 * logvar).exp() * noise
        for latent, scores in ((mean, sums.psnr_mean), (sample, sums.psnr_sample)):
            decoded = vae.decode(latent).sample.float().clamp(-1, 1)
            scores += psnr(batch.float(), decoded).tolist()
        sums.add(mean.cpu(), logvar.cpu())
    if not sums.values:
        raise ValueError("measure_posterior needs at least one image")
    return sums.report()


def moments_conv(vae: nn.Module) -> nn.Conv2d:
    """The last layer that makes the posterior's moments (mean channels, then log-variance channels):
    quant_conv where the model has one, else the encoder's conv_out."""
    return vae.quant_conv if getattr(vae, "quant_conv", None) is not None else vae.encoder.conv_out


@torch.no_grad()
def set_logvar(vae: nn.Module, value: float) -> None:
    """Make the posterior log-variance the constant `value` at every position of every image: the log-variance
    rows of the moments layer get zero weights and bias `value`. A plain AutoencoderKL still, saved as one."""
    conv = moments_conv(vae)
    half = conv.out_channels // 2
    conv.weight[half:].zero_()
    conv.bias[half:].fill_(value)


def hold_logvar(vae: nn.Module, value: float, optimizer: torch.optim.Optimizer) -> None:
    """`set_logvar`, kept through training by `optimizer` (built on the VAE's parameters, before Accelerate's
    prepare): the rows' gradients are zeroed, so they take no part in gradient clipping and Adam leaves them
    where they are, and they are set again after each step, where weight decay would shrink them."""
    set_logvar(vae, value)
    conv = moments_conv(vae)
    half = conv.out_channels // 2

    def zero_rows(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[half:] = 0
        return grad

    conv.weight.register_hook(zero_rows)
    conv.bias.register_hook(zero_rows)
    optimizer.register_step_post_hook(lambda *_: set_logvar(vae, value))
