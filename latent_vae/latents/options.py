"""What a precompute run can be told besides the model, the data and the output folder (one `--flag` per field)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

from ..images.reading import DEFAULT_MAX_PIXELS
from ..utils import option_values as values
from .format import storage_dtype


def _option(default: Any, help: str, parse: Any = None) -> Any:
    """A PrecomputeOptions field: its help is the `latent-vae precompute` flag's help; `parse` (from
    latent_vae.utils.option_values) reads the flag and checks the field's range, on the command line and in `validate`."""
    return field(default=default, metadata={"help": help, **({"parse": parse} if parse else {})})


@dataclass
class PrecomputeOptions:
    """Everything a precompute run can be told besides the model, the data and the output folder.
    The command line has one `--flag` per field (`latent_vae.cli.precompute`)."""

    resolution: int = _option(1024, "side of the square crop, or the buckets' side of equal area", values.image_side)
    buckets: bool = _option(False, "aspect-ratio buckets (SDXL-style) of about resolution**2 pixels instead of square crops")
    bucket_step: int | None = _option(None, "bucket sides are multiples of this (default: the model's downsampling factor)",
                                      values.positive_int)
    max_aspect: float = _option(4.0, "the most elongated bucket (long side / short side)", values.Real(1.0, True, 64.0))
    flip: bool = _option(False, "also store the latents of the horizontally mirrored image")
    dtype: Literal["bf16", "fp16", "fp32"] = _option("bf16", "storage dtype of mean and std")
    encode_dtype: Literal["fp32", "bf16", "fp16"] = _option("fp32", "the encoder's dtype (bf16 is much faster on recent GPUs)")
    device: str | None = _option(None, "cpu, cuda, cuda:N (default: this process's accelerator, cuda:LOCAL_RANK under torchrun)",
                                 values.device)
    batch_size: int = _option(8, "images per encoder call (twice that with --flip)", values.positive_int)
    num_workers: int | None = _option(None, "DataLoader workers reading and decoding images (default: the CPUs this process can spare)",
                                      values.Integer(0, 1024))
    shard_size: int = _option(512, "rows per virtual shard of an unsharded input (folder, Dataset): the most work a kill can lose per worker",
                              values.positive_int)
    max_upscale: float = _option(1.0, "skip images needing more upscaling than this to fill the crop (1: never upscale)",
                                 values.factor)
    max_pixels: int = _option(DEFAULT_MAX_PIXELS, "refuse images above this many pixels, from their header, before decoding",
                              values.positive_int)
    max_memory: str | int | None = _option(None, "memory budget per encoder call, e.g. 4GB: whole images when they fit, else "
                                           "exact tiles, which give the same latents (default: most of the free device memory)",
                                           values.byte_size)
    tile_size: int | None = _option(None, "expert override: always encode in exact tiles of this many pixels (same latents)",
                                    values.positive_int)
    channels_last: bool | None = _option(None, "NHWC memory layout (default: the codec's choice by device, NHWC on CPU)")
    image_column: str | None = _option(None, "datasets and parquet sources: the image column (default: the only image column)")
    key_column: str | None = _option(None, "datasets and parquet sources: a column of unique ids (default: a 'key' column, else the row)")
    caption_column: str = _option("text", "image folders: the column .txt captions go to (as diffusers' scripts)")
    split: str | None = _option(None, "a saved DatasetDict: the split to encode (default: train, or the only one)")
    claim_timeout: float = _option(300.0, "seconds without a heartbeat after which another process takes over a claimed shard",
                                   values.timeout)
    progress: bool = _option(True, "show a progress bar")
    engine: Literal["local", "ray"] = _option("local", "local: this process (and its torchrun ranks); ray: a Ray Data "
                                              "pipeline on a Ray cluster (pip install 'latent-vae[ray]')")
    ray_address: str | None = _option(None, "--engine ray: the cluster to join (default: RAY_ADDRESS, else a new local "
                                      "Ray on this machine)")
    encoders: int = _option(1, "--engine ray: encoder actors, each holding one model", values.positive_int)
    gpus_per_encoder: float | None = _option(None, "--engine ray: GPUs per encoder actor (default: 1 when the cluster has "
                                             "GPUs, else 0: the encoders run on CPUs)", values.Real(0.0, True, 64.0))
    decoders: int | None = _option(None, "--engine ray: most decode tasks at once, one CPU each (default: as many as "
                                   "the cluster's free CPUs allow)", values.positive_int)

    def validate(self) -> None:
        """Every field in its range (the same parsers as the flags'), so a Python caller's bad value is refused
        before any work, as the command line's is."""
        values.check_fields(self, {f.name: f.metadata["parse"] for f in fields(self) if "parse" in f.metadata})
        storage_dtype(self.dtype)

