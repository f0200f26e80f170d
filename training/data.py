"""Training images: an image folder or a datasets dataset on disk, as random crops, sharded across ranks.

A sample is a pure function of its position in the run (seed, epoch, index): the crop and flip are
drawn from a generator seeded by that position, so a resumed run, another worker count or another
worker reads exactly the same pixels. That is what makes `--resume` exact.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from latent_vae.images.reading import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    load_image,
    pil_to_tensor,
    scan_images,
    to_rgb,
)
from latent_vae.latents.sources import open_saved_dataset

# A corrupt image is replaced by the next one; after this many bad ones in a row the data is broken.
MAX_BAD_IN_A_ROW = 16


class ImageSource:
    """Random access to the images of a folder or a dataset: `len`, `load(i) -> RGB PIL` (ImageError if unreadable).

    Every image goes through the project's one reader (`load_image`: EXIF orientation, the pixel limit), so a
    decompression bomb or a corrupt file is an ImageError that training skips and counts, at any step.
    `unreadable` lists the subfolders that could not be read (the run reports them).
    """

    def __init__(self, path: str | Path, image_column: str = "image", split: str = "",
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
        path = Path(path).expanduser()
        self.name = str(path)
        self.files: list[Path] | None = None
        self.dataset = None
        self.column = image_column
        self.max_pixels = max_pixels
        self.unreadable: list[str] = []
        if not path.exists():
            raise FileNotFoundError(f"training data {path} does not exist")
        dataset = open_saved_dataset(path, split or None)
        if dataset is None:
            scan = scan_images(path)
            self.files, self.unreadable = scan.files, scan.unreadable
            if not self.files:
                unreadable = f" ({len(self.unreadable)} subfolders could not be read)" if self.unreadable else ""
                raise ValueError(f"{path}: no image files found{unreadable} (looked recursively for png/jpg/webp/...)")
        else:
            if image_column not in dataset.column_names:
                raise ValueError(f"{path}: no column {image_column!r} (columns: {', '.join(dataset.column_names)}); "
                                 "set --image_column")
            from datasets import Image as ImageFeature

            if isinstance(dataset.features[image_column], ImageFeature):
                # Decode ourselves, so that a corrupt row is an ImageError we can skip, not a crash in datasets.
                dataset = dataset.cast_column(image_column, ImageFeature(decode=False))
            self.dataset = dataset

    def __len__(self) -> int:
        return len(self.files) if self.files is not None else len(self.dataset)

    def describe(self, index: int) -> str:
        return str(self.files[index]) if self.files is not None else f"{self.name}[{index}]"

    def load(self, index: int) -> Image.Image:
        if self.files is not None:
            return load_image(self.files[index], max_pixels=self.max_pixels)
        value = self.dataset[index][self.column]
        name = self.describe(index)
        if isinstance(value, Image.Image):  # a column that datasets decoded itself
            try:
                return to_rgb(value)
            except ImageError as error:
                raise ImageError(f"{name}: {error}") from None
        if isinstance(value, (dict, bytes, bytearray, str)):  # Image(decode=False) {"bytes", "path"}, bytes, a path
            return load_image(value, max_pixels=self.max_pixels, name=name)
        raise ImageError(f"{name}: column {self.column!r} holds {type(value).__name__}, not an image")


def random_crop(image: Image.Image, size: int, rng: np.random.Generator, min_scale: float, flip: bool) -> torch.Tensor:
    """RGB PIL -> float 3 x size x size in [-1, 1]: random rescale (never below the crop), crop and flip."""
    short = min(image.size)
    lowest = max(min_scale, size / short)  # upsample only images smaller than the crop
    scale = lowest if lowest >= 1 else rng.uniform(lowest, 1.0)
    if scale != 1.0:
        width, height = (max(size, round(side * scale)) for side in image.size)
        image = image.resize((width, height), Image.BICUBIC)
    left = int(rng.integers(0, image.width - size + 1))
    top = int(rng.integers(0, image.height - size + 1))
    image = image.crop((left, top, left + size, top + size))
    if flip and rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return pil_to_tensor(image)


def ldm_crop(image: Image.Image, size: int, rng: np.random.Generator, crop_min: float, flip: bool) -> torch.Tensor:
    """RGB PIL -> float 3 x size x size in [-1, 1], as LDM's autoencoders crop: a square of side
    int(short side * uniform(crop_min, 1)) at a random place, area-resized to size, then a random flip."""
    side = max(1, int(min(image.size) * rng.uniform(crop_min, 1.0)))
    left = int(rng.integers(0, image.width - side + 1))
    top = int(rng.integers(0, image.height - side + 1))
    image = resize_square(image, left, top, side, size)
    if flip and rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return pil_to_tensor(image)


def resize_square(image: Image.Image, left: int, top: int, side: int, size: int) -> Image.Image:
    """The side x side square at (left, top), resized to size x size: by area (PIL's box filter, as cv2's INTER_AREA
    in LDM) when it shrinks, bicubic when the image is too small and it grows."""
    resample = Image.Resampling.BOX if side >= size else Image.Resampling.BICUBIC
    return image.resize((size, size), resample, box=(left, top, left + side, top + side))


def center_crop(image: Image.Image, size: int) -> torch.Tensor:
    """RGB PIL -> float 3 x size x size in [-1, 1]: the centre, at native resolution unless the image is smaller."""
    short = min(image.size)
    if short < size:
        image = image.resize((max(size, round(image.width * size / short)), max(size, round(image.height * size / short))),
                             Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return pil_to_tensor(image.crop((left, top, left + size, top + size)))


class CropDataset(Dataset):
    """(epoch, index) -> (crop, number of unreadable images skipped to get it); `crop_policy` "ldm" (`ldm_crop`)
    or "native" (`random_crop`)."""

    def __init__(self, source: ImageSource, resolution: int, *, seed: int, min_scale: float = 1.0, flip: bool = True,
                 crop_policy: str = "native", crop_min: float = 0.5):
        if crop_policy not in ("ldm", "native"):
            raise ValueError(f"crop_policy must be ldm or native, got {crop_policy!r}")
        self.source, self.resolution, self.seed, self.min_scale, self.flip = source, resolution, seed, min_scale, flip
        self.crop_policy, self.crop_min = crop_policy, crop_min

    def crop(self, image: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        if self.crop_policy == "ldm":
            return ldm_crop(image, self.resolution, rng, self.crop_min, self.flip)
        return random_crop(image, self.resolution, rng, self.min_scale, self.flip)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, index = key
        rng = np.random.default_rng([self.seed, epoch, index])
        for skipped in range(MAX_BAD_IN_A_ROW):
            try:
                image = self.source.load((index + skipped) % len(self.source))
                return self.crop(image, rng), skipped
            except ImageError:
                continue
        raise ValueError(f"{MAX_BAD_IN_A_ROW} unreadable images in a row from {self.source.describe(index)}: "
                           "is the data (or --image_column) right?")


class ShardedSampler(Sampler):
    """Endless (epoch, index) keys for one rank: each epoch a fresh permutation, rank r takes every
    world-th index. `start` is the number of samples this rank already consumed (the data position)."""

    def __init__(self, size: int, *, rank: int, world_size: int, seed: int, start: int = 0) -> None:
        self.size, self.rank, self.world_size, self.seed, self.start = size, rank, world_size, seed, start
        self.per_rank = math.ceil(size / world_size)  # padded by wrapping, as DistributedSampler

    def epoch_indices(self, epoch: int) -> list[int]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        order = order.tolist()
        order += order[: self.per_rank * self.world_size - self.size]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        position = self.start
        epoch, offset = divmod(position, self.per_rank)
        while True:
            indices = self.epoch_indices(epoch)
            for index in indices[offset:]:
                yield epoch, index
            epoch, offset = epoch + 1, 0


def collate(items: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, int]:
    return torch.stack([crop for crop, _ in items]), sum(skipped for _, skipped in items)


def train_loader(source: ImageSource, *, resolution: int, batch_size: int, seed: int, rank: int, world_size: int,
                 start: int = 0, num_workers: int = 2, **crop_options) -> DataLoader:
    """Batches of (crops, skipped) forever, starting at sample `start` of this rank's stream; `crop_options` go to
    `CropDataset` (min_scale, flip, crop_policy, crop_min)."""
    dataset = CropDataset(source, resolution, seed=seed, **crop_options)
    sampler = ShardedSampler(len(source), rank=rank, world_size=world_size, seed=seed, start=start)
    # Its own generator: creating the iterator must not draw from the global RNG, whose state checkpoints restore.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate, num_workers=num_workers,
                      drop_last=True, generator=torch.Generator().manual_seed(seed))


class SourceSubset:
    """Some images of a source, indexed 0..n-1 in their order there: the same interface as `ImageSource`."""

    def __init__(self, source: ImageSource, indices: np.ndarray) -> None:
        self.source, self.indices, self.name = source, indices, source.name

    def __len__(self) -> int:
        return len(self.indices)

    def describe(self, index: int) -> str:
        return self.source.describe(int(self.indices[index]))

    def load(self, index: int) -> Image.Image:
        return self.source.load(int(self.indices[index]))


# The held-out images depend on the data only, not on --seed: runs with other seeds score the same images.
HOLDOUT_SEED = 20_240_601


def hold_out(source: ImageSource, count: int) -> tuple[SourceSubset, SourceSubset]:
    """(training images, `count` held-out validation images): a fixed, seeded choice; no image is in both."""
    if count >= len(source):
        raise ValueError(f"validation_holdout {count} leaves no training image of the {len(source)} in {source.name}: "
                         "lower it or give --validation_data")
    order = np.random.default_rng(HOLDOUT_SEED).permutation(len(source))
    held = np.sort(order[:count])
    return SourceSubset(source, np.setdiff1d(np.arange(len(source)), held)), SourceSubset(source, held)


def validation_crops(source: ImageSource, count: int, resolution: int, crop_policy: str = "native") -> torch.Tensor:
    """The first `count` readable images as a fixed set to watch across a run, cropped as training sees them:
    "native": the centre at native resolution; "ldm": the whole centre square, area-resized (LDM's crop at its
    largest fraction)."""
    crops = []
    for index in range(len(source)):
        if len(crops) == count:
            break
        try:
            image = source.load(index)
        except ImageError:
            continue
        if crop_policy == "ldm":
            side = min(image.size)
            crops.append(pil_to_tensor(resize_square(image, (image.width - side) // 2, (image.height - side) // 2,
                                                     side, resolution)))
        else:
            crops.append(center_crop(image, resolution))
    if not crops:
        raise ValueError(f"{source.name}: no readable validation image")
    return torch.stack(crops)
