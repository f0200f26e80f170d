"""What the scale-equivariance regulariser buys and costs: the README demo trained for the same number of steps
with and without it, each inspected on photos it never saw, beside the untrained thumbnail code it starts from.

Both arms run `python -m training.demo` (training/configs/cpu_demo.json) with the same seed, data and step
count; a fixed step count rather than the demo's time budget, because on a shared machine a time budget gives
the arm that happens to run beside less load more steps. `--parallel` runs the two side by side (one thread
each, so that they see the same contention), otherwise one after the other. Then every model is measured by
`latent_vae.inspection.report` on centre squares of the photos: the latent's high-frequency share (Skorokhodov et
al. 2025), scale-equivariance PSNR and reconstruction PSNR, and the page `latent-vae inspect` draws is written
to OUT/inspect/index.html.

    python -m benchmarks.diffusability --images $LATENT_VAE_PHOTOS/cbsd68 --steps 600 --parallel
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.report import photo_folder, write_results
from latent_vae import LatentCodec
from latent_vae.images.reading import centre_square, find_images, load_image, pil_to_tensor
from latent_vae.inspection.html import write_report
from latent_vae.inspection.report import ModelInspection, inspect_codec
from latent_vae.utils.atomic import atomic_write_text

NAME = "diffusability"
CODE = "f16c16-small-thumb"  # the demo's preset: fresh zero-init weights are its untrained thumbnail code


def demo_command(out: Path, steps: int, weight: float, factors: str, threads: int) -> list[str]:
    settings = [f"max_steps={steps}", f"torch_threads={threads}", f"scale_equivariance_weight={weight}",
                f"scale_equivariance_factors={factors}", "report_to=none"]
    return [sys.executable, "-m", "training.demo", "--out", str(out), "--minutes", "0", "--set", *settings]


RUN_RECORD = "benchmark_run.json"  # in each arm's folder: its command, wall time and load samples


def train_arms(arms: dict[str, float], args: argparse.Namespace) -> dict[str, dict]:
    """Run the demo once per arm (name -> regulariser weight), side by side with --parallel; returns each arm's
    command, wall time and load samples (the 1-minute load average every 10 s). An arm whose folder holds a
    finished run of the same command is reused, with the record of that run."""
    runs, pending = {}, []
    for name, weight in arms.items():
        out = args.out / name
        command = demo_command(out, args.steps, weight, args.factors, args.threads)[1:]  # without the interpreter
        record = out / RUN_RECORD
        if record.is_file() and json.loads(record.read_text())["command"] == command:
            runs[name] = {**json.loads(record.read_text()), "out": out, "reused": True}
            print(f"{name}: reusing the finished run in {out}", flush=True)
            continue
        runs[name] = {"command": command, "weight": weight, "out": out, "loads": [], "reused": False}
        pending.append(name)
    processes: dict[str, tuple[subprocess.Popen, object, float]] = {}
    beside = list(pending) if args.parallel else []  # the arms that train at the same time, sharing the machine
    while pending or processes:
        while pending and (args.parallel or not processes):
            name = pending.pop(0)
            run = runs[name]
            run["out"].mkdir(parents=True, exist_ok=True)
            print(f"training {name}: {' '.join(run['command'])}", flush=True)
            log = open(run["out"] / "train.log", "w")  # noqa: SIM115 (open while the arm runs, closed when it ends)
            process = subprocess.Popen([sys.executable, *run["command"]], stdout=log, stderr=subprocess.STDOUT)
            processes[name] = (process, log, time.monotonic())
        time.sleep(10)
        load = os.getloadavg()[0]
        for name in list(processes):
            process, log, started = processes[name]
            run = runs[name]
            run["loads"].append(load)
            if process.poll() is None:
                continue
            log.close()
            del processes[name]
            if process.returncode != 0:
                raise SystemExit(f"{name} failed (exit {process.returncode}): see {run['out'] / 'train.log'}")
            run["wall_seconds"] = time.monotonic() - started
            run["trained_beside"] = [other for other in beside if other != name]
            record = {key: run[key] for key in ("command", "weight", "loads", "wall_seconds", "trained_beside")}
            atomic_write_text(run["out"] / RUN_RECORD, json.dumps(record, indent=2))
            print(f"{name}: done in {run['wall_seconds'] / 60:.1f} min", flush=True)
    return runs


def load_photos(folder: Path, resolution: int, limit: int) -> tuple[torch.Tensor, list[str]]:
    paths = find_images(folder)[: limit or None]
    if len(paths) < 2:
        raise SystemExit(f"{folder}: fewer than 2 images")
    return torch.stack([pil_to_tensor(centre_square(load_image(p), resolution)) for p in paths]), [p.name for p in paths]


def row(label: str, inspection: ModelInspection, run: dict | None) -> dict:
    numbers = inspection.numbers
    equivariance = numbers["scale_equivariance"]
    result = {
        "model": label,
        "SE weight": run["weight"] if run else None,
        "steps": run["demo"]["train_steps"] if run else 0,
        "train min": run["demo"]["train_seconds"] / 60 if run else 0.0,
        "load (1 min avg)": f"{statistics.mean(run['loads']):.1f} ({min(run['loads']):.1f}-{max(run['loads']):.1f})"
        if run and run["loads"] else None,
        "latent HF share": numbers["spectrum"]["latent"]["high_frequency_share"],
        "image HF share": numbers["spectrum"]["image"]["high_frequency_share"],
        "SE PSNR 2x dB": equivariance.get("2x", {}).get("psnr_mean"),
        "SE PSNR 4x dB": equivariance.get("4x", {}).get("psnr_mean"),
        "recon PSNR dB": numbers["reconstruction"]["psnr_mean"],
        "recon SSIM": numbers["reconstruction"]["ssim_mean"],
        "bicubic PSNR dB": numbers["reconstruction"]["bicubic_psnr_mean"],
        "active ch": numbers["channels"]["active_count"],
    }
    return result


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    arms = {"without": 0.0, **{f"with_se_{w:g}": w for w in args.weights}}  # folder names under --out
    runs = train_arms(arms, args)
    images, names = load_photos(args.images, args.resolution, args.max_images)
    inspections, rows = [], []
    models = [(CODE + " untrained code", CODE, None)] + [(name, str(run["out"] / "train" / "vae"), run)
                                                          for name, run in runs.items()]
    for label, source, run in models:
        if run is not None:
            run["demo"] = json.loads((run["out"] / "demo_results.json").read_text())
        codec = LatentCodec.from_pretrained(source, device="cpu", max_batch_size=8)
        inspection = inspect_codec(codec, images, label=label, source=source)
        inspections.append(inspection)
        rows.append(row(label, inspection, run))
    write_report(args.out / "inspect", inspections, data=str(args.images), image_names=names,
                 resolution=args.resolution)
    company = "; ".join(f"{name} beside {', '.join(run['trained_beside']) or 'no other arm'}"
                        + (" (an earlier run of the same command)" if run["reused"] else "") for name, run in runs.items())
    notes = (
        f"The README demo (training/configs/cpu_demo.json: {CODE}, 64-pixel crops, so a 4x4 latent in training) "
        f"trained {args.steps} steps per arm, seed 0, {args.threads} torch thread(s) per arm ({company}); the "
        f"regulariser's factors {args.factors} (the pixel loss of the downsampled pairs, a weight of 1 counting as "
        f"much as the full-size reconstruction). "
        f"Inspected on {len(names)} photos of {args.images.name}, centre squares at {args.resolution}x{args.resolution} "
        f"(16x16 latents), none seen in training. HF share: energy above half Nyquist of the normalised latent "
        f"(white noise {inspections[0].numbers['spectrum']['white_noise_high_frequency_share']:.3f}); SE PSNR: "
        f"decode(downsample(z)) against downsample(x). Train min: the demo's training time (without its "
        f"evaluation). The machine was shared with other agents: the load column is the 1-minute load average "
        f"sampled every 10 s while each arm trained (mean, min-max), on {os.cpu_count()} cores."
    )
    # the photo folder by name only: where it lies on this machine is no result
    arguments = {**{k: str(v) for k, v in vars(args).items()}, "images": args.images.name}
    write_results(NAME, rows, notes=notes, extra={"args": arguments,
                                                  "commands": {n: r["command"] for n, r in runs.items()},
                                                  "wall_seconds": {n: r["wall_seconds"] for n, r in runs.items()},
                                                  "load_samples": {n: r["loads"] for n, r in runs.items()},
                                                  "demo_results": {n: r["demo"] for n, r in runs.items()},
                                                  "images": names})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=photo_folder() / "cbsd68",
                        help="held-out photos (default: $LATENT_VAE_PHOTOS/cbsd68)")
    parser.add_argument("--steps", type=int, default=600, help="optimiser steps per arm (default 600)")
    parser.add_argument("--weights", type=float, nargs="+", default=[1.0],
                        help="scale_equivariance_weight of each regularised arm (default: 1)")
    parser.add_argument("--factors", default="2", help="scale_equivariance_factors (default 2: a 4x4 training latent)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per arm (default 1)")
    parser.add_argument("--parallel", action="store_true", help="train the two arms side by side")
    parser.add_argument("--resolution", type=int, default=256, help="inspection square side (default 256)")
    parser.add_argument("--max-images", type=int, default=0, help="inspect at most this many photos (default: all)")
    parser.add_argument("--out", type=Path, default=Path("runs/diffusability"), help="runs and the inspect page")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
