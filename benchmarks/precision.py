"""fp32 vs bf16 vs fp16 vs fp16 after `latent_vae.fp16_safe`, through LatentCodec: agreement with fp32 and time.

    python -m benchmarks.precision --device cpu --model f16c16-narrow --overflowing \\
        --images $LATENT_VAE_PHOTOS/cbsd68 --calibration $LATENT_VAE_PHOTOS/cset14 --resolution 256
    python -m benchmarks.precision --device cuda --model f16c16 --resolution 1024

Rows, all on the same model and photos (centre squares at --resolution):
- fp32: the reference; bf16, fp16: the model as given, cast;
- fp16 fixed: the model after `fp16_safe`, calibrated in fp32 on other photos (--calibration) at
  --calibration-resolution; its fp32 row checks that the fix kept the function.
- fp16 twin (with --overflowing): the well-behaved model the overflowing one was made from.

Random weights do not overflow fp16 by themselves, so --overflowing turns the model into one that does, by the
inverse of the transform (every free stage x 2**15, the GroupNorm eps left at diffusers' 1e-6): in fp32 it is
the same function as its twin (whose eps are 2**-30 of that), as the tests build it. --model may name a trained
folder instead. Latent errors compare each dtype's encoding with fp32's; image errors decode the fp32 latents in
each dtype, so they measure the decoder alone. On a CPU torch's fp16 convolutions are much slower than fp32 (no
fast fp16 kernels): keep the model and sizes modest there.
"""

from __future__ import annotations

import argparse
import copy
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from latent_vae import LatentCodec, NonFiniteError, load_vae
from latent_vae.fp16.layout import stage_graph
from latent_vae.fp16.rescale import fp16_safe
from latent_vae.images.reading import centre_square, find_images, load_image, pil_to_tensor
from latent_vae.utils.option_values import resolve_device

from .report import device_label, time_call, write_results

SCALE = 2.0**15  # what --overflowing multiplies every free stage by
COLUMNS = ("model", "dtype", "latent_rel_err", "image_rel_err", "image_max_abs_err", "encode_s", "decode_s",
           "time_vs_fp32", "result")


def overflowing_pair(vae):
    """(twin, source): the source overflows fp16; in fp32 both compute the same function (see the docstring)."""
    twin = copy.deepcopy(vae).eval()
    graph = stage_graph(twin)
    for _, norm, reads in graph.norms:
        if graph.stage_of(reads).free:
            norm.eps /= SCALE**2
    source = copy.deepcopy(twin)
    source_graph = stage_graph(source)
    source_graph.rescale({stage.name: SCALE for stage in source_graph.stages() if stage.free})
    return twin, source


