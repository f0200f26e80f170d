"""Precompute speed: the whole `precompute_latents` run against bare `LatentCodec.encode`, in the same run.

- `bare encode`: `LatentCodec.encode` on batches of images already decoded, resized and converted to float
  tensors (the encoder alone: the ceiling);
- `precompute (whole run)`: `precompute_latents` on the same images as JPEG files, timed from call to return:
  scanning the folder, decoding and resizing in DataLoader workers, encoding, and writing parquet shards.
  (Process start-up and model loading are left out of both: they do not grow with the dataset.)

Goal: the whole run at >= 90% of bare encode's images/s. Both use the same LatentCodec (same weights,
device, dtype, batch size). On CPU the DataLoader workers share the cores that encode; on a GPU they do not.

Where the rest of the time goes, per run: the encoder's own time (CUDA events around every `codec.encode` on a
GPU, wall time on CPU), the main process's time handling what the loader delivered (stacking, copying,
encoding; packing and parquet writes run in a writer thread beside it), and the remainder: waiting for the
DataLoader workers' images.

    python -m benchmarks.precompute_speed                   # CPU: f16c16 at 256 px, about 2 minutes
    python -m benchmarks.precompute_speed --device cuda     # GPU defaults: 1024 px, bf16, batch 16, 256 images
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.measure import result_name
from benchmarks.report import device_label, synchronize, write_results
from latent_vae import LatentCodec, build_vae
from latent_vae.images.reading import load_image
from latent_vae.latents import precompute  # StageClock patches its loop
from latent_vae.latents.encoding import prepare_image
from latent_vae.latents.options import PrecomputeOptions
from latent_vae.latents.precompute import precompute_latents
from latent_vae.latents.sources import open_source
from latent_vae.utils.option_values import resolve_device

NAME = "precompute_speed"
GOAL = 0.90
# Defaults that fit each kind of machine: a CPU run of about two minutes, a GPU run long enough to be steady.
DEFAULTS = {"cpu": {"resolution": 256, "num_images": 24, "batch_size": 4, "encode_dtype": "fp32"},
            "cuda": {"resolution": 1024, "num_images": 256, "batch_size": 16, "encode_dtype": "bf16"}}


def make_images(folder: Path, count: int, resolution: int, seed: int = 0) -> None:
    """JPEGs a little larger than the crop, of varied aspect: the decode and resize work a real folder costs."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        height, width = (int(resolution * rng.uniform(1.1, 1.6)) for _ in range(2))
        base = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize((width, height), Image.Resampling.BICUBIC)
        noisy = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, (height, width, 3), dtype=np.int16)
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)


def decoded_batches(folder: Path, resolution: int, batch_size: int) -> list[torch.Tensor]:
    """The exact tensors precompute would encode, prepared ahead (not timed)."""
    options = PrecomputeOptions(resolution=resolution, max_upscale=2.0)
    samples = [sample for shard in open_source(folder).shards for sample in shard.samples()]
    prepared = [prepare_image(load_image(sample.image), options).pixels for sample in samples]
    pixels = torch.stack(prepared).float().div(127.5).sub(1.0)
    return list(pixels.split(batch_size))


def time_bare(codec: LatentCodec, batches: list[torch.Tensor]) -> float:
    synchronize(codec.device)
    start = time.perf_counter()
    for batch in batches:
        codec.encode(batch)
    synchronize(codec.device)
    return time.perf_counter() - start


class StageClock:
    """Patches one run's codec and loop to time its stages: the encoder (CUDA events on a GPU: its time on the
    device, not the host's), and the main process's handling of each delivered chunk (`_Run._take`)."""

    def __init__(self, codec: LatentCodec) -> None:
        self.codec, self.events, self.encode_wall, self.handling = codec, [], 0.0, 0.0

    def __enter__(self) -> StageClock:
        encode, take = self.codec.encode, precompute._Run._take

        def timed_encode(*a, **k):
            begin = time.perf_counter()
            if self.codec.device.type == "cuda":
                events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                events[0].record()
                result = encode(*a, **k)
                events[1].record()
                self.events.append(events)
            else:
                result = encode(*a, **k)
            self.encode_wall += time.perf_counter() - begin
            return result

        def timed_take(run, item):
            begin = time.perf_counter()
            take(run, item)
            self.handling += time.perf_counter() - begin

        self._take = take
        self.codec.encode = timed_encode  # this instance only
        precompute._Run._take = timed_take
        return self

    def __exit__(self, *exc) -> None:
        del self.codec.encode
        precompute._Run._take = self._take

    def encoder_seconds(self) -> float:
        if not self.events:
            return self.encode_wall
        torch.cuda.synchronize()
        return sum(start.elapsed_time(end) for start, end in self.events) / 1000


