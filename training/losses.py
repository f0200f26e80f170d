"""The training loss as a wrapper around the VAE (the network itself stays a plain diffusers AutoencoderKL).

`AutoencoderWithLoss.forward` gives the reconstruction and every term that needs no discriminator;
the PatchGAN, its hinge loss and LDM's adaptive weight are the other helpers here, used by the
training step because the discriminator has its own optimiser.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn
from torchmetrics.functional.image import structural_similarity_index_measure

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


def kl_per_pixel(mean: torch.Tensor, logvar: torch.Tensor, pixel_values: int) -> torch.Tensor:
    """KL(q(z|x) || N(0, 1)) summed over the latent, divided by the image's pixel values, batch mean.

    Dividing by pixel values (not latent values) keeps LDM's meaning of kl_weight = 1e-6: LDM sums its
    pixel loss and its KL over each image, we average the pixel loss, so both are divided by the same count.
    """
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
    return kl.flatten(1).sum(1).mean() / pixel_values


def frequency_loss(reference: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """L1 between the images' 2-D Fourier amplitudes (orthonormal, so on the scale of pixel values).

    Phase is ignored: a blurred reconstruction loses high-frequency *energy*, which this term puts back
    even where the exact phase (position of texture) cannot be recovered from the latent.
    """
    amplitude = lambda x: torch.fft.rfft2(x.float(), norm="ortho").abs()
    return F.l1_loss(amplitude(reconstruction), amplitude(reference))


def ssim_loss(reference: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """1 - SSIM (Gaussian window 11, as `latent_vae.metrics.ssim`) of images in [-1, 1]."""
    unit = lambda x: (x.float().clamp(-1, 1) + 1) / 2
    return 1.0 - structural_similarity_index_measure(unit(reconstruction), unit(reference), data_range=1.0)


class AutoencoderWithLoss(nn.Module):
    """pixels -> {"reconstruction", "nll" (pixel + perceptual + sharpness terms), "kl", and each term}.

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
        if w.reconstruction == "l1":
            pixel_loss = F.l1_loss(rec, ref)
        elif w.reconstruction == "l2":
            pixel_loss = F.mse_loss(rec, ref)
        else:
            raise ValueError(f"unknown reconstruction loss {w.reconstruction!r}; choose l1 or l2")
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


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float) -> torch.Tensor:
    """LDM's balance of the GAN term: |grad nll| / |grad g_loss| at the decoder's last layer, clamped, no grad."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = nll_grad.float().norm() / (g_grad.float().norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()
