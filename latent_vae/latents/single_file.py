"""One latent per `.safetensors` file: the tensor under `latents`, with what is needed to decode it right."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..images.reading import check_input_file
from ..utils.atomic import atomic_path
from ..utils.file_boundary import json_or_none, parse_json, reading
from .provenance import check_made_by

LATENT_KEY = "latents"
FORMAT = "latent-vae/latent-v1"
# What a latent may be stored as; anything else (ints, bools, uint8) is not a latent this project wrote.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass
class LatentFile:
    latents: torch.Tensor  # C x h x w, normalised, float32
    fingerprint: str  # of the model that made it (`latent_vae.model_fingerprint`)
    image_size: tuple[int, int]  # (H, W) of the original image
    normalization: dict  # the constants it was normalised with, for the record
    source: str = ""  # the image it came from


def save_latent_file(path: str | os.PathLike, latent: LatentFile) -> Path:
    """Written atomically: a crash or a full disk never leaves a half-written latent under the real name."""
    path = Path(path)
    metadata = {
        "format": FORMAT,
        "fingerprint": latent.fingerprint,
        "image_size": json.dumps(list(latent.image_size)),
        "normalization": json.dumps(latent.normalization),
        "source": latent.source,
    }
    with atomic_path(path) as tmp:
        save_file({LATENT_KEY: latent.latents.detach().float().cpu().contiguous()}, str(tmp), metadata=metadata)
    return path


def _image_size(path: Path, text: str | None) -> tuple[int, int]:
    size = json_or_none(text) if text is not None else None
    if (not isinstance(size, list) or len(size) != 2
            or not all(type(side) is int and side > 0 for side in size)):  # type(): no bools, no floats
        raise ValueError(f"{path}: metadata 'image_size' must be [height, width] in positive whole pixels, got {text!r}")
    return size[0], size[1]


def load_latent_file(path: str | os.PathLike, *, model: Any = None) -> LatentFile:
    """Read and check a latent file; anything else is a ValueError that names the file and the problem. With a
    `model` (any form `latents.provenance` takes), a latent that another model made is refused too."""
    path = Path(path)
    check_input_file(path, "a latent file")
    with reading(path, ".safetensors file"), safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if LATENT_KEY not in f.keys():
            raise ValueError(f"{path}: no {LATENT_KEY!r} tensor in it (keys: {', '.join(f.keys()) or 'none'})")
        latents = f.get_tensor(LATENT_KEY)
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path}: not a latent-vae latent file (made by `latent-vae encode`)")
    if latents.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{path}: the latent is {str(latents.dtype).removeprefix('torch.')}; a latent is floating point")
    if latents.ndim != 3 or 0 in latents.shape:
        raise ValueError(f"{path}: the latent must be C x h x w, got shape {tuple(latents.shape)}")
    if not torch.isfinite(latents).all():
        bad = (~torch.isfinite(latents)).sum().item()
        raise ValueError(f"{path}: the latent holds {bad} NaN or inf value(s)")
    fingerprint = metadata.get("fingerprint")
    if not fingerprint:
        raise ValueError(f"{path}: no model fingerprint in its metadata, so the model that made it is unknown")
    if model is not None:
        check_made_by(model, fingerprint, path, what_to_do="decode it with the model that encoded it")
    normalization = parse_json(metadata.get("normalization", "{}"), str(path), what="JSON in metadata 'normalization'")
    return LatentFile(
        latents=latents.float(),
        fingerprint=fingerprint,
        image_size=_image_size(path, metadata.get("image_size")),
        normalization=normalization,
        source=metadata.get("source", ""),
    )
