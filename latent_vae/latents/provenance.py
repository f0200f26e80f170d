"""Which model made a latent: the one check, for a single latent file and for a latent dataset.

A latent decoded or trained on with another model than the one that made it is a silent bug (the images come
out wrong, or a diffusion model learns the wrong space), so every reader that is given a model checks it here.
A model is accepted when it is the one that made the latent, or a model with the same function (an fp16-fixed
copy: `latent_vae.models.loading.function_fingerprints`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def model_fingerprints(model: Any) -> tuple[str, ...]:
    """A model given any way (LatentCodec, AutoencoderKL, folder, .safetensors, preset, fingerprint string) -> the
    fingerprints whose latents it reads: its own first, then those of models with the same function."""
    from diffusers import AutoencoderKL

    from ..codec.latent_codec import LatentCodec
    from ..models.loading import function_fingerprints, load_vae

    if isinstance(model, LatentCodec):
        return model.fingerprints
    if isinstance(model, AutoencoderKL):
        return function_fingerprints(model)
    is_hex16 = isinstance(model, str) and len(model) == 16 and all(c in "0123456789abcdef" for c in model)
    if is_hex16 and not Path(model).exists():  # a fingerprint, not a folder that happens to look like one
        return (model,)
    return function_fingerprints(load_vae(model))


def check_made_by(model: Any, fingerprint: str, path: str | os.PathLike, *, made_by: str = "",
                  what_to_do: str = "use the model that made them") -> None:
    """Refuse latents (of the file or dataset at `path`, made by the model `fingerprint`, named `made_by` when
    known) that `model` did not make: a ValueError naming both models and `what_to_do`."""
    fingerprints = model_fingerprints(model)
    if fingerprint not in fingerprints:
        named = f" ({made_by})" if made_by else ""
        raise ValueError(f"{path}: latents were made by model {fingerprint}{named}, "
                         f"not by the given model {fingerprints[0]}; {what_to_do}")
