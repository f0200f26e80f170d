"""`latent-vae inspect`: how good a model's latent space is for diffusion, as one HTML page and report.json."""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import torch

from ..images.reading import pil_to_tensor, scan_images
from ..inspection.html import FIGURES, REPORT_FILES
from ..utils.errors import EXIT_OK, EXIT_SOME_FAILED, CommandError
from ..utils.option_values import Integer
from .common import (
    add_image_arguments,
    add_model_arguments,
    centre_squares,
    check_output_folder,
    max_pixels,
    open_codec,
)


def add_parser(commands: argparse._SubParsersAction) -> None:
    figures = "\n".join(f"  {name:<15} {line}" for name, line in FIGURES.items())
    p = commands.add_parser(
        "inspect", help="how good a latent space is for diffusion: one HTML page + report.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(
            "Measure a model's latent space on images (centre squares at --resolution) and write OUT/index.html "
            "(self-contained: opens from disk in any browser) and OUT/report.json (the same numbers). --compare M2 "
            "measures a second model on the same images, side by side.", 100),
        epilog=f"figures of the page:\n{figures}\n\nexit status: 0 done; 1 some images could not be read (each "
        "named; the report covers the rest); 2 nothing could run (bad arguments, model or --out, fewer than 2 "
        "images); 3 a bug.",
    )
    p.add_argument("--data", required=True, help="folder of images (recursive); at least 2")
    p.add_argument("--out", required=True, help="output folder: new, empty, or an earlier inspect report")
    p.add_argument("--resolution", type=Integer(1), default=256,
                   help="centre-crop and resize every image to this square side (default 256: a 16x16 latent at f16)")
    p.add_argument("--compare", metavar="M2", help="a second model (preset, folder or .safetensors), side by side")
    p.add_argument("--max-images", type=Integer(0, wanted="0 (all) or an integer of at least 2"), default=32,
                   help="measure at most this many images (default 32; 0: all)")
    p.add_argument("--interpolation-steps", type=Integer(3), default=8, help="frames per interpolation path (default 8)")
    p.add_argument("--interpolation-pairs", type=Integer(1), default=2,
                   help="paths drawn between consecutive pairs of images (default 2)")
    add_image_arguments(p)
    add_model_arguments(p, default=None)
    p.set_defaults(func=run_inspect)


def read_images(args: argparse.Namespace) -> tuple[torch.Tensor, list[str], list[str]]:
    """(Nx3xRxR images, their names, one failure line per unreadable image or folder)."""
    limit = max_pixels(args)
    scan = scan_images(args.data)
    failures = list(scan.unreadable)
    for line in scan.unreadable:
        print(f"failed: {line}", file=sys.stderr)
    tensors, names = [], []
    for path, square in centre_squares(scan.files, args.resolution, limit, failures, "read images"):
        tensors.append(pil_to_tensor(square))
        names.append(str(path.relative_to(args.data)))
        if args.max_images and len(tensors) == args.max_images:
            break
    if len(tensors) < 2:
        raise CommandError(f"{args.data}: {len(tensors)} readable image(s); inspect compares at least 2")
    return torch.stack(tensors), names, failures


def summary_line(label: str, numbers: dict) -> str:
    shown = lambda value, unit="": "-" if value is None else f"{value:.3f}{unit}"
    spectrum, reconstruction = numbers["spectrum"], numbers["reconstruction"]
    return (f"{label}: PSNR {shown(reconstruction['psnr_mean'], ' dB')} (bicubic {shown(reconstruction['bicubic_psnr_mean'])}), "
            f"latent high-frequency share {shown(spectrum['latent']['high_frequency_share'])} (images "
            f"{shown(spectrum['image']['high_frequency_share'])}), scale equivariance 2x "
            f"{shown(numbers['scale_equivariance'].get('2x', {}).get('psnr_mean'), ' dB')}, "
            f"{numbers['channels']['active_count']} of {numbers['description']['latent_channels']} channels active")


# The smallest latent side inspect measures: its spectrum needs rings below and above half Nyquist, and the
# scale-equivariance check a latent that still has pixels after 2x pooling.
MIN_LATENT_SIDE = 4


def run_inspect(args: argparse.Namespace) -> int:
    if args.max_images == 1:
        raise CommandError("--max-images must be 0 (all) or an integer of at least 2, got 1")
    out = check_output_folder(args.out, "an inspect report", lambda entry: entry.name in REPORT_FILES)
    if not Path(args.data).is_dir():
        raise CommandError(f"--data {args.data}: not a folder of images")
    sources = [args.model] + ([args.compare] if args.compare else [])
    codecs = [open_codec(args, source) for source in sources]
    for source, codec in zip(sources, codecs):
        if args.resolution % codec.downsampling_factor:
            raise CommandError(f"--resolution {args.resolution} must be a multiple of {source}'s downsampling "
                               f"factor {codec.downsampling_factor}")
        if args.resolution // codec.downsampling_factor < MIN_LATENT_SIDE:  # a spectrum needs rings, 2x a pixel to pool
            raise CommandError(f"--resolution {args.resolution} gives {source} a latent of "
                               f"{args.resolution // codec.downsampling_factor} pixels a side; inspect needs at least "
                               f"{MIN_LATENT_SIDE}: --resolution {MIN_LATENT_SIDE * codec.downsampling_factor} or more")
    images, names, failures = read_images(args)

    from ..inspection.html import write_report
    from ..inspection.report import inspect_codec

    labels = sources if len(set(sources)) == len(sources) else [f"{s} ({i + 1})" for i, s in enumerate(sources)]
    inspections = [inspect_codec(codec, images, label=label, source=source, interpolation_steps=args.interpolation_steps,
                                 interpolation_pairs=args.interpolation_pairs)
                   for codec, label, source in zip(codecs, labels, sources)]
    page, report = write_report(out, inspections, data=str(args.data), image_names=names, resolution=args.resolution)
    for inspection in inspections:
        print(summary_line(inspection.label, inspection.numbers))
    print(f"wrote {page} and {report} ({len(names)} images)")
    if failures:
        print(f"{len(failures)} inputs failed; the report covers the other {len(names)} images", file=sys.stderr)
        return EXIT_SOME_FAILED
    return EXIT_OK
