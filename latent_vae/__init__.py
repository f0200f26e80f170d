"""latent-vae: a Stable-Diffusion-style KL-VAE latent compression module for diffusion models.

The names below load their module on first use, so that `import latent_vae` (and the `latent-vae`
command's `--help`) does not pay for importing diffusers until a model is needed.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# name -> the submodule that defines it
_EXPORTS = {
    "EncodeOutput": "codec.latent_codec", "LatentCodec": "codec.latent_codec",
    "interpolate_latents": "codec.latent_codec",
    "LatentNormalization": "models.normalization", "calibrate": "models.normalization",
    "CodingPlan": "codec.tiling", "enable_exact_tiling": "codec.tiling", "plan_coding": "codec.tiling",
    "ImageError": "utils.errors", "ModelLoadError": "utils.errors", "NonFiniteError": "utils.errors",
    "load_image": "images.reading",
    "BucketBatchSampler": "latents.readers", "collate_latents": "latents.readers", "load_latents": "latents.readers",
    "LatentInfo": "latents.format", "read_failures": "latents.format", "verify_latents": "latents.verify",
    "PrecomputeOptions": "latents.options", "PrecomputeSummary": "latents.run",
    "precompute_latents": "latents.precompute",
    "build_vae": "models.loading", "load_vae": "models.loading", "model_fingerprint": "models.loading",
    "save_single_file": "models.loading", "save_vae": "models.loading",
    "DEFAULT_PRESET": "models.presets", "PRESETS": "models.presets", "VAEPreset": "models.presets",
    "get_preset": "models.presets",
    "ResidualAutoencoderKL": "models.residual",
    "fp16_safe": "fp16.rescale", "save_fp16_safe": "fp16.rescale",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'latent_vae' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
