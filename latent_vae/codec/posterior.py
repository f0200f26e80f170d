"""How far a posterior sample lies from its mean, measured against the latents' own spread.

A KL-VAE's encoder gives each latent value a mean and a standard deviation. Drawing a sample (as Stable
Diffusion's training does with `latent_dist.sample()`) is sound only while that standard deviation is small
beside how much the means themselves vary: a model trained on small crops can lose this at larger sizes, where
its log-variance runs up to the clamp (docs/training.md), and a diffusion model trained on its samples then
trains on noise. `PosteriorStats` gathers, per channel and over any number of batches, the mean posterior
variance and the variance of the means (across images and positions); its `noise_ratio` is

    sqrt( sum_c E[std_c ** 2] / sum_c Var[mean_c] )

the expected distance of a sample from its mean relative to the spread of the means: 0 for a deterministic
encoder, 1 when a sample is as far from its mean as two different images' latents are from each other.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field

import torch

from ..utils.errors import PosteriorNoiseWarning

# Above this a sample is more than half noise beside the latents' own spread: sampling would drown them. A sound
# posterior lies far below it (docs/training.md has the measurements).
NOISE_LIMIT = 0.5


@dataclass
class PosteriorStats:
    """Running float64 sums per latent channel over (images x positions); `merge` adds another run's sums."""

    values: int = 0  # latent values per channel seen
    sum_variance: list[float] = field(default_factory=list)  # sum of std ** 2
    sum_mean: list[float] = field(default_factory=list)
    sum_mean_squared: list[float] = field(default_factory=list)

    def update(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Add a batch of moments, NxCxhxw (or CxHxW for one image)."""
        mean, std = (t.detach().double().cpu() for t in (mean, std))
        if mean.ndim == 3:
            mean, std = mean[None], std[None]
        dims = (0, 2, 3)
        sums = (std.square().sum(dims), mean.sum(dims), mean.square().sum(dims))
        if not self.sum_mean:
            self.sum_variance, self.sum_mean, self.sum_mean_squared = ([0.0] * mean.shape[1] for _ in range(3))
        for total, add in zip((self.sum_variance, self.sum_mean, self.sum_mean_squared), sums):
            for c, value in enumerate(add.tolist()):
                total[c] += value
        self.values += mean.numel() // mean.shape[1]

    def merge(self, other: PosteriorStats) -> PosteriorStats:
        if not other.values:
            return self
        if not self.values:
            return PosteriorStats(other.values, *(list(v) for v in
                                  (other.sum_variance, other.sum_mean, other.sum_mean_squared)))
        return PosteriorStats(self.values + other.values,
                              *([a + b for a, b in zip(x, y)] for x, y in
                                zip((self.sum_variance, self.sum_mean, self.sum_mean_squared),
                                    (other.sum_variance, other.sum_mean, other.sum_mean_squared))))

    def channel_variances(self) -> tuple[list[float], list[float]]:
        """(mean posterior variance, variance of the means) per channel."""
        n = max(self.values, 1)
        posterior = [v / n for v in self.sum_variance]
        spread = [max(sq / n - (s / n) ** 2, 0.0) for s, sq in zip(self.sum_mean, self.sum_mean_squared)]
        return posterior, spread

    def noise_ratio(self) -> float | None:
        """sqrt(sum of mean posterior variances / sum of variances of the means); None before two values."""
        if self.values < 2:
            return None
        posterior, spread = self.channel_variances()
        total = sum(spread)
        return math.sqrt(sum(posterior) / total) if total > 0 else math.inf

    def record(self) -> dict:
        """What a manifest or `latents.json` keeps: the sums (to merge) and the figures (for people)."""
        posterior, spread = self.channel_variances()
        return {**asdict(self), "noise_ratio": self.noise_ratio(),
                "channel_noise_ratios": [math.sqrt(p / s) if s > 0 else None for p, s in zip(posterior, spread)]}

    @classmethod
    def from_record(cls, record: dict | None) -> PosteriorStats:
        if not record:
            return cls()
        return cls(int(record["values"]), *(list(map(float, record[k])) for k in
                                            ("sum_variance", "sum_mean", "sum_mean_squared")))


def noise_warning(ratio: float | None, model: str | None, *, where: str = "",
                  advice: str = "read the mean instead (sample=False)") -> str | None:
    """One line when a posterior sample would drown the latents (`ratio` above NOISE_LIMIT), else None."""
    if ratio is None or ratio <= NOISE_LIMIT:
        return None
    return (f"{where + ': ' if where else ''}the posterior of model {model or '(unnamed)'} is mostly noise: a sample "
            f"lies {ratio:.3g} times the latents' spread from its mean (sound is under {NOISE_LIMIT}); {advice}, "
            "or retrain the model as docs/training.md says")


def warn_if_noisy(ratio: float | None, model: str | None, *, where: str = "",
                  advice: str = "read the mean instead (sample=False)") -> str | None:
    """`noise_warning` as a PosteriorNoiseWarning (the command line prints it as one line); returns the line."""
    line = noise_warning(ratio, model, where=where, advice=advice)
    if line is not None:
        warnings.warn(line, PosteriorNoiseWarning, stacklevel=3)
    return line
