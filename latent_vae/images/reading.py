"""Reading, checking and converting images.

Tensor convention (as AutoencoderKL): float NxCxHxW in [-1, 1], RGB. Numpy convention: uint8 HxWxC
(or HxW grayscale). Everything that is not RGB (grayscale, RGBA, palette, 16-bit, CMYK) becomes RGB;
transparency is composited onto white.
"""

from __future__ import annotations

import io
import math
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from ..utils.errors import ImageError, printable

ImageInput = Union[str, os.PathLike, bytes, Image.Image, np.ndarray, torch.Tensor]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm")


# Real photos reach about 50 megapixels (a 45-61 MP camera, a 48 MP phone in full resolution); a
# 100-megapixel PNG decodes to 3.4 GB of RGB floats on its way into the network. Above this limit an
# image is refused before it is decoded, so a tiny "decompression bomb" file costs nothing.
DEFAULT_MAX_PIXELS = 64_000_000

ImageSource = Union[str, os.PathLike, bytes, BinaryIO, dict]


def _describe(source, name: str | None) -> str:
    if name:
        return name
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, dict) and source.get("path"):
        return str(source["path"])
    return "image bytes" if isinstance(source, (bytes, bytearray, dict)) else "image stream"


def check_input_file(path: Path, kind: str, label: str | None = None, error: type[ValueError] = ValueError) -> None:
    """A path the project is about to read must be a non-empty file: else `error` naming it (`label`, default the
    path) and saying why. `kind` names what it should be ("an image", "a latent file")."""
    label = label or str(path)
    try:
        info = path.stat()  # follows links: a dangling link or a link loop fails here
    except FileNotFoundError:
        raise error(f"{label}: no such file") from None
    except OSError as cause:  # ELOOP, EACCES on a parent folder, ...
        raise error(f"{label}: cannot read ({cause.strerror or cause})") from None
    if path.is_dir():
        raise error(f"{label}: is a folder, not {kind}")
    if info.st_size == 0:
        raise error(f"{label}: empty file")


def load_image(source: ImageSource, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, name: str | None = None) -> Image.Image:
    """The project's one image reader: a file path, encoded bytes, a binary stream or an undecoded 🤗
    datasets image (``{"bytes": ..., "path": ...}``) -> an upright 8-bit RGB PIL image, fully decoded.

    EXIF orientation is applied (cameras store portrait photos sideways with a rotation tag). An image
    over `max_pixels` (None: no limit) is refused from its header, before decoding. Every failure is an
    `ImageError` whose message starts with `name` (default: the path) and says why.
    """
    label = _describe(source, name)
    if isinstance(source, dict):
        data, path = source.get("bytes"), source.get("path")
        source = data if data is not None else path
        if source is None:
            raise ImageError(f"{label}: no image (neither bytes nor a path)")
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageError(f"{label}: empty image data")
        source = io.BytesIO(bytes(source))
    elif isinstance(source, (str, os.PathLike)):
        check_input_file(Path(source), "an image", label, ImageError)
    elif not hasattr(source, "read"):
        raise ImageError(f"{label}: unsupported image input of type {type(source).__name__}")
    try:
        with warnings.catch_warnings():
            # Pillow warns above its own limit; ours is checked just below, before anything is decoded.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                width, height = image.size
                if max_pixels is not None and width * height > max_pixels:
                    raise ImageError(f"{label}: {width}x{height} is {width * height:,} pixels, over the limit of "
                                     f"{max_pixels:,} (raise it with max_pixels / --max-pixels)")
                image.load()
                if image.mode == "F":
                    raise ImageError(f"{label}: {FLOAT_IMAGE_REFUSED}")
                return to_rgb(ImageOps.exif_transpose(image))
    except ImageError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageError(f"{label}: refused as a decompression bomb ({error})") from None
    except UnidentifiedImageError:
        raise ImageError(f"{label}: not an image file (or an unsupported format)") from None
    except PermissionError:
        raise ImageError(f"{label}: permission denied") from None
    except MemoryError:
        raise ImageError(f"{label}: too large to decode in the available memory") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, TypeError) as error:
        raise ImageError(f"{label}: corrupt or truncated image ({error})") from None


