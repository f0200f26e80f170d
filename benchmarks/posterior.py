"""Is a model's posterior sound at the sizes where it is used? Decode the posterior mean and one posterior sample
of held-out photos at several sizes, beside the latent's statistics.

A latent dataset samples the posterior on every read by default: a sample that decodes much worse than the
mean means a diffusion model trained on those latents trains on noise. For each size (each photo's centre
square, resized): PSNR of decode(mean) and of decode(one sample), the log-variance (mean and max), the KL per
latent value, the noise ratio as `precompute` records it (latent_vae.codec.posterior: how far a sample lies from
its mean against the spread of the means across images and positions, over all channels and on the worst
channel) and bicubic at equal values as the bar to beat.

    python -m benchmarks.posterior --model runs/demo/train/vae --images $LATENT_VAE_PHOTOS/cset14 \
        $LATENT_VAE_PHOTOS/cbsd68 --max-images 12 --name posterior_cpu --label "demo 3 min"
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from benchmarks.report import RESULTS_DIR, markdown_table, photo_folder, write_results
from latent_vae import load_vae
from latent_vae.images.metrics import bicubic_equal_values, psnr
from latent_vae.images.reading import centre_square, find_images, load_image, pil_to_tensor
from training.posterior import measure_posterior

SIZES = (64, 128, 256, 512, 1024)
COLUMNS = ("model", "size", "images", "PSNR mean", "PSNR sample", "sample - mean", "bicubic", "logvar mean",
           "logvar max", "KL per value", "noise ratio", "worst channel", "constant channels")


def squares(paths: list[Path], size: int):
    """Each photo's centre square at size x size, one 1x3xHxW tensor at a time."""
    for path in paths:
        yield pil_to_tensor(centre_square(load_image(path), size))[None]


def bicubic_psnr(paths: list[Path], size: int, latent_values: int) -> float:
    scores = [psnr(image, bicubic_equal_values(image, latent_values)).item() for image in squares(paths, size)]
    return sum(scores) / len(scores)


def measure(model: str, label: str, paths: list[Path], sizes: tuple[int, ...], seed: int) -> list[dict]:
    vae = load_vae(model).float().eval()
    channels = vae.config.latent_channels
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    rows = []
    for size in sizes:
        report = measure_posterior(vae, squares(paths, size), seed=seed)
        row = {"model": label, "size": size, "images": len(paths), "PSNR mean": report.psnr_mean,
               "PSNR sample": report.psnr_sample, "sample - mean": -report.sample_gap,
               "bicubic": bicubic_psnr(paths, size, channels * (size // factor) ** 2),
               "logvar mean": report.logvar_mean, "logvar max": report.logvar_max,
               "KL per value": report.kl_per_value, "noise ratio": report.noise_ratio,
               "worst channel": report.worst_channel_noise_ratio,
               "constant channels": sum(r is None for r in report.channel_noise_ratios),
               "noise ratio per channel": report.channel_noise_ratios}
        print(markdown_table([row], COLUMNS).splitlines()[-1], flush=True)
        rows.append(row)
    return rows


def main(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    paths = [path for folder in args.images for path in find_images(folder)[: args.max_images]]
    if not paths:
        raise SystemExit(f"no images under {', '.join(args.images)}")
    command = "python -m benchmarks.posterior " + shlex.join(sys.argv[1:])
    rows = measure(args.model, args.label or args.model, paths, tuple(args.sizes), args.seed)
    name = args.name
    if args.append and (RESULTS_DIR / f"{name}.json").exists():  # several models in one table
        previous = json.loads((RESULTS_DIR / f"{name}.json").read_text())
        rows = previous["rows"] + rows
        command = previous["commands"] + [command]
    else:
        command = [command]
    folders = ", ".join(Path(folder).name for folder in args.images)
    notes = (f"Photos: the centre square of each of {len(paths)} photos (the first {args.max_images} of {folders}), "
             f"resized to each size; never seen in training. One posterior sample per image (seed {args.seed}). "
             f"{args.note + ' ' if args.note else ''}Commands: " + "; ".join(f"`{c}`" for c in command))
    write_results(name, rows, notes=notes, columns=COLUMNS, extra={"commands": command})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a trained model folder (a preset name: untrained weights)")
    parser.add_argument("--label", default="", help="the model's name in the table (default: --model)")
    parser.add_argument("--images", nargs="+", default=[str(photo_folder() / "cset14"), str(photo_folder() / "cbsd68")],
                        help="image folders (default: $LATENT_VAE_PHOTOS/cset14 and cbsd68)")
    parser.add_argument("--max-images", type=int, default=12, help="photos from each folder")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="posterior_cpu", help="results/NAME.json and .md")
    parser.add_argument("--append", action="store_true", help="add rows to results/NAME.* instead of replacing them")
    parser.add_argument("--note", default="", help="a sentence for the notes (how the models were trained)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
