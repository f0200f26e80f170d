"""Reading, checking and converting images.

Tensor convention (as AutoencoderKL): float NxCxHxW in [-1, 1], RGB. Numpy convention: uint8 HxWxC
(or HxW grayscale). Everything that is not RGB (grayscale, RGBA, palette, 16-bit, CMYK) becomes RGB;
transparency is composited onto white.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, UnidentifiedImageError

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm")


class ImageError(ValueError):
    """An input that is not a usable image; the message names it and says why."""


def load_image(path: str | os.PathLike) -> Image.Image:
    """An image file as an RGB PIL image, fully decoded (so a truncated file fails here, not later)."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if path.is_dir():
        raise ImageError(f"{path}: is a folder, not an image")
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(image)
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file (or an unsupported format)") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"{path}: corrupt or truncated image ({error})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: 16/32-bit images are rescaled, transparency goes onto white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def centre_square(image: Image.Image, size: int) -> Image.Image:
    """The largest centred square of the image, resized to size x size (bicubic)."""
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL -> float 3xHxW in [-1, 1]"""
    array = np.asarray(to_rgb(image), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


def array_to_tensor(array: np.ndarray) -> torch.Tensor:
    """uint8 HxWxC (C = 1, 3 or 4) or HxW -> float 3xHxW in [-1, 1]"""
    if array.dtype != np.uint8:
        raise ImageError(f"numpy images must be uint8 HxWxC, got dtype {array.dtype}")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ImageError(f"numpy images must be HxW or HxWxC with C in (1, 3, 4), got shape {array.shape}")
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[array.shape[2]]
    return pil_to_tensor(Image.fromarray(array.squeeze(2) if mode == "L" else array, mode=mode))


def as_image_tensors(images: ImageInput | Sequence[ImageInput]) -> list[torch.Tensor]:
    """Any supported input (one image or a sequence) -> a list of float 3xHxW tensors in [-1, 1]."""
    if isinstance(images, torch.Tensor):
        if images.ndim == 3:
            images = images.unsqueeze(0)
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ImageError(f"image tensors must be float Nx3xHxW (or 3xHxW) in [-1, 1], got {tuple(images.shape)}")
        return list(images)
    if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)):
        images = [images]
    tensors = []
    for image in images:
        if isinstance(image, (str, os.PathLike)):
            tensors.append(pil_to_tensor(load_image(image)))
        elif isinstance(image, Image.Image):
            tensors.append(pil_to_tensor(image))
        elif isinstance(image, np.ndarray):
            tensors.append(array_to_tensor(image))
        elif isinstance(image, torch.Tensor):
            tensors.extend(as_image_tensors(image))
        else:
            raise ImageError(f"unsupported image input of type {type(image).__name__}")
    if not tensors:
        raise ImageError("no images given")
    return tensors


def pad_to_multiple(batch: torch.Tensor, factor: int) -> torch.Tensor:
    """Pad the bottom and right of NxCxHxW up to multiples of `factor` by reflection (edge replication
    where the image is too small to reflect); decode crops the padding back off."""
    height, width = batch.shape[-2:]
    pad_h, pad_w = -height % factor, -width % factor
    if pad_h == 0 and pad_w == 0:
        return batch
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    return F.pad(batch, (0, pad_w, 0, pad_h), mode=mode)


def tensor_to_uint8(batch: torch.Tensor) -> np.ndarray:
    """float NxCxHxW in [-1, 1] -> uint8 NxHxWxC"""
    return (batch.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)).permute(0, 2, 3, 1).cpu().numpy()


def tensor_to_pil(batch: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(array) for array in tensor_to_uint8(batch)]


def find_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under `folder`, recursively, sorted by path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageError(f"{folder}: not a folder")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def error_map(original: np.ndarray, reconstruction: np.ndarray, gain: float = 4.0) -> np.ndarray:
    """uint8 HxWx3 absolute difference, amplified by `gain` so small errors are visible."""
    difference = np.abs(original.astype(np.float32) - reconstruction.astype(np.float32)) * gain
    return np.clip(difference, 0, 255).astype(np.uint8)


def image_strip(images: Sequence[Image.Image | np.ndarray], labels: Sequence[str] | None = None, gap: int = 4) -> Image.Image:
    """Images side by side on white, with an optional caption above each."""
    pils = [im if isinstance(im, Image.Image) else Image.fromarray(im) for im in images]
    caption = 14 if labels else 0
    width = sum(im.width for im in pils) + gap * (len(pils) - 1)
    height = max(im.height for im in pils) + caption
    strip = Image.new("RGB", (width, height), (255, 255, 255))
    x = 0
    for i, im in enumerate(pils):
        strip.paste(im.convert("RGB"), (x, caption))
        if labels:
            # each caption drawn on a canvas of its column's width, so a long one is clipped, not overlapping
            label = Image.new("RGB", (im.width, caption), (255, 255, 255))
            ImageDraw.Draw(label).text((2, 1), labels[i], fill=(0, 0, 0))
            strip.paste(label, (x, 0))
        x += im.width + gap
    return strip


def image_grid(rows: Sequence[Image.Image], gap: int = 4) -> Image.Image:
    """Strips stacked vertically."""
    width = max(r.width for r in rows)
    grid = Image.new("RGB", (width, sum(r.height for r in rows) + gap * (len(rows) - 1)), (255, 255, 255))
    y = 0
    for r in rows:
        grid.paste(r, (0, y))
        y += r.height + gap
    return grid
