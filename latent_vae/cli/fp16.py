"""`latent-vae fp16-fix`: rescale a model by powers of two into fp16's range, the same function (`latent_vae.fp16.rescale`)."""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from ..images.reading import pil_to_tensor
from ..utils import option_values as values
from ..utils.errors import EXIT_OK, EXIT_SOME_FAILED, CommandError, printable
from .common import add_image_arguments, centre_squares, list_input_images, max_pixels
from .models import check_model_output


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "fp16-fix", help="rescale a model into fp16's range without changing its function (no training)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(
            "Run the model in fp32 on calibration images (centre squares at --resolution; the decoder on their "
            "latents), record the largest value of every stage of its residual stream and of each resnet's inner "
            "branch, and scale every stage that peaks above 65504 / --headroom down by a power of two, with the "
            "weights around it rescaled so that the function is the same (GroupNorm ignores its input's scale). "
            "The latent and the decoded image are never scaled, so latents made by SRC decode with DST. Prints the "
            "peak of every stage before and after; writes a diffusers model folder (plain AutoencoderKL, or "
            "ResidualAutoencoderKL for shortcut models) with SRC's normalisation and fp16_fix.json (the report).",
            100),
        epilog="exit status: 0 done; 1 some images could not be read (each named; calibrated on the rest); 2 nothing "
        "could run (bad arguments, model, images or --out, or a layer the transform cannot prove scale-invariant); "
        "3 a bug.",
    )
    p.add_argument("--model", required=True, metavar="SRC", help="model folder, .safetensors file or preset")
    p.add_argument("--data", required=True, metavar="IMAGES", help="folder of calibration images (recursive)")
    p.add_argument("--out", required=True, metavar="DST",
                   help="the fixed model folder: new, empty, or a model folder (replaced whole)")
    p.add_argument("--resolution", type=values.positive_int, default=512,
                   help="centre-crop and resize calibration images to this square side (default 512)")
    p.add_argument("--limit", type=values.non_negative_int, default=16,
                   help="calibrate on at most this many images (default 16; 0: all)")
    p.add_argument("--headroom", type=values.positive_float, default=32.0,
                   help="a power of two: every stage's calibration peak is put at most 65504 / HEADROOM, leaving "
                   "room for larger images and other content (default 32: peaks at most 2047)")
    p.add_argument("--device", type=values.device, default="auto", help="where to calibrate, in fp32 (default: auto)")
    p.add_argument("--seed", type=values.any_int, default=0, help="seed for a preset's fresh weights (default: 0)")
    add_image_arguments(p)
    p.set_defaults(func=run_fp16_fix)


def run_fp16_fix(args: argparse.Namespace) -> int:
    from diffusers import AutoencoderKL

    from ..fp16.layout import is_power_of_two, stage_graph
    from ..fp16.rescale import fp16_safe, save_fp16_safe
    from ..models.loading import load_vae, model_folder
    from ..utils.option_values import resolve_device

    # everything that can be refused is refused before the work
    if not (is_power_of_two(args.headroom) and args.headroom >= 1):
        raise CommandError(f"--headroom must be a power of two of at least 1 (1, 2, 4, ... 32), got {args.headroom:g}")
    out = check_model_output(args.out)
    source_folder = model_folder(Path(args.model)) if Path(args.model).is_dir() else None
    sources = (Path(args.model).resolve(), source_folder.resolve()) if source_folder is not None else ()
    if out.exists() and out.resolve() in sources:
        raise CommandError(f"--out {printable(args.out)} is the --model folder: write the fixed model to a new folder "
                           "(latents made by the source keep decoding with either)")
    limit = max_pixels(args)
    paths, failures = list_input_images(args.data, args.limit)
    device = resolve_device(args.device)
    vae = load_vae(args.model, seed=args.seed)
    stage_graph(vae)  # a layer the transform cannot prove scale-invariant: refused before any image is read
    vae = vae.float().to(device)

    def samples():
        loaded = 0
        for _, square in centre_squares(paths, args.resolution, limit, failures, "calibrate"):
            loaded += 1
            yield pil_to_tensor(square)
        if not loaded:
            raise CommandError(f"{printable(args.data)}: none of the {len(paths)} images could be read")

    report = fp16_safe(vae, samples(), headroom=args.headroom)
    print(report.table())
    print(report.summary())
    save_fp16_safe(vae.cpu(), report, out)
    if report.changed:
        what = (f"rescaled; fingerprint {report.fingerprint}, the same function as {report.source_fingerprint}: "
                f"latents made by {printable(args.model)} decode with it")
    else:
        what = "every stage already fits at this headroom: copied unchanged"
    loaders = "latent_vae.load_vae" + ("" if type(vae) is not AutoencoderKL else
                                      " (exact GroupNorm eps) or diffusers' AutoencoderKL.from_pretrained")
    print(f"saved {printable(str(out))} ({what}); load it with {loaders}")
    if failures:
        print(f"{len(failures)} inputs failed; calibrated on the other {report.images} images", file=sys.stderr)
        return EXIT_SOME_FAILED
    return EXIT_OK
