"""Encode and decode speed: LatentCodec against plain diffusers AutoencoderKL usage, in the same run.

For each preset and resolution: images/s, peak memory, and achieved GFLOP/s (FLOPs counted once, on the
meta device, for the plain model: a variant that skips work is credited with the plain FLOPs) against
this machine's matmul peak, measured in the same run and dtype.

Variants, all on the same weights and the same input:
- `diffusers`: `vae.encode(x).latent_dist.mode()` and `vae.decode(z).sample` under `torch.no_grad()`,
  as pipelines call it (contiguous NCHW tensors);
- `LatentCodec NCHW` and `LatentCodec NHWC`: the adapter with `channels_last` off and on (whole images
  wherever they fit the memory budget, so that all variants do the same arithmetic).
  Both have its in-place resnet blocks (`latent_vae.codec.latent_codec._inplace_resnets`: the same operations, bit for
  bit, with fewer memory passes). The codec's default is NHWC on CPU and NCHW on CUDA, from these numbers.

    python -m benchmarks.codec_speed                                   # CPU, fp32: a few minutes
    python -m benchmarks.codec_speed --device cuda --dtype bf16 --batch-size 4
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from benchmarks.measure import (
    PeakMemory,
    add_device_args,
    count_flops,
    device_and_dtype,
    is_out_of_memory,
    matmul_probe,
    result_name,
)
from benchmarks.report import (
    device_label,
    markdown_table,
    save_figure,
    synchronize,
    write_results,
)
from latent_vae import LatentCodec, build_vae
from latent_vae.models.presets import downsampling_factor

NAME = "codec_speed"
GOAL_RATIO, GOAL_PEAK, GOAL_RESOLUTION = 1.3, 0.85, 512
CPU_MAX_GFLOP = 1200.0  # keeps the CPU run to minutes: f8c4's 512x512 decode (2.5 TFLOP) is counted, not run


def make_variants(preset: str, device: torch.device, dtype: torch.dtype, batch: int) -> dict[str, tuple]:
    """name -> (encode(pixels), decode(latents)) on identical weights."""
    plain = build_vae(preset, seed=0).to(device, dtype).eval()

    def plain_encode(x):
        with torch.no_grad():
            return plain.encode(x.to(dtype)).latent_dist.mode()

    def plain_decode(z):
        with torch.no_grad():
            return plain.decode(z.to(dtype)).sample

    def codec(channels_last: bool) -> LatentCodec:
        return LatentCodec(build_vae(preset, seed=0), device=device, dtype=dtype,
                           max_batch_size=batch, channels_last=channels_last)

    nchw, nhwc = codec(False), codec(True)
    return {
        "diffusers": (plain_encode, plain_decode),
        "LatentCodec NCHW": (nchw.encode, nchw.decode),
        "LatentCodec NHWC": (nhwc.encode, nhwc.decode),
    }


def check_same_outputs(variants: dict, device: torch.device, dtype: torch.dtype, latent_channels: int) -> float:
    """Largest difference between the variants' decoded images on a small input. In fp32 they must agree
    (a speed-up that changes the outputs is a bug); in bf16/fp16 rounding differs, so it is only reported."""
    torch.manual_seed(0)
    z = torch.randn(1, latent_channels, 4, 4, device=device)
    outputs = [decode(z).float().clamp(-1, 1) for _, decode in variants.values()]
    worst = max((o - outputs[0]).abs().max().item() for o in outputs[1:])
    if dtype == torch.float32 and worst > 1e-4:
        raise AssertionError(f"variants disagree by {worst:.2e} in fp32: a speed-up changed the outputs")
    return worst


def compare(fns: dict, device, gflop: float, max_gflop: float, probe) -> tuple[dict, float | None]:
    """(name -> (seconds, peak MiB, status), matmul peak GFLOP/s). The variants and a matmul probe run in
    turns, round after round, and each keeps its fastest round: on a shared machine the load drifts, and
    turns expose every variant (and the peak they are compared with) to the same drift, while the fastest
    round is the one least slowed by other processes."""
    if gflop > max_gflop:
        return {name: (None, None, "too big") for name in fns}, None
    matmul_peak = 0.0
    warmup, rounds = (1, 3) if gflop < max_gflop / 10 else (0, 2)
    best: dict[str, float] = {name: math.inf for name in fns}
    peak: dict[str, float | None] = {name: None for name in fns}
    status = {name: "ok" for name in fns}
    for round_index in range(warmup + rounds):
        matmul_peak = max(matmul_peak, probe(1.0))
        for name, fn in fns.items():
            if status[name] != "ok":
                continue
            try:
                with PeakMemory(device) as memory:
                    start = time.perf_counter()
                    fn()
                    synchronize(device)
                    seconds = time.perf_counter() - start
            except (RuntimeError, torch.OutOfMemoryError) as error:
                if not is_out_of_memory(error):
                    raise
                status[name] = "OOM"
                continue
            if round_index >= warmup:
                best[name] = min(best[name], seconds)
                peak[name] = max(peak[name] or 0.0, memory.mib or 0.0) if memory.mib is not None else None
    matmul_peak = max(matmul_peak, probe(1.0))
    return {name: (best[name] if status[name] == "ok" else None, peak[name], status[name]) for name in fns}, matmul_peak


def main(args: argparse.Namespace) -> None:
    device, dtype = device_and_dtype(args)
    max_gflop = args.max_gflop if args.max_gflop is not None else (math.inf if device.type == "cuda" else CPU_MAX_GFLOP)
    probe = matmul_probe(device, dtype)
    peaks: list[float] = []
    rows, agreement = [], {}
    for preset in args.presets:
        with torch.device("meta"):
            meta = build_vae(preset)
        factor = downsampling_factor(meta.config.block_out_channels)
        channels = int(meta.config.latent_channels)
        variants = make_variants(preset, device, dtype, args.batch_size)
        agreement[preset] = check_same_outputs(variants, device, dtype, channels)
        print(f"{preset}: variants agree within {agreement[preset]:.1e}", flush=True)
        for resolution in args.resolutions:
            batch, side = args.batch_size, resolution // factor
            x = torch.rand(batch, 3, resolution, resolution, device=device) * 2 - 1
            z = torch.randn(batch, channels, side, side, device=device)
            with torch.no_grad():
                gflop = {
                    "encode": count_flops(lambda: meta.encode(torch.empty(x.shape, device="meta"))) / 1e9,
                    "decode": count_flops(lambda: meta.decode(torch.empty(z.shape, device="meta"))) / 1e9,
                }
            for stage in ("encode", "decode"):
                fns = {
                    name: (lambda encode=encode: encode(x)) if stage == "encode" else (lambda decode=decode: decode(z))
                    for name, (encode, decode) in variants.items()
                }
                results, matmul_peak = compare(fns, device, gflop[stage], max_gflop, probe)
                if matmul_peak:
                    peaks.append(matmul_peak)
                base = results["diffusers"][0]
                if matmul_peak is None:  # not run: one row carries the FLOP count
                    results = {"all variants": (None, None, "too big")}
                for name, (seconds, mib, status) in results.items():
                    row = {
                        "preset": preset, "resolution": resolution, "stage": stage, "variant": name,
                        "GFLOP/image": gflop[stage] / batch,
                        "images/s": batch / seconds if seconds else None,
                        "peak MiB": mib,
                        "GFLOP/s": gflop[stage] / seconds if seconds else None,
                        "x diffusers": base / seconds if seconds and base else None,
                        "% of matmul peak": gflop[stage] / seconds / matmul_peak * 100 if seconds else None,
                        "matmul peak GFLOP/s": matmul_peak,
                        "status": status,
                    }
                    rows.append(row)
                    print(row, flush=True)
    peak = max(peaks) if peaks else probe(3.0)  # for the plot: the best the machine showed in this run

    notes = build_notes(rows, peak, peaks, device, dtype, args, agreement)
    table_rows = [{k: ("-" if v is None else v) for k, v in row.items()} for row in rows]
    write_results(
        result_name(NAME, device), table_rows, notes=notes,
        columns=["preset", "resolution", "stage", "variant", "GFLOP/image", "images/s", "peak MiB", "GFLOP/s",
                 "% of matmul peak", "x diffusers", "status"],
        extra={"args": vars(args), "device": device_label(device), "dtype": str(dtype),
               "matmul_peak_gflops": peak, "matmul_peak_samples": peaks, "max_output_difference": agreement},
    )
    plot(rows, peak, device)


def build_notes(rows, peak, peaks, device, dtype, args, agreement: dict[str, float]) -> str:
    lines = [
        f"{device_label(device)}, {str(dtype).replace('torch.', '')}, batch {args.batch_size}. Times: the fastest "
        "of 2-3 rounds in which the variants and a square-matmul probe take turns (the machine is shared); "
        "'% of matmul peak' compares with the best matmul of the same rounds (over the run: "
        f"{min(peaks, default=0):.0f} to {peak:.0f} GFLOP/s). 'too big': not run here (more than {args.max_gflop or CPU_MAX_GFLOP:g} "
        "GFLOP a call on CPU); FLOPs are still counted. Largest difference between the variants' decoded images "
        f"(range [-1, 1]): {', '.join(f'{k} {v:.1e}' for k, v in agreement.items())}.",
        "",
        "Goals (this CPU, fp32): LatentCodec >= 1.3x plain diffusers at 512x512, and >= 85% of the matmul peak.",
        "",
    ]
    goal_rows = [r for r in rows if r["resolution"] == GOAL_RESOLUTION and r["variant"] != "diffusers" and r["x diffusers"]]
    summary = [
        {"preset": r["preset"], "stage": r["stage"], "variant": r["variant"], "x diffusers": r["x diffusers"],
         "% of peak": r["% of matmul peak"],
         "goals met": "yes" if r["x diffusers"] >= GOAL_RATIO and r["% of matmul peak"] >= GOAL_PEAK * 100 else "no"}
        for r in goal_rows
    ]
    if summary:
        lines += [f"At {GOAL_RESOLUTION}x{GOAL_RESOLUTION}:", "", markdown_table(summary)]
    return "\n".join(lines)


def plot(rows, peak, device) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if r["GFLOP/s"]]
    if not measured:
        print("nothing was run here: no plot")
        return
    labels = [f"{r['preset']} {r['resolution']}\n{r['stage']}" for r in measured if r["variant"] == "diffusers"]
    variants = list(dict.fromkeys(r["variant"] for r in measured))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(labels)) + 2.5, 4.2))
    width = 0.8 / len(variants)
    for i, variant in enumerate(variants):
        values = [r["% of matmul peak"] for r in measured if r["variant"] == variant]
        ax.bar([j + i * width for j in range(len(values))], values, width, label=variant)
    ax.axhline(100, color="gray", linestyle=":", label=f"matmul peak (best {peak:.0f} GFLOP/s)")
    ax.axhline(GOAL_PEAK * 100, color="red", linestyle=":", label=f"{GOAL_PEAK:.0%} of peak (goal)")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels, fontsize=8)
    ax.set(ylabel="% of the matmul peak", title=f"VAE encode/decode throughput ({device_label(device)})")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    save_figure(fig, result_name(NAME, device))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_args(parser)
    parser.add_argument("--presets", nargs="+", default=["f16c16", "f8c4"])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--max-gflop", type=float, default=None,
                        help=f"largest call to actually run (default: {CPU_MAX_GFLOP:g} on CPU, no limit on CUDA)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
