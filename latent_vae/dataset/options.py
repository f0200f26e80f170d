"""What a precompute run can be told besides the model, the data and the output folder (one `--flag` per field)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ..images import DEFAULT_MAX_PIXELS
from .format import storage_dtype


def _option(default: Any, help: str) -> Any:
    """A PrecomputeOptions field: its help is the `latent-vae precompute` flag's help."""
    return field(default=default, metadata={"help": help})


@dataclass
class PrecomputeOptions:
    """Everything a precompute run can be told besides the model, the data and the output folder.
    The command line has one `--flag` per field (`latent_vae.cli.precompute`)."""

    resolution: int = _option(1024, "side of the square crop, or the buckets' side of equal area")
    buckets: bool = _option(False, "aspect-ratio buckets (SDXL-style) of about resolution**2 pixels instead of square crops")
    bucket_step: int | None = _option(None, "bucket sides are multiples of this (default: the model's downsampling factor)")
    max_aspect: float = _option(4.0, "the most elongated bucket (long side / short side)")
    flip: bool = _option(False, "also store the latents of the horizontally mirrored image")
    dtype: Literal["bf16", "fp16", "fp32"] = _option("bf16", "storage dtype of mean and std")
    encode_dtype: Literal["fp32", "bf16", "fp16"] = _option("fp32", "the encoder's dtype (bf16 is much faster on recent GPUs)")
    device: str | None = _option(None, "cpu, cuda, cuda:N (default: this process's accelerator, cuda:LOCAL_RANK under torchrun)")
    batch_size: int = _option(8, "images per encoder call (twice that with --flip)")
    num_workers: int | None = _option(None, "DataLoader workers reading and decoding images (default: the CPUs this process can spare)")
    shard_size: int = _option(512, "rows per virtual shard of an unsharded input (folder, Dataset): the most work a kill can lose per worker")
    max_upscale: float = _option(1.0, "skip images needing more upscaling than this to fill the crop (1: never upscale)")
    max_pixels: int = _option(DEFAULT_MAX_PIXELS, "refuse images above this many pixels, from their header, before decoding")
    max_memory: str | None = _option(None, "memory budget per encoder call, e.g. 4GB: whole images when they fit, else exact "
                                     "tiles, which give the same latents (default: most of the free device memory)")
    tile_size: int | None = _option(None, "expert override: always encode in exact tiles of this many pixels (same latents)")
    channels_last: bool | None = _option(None, "NHWC memory layout (default: the codec's choice by device, NHWC on CPU)")
    image_column: str | None = _option(None, "datasets and parquet sources: the image column (default: the only image column)")
    key_column: str | None = _option(None, "datasets and parquet sources: a column of unique ids (default: a 'key' column, else the row)")
    caption_column: str = _option("text", "image folders: the column .txt captions go to (as diffusers' scripts)")
    split: str | None = _option(None, "a saved DatasetDict: the split to encode (default: train, or the only one)")
    claim_timeout: float = _option(300.0, "seconds without a heartbeat after which another process takes over a claimed shard")
    progress: bool = _option(True, "show a progress bar")

    def validate(self) -> None:
        if self.resolution < 1:
            raise ValueError(f"resolution must be positive, got {self.resolution}")
        for name in ("batch_size", "shard_size", "max_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_upscale < 1.0:
            raise ValueError(f"max_upscale must be at least 1.0 (1.0: never upscale), got {self.max_upscale}")
        if self.max_aspect < 1.0:
            raise ValueError(f"max_aspect must be at least 1.0, got {self.max_aspect}")
        if self.claim_timeout <= 0:
            raise ValueError(f"claim_timeout must be positive, got {self.claim_timeout}")
        storage_dtype(self.dtype)

