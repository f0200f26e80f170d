"""latent-vae: a Stable-Diffusion-style KL-VAE latent compression module for diffusion models."""

from .codec import EncodeOutput, LatentCodec, NonFiniteError, interpolate_latents
from .images import ImageError, load_image
from .model import ModelLoadError, build_vae, load_vae, model_fingerprint, save_single_file, save_vae
from .presets import DEFAULT_PRESET, PRESETS, VAEPreset, get_preset
from .stats import LatentNormalization, calibrate

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_PRESET", "PRESETS", "EncodeOutput", "ImageError", "LatentCodec", "LatentNormalization",
    "ModelLoadError", "NonFiniteError", "VAEPreset", "build_vae", "calibrate", "get_preset",
    "interpolate_latents", "load_image", "load_vae", "model_fingerprint", "save_single_file", "save_vae",
]
