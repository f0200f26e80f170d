"""Latent normalisation: the constants that give a diffusion model unit-variance latents.

They live in the model's config (`scaling_factor`, `shift_factor`, `latents_mean`, `latents_std`) so
that diffusers pipelines apply them too, with diffusers' own conventions:

- per channel (SDXL-style, when `latents_mean`/`latents_std` are set): z' = (z - mean_c) * scale / std_c
- global (SD3/FLUX-style): z' = (z - shift) * scale
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch


@dataclass(frozen=True)
class LatentNormalization:
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None

    @classmethod
    def from_config(cls, config) -> "LatentNormalization":
        mean, std = config.get("latents_mean"), config.get("latents_std")
        return cls(
            scaling_factor=float(config.get("scaling_factor") or 1.0),
            shift_factor=float(config.get("shift_factor") or 0.0),
            latents_mean=tuple(float(v) for v in mean) if mean is not None else None,
            latents_std=tuple(float(v) for v in std) if std is not None else None,
        )

    @property
    def per_channel(self) -> bool:
        return self.latents_mean is not None and self.latents_std is not None

    def to_config(self) -> dict:
        return dict(
            scaling_factor=self.scaling_factor,
            shift_factor=self.shift_factor,
            latents_mean=list(self.latents_mean) if self.latents_mean is not None else None,
            latents_std=list(self.latents_std) if self.latents_std is not None else None,
        )

    def _channel_stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.latents_mean, device=z.device, dtype=z.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.latents_std, device=z.device, dtype=z.dtype).view(1, -1, 1, 1)
        if mean.shape[1] != z.shape[1]:
            raise ValueError(f"latents_mean has {mean.shape[1]} channels but the latents have {z.shape[1]}")
        return mean, std

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """raw VAE latents -> what a diffusion model sees"""
        if self.per_channel:
            mean, std = self._channel_stats(z)
            return (z - mean) * self.scaling_factor / std
        return (z - self.shift_factor) * self.scaling_factor

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """what a diffusion model sees -> raw VAE latents"""
        if self.per_channel:
            mean, std = self._channel_stats(z)
            return z * std / self.scaling_factor + mean
        return z / self.scaling_factor + self.shift_factor


def write_normalization(vae, normalization: LatentNormalization) -> None:
    """Store the constants in the model config, where saving and diffusers pipelines find them."""
    vae.register_to_config(**normalization.to_config())
    # diffusers resets keys listed as "left at their default" when it loads a config: these are not any more.
    defaults = vae.config.get("_use_default_values")
    if defaults:
        vae.register_to_config(_use_default_values=[k for k in defaults if k not in normalization.to_config()])


class RunningLatentStats:
    """Global and per-channel mean/std of raw latents, accumulated in float64 batch by batch."""

    def __init__(self) -> None:
        self.count = 0
        self.sum: torch.Tensor | None = None
        self.sum_sq: torch.Tensor | None = None

    def update(self, z: torch.Tensor) -> None:
        z = z.detach().to("cpu", torch.float64)
        per_channel = z.transpose(0, 1).reshape(z.shape[1], -1)
        if self.sum is None:
            self.sum = torch.zeros(z.shape[1], dtype=torch.float64)
            self.sum_sq = torch.zeros(z.shape[1], dtype=torch.float64)
        self.sum += per_channel.sum(1)
        self.sum_sq += (per_channel**2).sum(1)
        self.count += per_channel.shape[1]

    def normalization(self, per_channel: bool) -> LatentNormalization:
        """Constants that map the latents seen to zero mean and unit variance."""
        if self.sum is None or self.count < 2:
            raise ValueError("no latents seen: calibration needs at least one image")
        channel_mean = self.sum / self.count
        channel_var = self.sum_sq / self.count - channel_mean**2
        if per_channel:
            return LatentNormalization(
                scaling_factor=1.0,
                shift_factor=0.0,
                latents_mean=tuple(channel_mean.tolist()),
                latents_std=tuple(channel_var.clamp_min(1e-12).sqrt().tolist()),
            )
        mean = channel_mean.mean()
        # Total variance around the global mean: within-channel variance plus spread of the channel means.
        var = (channel_var + (channel_mean - mean) ** 2).mean()
        return LatentNormalization(scaling_factor=float(1.0 / var.clamp_min(1e-12).sqrt()), shift_factor=float(mean))


def calibrate(codec, images: Iterable, *, per_channel: bool = False) -> LatentNormalization:
    """Measure the normalisation on `images` (an iterable of codec inputs, e.g. paths, in batches of
    `codec.max_batch_size`) and write it into the codec's model config."""
    stats = RunningLatentStats()
    batch: list = []
    for image in images:
        batch.append(image)
        if len(batch) == codec.max_batch_size:
            stats.update(codec.encode_raw(batch))
            batch = []
    if batch:
        stats.update(codec.encode_raw(batch))
    normalization = stats.normalization(per_channel)
    codec.set_normalization(normalization)
    return normalization