def time_precompute(codec: LatentCodec, folder: Path, out: Path, args) -> dict:
    """One whole run: seconds from call to return, and its stages."""
    shutil.rmtree(out, ignore_errors=True)
    with StageClock(codec) as clock:
        synchronize(codec.device)
        start = time.perf_counter()
        summary = precompute_latents(codec, folder, out, resolution=args.resolution, dtype=args.storage_dtype,
                                     batch_size=args.batch_size, num_workers=args.num_workers, max_upscale=2.0,
                                     progress=False)
        synchronize(codec.device)
        seconds = time.perf_counter() - start
    if summary.rows != args.num_images:
        raise RuntimeError(f"precompute wrote {summary.rows} of {args.num_images} images: {summary.line()}")
    return {"seconds": seconds, "encoder": clock.encoder_seconds(), "handling": clock.handling}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when available)")
    parser.add_argument("--model", default="f16c16", help="preset (fresh weights: speed does not depend on them)")
    parser.add_argument("--resolution", type=int, default=None, help="default: 256 on CPU, 1024 on GPU")
    parser.add_argument("--num-images", type=int, default=None, help="default: 24 on CPU, 256 on GPU")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 4 on CPU, 16 on GPU")
    parser.add_argument("--encode-dtype", default=None, help="fp32, bf16 or fp16 (default: fp32 on CPU, bf16 on GPU)")
    parser.add_argument("--storage-dtype", default="bf16", help="dtype of the stored mean/std")
    parser.add_argument("--num-workers", type=int, default=None, help="DataLoader workers (default: precompute's)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--repeats", type=int, default=1, help="alternate bare/whole this many times, keep the best")
    parser.add_argument("--workdir", default=None, help="where the images and shards go (default: a temp folder)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    for key, value in DEFAULTS["cuda" if device.type == "cuda" else "cpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # one input shape: let cuDNN pick its fastest kernels

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="precompute_speed_"))
    folder, out = workdir / "images", workdir / "latents"
    try:
        print(f"making {args.num_images} JPEGs around {args.resolution} px in {folder} ...")
        make_images(folder, args.num_images, args.resolution)
        batches = decoded_batches(folder, args.resolution, args.batch_size)
        codec = LatentCodec(build_vae(args.model, seed=0), device=device, dtype=args.encode_dtype,
                            max_batch_size=args.batch_size, channels_last=args.channels_last)
        codec.encode(batches[0])  # warm-up: kernel selection, allocator
        bare, runs = [], []
        for repeat in range(args.repeats):  # alternating, so that drift on a shared machine hits all
            with StageClock(codec) as clock:
                seconds = time_bare(codec, batches)
            bare.append({"seconds": seconds, "encoder": clock.encoder_seconds(), "handling": seconds})
            runs.append(time_precompute(codec, folder, out, args))
            print(f"repeat {repeat}: bare {args.num_images / bare[-1]['seconds']:.2f} img/s, whole "
                  f"{args.num_images / runs[-1]['seconds']:.2f} img/s", flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    def row(variant: str, timings: list[dict]) -> dict:
        best = min(timings, key=lambda t: t["seconds"])
        return {"variant": variant, "images/s": args.num_images / best["seconds"],
                "encoder": best["encoder"] / best["seconds"], "main process": best["handling"] / best["seconds"],
                "waiting for images": 1 - best["handling"] / best["seconds"]}

    config = f"{args.model}, {args.resolution} px, batch {args.batch_size}, {args.encode_dtype} encode, {args.storage_dtype} storage"
    rows = [row("bare LatentCodec.encode (decoded tensors)", bare), row("precompute, whole run", runs)]
    bare_rate = rows[0]["images/s"]
    for r in rows:
        r.update(relative=r["images/s"] / bare_rate, device=device_label(device), config=config)
    del rows[0]["waiting for images"]  # no loader
    ratio = rows[1]["relative"]
    verdict = "met" if ratio >= GOAL else "NOT met"
    notes = (f"Goal: whole run >= {GOAL:.0%} of bare encode: {verdict} ({ratio:.1%}). {args.num_images} JPEGs of "
             f"1.1-1.6x the resolution, decoded and resized in DataLoader workers; best of {args.repeats}. "
             "The whole run counts folder scan, worker start-up, encoding and parquet writes (not process "
             "start-up or model loading). On CPU the workers share the cores that encode. Shares of each run's "
             "time: 'encoder' = the encoder's own time (CUDA events on a GPU), 'main process' = handling the "
             "loader's chunks (encoding included), 'waiting for images' = the rest.")
    write_results(result_name(NAME, device), rows, notes=notes,
                  columns=["variant", "images/s", "relative", "encoder", "main process", "waiting for images",
                           "device", "config"],
                  extra={"goal": GOAL, "ratio": ratio, "args": vars(args)})


if __name__ == "__main__":
    main()
