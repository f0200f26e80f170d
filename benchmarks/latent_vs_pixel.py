"""What latent space buys: one diffusion UNet in pixel space (3xRxR) and in latent space (16xR/16xR/16).

For each resolution: FLOPs per step (counted on the meta device, so every size is counted), forward time
per step, training step time and peak memory where a size is cheap enough to run on this device, the
VAE decode, and end-to-end sampling (N steps + one decode against N pixel steps). Speed-ups are set beside
the common claim that latent diffusion is about 50x cheaper than pixel diffusion.

    python -m benchmarks.latent_vs_pixel                                  # CPU: a few minutes
    python -m benchmarks.latent_vs_pixel --device cuda --dtype bf16 --batch-size 4   # GPU: runs every size
    python -m benchmarks.latent_vs_pixel --device cuda --dtype bf16 --batch-size 4 --cuda-graphs  # steps as graphs
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch
from diffusers import DDPMScheduler

from benchmarks.measure import (
    PeakMemory,
    add_device_args,
    count_flops,
    device_and_dtype,
    is_out_of_memory,
    result_name,
)
from benchmarks.report import (
    device_label,
    markdown_table,
    save_figure,
    synchronize,
    write_results,
)
from latent_vae import build_vae
from latent_vae.models.presets import downsampling_factor
from latent_vae.pipeline import LatentDiffusionPipeline, build_unet, denoising_step

CLAIM = 50.0  # "latent diffusion is ~50x faster than pixel diffusion"
NAME = "latent_vs_pixel"


def stem(args: argparse.Namespace) -> str:
    """The results' name: eager and graphed steps are kept apart."""
    return NAME + ("_graphs" if args.cuda_graphs else "")


def timing_plan(gflop: float, max_gflop: float) -> tuple[int, int] | None:
    """(warmup, repeats) for a call of `gflop`, or None when it is too big to run here."""
    if gflop > max_gflop:
        return None
    # Small calls: warm up and keep the fastest of 5. Calls near the limit: one timed call (a warm-up would
    # double the cost; on CPU the first call's extra set-up is small against seconds of compute).
    return (1, 5) if gflop < max_gflop / 10 else (0, 1)


def measure(fn, device: torch.device, gflop: float, max_gflop: float) -> tuple[float | None, float | None, str]:
    """(seconds, peak MiB, status) of `fn()`; status is "ok", "too big" (not run) or "OOM".

    The fastest repeat, not the median: on a shared machine other processes only ever add time, and they
    hurt a latent step (many small kernels) far more than a pixel step (few large ones)."""
    plan = timing_plan(gflop, max_gflop)
    if plan is None:
        return None, None, "too big"
    warmup, repeats = plan
    try:
        with PeakMemory(device) as memory:
            for _ in range(warmup):
                fn()
            times = []
            for _ in range(repeats):
                synchronize(device)
                start = time.perf_counter()
                fn()
                synchronize(device)
                times.append(time.perf_counter() - start)
    except (RuntimeError, torch.OutOfMemoryError) as error:
        if not is_out_of_memory(error):
            raise
        torch.cuda.empty_cache() if device.type == "cuda" else None
        return None, None, "OOM"
    return min(times), memory.mib, "ok"


