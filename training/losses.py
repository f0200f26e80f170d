"""The training loss as a wrapper around the VAE (the network itself stays a plain diffusers AutoencoderKL).

`AutoencoderWithLoss.forward` gives the reconstruction and every term that needs no discriminator;
the PatchGAN, its hinge loss and LDM's adaptive weight are the other helpers here, used by the
training step because the discriminator has its own optimiser.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn
from torchmetrics.functional.image import structural_similarity_index_measure

from latent_vae.inspection.measures import downsample, gaussian_kl

from .lpips import LPIPS


@dataclass(frozen=True)
class LossWeights:
    reconstruction: str = "l1"  # "l1" or "l2", per pixel value
    kl: float = 1e-6
    logvar_min: float = -30.0
    logvar_max: float = 20.0
    lpips: float = 0.0
    sharpness: float = 0.0
    sharpness_kind: str = "fft"  # "fft" or "ssim"
    scale_equivariance: float = 0.0
    scale_equivariance_factors: tuple[int, ...] = (2, 4)


def kl_per_pixel(mean: torch.Tensor, logvar: torch.Tensor, pixel_values: int) -> torch.Tensor:
    """KL(q(z|x) || N(0, 1)) summed over the latent, divided by the image's pixel values, batch mean.

    Dividing by pixel values (not latent values) keeps LDM's meaning of kl_weight = 1e-6: LDM sums its
    pixel loss and its KL over each image, we average the pixel loss, so both are divided by the same count.
    """
    return gaussian_kl(mean, logvar).flatten(1).sum(1).mean() / pixel_values


def frequency_loss(reference: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """L1 between the images' 2-D Fourier amplitudes (orthonormal, so on the scale of pixel values).

    Phase is ignored: a blurred reconstruction loses high-frequency *energy*, which this term puts back
    even where the exact phase (position of texture) cannot be recovered from the latent.
    """
    amplitude = lambda x: torch.fft.rfft2(x.float(), norm="ortho").abs()
    return F.l1_loss(amplitude(reconstruction), amplitude(reference))


def scale_equivariance_loss(decode: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor,
                            pixels: torch.Tensor, factors: Sequence[int],
                            distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Skorokhodov et al. 2025's scale equivariance: decode the latents downsampled by each factor and compare
    them with the images downsampled by the same factor (`latent_vae.inspection.measures.downsample`, the block mean),
    with the pixel loss's `distance` (a mean per pixel value): the mean over the factors.

    Its gradient reaches the decoder and, through the latents, the encoder: it reshapes the latent space (its
    high frequencies), so it has no place in a decoder-only fine-tune."""
    terms = [distance(decode(downsample(latents, f)).float(), downsample(pixels, f).float()) for f in factors]
    return torch.stack(terms).mean()


