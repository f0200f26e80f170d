"""Exact tiling against whole-image coding and diffusers' `enable_tiling()`: error, time, peak memory.

Every case runs in a fresh subprocess (so that peak resident sets do not mix) on the same weights and input:
- `whole`: whole-image coding, diffusers' own forward (`vae._encode` / `vae._decode`) in the codec's CPU layout
  (channels_last), the reference;
- `layout`: the same whole-image forward in the other memory layout (contiguous NCHW): the same function in
  another fp32 summation order, the yardstick for "exact";
- `keep` / `recompute`: this project's exact tiles (`latent_vae.codec.tiling`), every tileable level forced to
  that strategy, tiles of `--tile-size`;
- `budget`: what `plan_coding` picks for `--max-memory`;
- `diffusers`: `vae.enable_tiling()` with 512-pixel tiles and its default 25% overlap (blended).
The errors are max and mean |x - whole| (decoded images in [-1, 1], or posterior moments) and the relative L2
error. Time is wall seconds and, on CPU, the case process's CPU seconds (user + system), which the load of a
shared machine moves much less; a method may be listed twice (`--methods whole keep whole keep`), each row then
compared with the `whole` row before it. Weights are each preset's fresh random weights (seed 0) unless
`--model` names trained ones: random weights exaggerate diffusers' error (its per-tile GroupNorm statistics
differ more), not this project's.

    python -m benchmarks.tiling                          # f16c16 and f8c4 at 1024 and 2048, CPU
    python -m benchmarks.tiling --decode-4096            # f16c16: 16x256x256 -> 4096x4096 in a 7 GiB budget
    python -m benchmarks.tiling --device cuda --dtype bf16 --sizes 4096 8192
    python -m benchmarks.tiling --threads 1 --directions decode --methods whole keep whole keep  # two rounds
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.measure import add_device_args, device_and_dtype, result_name
from benchmarks.report import device_label, save_figure, synchronize, write_results

NAME = "tiling"
METHODS = ("whole", "layout", "keep", "recompute", "diffusers")
DIFFUSERS_TILE = 512


def _input(direction: str, vae, size: int, seed: int, image: str | None) -> torch.Tensor:
    """A photo (enlarged to size x size) to encode, or a fixed random latent to decode."""
    from latent_vae.models.presets import downsampling_factor

    generator = torch.Generator().manual_seed(seed)
    if direction == "decode":
        f = downsampling_factor(vae.config.block_out_channels)
        return torch.randn(1, vae.config.latent_channels, size // f, size // f, generator=generator)
    if image:
        import numpy as np
        from PIL import Image

        picture = Image.open(image).convert("RGB").resize((size, size), Image.BICUBIC)
        return torch.from_numpy(np.asarray(picture)).permute(2, 0, 1)[None].float() / 127.5 - 1
    return torch.rand(1, 3, size, size, generator=generator) * 2 - 1


def _cpu_seconds() -> float:
    """CPU time this process has used (user + system): on a shared machine it varies much less than wall time."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_case(args: argparse.Namespace) -> None:
    """One case in this process: prints one JSON line (seconds, peak RSS, plan) and saves the output."""
    from safetensors.torch import save_file

    from latent_vae import load_vae
    from latent_vae.codec.latent_codec import _inplace_resnets
    from latent_vae.codec.tiling import decode_exact, encode_exact, plan_coding

    device, dtype = device_and_dtype(args)
    vae = load_vae(args.model, seed=0).to(device, dtype).eval().requires_grad_(False)
    _inplace_resnets(vae)  # as LatentCodec runs it
    memory_format = torch.channels_last if device.type == "cpu" else torch.contiguous_format
    if args.method == "layout":
        memory_format = torch.contiguous_format if device.type == "cpu" else torch.channels_last
    vae = vae.to(memory_format=memory_format)
    x = _input(args.direction, vae, args.size, args.seed, args.image).to(device, dtype)
    x = x.contiguous(memory_format=memory_format)
    plan = None
    if args.method in ("keep", "recompute", "budget"):
        forced = {} if args.method == "budget" else {"tile_size": args.tile_size, "strategy": args.method}
        plan = plan_coding(vae, args.direction, tuple(x.shape), dtype=dtype, device=device,
                           max_memory=args.max_memory, **forced)
    if args.method == "diffusers":
        vae.enable_tiling()
        f = 2 ** (len(vae.config.block_out_channels) - 1)
        vae.tile_sample_min_size, vae.tile_latent_min_size = DIFFUSERS_TILE, DIFFUSERS_TILE // f
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start, start_cpu = time.perf_counter(), _cpu_seconds()
    with torch.inference_mode():
        if plan is not None and not plan.whole:
            out = (encode_exact if args.direction == "encode" else decode_exact)(vae, x, plan)
        elif args.direction == "encode":
            out = vae._encode(x)
        else:
            out = vae._decode(x).sample
        synchronize(device)
    seconds, cpu_seconds = time.perf_counter() - start, _cpu_seconds() - start_cpu
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if args.out:
        save_file({"out": out.float().contiguous().cpu()}, args.out)
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_mib": peak, "rss_before_mib": base_rss,
                      "plan": plan.describe() if plan else ("diffusers tiles" if args.method == "diffusers" else
                                                             "whole image"),
                      "strategies": list(plan.strategies) if plan else None}))


