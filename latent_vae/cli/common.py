"""Pieces every `latent-vae` command shares: the model and image arguments, the codec they open, and the loop
that runs a command over many files, reporting each bad input in one line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image
from tqdm.auto import tqdm

from ..atomic import atomic_path
from ..errors import EXIT_OK, EXIT_SOME_FAILED, CommandError, ImageError, NonFiniteError, input_failure
from ..images import DEFAULT_MAX_PIXELS
from ..presets import DEFAULT_PRESET, PRESETS

# diffusers (through ..codec and ..model) and torchmetrics (..metrics) are imported inside the commands that
# use them: `latent-vae --help` and argument errors then answer without the ~4 s those imports take.
if TYPE_CHECKING:
    from ..codec import LatentCodec


def add_model_arguments(parser: argparse.ArgumentParser, default: str | None = DEFAULT_PRESET) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model", default=default, required=default is None,
        help=f"a preset ({', '.join(PRESETS)}; fresh untrained weights), a diffusers model folder "
        f"(config.json + safetensors, or a pipeline folder with vae/), or a .safetensors file (default: {default})",
    )
    group.add_argument("--seed", type=int, default=0, help="seed for a preset's fresh weights (default: 0)")
    group.add_argument("--device", default="auto", help="cpu, cuda, mps or auto (default: auto)")
    group.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="precision (default: fp32)")
    group.add_argument("--batch-size", type=int, default=4, help="images per forward pass (default: 4)")
    group.add_argument(
        "--max-memory", default=None,
        help="memory budget per forward pass, e.g. 4GB or 512MiB: whole images where they fit, exact tiles (the "
        "same result) where they do not (default: most of the free device memory / available RAM)",
    )
    group.add_argument(
        "--tile-size", type=int, default=None,
        help="expert: always code in exact tiles of this many pixels (default: the budget decides)",
    )



def open_codec(args: argparse.Namespace) -> LatentCodec:
    from ..codec import LatentCodec

    codec = LatentCodec.from_pretrained(
        args.model, seed=args.seed, device=args.device, dtype=args.dtype,
        max_batch_size=args.batch_size, max_memory=args.max_memory, tile_size=args.tile_size or None,
    )
    if args.model in PRESETS:
        print(
            f"note: {args.model!r} is a preset: fresh, untrained weights, so reconstructions are noise. "
            "Pass a trained model folder to see real results (`python -m training.demo` trains one).",
            file=sys.stderr,
        )
    return codec


def add_image_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
        help="refuse images with more pixels than this, read from the header before decoding (a decompression "
        f"bomb costs nothing); 0: no limit (default: {DEFAULT_MAX_PIXELS:,})",
    )


def max_pixels(args: argparse.Namespace) -> int | None:
    if args.max_pixels < 0:
        raise CommandError(f"--max-pixels must be 0 (no limit) or positive, got {args.max_pixels}")
    return args.max_pixels or None


def require_positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name) < 1:
            raise CommandError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")


def save_image(image: Image.Image, path: Path) -> Path:
    """A PNG written atomically: a full disk or a crash never leaves a half-written image under the real name."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def unique_output(out_dir: Path, stem: str, suffix: str, taken: set[str]) -> Path:
    """`out_dir/stem.suffix`, numbered when two inputs share a stem, so no output overwrites another."""
    name, n = stem, 1
    while name in taken:
        name, n = f"{stem}-{n}", n + 1
    taken.add(name)
    return out_dir / f"{name}{suffix}"


def for_each_file(
    paths: Sequence[str], work: Callable[[Path], str | None], description: str
) -> int:
    """Run `work` on every path with a progress bar; each bad input is reported in one line, the rest still done."""
    failures = []
    for path in tqdm([Path(p) for p in paths], desc=description, unit="file", disable=len(paths) < 2):
        try:
            message = work(path)
        except (ImageError, ValueError, OSError, NonFiniteError) as error:
            failures.append(input_failure(path, error))
            tqdm.write(f"failed: {failures[-1]}", file=sys.stderr)
            continue
        if message:
            tqdm.write(message)
    if failures:
        print(f"{len(failures)} of {len(paths)} inputs failed; the other {len(paths) - len(failures)} were written",
              file=sys.stderr)
        return EXIT_SOME_FAILED
    return EXIT_OK


# -- commands -------------------------------------------------------------------------------------


def add_dataclass_arguments(parser: argparse.ArgumentParser, options_class: type, title: str = "precompute options") -> None:
    """One `--field-name` flag per field of a dataclass: type, choices (a Literal) and default from the
    annotation, help from the field's metadata; a bool is a switch (`--no-FIELD` when it defaults to True)."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(options_class)
    group = parser.add_argument_group(title)
    for spec in dataclasses.fields(options_class):
        kind = hints[spec.name]
        optional = type(None) in typing.get_args(kind)
        if optional:  # X | None: the flag takes an X, and None stays the default
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        flag, text = "--" + spec.name.replace("_", "-"), spec.metadata.get("help", "")
        if kind is bool and optional:  # three states: --flag, --no-flag, or neither (None: decided later)
            group.add_argument(flag, dest=spec.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif kind is bool:
            if spec.default:
                group.add_argument(f"--no-{spec.name.replace('_', '-')}", dest=spec.name, action="store_false", help=f"do not {text}")
            else:
                group.add_argument(flag, dest=spec.name, action="store_true", help=text)
        elif typing.get_origin(kind) is typing.Literal:
            choices = list(typing.get_args(kind))
            group.add_argument(flag, dest=spec.name, type=type(choices[0]), choices=choices, default=spec.default,
                               help=f"{text} (default: {spec.default})")
        else:
            group.add_argument(flag, dest=spec.name, type=kind, default=spec.default, metavar=kind.__name__.upper(),
                               help=f"{text}" + (f" (default: {spec.default})" if spec.default is not None else ""))