def photos(folder: str | None, resolution: int, limit: int, seed: int) -> list[torch.Tensor]:
    """Centre squares of real photos, or smooth random images when no folder is given."""
    if folder:
        paths = find_images(folder)[:limit]
        if not paths:
            raise SystemExit(f"{folder}: no images")
        return [pil_to_tensor(centre_square(load_image(p), resolution))[None] for p in paths]
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(limit, 3, resolution // 16, resolution // 16, generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=(resolution, resolution), mode="bicubic")
    return [image[None] for image in smooth.mul(2).sub(1).clamp(-1, 1)]


def relative(errors: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """||a - b|| / ||b|| over all pairs together."""
    num = sum(float((a - b).double().pow(2).sum()) for a, b in errors)
    den = sum(float(b.double().pow(2).sum()) for _, b in errors)
    return (num / den) ** 0.5


def fastest(fn, device, repeats: int) -> float:
    """The fastest of `repeats` timed calls (after one untimed): other processes only ever add time."""
    return min(time_call(fn, device, warmup=0 if i else 1, repeats=1) for i in range(repeats))


def measure(label: str, vae, dtype: str, images, reference, args) -> dict:
    codec = LatentCodec(copy.deepcopy(vae), device=args.device, dtype=dtype)
    row = {"model": label, "dtype": dtype, "device": device_label(codec.device)}
    try:
        latents = [codec.encode(image) for image in images]
        decoded = [codec.decode(z) for z in (reference["latents"] if reference else latents)]
    except NonFiniteError as error:
        return {**row, "result": f"NonFiniteError ({str(error).split(':')[0]})"}
    if reference:
        row["latent_rel_err"] = relative(list(zip(latents, reference["latents"])))
        row["image_rel_err"] = relative(list(zip(decoded, reference["images"])))
        row["image_max_abs_err"] = max(float((a - b).abs().max()) for a, b in zip(decoded, reference["images"]))
    row["encode_s"] = fastest(lambda: codec.encode(images[0]), codec.device, args.repeats)
    row["decode_s"] = fastest(lambda: codec.decode(latents[0]), codec.device, args.repeats)
    row["result"] = "ok"
    return row if reference else {**row, "latents": latents, "images": decoded}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="f16c16-narrow", help="preset or model folder (default f16c16-narrow)")
    parser.add_argument("--overflowing", action="store_true",
                        help="benchmark the model made to overflow fp16 (every free stage x 2**15), and its twin")
    parser.add_argument("--images", help="folder of photos to measure on (default: smooth random images)")
    parser.add_argument("--calibration", help="folder of other photos to calibrate fp16_safe on (default: --images)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--calibration-resolution", type=int, default=128)
    parser.add_argument("--limit", type=int, default=4, help="photos measured (default 4)")
    parser.add_argument("--calibration-limit", type=int, default=8, help="photos calibrated on (default 8)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=None, help="results name (default precision_<device>)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    source = load_vae(args.model, seed=0).eval()
    twin = None
    if args.overflowing:
        twin, source = overflowing_pair(source)
    images = photos(args.images, args.resolution, args.limit, seed=0)
    calibration = photos(args.calibration or args.images, args.calibration_resolution, args.calibration_limit, seed=1)
    device = resolve_device(args.device)
    fixed = copy.deepcopy(source).to(device)
    start = time.perf_counter()
    report = fp16_safe(fixed, calibration)
    fix_seconds = time.perf_counter() - start
    fixed = fixed.cpu()

    label = f"{args.model}{' x2^15 (overflowing)' if args.overflowing else ''}"
    reference = measure(label, source, "fp32", images, None, args)
    rows = [{**{k: v for k, v in reference.items() if k not in ("latents", "images")},
             "latent_rel_err": 0.0, "image_rel_err": 0.0, "image_max_abs_err": 0.0}]
    runs = [(label, source, "bf16"), (label, source, "fp16"), ("fixed", fixed, "fp32"), ("fixed", fixed, "fp16")]
    if twin is not None:
        runs.append(("twin (well-behaved)", twin, "fp16"))
    for name, vae, dtype in runs:
        rows.append(measure(name, vae, dtype, images, reference, args))
        print(rows[-1], flush=True)
    base = reference["encode_s"] + reference["decode_s"]
    for row in rows:
        if "encode_s" in row:
            row["time_vs_fp32"] = (row["encode_s"] + row["decode_s"]) / base
    over = sum(stage.peak_before > 65504 for stage in report.stages)
    where = f"{Path(args.images).name}/ ({len(images)} photos)" if args.images else f"{len(images)} smooth random images"
    calibrated = (f"{Path(args.calibration or args.images).name}/ ({report.images} photos)"
                  if (args.calibration or args.images) else f"{report.images} other smooth random images")
    command = "python -m benchmarks.precision " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if os.environ.get("LATENT_VAE_PHOTOS"):  # the photos' folder as the README names it, not this machine's path
        command = command.replace(os.environ["LATENT_VAE_PHOTOS"].rstrip("/"), "$LATENT_VAE_PHOTOS")
    write_results(
        args.out or f"precision_{device.type}", rows, columns=COLUMNS,
        notes=f"{label}; measured on {where} at {args.resolution}x{args.resolution}, batch 1, untiled; fp16_safe "
        f"calibrated on {calibrated} at {args.calibration_resolution}x{args.calibration_resolution} in "
        f"{fix_seconds:.1f} s: {over} of {len(report.stages)} stages overflowed fp16, "
        f"{sum(s.factor != 1 for s in report.stages)} rescaled. Latent errors: each dtype's encoding against "
        "fp32's; image errors: the fp32 latents decoded in each dtype against fp32's decoding (relative: "
        "||a - b|| / ||b|| over all photos). Times are seconds per image (the fastest of "
        f"{args.repeats}); time_vs_fp32 is (encode + decode) against fp32's in the same run (the fixed model's fp32 "
        "row is the same arithmetic as the first row: its time ratio shows how much a shared machine moves the "
        f"times). Command: `{command}`",
        extra={"command": command, "fp16_fix": report.to_dict()},
    )


if __name__ == "__main__":
    main()
