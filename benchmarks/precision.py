"""fp32 vs bf16 vs fp16 through LatentCodec: agreement with fp32 and time per image.

    python -m benchmarks.precision --device cuda --resolution 1024
    python -m benchmarks.precision --device cpu --resolution 256 --preset f16c16-narrow

The weights are a preset's fresh ones unless --model names a trained folder, so the numbers say how
far reduced precision moves the latents and images, not how good the reconstructions are.
"""

from __future__ import annotations

import argparse

import torch

from latent_vae import LatentCodec, NonFiniteError, load_vae

from .measure import result_name
from .report import device_label, time_call, write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="f16c16", help="preset or model folder (default f16c16)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    # A smooth random image: the statistics of a photo matter less here than the dtype's range.
    pixels = torch.nn.functional.interpolate(
        torch.rand(args.batch_size, 3, args.resolution // 16, args.resolution // 16),
        size=(args.resolution, args.resolution), mode="bicubic",
    ).mul(2).sub(1).clamp(-1, 1)
    rows, reference = [], None
    for dtype in ("fp32", "bf16", "fp16"):
        codec = LatentCodec(load_vae(args.model, seed=0), device=args.device, dtype=dtype,
                            max_batch_size=args.batch_size)
        codec_device = codec.device
        row = {"dtype": dtype, "device": device_label(codec.device)}
        try:
            latents = codec.encode(pixels)
            images = codec.decode(latents)
        except NonFiniteError as error:
            rows.append({**row, "result": f"NonFiniteError: {error}"})
            continue
        if reference is None:
            reference = (latents, images)
        row["latent_rel_err"] = ((latents - reference[0]).norm() / reference[0].norm()).item()
        row["image_max_abs_err"] = (images - reference[1]).abs().max().item()
        row["encode_s_per_image"] = time_call(lambda: codec.encode(pixels), codec.device, repeats=args.repeats) / len(pixels)
        row["decode_s_per_image"] = time_call(lambda: codec.decode(latents), codec.device, repeats=args.repeats) / len(pixels)
        if codec.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            codec.decode(latents)
            row["decode_peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
        row["result"] = "ok"
        rows.append(row)
    fp32 = next((r for r in rows if r["dtype"] == "fp32" and "encode_s_per_image" in r), None)
    for row in rows:
        if fp32 and "encode_s_per_image" in row:
            row["speedup_vs_fp32"] = (fp32["encode_s_per_image"] + fp32["decode_s_per_image"]) / (
                row["encode_s_per_image"] + row["decode_s_per_image"])
    write_results(
        result_name("precision", codec_device), rows,
        notes=f"{args.model} at {args.resolution}x{args.resolution}, batch {args.batch_size}, untiled; "
        "errors are against fp32 in the same run.",
    )


if __name__ == "__main__":
    main()
