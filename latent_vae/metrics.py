"""Image fidelity metrics on float images in [-1, 1] (the codec's tensor convention)."""

from __future__ import annotations

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


def _to_unit(images: torch.Tensor) -> torch.Tensor:
    return images.detach().float().clamp(-1, 1).add(1).div(2)


def psnr(reference: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB (data range [0, 1]) of Nx3xHxW batches in [-1, 1]: a tensor of N values."""
    return peak_signal_noise_ratio(
        _to_unit(reconstruction), _to_unit(reference), data_range=1.0, reduction="none", dim=(1, 2, 3)
    )


def ssim(reference: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Gaussian window 11, sigma 1.5) of Nx3xHxW batches in [-1, 1]: a tensor of N values."""
    return structural_similarity_index_measure(
        _to_unit(reconstruction), _to_unit(reference), data_range=1.0, reduction="none"
    )
