"""Training images: an image folder or a datasets dataset on disk, as random crops, sharded across ranks.

A sample is a pure function of its position in the run (seed, epoch, index): the crop and flip are
drawn from a generator seeded by that position, so a resumed run, another worker count or another
worker reads exactly the same pixels. That is what makes `--resume` exact.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from latent_vae.sources import open_saved_dataset
from latent_vae.images import ImageError, find_images, load_image, pil_to_tensor, to_rgb

# A corrupt image is replaced by the next one; after this many bad ones in a row the data is broken.
MAX_BAD_IN_A_ROW = 16


class ImageSource:
    """Random access to the images of a folder or a dataset: `len`, `load(i) -> RGB PIL` (ImageError if unreadable)."""

    def __init__(self, path: str | Path, image_column: str = "image", split: str = "") -> None:
        path = Path(path).expanduser()
        self.name = str(path)
        self.files: list[Path] | None = None
        self.dataset = None
        self.column = image_column
        if not path.exists():
            raise FileNotFoundError(f"training data {path} does not exist")
        dataset = open_saved_dataset(path, split or None)
        if dataset is None:
            self.files = find_images(path)
            if not self.files:
                raise ValueError(f"{path}: no image files found (looked recursively for png/jpg/webp/...)")
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
            return load_image(self.files[index])
        value = self.dataset[index][self.column]
        try:
            if isinstance(value, dict):  # datasets' Image(decode=False): {"bytes": ..., "path": ...}
                value = value.get("bytes") or value.get("path")
            if isinstance(value, Image.Image):
                return to_rgb(value)
            if isinstance(value, (bytes, bytearray)):
                with Image.open(io.BytesIO(value)) as image:
                    image.load()
                    return to_rgb(image)
            if isinstance(value, str):
                return load_image(value)
        except (OSError, SyntaxError, ValueError) as error:
            raise ImageError(f"{self.describe(index)}: corrupt or unreadable image ({error})") from None
        raise ImageError(f"{self.describe(index)}: column {self.column!r} holds {type(value).__name__}, not an image")


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


def center_crop(image: Image.Image, size: int) -> torch.Tensor:
    """RGB PIL -> float 3 x size x size in [-1, 1]: the centre, at native resolution unless the image is smaller."""
    short = min(image.size)
    if short < size:
        image = image.resize((max(size, round(image.width * size / short)), max(size, round(image.height * size / short))),
                             Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return pil_to_tensor(image.crop((left, top, left + size, top + size)))


class CropDataset(Dataset):
    """(epoch, index) -> (crop, number of unreadable images skipped to get it)."""

    def __init__(self, source: ImageSource, resolution: int, *, seed: int, min_scale: float = 1.0, flip: bool = True):
        self.source, self.resolution, self.seed, self.min_scale, self.flip = source, resolution, seed, min_scale, flip

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, index = key
        rng = np.random.default_rng([self.seed, epoch, index])
        for skipped in range(MAX_BAD_IN_A_ROW):
            try:
                image = self.source.load((index + skipped) % len(self.source))
                return random_crop(image, self.resolution, rng, self.min_scale, self.flip), skipped
            except ImageError:
                continue
        raise RuntimeError(f"{MAX_BAD_IN_A_ROW} unreadable images in a row from {self.source.describe(index)}: "
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
                 start: int = 0, min_scale: float = 1.0, flip: bool = True, num_workers: int = 2) -> DataLoader:
    """Batches of (crops, skipped) forever, starting at sample `start` of this rank's stream."""
    dataset = CropDataset(source, resolution, seed=seed, min_scale=min_scale, flip=flip)
    sampler = ShardedSampler(len(source), rank=rank, world_size=world_size, seed=seed, start=start)
    # Its own generator: creating the iterator must not draw from the global RNG, whose state checkpoints restore.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate, num_workers=num_workers,
                      drop_last=True, generator=torch.Generator().manual_seed(seed))


def validation_crops(source: ImageSource, count: int, resolution: int) -> torch.Tensor:
    """The first `count` readable images, centre-cropped: a fixed set to watch across a run."""
    crops = []
    for index in range(len(source)):
        if len(crops) == count:
            break
        try:
            crops.append(center_crop(source.load(index), resolution))
        except ImageError:
            continue
    if not crops:
        raise ValueError(f"{source.name}: no readable validation image")
    return torch.stack(crops)
