"""latent-vae: a Stable-Diffusion-style KL-VAE latent compression module for diffusion models."""

from .codec import EncodeOutput, LatentCodec, NonFiniteError, interpolate_latents
from .images import ImageError, load_image
from .latents import BucketBatchSampler, LatentInfo, collate_latents, load_latents, read_failures
from .model import ModelLoadError, build_vae, load_vae, model_fingerprint, save_single_file, save_vae
from .precompute import PrecomputeOptions, PrecomputeSummary, precompute_latents
from .presets import DEFAULT_PRESET, PRESETS, VAEPreset, get_preset
from .residual import ResidualAutoencoderKL
from .stats import LatentNormalization, calibrate

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_PRESET", "PRESETS", "BucketBatchSampler", "EncodeOutput", "ImageError", "LatentCodec", "LatentInfo",
    "LatentNormalization", "ModelLoadError", "NonFiniteError", "PrecomputeOptions", "PrecomputeSummary",
    "ResidualAutoencoderKL",
    "VAEPreset", "build_vae", "calibrate", "collate_latents", "get_preset", "interpolate_latents", "load_image",
    "load_latents", "load_vae", "model_fingerprint", "precompute_latents", "read_failures", "save_single_file",
    "save_vae",
]
