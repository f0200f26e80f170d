"""One latent per `.safetensors` file: the tensor under `latents`, with what is needed to decode it right."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

LATENT_KEY = "latents"
FORMAT = "latent-vae/latent-v1"


@dataclass
class LatentFile:
    latents: torch.Tensor  # C x h x w, normalised, float32
    fingerprint: str  # of the model that made it (`latent_vae.model_fingerprint`)
    image_size: tuple[int, int]  # (H, W) of the original image
    normalization: dict  # the constants it was normalised with, for the record
    source: str = ""  # the image it came from


def save_latent_file(path: str | os.PathLike, latent: LatentFile) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    metadata = {
        "format": FORMAT,
        "fingerprint": latent.fingerprint,
        "image_size": json.dumps(list(latent.image_size)),
        "normalization": json.dumps(latent.normalization),
        "source": latent.source,
    }
    save_file({LATENT_KEY: latent.latents.detach().float().cpu().contiguous()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)  # never leave a half-written latent under the real name
    return path


def load_latent_file(path: str | os.PathLike) -> LatentFile:
    """Read and check a latent file; anything else is a ValueError that names the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if LATENT_KEY not in f.keys():
                raise ValueError(f"{path}: no {LATENT_KEY!r} tensor in it (keys: {', '.join(f.keys()) or 'none'})")
            latents = f.get_tensor(LATENT_KEY)
    except SafetensorError as error:
        raise ValueError(f"{path}: not a readable .safetensors file ({error})") from None
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path}: not a latent-vae latent file (made by `latent-vae encode`)")
    if latents.ndim != 3:
        raise ValueError(f"{path}: the latent must be C x h x w, got shape {tuple(latents.shape)}")
    return LatentFile(
        latents=latents.float(),
        fingerprint=metadata["fingerprint"],
        image_size=tuple(json.loads(metadata["image_size"])),
        normalization=json.loads(metadata["normalization"]),
        source=metadata.get("source", ""),
    )
