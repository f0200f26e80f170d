"""Image fidelity metrics on float images in [-1, 1] (the codec's tensor convention)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

SSIM_WINDOW = 11  # pixels: the Gaussian window of `ssim`; smaller images have no SSIM


def _to_unit(images: torch.Tensor) -> torch.Tensor:
    return images.detach().float().clamp(-1, 1).add(1).div(2)


def psnr(reference: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB (data range [0, 1]) of Nx3xHxW batches in [-1, 1]: a tensor of N values."""
    return peak_signal_noise_ratio(
        _to_unit(reconstruction), _to_unit(reference), data_range=1.0, reduction="none", dim=(1, 2, 3)
    )


def ssim(reference: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Gaussian window 11, sigma 1.5) of Nx3xHxW batches in [-1, 1]: a tensor of N values.
    Both sides must be at least SSIM_WINDOW pixels (a ValueError otherwise)."""
    if min(reference.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got "
                         f"{reference.shape[-1]}x{reference.shape[-2]}")
    return structural_similarity_index_measure(
        _to_unit(reconstruction), _to_unit(reference), data_range=1.0, reduction="none", kernel_size=SSIM_WINDOW
    )


def equal_values_size(height: int, width: int, values: int) -> tuple[int, int]:
    """The largest (h, w) with the aspect of HxW whose 3 x h x w numbers do not exceed `values`."""
    scale = math.sqrt(values / (3 * height * width))
    return max(1, math.floor(height * scale)), max(1, math.floor(width * scale))


def bicubic_equal_values(images: torch.Tensor, values: int) -> torch.Tensor:
    """The baseline a VAE must beat: images (Nx3xHxW or 3xHxW, in [-1, 1]) shrunk to at most `values`
    numbers each (the latent's C x h x w), antialiased bicubic, then enlarged back, bicubic."""
    batch = images if images.ndim == 4 else images[None]
    height, width = batch.shape[-2:]
    small = F.interpolate(batch, size=equal_values_size(height, width, values), mode="bicubic", antialias=True,
                          align_corners=False)
    restored = F.interpolate(small, size=(height, width), mode="bicubic", align_corners=False).clamp(-1, 1)
    return restored if images.ndim == 4 else restored[0]