def cuda_graph(unet, x: torch.Tensor, t: torch.Tensor):
    """`unet(x, t)` captured once as a CUDA graph; returns its replay. A small UNet's step is a few hundred short
    kernels: launched one by one from Python its time is the launches', not the GPU's work."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.inference_mode():
        for _ in range(3):  # warm-up outside the capture: cuDNN/cuBLAS choose their kernels and workspaces
            unet(x, t)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode():
        unet(x, t)
    return graph.replay


def unet_flops(unet_meta, channels: int, side: int, batch: int) -> tuple[float, float]:
    """GFLOP of one forward and of one training step (forward + backward), counted on the meta device."""
    x = torch.empty(batch, channels, side, side, device="meta")
    t = torch.zeros(batch, dtype=torch.long, device="meta")
    with torch.no_grad():
        forward = count_flops(lambda: unet_meta(x, t))
    training = count_flops(lambda: unet_meta(x, t).sample.float().square().mean().backward())
    return forward / 1e9, training / 1e9


def main(args: argparse.Namespace) -> None:
    device, dtype = device_and_dtype(args)
    if args.cuda_graphs and device.type != "cuda":
        raise SystemExit("--cuda-graphs needs a CUDA device")
    autocast = dtype if dtype != torch.float32 else None
    max_gflop = args.max_gflop if args.max_gflop is not None else (math.inf if device.type == "cuda" else 2500.0)
    vae = build_vae(args.vae, seed=0)
    factor = downsampling_factor(vae.config.block_out_channels)
    latent_channels = int(vae.config.latent_channels)

    # One UNet configuration for both spaces: only conv_in/conv_out differ (3 vs 16 channels).
    spaces = {"pixel": (3, 1), "latent": (latent_channels, factor)}
    unets, metas, inference_unets = {}, {}, {}
    for space, (channels, _) in spaces.items():
        unets[space] = build_unet(channels, 64, seed=0).to(device)
        with torch.device("meta"):
            metas[space] = build_unet(channels, 64)
        # Inference runs in the benchmark dtype, as pipelines load with torch_dtype; training keeps fp32 weights.
        inference_unets[space] = copy.deepcopy(unets[space]).to(dtype).eval() if autocast else unets[space].eval()
    with torch.device("meta"):
        vae_meta = build_vae(args.vae)
    pipe = LatentDiffusionPipeline(unet=inference_unets["latent"], scheduler=DDPMScheduler(), vae=vae.to(device, dtype))
    scheduler = DDPMScheduler()

    rows, summary = [], []
    for resolution in args.resolutions:
        if resolution % (factor * 8):
            raise ValueError(f"resolution must be a multiple of {factor * 8}, got {resolution}")
        result: dict[str, dict] = {}
        for space, (channels, down) in spaces.items():
            side, batch = resolution // down, args.batch_size
            fwd_gflop, train_gflop = unet_flops(metas[space], channels, side, batch)
            x = torch.randn(batch, channels, side, side, device=device)
            t = torch.full((batch,), 500, device=device, dtype=torch.long)
            unet = inference_unets[space]

            if args.cuda_graphs:
                forward = cuda_graph(unet, x.to(unet.dtype), t)
            else:
                def forward():
                    with torch.inference_mode():
                        unet(x.to(unet.dtype), t)

            optimizer = torch.optim.AdamW(unets[space].parameters(), lr=1e-5)
            generator = torch.Generator("cpu").manual_seed(0)

            def train():
                denoising_step(unets[space], scheduler, optimizer, x, None, generator, autocast)

            fwd_s, fwd_mib, fwd_status = measure(forward, device, fwd_gflop, max_gflop)
            train_s, train_mib, train_status = ((None, None, fwd_status) if args.no_train else
                                                measure(train, device, train_gflop, max_gflop))
            row = {
                "resolution": resolution, "space": space, "input": f"{batch}x{channels}x{side}x{side}",
                "step GFLOP": fwd_gflop, "step s": fwd_s, "step MiB": fwd_mib,
                "train GFLOP": train_gflop, "train s": train_s, "train MiB": train_mib,
                "status": fwd_status if fwd_status == train_status else f"step {fwd_status}, train {train_status}",
            }
            if space == "latent":
                z = torch.randn(batch, latent_channels, side, side, device=device)
                with torch.no_grad():
                    decode_gflop = count_flops(lambda: vae_meta.decode(torch.empty(z.shape, device="meta"))) / 1e9

                def decode():
                    with torch.inference_mode():
                        pipe.decode_latents(z)

                decode_s, decode_mib, decode_status = measure(decode, device, decode_gflop, max_gflop)
                row.update({"decode GFLOP": decode_gflop, "decode s": decode_s, "decode MiB": decode_mib})
                if decode_status != "ok":
                    row["status"] += f", decode {decode_status}"
                row["e2e GFLOP"] = args.steps * fwd_gflop + decode_gflop
                row["e2e s"] = args.steps * fwd_s + decode_s if fwd_s is not None and decode_s is not None else None
                row["decode share (FLOPs)"] = decode_gflop / row["e2e GFLOP"]
                row["decode share (time)"] = decode_s / row["e2e s"] if row["e2e s"] else None
            else:
                row["e2e GFLOP"] = args.steps * fwd_gflop
                row["e2e s"] = args.steps * fwd_s if fwd_s is not None else None
            result[space] = row
            rows.append(row)
            print({k: v for k, v in row.items()}, flush=True)

        pixel, latent = result["pixel"], result["latent"]

        def ratio(key: str) -> float | None:
            a, b = pixel.get(key), latent.get(key)
            return a / b if a is not None and b else None

        summary.append({
            "resolution": resolution,
            "step FLOPs x": ratio("step GFLOP"), "step time x": ratio("step s"),
            "train time x": ratio("train s"), "train memory x": ratio("train MiB"),
            f"e2e FLOPs x ({args.steps} steps)": ratio("e2e GFLOP"), f"e2e time x ({args.steps} steps)": ratio("e2e s"),
            "decode share of latent e2e (FLOPs)": latent["decode share (FLOPs)"],
            "decode share (time)": latent["decode share (time)"],
        })

    notes = build_notes(args, device, dtype, summary, max_gflop)
    # "-": not measured here (see status); JSON keeps the same cells as the table.
    rows = [{k: ("-" if v is None else v) for k, v in row.items()} for row in rows]
    write_results(
        result_name(stem(args), device), rows, notes=notes,
        columns=["resolution", "space", "input", "step GFLOP", "step s", "step MiB", "train s", "train MiB",
                 "decode GFLOP", "decode s", "e2e GFLOP", "e2e s", "status"],
        extra={"args": vars(args), "device": device_label(device), "dtype": str(dtype), "summary": summary,
               "claim": CLAIM},
    )
    plot(rows, summary, args, device)


def build_notes(args, device, dtype, summary: list[dict], max_gflop: float) -> str:
    lines = [
        f"UNet2DModel (128,256,256,512), 2 layers per block, attention at the two lowest levels; VAE `{args.vae}`; "
        f"batch {args.batch_size}; {device_label(device)}, {str(dtype).replace('torch.', '')} "
        "(inference in that dtype, training with fp32 weights under autocast). "
        + ("Sampling steps are replayed CUDA graphs (captured once per shape); training and decode run eagerly. "
           if args.cuda_graphs else "")
        + "FLOPs are counted by `torch.utils.flop_counter` on the meta device for every size; times (the fastest "
        "of up to 5 repeats: the machine may be shared) and memory only where a call costs at most "
        f"{max_gflop:g} GFLOP ('too big' otherwise). End-to-end = N x measured "
        "step + one measured decode (the scheduler's arithmetic is negligible). Peak memory: what the call adds "
        "above the weights (CUDA allocator peak; on CPU the resident-set peak); for training that includes the "
        "gradients and AdamW state (a fresh optimiser per measurement), the same for both spaces. Pixel/latent ratios:",
        "",
        markdown_table([{k: ("-" if v is None else v) for k, v in row.items()} for row in summary]),
        "",
    ]
    for row in summary:
        by_time = row.get(f"e2e time x ({args.steps} steps)")
        e2e = by_time or row[f"e2e FLOPs x ({args.steps} steps)"]
        kind = "measured time" if by_time else "FLOPs"
        share_time, share_flops = row["decode share (time)"], row["decode share of latent e2e (FLOPs)"]
        share = share_time if share_time is not None else share_flops
        verdict = "above" if e2e >= CLAIM else "below"
        dominated = "; the VAE decode dominates the latent run" if share >= 0.5 else ""
        lines.append(
            f"- {row['resolution']}x{row['resolution']}: end-to-end {e2e:,.0f}x by {kind}, {verdict} the "
            f"~{CLAIM:g}x claim; the decode is {share:.0%} of the latent run "
            f"({'time' if share_time is not None else 'FLOPs'}){dominated}."
        )
    return "\n".join(lines)


def plot(rows: list[dict], summary: list[dict], args, device) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_flops, ax_x) = plt.subplots(1, 2, figsize=(11, 4.2))
    for space, marker in (("pixel", "o"), ("latent", "s")):
        points = [r for r in rows if r["space"] == space]
        ax_flops.plot([r["resolution"] for r in points], [r["step GFLOP"] for r in points], marker=marker,
                      label=f"{space}: GFLOP per step")
        timed = [r for r in points if isinstance(r["step s"], float)]
        if timed:
            ax_flops.plot([r["resolution"] for r in timed], [r["step s"] * 1e3 for r in timed], marker=marker,
                          linestyle="--", label=f"{space}: ms per step (measured)")
    ax_flops.plot([r["resolution"] for r in rows if r["space"] == "latent"],
                  [r["decode GFLOP"] for r in rows if r["space"] == "latent"], marker="^", label="VAE decode GFLOP")
    ax_flops.set(xscale="log", yscale="log", xlabel="image side (pixels)", title="cost of one UNet step")
    ax_flops.set_xticks(args.resolutions, [str(r) for r in args.resolutions])
    ax_flops.legend(fontsize=8)
    resolutions = [s["resolution"] for s in summary]
    for key, marker in ((f"e2e FLOPs x ({args.steps} steps)", "o"), (f"e2e time x ({args.steps} steps)", "s"),
                        ("step FLOPs x", "v"), ("step time x", "^")):
        points = [(r, s[key]) for r, s in zip(resolutions, summary) if s.get(key)]
        if points:
            ax_x.plot(*zip(*points), marker=marker, label=key)
    ax_x.axhline(CLAIM, color="gray", linestyle=":", label=f"the ~{CLAIM:g}x claim")
    ax_x.set(xscale="log", yscale="log", xlabel="image side (pixels)", ylabel="pixel / latent",
             title=f"latent speed-up ({device_label(device)})")
    ax_x.set_xticks(resolutions, [str(r) for r in resolutions])
    ax_x.legend(fontsize=8)
    save_figure(fig, result_name(stem(args), device))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_args(parser)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[128, 256, 512, 1024])
    parser.add_argument("--steps", type=int, default=50, help="sampling steps for the end-to-end comparison")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--vae", default="f16c16", help="VAE preset (its widths set the decode cost)")
    parser.add_argument("--no-train", action="store_true", help="time sampling steps and decodes only")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="time each sampling step as a replayed CUDA graph (no Python launch cost; "
                        "results: latent_vs_pixel_graphs_cuda)")
    parser.add_argument("--max-gflop", type=float, default=None,
                        help="largest call to actually run (default: 2500 on CPU, no limit on CUDA)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
