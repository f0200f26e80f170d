"""latent-vae: a Stable-Diffusion-style KL-VAE latent compression module for diffusion models.

The names below load their module on first use, so that `import latent_vae` (and the `latent-vae`
command's `--help`) does not pay for importing diffusers until a model is needed.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# name -> the submodule that defines it
_EXPORTS = {
    "EncodeOutput": "codec", "LatentCodec": "codec", "interpolate_latents": "codec",
    "ImageError": "errors", "ModelLoadError": "errors", "NonFiniteError": "errors",
    "load_image": "images",
    "BucketBatchSampler": "dataset.readers", "collate_latents": "dataset.readers", "load_latents": "dataset.readers",
    "LatentInfo": "dataset.format", "read_failures": "dataset.format", "verify_latents": "dataset.verify",
    "PrecomputeOptions": "dataset.options", "PrecomputeSummary": "dataset.precompute",
    "precompute_latents": "dataset.precompute",
    "build_vae": "model", "load_vae": "model", "model_fingerprint": "model", "save_single_file": "model",
    "save_vae": "model",
    "DEFAULT_PRESET": "presets", "PRESETS": "presets", "VAEPreset": "presets", "get_preset": "presets",
    "ResidualAutoencoderKL": "residual",
    "fp16_safe": "fp16", "save_fp16_safe": "fp16",
    "LatentNormalization": "stats", "calibrate": "stats",
    "CodingPlan": "tiling", "enable_exact_tiling": "tiling", "plan_coding": "tiling",
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