def ssim_loss(reference: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """1 - SSIM (Gaussian window 11, as `latent_vae.images.metrics.ssim`) of images in [-1, 1]."""
    unit = lambda x: (x.float().clamp(-1, 1) + 1) / 2
    return 1.0 - structural_similarity_index_measure(unit(reconstruction), unit(reference), data_range=1.0)


class AutoencoderWithLoss(nn.Module):
    """pixels -> {"reconstruction", "nll" (pixel + perceptual + sharpness + scale-equivariance terms), "kl", and
    each term}.

    The posterior is sampled (reparameterised) as in LDM; `sample=False` decodes its mean.
    """

    def __init__(self, vae: AutoencoderKL, weights: LossWeights, lpips: LPIPS | None = None) -> None:
        super().__init__()
        if weights.lpips > 0 and lpips is None:
            raise ValueError("lpips weight > 0 needs an LPIPS module")
        self.vae = vae
        self.weights = weights
        self.lpips = lpips

    def forward(self, pixels: torch.Tensor, sample: bool = True) -> dict[str, torch.Tensor]:
        w = self.weights
        posterior = self.vae.encode(pixels).latent_dist
        logvar = posterior.logvar.clamp(w.logvar_min, w.logvar_max)
        mean = posterior.mean
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean) if sample else mean
        reconstruction = self.vae.decode(z).sample
        ref, rec = pixels.float(), reconstruction.float()
        distance = {"l1": F.l1_loss, "l2": F.mse_loss}.get(w.reconstruction)
        if distance is None:
            raise ValueError(f"unknown reconstruction loss {w.reconstruction!r}; choose l1 or l2")
        pixel_loss = distance(rec, ref)
        nll = pixel_loss
        out = {"pixel_loss": pixel_loss.detach()}
        if w.lpips > 0:
            # Not under no_grad: this term must move the VAE (the LPIPS weights themselves are frozen).
            perceptual = self.lpips(rec, ref).mean()
            nll = nll + w.lpips * perceptual
            out["lpips"] = perceptual.detach()
        if w.sharpness > 0:
            if w.sharpness_kind == "fft":
                sharp = frequency_loss(ref, rec)
            elif w.sharpness_kind == "ssim":
                sharp = ssim_loss(ref, rec)
            else:
                raise ValueError(f"unknown sharpness loss {w.sharpness_kind!r}; choose fft or ssim")
            nll = nll + w.sharpness * sharp
            out["sharpness"] = sharp.detach()
        if w.scale_equivariance > 0:
            # the latent the reconstruction decoded (a posterior sample in training), downsampled
            equivariance = scale_equivariance_loss(lambda latents: self.vae.decode(latents).sample, z, ref,
                                                   w.scale_equivariance_factors, distance)
            nll = nll + w.scale_equivariance * equivariance
            out["scale_equivariance"] = equivariance.detach()
        kl = kl_per_pixel(mean.float(), logvar.float(), pixels[0].numel())
        out.update(reconstruction=reconstruction, nll=nll, kl=kl)
        return out


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix / taming's NLayerDiscriminator): images -> a map of real/fake logits.

    GroupNorm instead of BatchNorm: a VAE run has few images per device, and group statistics need no
    running buffers to keep in sync across ranks or to switch between train and eval.
    """

    def __init__(self, layers: int = 3, channels: int = 64, in_channels: int = 3) -> None:
        super().__init__()

        def norm(c: int) -> nn.GroupNorm:
            return nn.GroupNorm(min(32, c // 4), c)

        blocks: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            blocks += [nn.Conv2d(width, out, 4, stride, 1, bias=False), norm(out), nn.LeakyReLU(0.2)]
            width = out
        blocks.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*blocks)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)  # as pix2pix/taming

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real_logits.float()).mean() + F.relu(1.0 + fake_logits.float()).mean())


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.float().mean()


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, *, pixel_values: int,
                    max_weight: float = 1e4, grad_scale: float = 1.0) -> torch.Tensor:
    """LDM's balance of the GAN term, in LDM's units, for our per-pixel-value mean losses; no grad.

    LDM sums its reconstruction loss over each image's `pixel_values` (3*H*W) and weighs the GAN term by
    w = clamp(|grad nll_sum| / (|grad g_loss| + 1e-4), 0, max_weight) at the decoder's last layer. Our nll is that
    sum divided by `pixel_values`, so |grad nll_sum| = pixel_values * |grad nll|: the ratio, its 1e-4 and its clamp
    are LDM's exactly. Our whole loss is LDM's divided by `pixel_values`, so the weight returned is w / pixel_values.

    fp16: the gradients are taken at the loss scale `grad_scale` (as the training backward, so small ones do not
    underflow) and unscaled in fp32 before the norms. A non-finite gradient (an fp16 overflow) gives NaN, which
    the caller treats as an overflow; the clamp would otherwise turn an inf ratio into max_weight.
    """
    nll_grad = torch.autograd.grad(nll * grad_scale, last_layer, retain_graph=True)[0].float() / grad_scale
    g_grad = torch.autograd.grad(g_loss * grad_scale, last_layer, retain_graph=True)[0].float() / grad_scale
    nll_norm, g_norm = nll_grad.norm() * pixel_values, g_grad.norm()
    weight = (nll_norm / (g_norm + 1e-4)).clamp(0.0, max_weight) / pixel_values
    finite = torch.isfinite(nll_norm) & torch.isfinite(g_norm)  # no host sync: the caller decides once per step
    return torch.where(finite, weight, torch.full_like(weight, float("nan"))).detach()


def generator_objective(out: dict[str, torch.Tensor], kl_weight: float, *, fake_logits: torch.Tensor | None = None,
                        last_layer: torch.Tensor | None = None, disc_weight: float = 0.5, max_weight: float = 1e4,
                        grad_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """The VAE's loss: {"vae_loss": nll + kl_weight * kl} and, given the discriminator's `fake_logits` (the GAN
    is on), {"g_loss", "d_weight", "gan_loss": d_weight * g_loss}; the total is vae_loss + gan_loss.

    Every term is LDM's `LPIPSWithDiscriminator` generator loss divided by the pixel values of one image (its
    reconstruction and LPIPS terms summed over pixel values, its KL summed over the latent, each divided by the
    batch); `d_weight` already includes `disc_weight` (LDM's discriminator_weight) and that division.
    """
    terms = {"vae_loss": out["nll"] + kl_weight * out["kl"]}
    if fake_logits is not None:
        g_loss = generator_loss(fake_logits)
        pixel_values = out["reconstruction"][0].numel()
        d_weight = disc_weight * adaptive_weight(out["nll"], g_loss, last_layer, pixel_values=pixel_values,
                                                 max_weight=max_weight, grad_scale=grad_scale)
        terms.update(g_loss=g_loss, d_weight=d_weight, gan_loss=d_weight * g_loss)
    return terms
