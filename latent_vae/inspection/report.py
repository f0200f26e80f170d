"""`latent-vae inspect`'s measurements: one model's latent space on a set of images, as numbers and pictures.

`inspect_codec` runs the codec over the images and gathers every measure of `latent_vae.inspection.measures`
beside reconstruction fidelity and the bicubic baseline at equal values; `report_json` is what
report.json holds; `latent_vae.inspection.html` draws the page.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..codec.latent_codec import LatentCodec, interpolate_latents
from ..images.figures import error_map, image_strip
from ..images.metrics import bicubic_equal_values, psnr, ssim
from ..images.reading import tensor_to_uint8
from .measures import (
    ACTIVE_THRESHOLD,
    HALF_NYQUIST,
    ChannelStats,
    Evenness,
    RadialSpectrum,
    channel_stats,
    downsample,
    equivariance_factors,
    interpolation_evenness,
    latent_pca,
    pca_rgb,
    radial_spectrum,
    scale_equivariance_pair,
)

PICTURE_ROWS = 4  # images shown in the reconstruction, scale-equivariance and PCA figures
INTERPOLATION_MODE = "lerp"  # the straight path: what a diffusion model's denoising moves along


@dataclass
class ModelInspection:
    """Everything `inspect` measured on one model: `numbers` (JSON-able), spectra and pictures."""

    label: str
    numbers: dict
    channels: ChannelStats
    spectra: dict[str, RadialSpectrum]  # "latent" (normalised) and "image" (at latent size)
    pictures: dict[str, Image.Image] = field(default_factory=dict)
    evenness: list[Evenness] = field(default_factory=list)


def json_safe(value):
    """`value` with every inf or NaN float (a PSNR of identical images is inf) replaced by None: strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _mean(values: Sequence[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def model_description(codec: LatentCodec, source: str) -> dict:
    config = codec.config
    normalization = codec.normalization
    neutral = normalization.scaling_factor == 1.0 and normalization.shift_factor == 0.0 and not normalization.per_channel
    return {"model": source, "class": type(codec.vae).__name__, "shortcut": config.get("shortcut"),
            "block_out_channels": list(config.block_out_channels), "latent_channels": codec.latent_channels,
            "downsampling_factor": codec.downsampling_factor, "fingerprint": codec.fingerprint,
            "normalization": normalization.to_config(), "normalization_neutral": neutral}


def _encode_all(codec: LatentCodec, images: torch.Tensor, label: str, progress: bool):
    latents, means, logvars, reconstructions = [], [], [], []
    bar = tqdm(total=len(images), desc=f"{label}: encode + decode", unit="img", disable=not progress)
    for chunk in images.split(codec.max_batch_size):
        encoded = codec.encode(chunk, return_dict=True)
        reconstructions.append(codec.decode(encoded.latents).cpu())
        latents.append(encoded.latents.cpu())
        means.append(encoded.mean.cpu())
        logvars.append(encoded.logvar.cpu())
        bar.update(len(chunk))
    bar.close()
    return torch.cat(latents), torch.cat(means), torch.cat(logvars), torch.cat(reconstructions)


def _reconstruction_numbers(images: torch.Tensor, reconstructions: torch.Tensor, latent_values: int) -> tuple[dict, torch.Tensor]:
    baseline = bicubic_equal_values(images, latent_values)
    scores = {
        "psnr": psnr(images, reconstructions).tolist(), "ssim": ssim(images, reconstructions).tolist(),
        "bicubic_psnr": psnr(images, baseline).tolist(), "bicubic_ssim": ssim(images, baseline).tolist(),
    }
    numbers = {f"{key}_mean": _mean(values) for key, values in scores.items()}
    numbers.update(per_image=scores, latent_values=latent_values,
                   compression=images[0].numel() / latent_values,
                   lpips="not computed (latent-vae has no LPIPS weights of its own; benchmarks/quality.py scores it)")
    return numbers, baseline


def _scale_equivariance(codec: LatentCodec, images, means, reconstructions, label, progress) -> tuple[dict, dict]:
    numbers, pictures = {}, {}
    factors = equivariance_factors(*means.shape[-2:])
    # shown at half the input size whatever the factor, pixels enlarged as they are (no smoothing)
    side = (images.shape[-1] // 2, images.shape[-2] // 2)

    def enlarge(array):
        return Image.fromarray(array).resize(side, Image.Resampling.NEAREST)

    for factor in tqdm(factors, desc=f"{label}: scale equivariance", unit="factor", disable=not progress or not factors):
        small, decoded = [], []
        for chunk_images, chunk_means in zip(images.split(codec.max_batch_size), means.split(codec.max_batch_size)):
            reference, result = scale_equivariance_pair(codec.decode_raw, chunk_means, chunk_images, factor)
            small.append(reference)
            decoded.append(result.cpu())
        small, decoded = torch.cat(small), torch.cat(decoded)
        equivariance = psnr(small, decoded).tolist()
        # the best a decoder can do from this latent: its full reconstruction, downsampled
        ceiling = psnr(small, downsample(reconstructions, factor)).tolist()
        numbers[f"{factor}x"] = {"psnr": equivariance, "psnr_mean": _mean(equivariance),
                                 "reconstruction_downsampled_psnr_mean": _mean(ceiling)}
        rows = []
        for i in range(min(PICTURE_ROWS, len(images))):
            a, b = tensor_to_uint8(small[i : i + 1])[0], tensor_to_uint8(decoded[i : i + 1])[0]
            rows.append(image_strip([enlarge(a), enlarge(b), enlarge(error_map(a, b))],
                                    [f"downsample(x) {factor}x", "decode(downsample(z))",
                                     f"error x4, {equivariance[i]:.1f} dB"]))
        pictures[f"equivariance_{factor}x"] = _stack(rows)
    return numbers, pictures


def _interpolations(codec: LatentCodec, latents: torch.Tensor, steps: int, pairs: int, label: str, progress: bool):
    results, strips = [], []
    count = min(pairs, len(latents) // 2)
    for p in tqdm(range(count), desc=f"{label}: interpolation", unit="path", disable=not progress or count == 0):
        path = interpolate_latents(latents[2 * p], latents[2 * p + 1], steps, mode=INTERPOLATION_MODE)
        frames = torch.cat([codec.decode(chunk).cpu() for chunk in path.split(codec.max_batch_size)])
        evenness = interpolation_evenness(frames)
        results.append(evenness)
        labels = ["A"] + [f"{i / (steps - 1):.2f}" for i in range(1, steps - 1)] + ["B"]
        strips.append(image_strip(tensor_to_uint8(frames), labels))
    return results, strips


def _stack(rows: Sequence[Image.Image], gap: int = 4) -> Image.Image:
    width = max(r.width for r in rows)
    sheet = Image.new("RGB", (width, sum(r.height for r in rows) + gap * (len(rows) - 1)), "white")
    y = 0
    for row in rows:
        sheet.paste(row, (0, y))
        y += row.height + gap
    return sheet


def _pictures(images, reconstructions, baseline, latents, numbers) -> dict[str, Image.Image]:
    rows, pca_rows = [], []
    size = images.shape[-1]
    for i in range(min(PICTURE_ROWS, len(images))):
        original, recon, bicubic = (tensor_to_uint8(t[i : i + 1])[0] for t in (images, reconstructions, baseline))
        per_image = numbers["reconstruction"]["per_image"]
        rows.append(image_strip([original, recon, bicubic, error_map(original, recon)],
                                ["original", f"VAE {per_image['psnr'][i]:.1f} dB",
                                 f"bicubic {per_image['bicubic_psnr'][i]:.1f} dB", "VAE error x4"]))
        picture = Image.fromarray(pca_rgb(latents[i]).numpy()).resize((size, size), Image.Resampling.NEAREST)
        shares = "/".join(f"{100 * v:.0f}" for v in latent_pca(latents[i], 3)[1])
        pca_rows.append(image_strip([original, picture], ["original", f"PCA 1-3 as RGB ({shares}% of variance)"]))
    return {"reconstruction": _stack(rows), "pca": _stack(pca_rows)}


@torch.inference_mode()
def inspect_codec(codec: LatentCodec, images: torch.Tensor, *, label: str, source: str,
                  interpolation_steps: int = 8, interpolation_pairs: int = 2, progress: bool = True) -> ModelInspection:
    """Measure one model on N same-size images (float Nx3xHxW in [-1, 1], N >= 2, sides multiples of the
    model's downsampling factor)."""
    if len(images) < 2:
        raise ValueError(f"inspect needs at least 2 images (active units compare images), got {len(images)}")
    factor = codec.downsampling_factor
    if images.shape[-2] % factor or images.shape[-1] % factor:
        raise ValueError(f"image sides {tuple(images.shape[-2:])} must be multiples of the model's factor {factor}")
    latents, means, logvars, reconstructions = _encode_all(codec, images, label, progress)
    numbers = {"description": model_description(codec, source), "latent_shape": list(latents.shape[1:])}
    numbers["reconstruction"], baseline = _reconstruction_numbers(images, reconstructions, latents[0].numel())

    normalization = codec.normalization
    to_normalised_units = lambda t: normalization.normalize(t) - normalization.normalize(torch.zeros_like(t))
    channels = channel_stats(latents, means, logvars, normalised_std=to_normalised_units)
    spectra = {"latent": radial_spectrum(latents), "image": radial_spectrum(downsample(images, factor))}
    numbers["channels"] = {**vars(channels), "active_count": channels.active_count,
                           "active_threshold": ACTIVE_THRESHOLD, "kl_mean": sum(channels.kl) / len(channels.kl)}
    numbers["spectrum"] = {name: {"high_frequency_share": s.high_frequency_share(), "ring_edges": list(s.edges),
                                  "mean_power": s.mean_power} for name, s in spectra.items()}
    numbers["spectrum"]["white_noise_high_frequency_share"] = spectra["latent"].plane_share()
    numbers["spectrum"]["cutoff"] = HALF_NYQUIST

    numbers["scale_equivariance"], pictures = _scale_equivariance(codec, images, means, reconstructions, label, progress)
    evenness, strips = _interpolations(codec, latents, interpolation_steps, interpolation_pairs, label, progress)
    numbers["interpolation"] = {"mode": INTERPOLATION_MODE, "steps": interpolation_steps,
                                "paths": [e.to_dict() for e in evenness],
                                "variation_mean": _mean([e.variation for e in evenness])}
    pca_shares = [latent_pca(z, 3)[1] for z in latents]
    numbers["pca_variance_share_mean"] = [sum(s[k] for s in pca_shares) / len(pca_shares) for k in range(3)]
    pictures.update(_pictures(images, reconstructions, baseline, latents, numbers))
    if strips:
        pictures["interpolation"] = _stack(strips)
    return ModelInspection(label, numbers, channels, spectra, pictures, evenness)


def report_json(inspections: Sequence[ModelInspection], *, data: str, image_names: Sequence[str], resolution: int) -> dict:
    """What report.json holds: the inputs, then one entry of numbers per model (the page shows the same)."""
    from .. import __version__

    return json_safe({"tool": "latent-vae inspect", "version": __version__, "data": data, "resolution": resolution,
                      "images": list(image_names), "models": [{"label": i.label, **i.numbers} for i in inspections]})
