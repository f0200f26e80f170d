"""Preprocessing and the pure per-batch function of a precompute: an image -> its crop at the resolution (or
aspect-ratio bucket) with SDXL's size conditioning; prepared images -> the rows a latent dataset stores."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..images.reading import centre_crop, resize_crop
from ..utils.errors import ImageError
from . import format as fmt
from .options import PrecomputeOptions


def make_buckets(resolution: int, step: int, max_aspect: float = 4.0) -> list[tuple[int, int]]:
    """(H, W) buckets of at most resolution**2 pixels, sides multiples of `step`, from 1:max_aspect to max_aspect:1
    (SDXL's recipe: for each width, the tallest height that keeps the area)."""
    if resolution % step:
        raise ValueError(f"resolution {resolution} is not a multiple of the bucket step {step}")
    area = resolution * resolution
    buckets = set()
    for width in range(step, int(resolution * math.sqrt(max_aspect)) + step, step):
        height = (area // width) // step * step
        if height >= step and max(width / height, height / width) <= max_aspect + 1e-9:
            buckets.add((height, width))
    return sorted(buckets, key=lambda hw: hw[1] / hw[0])


def nearest_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest (in log ratio, so 2:1 and 1:2 are equally far from 1:1)."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda hw: abs(math.log(hw[1] / hw[0]) - ratio))


class SkipImage(Exception):
    """An input that cannot be used; `reason` is one short word for counting."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# load_image's messages ("NAME: why") -> the short reason word that failures are counted by.
_REASONS = (("no such file", "missing"), ("no image", "missing"), ("empty", "empty"), ("not an image", "unsupported"),
            ("is a folder", "unsupported"), ("unsupported", "unsupported"), ("over the limit", "too_large"),
            ("decompression bomb", "too_large"), ("too large", "too_large"), ("corrupt", "corrupt"),
            ("permission denied", "unreadable"), ("cannot read", "unreadable"))


def failure_reason(error: ImageError, name: str) -> str:
    why = str(error).removeprefix(f"{name}: ").lower()
    return next((reason for fragment, reason in _REASONS if fragment in why), "unreadable")


@dataclass
class PreparedImage:
    """An image ready to encode: the resized crop (uint8 3xHxW) and SDXL's size conditioning."""

    pixels: torch.Tensor
    original_size: list[int]  # [H, W] as read
    crop_coords_top_left: list[int]
    target_size: list[int]  # [H, W] of the crop


def prepare_image(image: Image.Image, options: PrecomputeOptions,
                  buckets: Sequence[tuple[int, int]] | None = None) -> PreparedImage:
    """A decoded RGB image -> its crop at the resolution (or nearest bucket); SkipImage("too_small") when filling
    the crop would need more than `max_upscale`."""
    width, height = image.size
    target = nearest_bucket(height, width, buckets) if buckets else (options.resolution, options.resolution)
    crop = centre_crop(height, width, target)
    if crop.scale > options.max_upscale + 1e-9:
        raise SkipImage("too_small", f"{width}x{height} is too small for {target[1]}x{target[0]} "
                        f"(needs {crop.scale:.2f}x upscaling, at most {options.max_upscale:g}x allowed)")
    pixels = resize_crop(image, crop)
    return PreparedImage(torch.from_numpy(np.asarray(pixels).copy()).permute(2, 0, 1), [height, width],
                         list(crop.top_left), list(target))


def make_codec(model, options: PrecomputeOptions, device: torch.device):
    """(codec, model source) of a run: `model` is a preset name, model folder or .safetensors file, an AutoencoderKL,
    or a LatentCodec (used as configured by the caller: device, dtype, tiling)."""
    from diffusers import AutoencoderKL

    from ..codec.latent_codec import LatentCodec
    from ..models.loading import load_vae

    per_call = options.batch_size * (2 if options.flip else 1)
    if isinstance(model, LatentCodec):
        return model, None
    vae = model if isinstance(model, AutoencoderKL) else load_vae(model)
    source = str(model) if isinstance(model, (str, os.PathLike)) else None
    codec = LatentCodec(vae, device=device, dtype=options.encode_dtype, max_batch_size=per_call,
                        max_memory=options.max_memory, tile_size=options.tile_size,
                        channels_last=options.channels_last)
    return codec, source


# -- the pure per-batch function ------------------------------------------------------------------------------------


def encode_prepared(codec, images: Sequence[PreparedImage], metadata: Sequence[dict], *, flip: bool = False,
                    dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """The per-batch work, a pure function: prepared images of one size and their metadata ("key" and the
    passthrough columns) -> one output row each, as stored in a latent dataset. The run calls it for every batch;
    another engine can too (see `encode_images`)."""
    return moment_rows(images, metadata, *encode_moments(codec, images, flip=flip, dtype=dtype), flip=flip, dtype=dtype)


def encode_moments(codec, images: Sequence[PreparedImage], *, flip: bool,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The accelerator's part of `encode_prepared`: the posterior mean and std, in the storage dtype, on the CPU."""
    pixels = torch.stack([image.pixels for image in images])
    if codec.device.type == "cuda":  # page-locked: the copy to the GPU runs at full speed and asynchronously
        pixels = pixels.pin_memory()
    pixels = pixels.to(codec.device, non_blocking=True).float().div_(127.5).sub_(1.0)
    if flip:  # one forward pass for both: the mirrored images ride in the same batch
        pixels = torch.cat([pixels, pixels.flip(-1)])
    out = codec.encode(pixels, return_dict=True)
    return out.mean.to(dtype).cpu(), torch.exp(0.5 * out.logvar).to(dtype).cpu()


def moment_rows(images: Sequence[PreparedImage], metadata: Sequence[dict], mean: torch.Tensor, std: torch.Tensor, *,
          flip: bool, dtype: torch.dtype) -> list[dict]:
    """The host's part of `encode_prepared`: one output row per image."""
    n = len(images)
    means, stds = fmt.pack(mean, dtype), fmt.pack(std, dtype)
    shape = list(mean.shape[1:])
    rows = []
    for i, (image, meta) in enumerate(zip(images, metadata)):
        row = {**meta, fmt.KEY: str(meta[fmt.KEY]), fmt.MEAN: means[i], fmt.STD: stds[i], fmt.LATENT_SHAPE: shape,
               fmt.ORIGINAL_SIZE: image.original_size, fmt.CROP_TOP_LEFT: image.crop_coords_top_left,
               fmt.TARGET_SIZE: image.target_size}
        if flip:
            row[fmt.FLIP_MEAN], row[fmt.FLIP_STD] = means[n + i], stds[n + i]
        rows.append(row)
    return rows


def encode_images(codec, images: Sequence[Image.Image], metadata: Sequence[dict], options: PrecomputeOptions,
                  buckets: Sequence[tuple[int, int]] | None = None) -> tuple[list[dict], list[dict]]:
    """Decoded RGB images + their metadata ("key", passthrough columns) -> (rows, failures): prepare each image,
    encode them in groups of one size with `encode_prepared`. For engines other than this run (Ray Data's
    `map_batches`, Spark): the same rows as `latent-vae precompute` writes, without its files."""
    prepared: dict[tuple[int, ...], list[tuple[PreparedImage, dict]]] = {}
    failures = []
    for image, meta in zip(images, metadata):
        try:
            item = prepare_image(image, options, buckets)
        except SkipImage as skip:
            failures.append({"key": str(meta[fmt.KEY]), "reason": skip.reason, "message": str(skip)})
            continue
        prepared.setdefault(tuple(item.pixels.shape), []).append((item, meta))
    rows = []
    for group in prepared.values():
        for start in range(0, len(group), options.batch_size):
            chunk = group[start:start + options.batch_size]
            rows += encode_prepared(codec, [c[0] for c in chunk], [c[1] for c in chunk], flip=options.flip,
                                    dtype=fmt.storage_dtype(options.dtype))
    return rows, failures


# -- reading shards in DataLoader workers --------------------------------------------------------------------------