def spawn(args: argparse.Namespace, **case) -> dict:
    """Run one case in a fresh interpreter; returns its JSON line (plus `error` if it failed)."""
    command = [sys.executable, "-m", "benchmarks.tiling", "--case", "--device", args.device, "--dtype", args.dtype]
    if args.threads:
        command += ["--threads", str(args.threads)]
    for key, value in case.items():
        if value is not None:
            command += [f"--{key.replace('_', '-')}", str(value)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=args.case_timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"not finished in {args.case_timeout:g} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(lines[-1])


def _load(path: str) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(path)["out"]


def errors(out: torch.Tensor, reference: torch.Tensor) -> dict:
    diff = (out - reference).double()
    return {"max_err": diff.abs().max().item(), "mean_err": diff.abs().mean().item(),
            "rel_l2": (diff.norm() / reference.double().norm()).item()}


def seam_figure(whole: torch.Tensor, diffusers: torch.Tensor, exact: torch.Tensor, tile: int, stem: str, label: str):
    """whole | diffusers' tiles | exact tiles around a tile corner, with |difference| maps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y = x = tile * 7 // 8  # inside the blend band where four of diffusers' tiles meet (stride 3/4 tile)
    half = 96
    def crop(t):
        return t[0, :, y - half : y + half, x - half : x + half].permute(1, 2, 0).clamp(-1, 1).add(1).div(2).numpy()
    def err(t):
        return (t - whole)[0].abs().amax(0)[y - half : y + half, x - half : x + half].numpy()
    fig, axes = plt.subplots(1, 5, figsize=(17, 3.8))
    panels = [(crop(whole), "whole image"), (crop(diffusers), "diffusers enable_tiling"),
              (crop(exact), "exact tiles (this project)")]
    for ax, (picture, title) in zip(axes, panels):
        ax.imshow(picture)
        ax.set_title(title)
    vmax = max(err(diffusers).max(), 1e-6)
    for ax, (t, title) in zip(axes[3:], [(diffusers, "|diffusers - whole|"), (exact, "|exact - whole|")]):
        image = ax.imshow(err(t), cmap="magma", vmin=0, vmax=vmax)
        ax.set_title(f"{title}, max {err(t).max():.2g}")
        fig.colorbar(image, ax=ax, fraction=0.046)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(label)
    save_figure(fig, stem)


def main(args: argparse.Namespace) -> None:
    device, _ = device_and_dtype(args)
    if args.decode_4096:
        return decode_4096(args, device)
    rows, drawn = [], False
    scratch = Path(tempfile.mkdtemp(prefix="tiling-bench-"))
    for preset in args.presets:
        for size in args.sizes:
            for direction in args.directions:
                outputs = {}
                for method in args.methods:
                    path = scratch / f"{Path(preset).name}-{size}-{direction}-{method}.safetensors"  # a preset or a model folder
                    result = spawn(args, model=preset, size=size, direction=direction, method=method,
                                   tile_size=args.tile_size, max_memory=args.max_memory, image=args.image,
                                   out=path)
                    row = {"model": preset, "size": size, "direction": direction, "method": method,
                           "seconds": result.get("seconds"), "cpu_seconds": result.get("cpu_seconds"),
                           "peak_MiB": result.get("peak_mib"), "plan": result.get("plan", result.get("error"))}
                    if "error" not in result:
                        outputs[method] = _load(path)
                        path.unlink()
                    if method != "whole" and method in outputs and "whole" in outputs:
                        row.update(errors(outputs[method], outputs["whole"]))
                    if "whole" in outputs and row.get("seconds") and method != "whole":
                        whole_row = next(r for r in rows[::-1] if r["method"] == "whole")
                        row["x_whole_time"] = row["seconds"] / whole_row["seconds"] if whole_row["seconds"] else None
                        if row.get("cpu_seconds") and whole_row.get("cpu_seconds"):
                            row["x_whole_cpu"] = row["cpu_seconds"] / whole_row["cpu_seconds"]
                    rows.append(row)
                    print(row, flush=True)
                    write(args, device, rows)  # after every case, so that a cut-short run still leaves its rows
                if (direction == "decode" and {"whole", "diffusers", "recompute"} <= set(outputs) and not drawn
                        and size >= 2 * DIFFUSERS_TILE):  # the figure shows where four of diffusers' tiles meet
                    drawn = True
                    seam_figure(outputs["whole"], outputs["diffusers"], outputs["recompute"], DIFFUSERS_TILE,
                                result_name(f"{args.name}_seams", device),
                                f"{preset} decode at {size}x{size} ({args.model_note}): where four of diffusers' "
                                f"{DIFFUSERS_TILE}-px tiles meet")


def _peak_meaning(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated (model, input and output included; kept tiles live in host memory)"
    return "the process's peak resident set (model and input included)"


def command_line() -> str:
    """How this run was started, for its results file."""
    return shlex.join(["python", "-m", "benchmarks.tiling", *sys.argv[1:]])


def write(args: argparse.Namespace, device: torch.device, rows: list[dict]) -> None:
    notes = (f"{device_label(device)}, {args.dtype}. Exact tiles: {args.tile_size}-px tiles, every tileable level "
             f"forced to keep or recompute; diffusers: enable_tiling() with {DIFFUSERS_TILE}-px tiles, 25% overlap. "
             f"Weights: {args.model_note}. Each case a fresh process; peak = {_peak_meaning(device)}. "
             + ("The CPU is shared with other jobs: compare times within this run only; cpu_seconds (the case "
                "process's user + system time) varies less with the load than seconds." if device.type == "cpu"
                else "Times include the host copies of kept tiles, not process start-up or model loading."))
    write_results(result_name(args.name, device), rows, notes=f"{notes} Command: `{command_line()}`.",
                  extra={"command": command_line()},
                  columns=["model", "size", "direction", "method", "seconds", "x_whole_time", "cpu_seconds",
                           "x_whole_cpu", "peak_MiB", "max_err", "mean_err", "rel_l2", "plan"])


def decode_4096(args: argparse.Namespace, device: torch.device) -> None:
    """The full f16c16 decoding a 16x256x256 latent into a 4096x4096 image under a budget (whole would need ~50 GB)."""
    result = spawn(args, model="f16c16", size=4096, direction="decode", method="budget", max_memory=args.max_memory)
    row = {"model": "f16c16", "size": 4096, "direction": "decode", "method": f"budget {args.max_memory}",
           "seconds": result.get("seconds"), "peak_MiB": result.get("peak_mib"),
           "plan": result.get("plan", result.get("error"))}
    notes = (f"{device_label(device)}, {args.dtype}, random weights (seed 0), a random 16x256x256 latent. Peak = "
             "the fresh process's peak resident set (model, latent and output included). The CPU is shared with "
             "other jobs, so the time is an upper bound for an idle machine.")
    write_results(result_name(f"{NAME}_4096", device), [row], notes=notes)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_args(parser)
    parser.add_argument("--presets", nargs="+", default=["f16c16", "f8c4"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[1024, 2048])
    parser.add_argument("--directions", nargs="+", default=["encode", "decode"], choices=["encode", "decode"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=[*METHODS, "budget"],
                        help="budget: what plan_coding picks for --max-memory (not run by default)")
    parser.add_argument("--case-timeout", type=float, default=None, help="give up a case after this many seconds")
    parser.add_argument("--name", default=NAME, help="results file stem (default: tiling)")
    parser.add_argument("--tile-size", type=int, default=512, help="exact tiles' side in pixels (default: 512)")
    parser.add_argument("--max-memory", default="7GiB", help="budget for --decode-4096 and the budget method")
    parser.add_argument("--image", default=None, help="a photo to encode (enlarged); default: uniform noise")
    parser.add_argument("--model-note", default="random weights (seed 0)", help="how the weights were made")
    parser.add_argument("--decode-4096", action="store_true", help="only the 4096x4096 f16c16 decode in a budget")
    # one case, in a child process
    parser.add_argument("--case", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="f16c16", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=1024, help=argparse.SUPPRESS)
    parser.add_argument("--direction", default="decode", help=argparse.SUPPRESS)
    parser.add_argument("--method", default="whole", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.case:
        run_case(arguments)
    else:
        main(arguments)