# A float image may hold [0, 1] or [0, 255]: guessing would turn one of them black or white without a word.
FLOAT_IMAGE_REFUSED = ("a 32-bit float (mode 'F') image has no agreed range; convert it to 8 bits first "
                       "(e.g. Image.fromarray((array * 255).round().astype('uint8')) for values in [0, 1])")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any integer PIL mode -> 8-bit RGB: 16/32-bit images are rescaled, transparency goes onto white.
    Float ("F") images are refused: their range is unknown."""
    if image.mode == "F":
        raise ImageError(FLOAT_IMAGE_REFUSED)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
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


@dataclass(frozen=True)
class Crop:
    """Where a centre crop comes from: resize by `scale` so the image covers `target`, cut the middle out."""

    target: tuple[int, int]  # (H, W) after the crop
    box: tuple[float, float, float, float]  # (left, top, right, bottom) in the original image
    scale: float  # resize factor original -> target
    top_left: tuple[int, int]  # (top, left) of the crop in the resized image: SDXL's crops_coords_top_left


def centre_crop(height: int, width: int, target: tuple[int, int]) -> Crop:
    """Resize so the image covers `target`, then cut the middle out."""
    th, tw = target
    scale = max(th / height, tw / width)
    box_w, box_h = tw / scale, th / scale
    # Clamped: rounding can put the box a hair outside the image, which Pillow refuses.
    left, top = max(0.0, (width - box_w) / 2), max(0.0, (height - box_h) / 2)
    box = (left, top, min(float(width), left + box_w), min(float(height), top + box_h))
    return Crop(target, box, scale, (round(top * scale), round(left * scale)))


def resize_crop(image: Image.Image, crop: Crop) -> Image.Image:
    """Cut and resize in one resampling (Lanczos, antialiased when shrinking)."""
    return image.resize((crop.target[1], crop.target[0]), Image.Resampling.LANCZOS, box=crop.box, reducing_gap=3.0)


def centre_square(image: Image.Image, size: int) -> Image.Image:
    """The largest centred square of the image at size x size: the pixels `latent-vae precompute` encodes."""
    return resize_crop(image, centre_crop(image.height, image.width, (size, size)))


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


def check_image_tensor(images: torch.Tensor) -> torch.Tensor:
    """float Nx3xHxW (or 3xHxW) in [-1, 1] -> Nx3xHxW; anything else (pixels in [0, 255], NaN, ints) is an ImageError."""
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ImageError(f"image tensors must be float Nx3xHxW (or 3xHxW) in [-1, 1], got {str(images.dtype).removeprefix('torch.')} "
                         f"{tuple(images.shape)}")
    if images.numel() == 0:
        raise ImageError(f"image tensor of shape {tuple(images.shape)} holds no pixels")
    # One pass and one wait for the device: min and max are NaN when any value is, and inf when any is.
    low, high = torch.stack(torch.aminmax(images.detach())).tolist()
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ImageError("image tensor holds NaN or inf")
    if low < -1 - TENSOR_RANGE_SLACK or high > 1 + TENSOR_RANGE_SLACK:
        hint = " (pixels in [0, 255]? use x / 127.5 - 1)" if high > 2 else " (pixels in [0, 1]? use x * 2 - 1)"
        raise ImageError(f"image tensors must hold values in [-1, 1], got [{low:.3g}, {high:.3g}]{hint}")
    return images


# Resampling and float arithmetic overshoot [-1, 1] a little; beyond this a tensor is on another scale.
TENSOR_RANGE_SLACK = 0.05


def as_image_tensors(images: ImageInput | Sequence[ImageInput]) -> list[torch.Tensor]:
    """Any supported input (one image or a sequence) -> a list of float 3xHxW tensors in [-1, 1]."""
    if isinstance(images, torch.Tensor):
        return list(check_image_tensor(images))
    if isinstance(images, (str, os.PathLike, bytes, bytearray, Image.Image, np.ndarray)):
        images = [images]
    tensors = []
    for image in images:
        if isinstance(image, (str, os.PathLike, bytes, bytearray)):
            tensors.append(pil_to_tensor(load_image(image)))
        elif isinstance(image, Image.Image):
            tensors.append(pil_to_tensor(image))
        elif isinstance(image, np.ndarray):
            tensors.append(array_to_tensor(image))
        elif isinstance(image, torch.Tensor):
            tensors.extend(check_image_tensor(image))
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


@dataclass
class ImageScan:
    files: list[Path]  # image files, sorted by path
    unreadable: list[str]  # one line per folder that could not be listed: "FOLDER: cannot read (reason)"


def scan_images(folder: str | os.PathLike) -> ImageScan:
    """Image files under `folder`, recursively, and the subfolders that could not be read (never skipped silently)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageError(f"{folder}: not a folder")
    unreadable: list[str] = []

    def report(error: OSError) -> None:
        unreadable.append(f"{printable(str(error.filename))}: cannot read ({error.strerror or error})")

    files = []
    for root, _, names in os.walk(folder, onerror=report, followlinks=False):
        files.extend(Path(root) / name for name in names if Path(name).suffix.lower() in IMAGE_SUFFIXES)
    return ImageScan(sorted(files), unreadable)


def find_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under `folder`, recursively, sorted by path; each unreadable subfolder is a warning."""
    scan = scan_images(folder)
    for line in scan.unreadable:
        warnings.warn(f"skipped folder {line}", stacklevel=2)
    return scan.files
