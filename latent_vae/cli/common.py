"""Pieces every `latent-vae` command shares: the model and image arguments, the codec they open, and the loop
that runs a command over many files, reporting each bad input in one line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image
from tqdm.auto import tqdm

from ..images.reading import DEFAULT_MAX_PIXELS, centre_square, load_image, scan_images
from ..models.presets import DEFAULT_PRESET, PRESETS
from ..utils import option_values as values
from ..utils.atomic import atomic_path, left_by_dead_process
from ..utils.errors import (
    EXIT_OK,
    EXIT_SOME_FAILED,
    CommandError,
    ImageError,
    NonFiniteError,
    input_failure,
    printable,
)

# diffusers (through ..codec and ..model) and torchmetrics (..metrics) are imported inside the commands that
# use them: `latent-vae --help` and argument errors then answer without the ~4 s those imports take.
if TYPE_CHECKING:
    from ..codec.latent_codec import LatentCodec


class UsageError(Exception):
    """A bad command line (an unknown flag, a value out of range): `main` prints it as one line and exits 2."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line naming the option (`PROG: error: argument --X: why`), not a
    usage block, and is raised as UsageError rather than exiting: `main` returns 2, as for any input that stops
    a command. Subcommand parsers are of this class too (argparse makes them of their parent's class)."""

    def error(self, message: str):
        raise UsageError(self.prog, f"{printable(message)} (see {self.prog} --help)")

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        # argparse reads `--flag=--` as an empty list, without calling the flag's type: refuse it as a missing value
        for action in self._actions:
            value = getattr(namespace, action.dest, None)
            if isinstance(action, argparse._StoreAction) and action.nargs is None and isinstance(value, list):
                self.error(f"argument {'/'.join(action.option_strings) or action.dest}: expected one value, got '--'")
        return namespace, extras


def add_model_arguments(parser: argparse.ArgumentParser, default: str | None = DEFAULT_PRESET) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model", default=default, required=default is None,
        help=f"a preset ({', '.join(PRESETS)}; fresh untrained weights), a diffusers model folder "
        f"(config.json + safetensors, or a pipeline folder with vae/), or a .safetensors file (default: {default})",
    )
    group.add_argument("--seed", type=values.any_int, default=0, help="seed for a preset's fresh weights (default: 0)")
    group.add_argument("--device", type=values.device, default="auto",
                       help="cpu, cuda, cuda:N, mps or auto; checked to exist (default: auto)")
    group.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="precision (default: fp32)")
    group.add_argument("--batch-size", type=values.positive_int, default=4, help="images per forward pass (default: 4)")
    group.add_argument(
        "--max-memory", type=values.byte_size, default=None,
        help="memory budget per forward pass, e.g. 4GB or 512MiB: whole images where they fit, exact tiles (the "
        "same result) where they do not (default: most of the free device memory / available RAM)",
    )
    group.add_argument(
        "--tile-size", type=values.non_negative_int, default=None,
        help="expert: always code in exact tiles of this many pixels (default or 0: the budget decides)",
    )



def list_input_images(data: str, limit: int = 0) -> tuple[list[Path], list[str]]:
    """The image files under the folder `data` (the first `limit`; 0: all) and one failure line, printed as it
    is found, per folder that could not be read; a CommandError when there is no image."""
    scan = scan_images(data)
    for line in scan.unreadable:
        print(f"failed: {line}", file=sys.stderr)
    paths = scan.files[: limit or None]
    if not paths:
        raise CommandError(f"{printable(str(data))}: no images found"
                           + (" (some folders could not be read)" if scan.unreadable else ""))
    return paths, list(scan.unreadable)


def centre_squares(paths: Sequence[Path], resolution: int, limit: int | None, failures: list[str],
                   description: str) -> Iterator[tuple[Path, Image.Image]]:
    """(path, its centre square resized to `resolution`) for each readable image of `paths`, with a progress bar;
    an unreadable one is reported in one line and added to `failures`, and the others go on."""
    for path in tqdm(paths, desc=description, unit="img", disable=len(paths) < 2):
        try:
            image = load_image(path, max_pixels=limit)
        except ImageError as error:  # load_image reports every reading fault (OSError included) as one
            failures.append(input_failure(path, error))
            tqdm.write(f"failed: {failures[-1]}", file=sys.stderr)
            continue
        yield path, centre_square(image, resolution)


def open_codec(args: argparse.Namespace, source: str | None = None) -> LatentCodec:
    """The codec of `source` (default `--model`) with the model arguments' device, precision and memory budget."""
    from ..codec.latent_codec import LatentCodec

    source = args.model if source is None else source
    codec = LatentCodec.from_pretrained(
        source, seed=args.seed, device=args.device, dtype=args.dtype,
        max_batch_size=args.batch_size, max_memory=args.max_memory, tile_size=args.tile_size or None,
    )
    if source in PRESETS:
        fresh = ("its untrained shortcut code, a working but untrained model" if PRESETS[source].shortcut
                 else "untrained weights, so reconstructions are noise")
        print(f"note: {source!r} is a preset: {fresh}, with a neutral normalisation. Pass a trained model folder to "
              "see real results (`python -m training.demo` trains one).", file=sys.stderr)
    return codec


def add_image_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-pixels", type=values.non_negative_int, default=DEFAULT_MAX_PIXELS,
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


# -- outputs: never destroy what is there -------------------------------------------------------------


def by_suffix(*suffixes: str) -> Callable[[Path], bool]:
    """Accepts the files a command writes by their suffix (for `check_output_folder`)."""
    return lambda entry: entry.is_file() and entry.suffix.lower() in suffixes


def by_name(*names: str) -> Callable[[Path], bool]:
    return lambda entry: entry.name in names


def _check_parents(path: Path, option: str) -> None:
    """Every existing ancestor must be a folder (else creating the output fails after all the work)."""
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise CommandError(f"{option} {printable(str(path))}: {printable(str(parent))} is a file, not a folder")
            return


def check_output_folder(path: str | Path, kind: str, accepts: Callable[[Path], bool], *, option: str = "--out",
                        marker: str | None = None) -> Path:
    """Refuse, before any work, an output folder that the command would destroy or mix into: a file (or any
    non-folder) where the folder goes, or a folder holding anything `accepts` does not (what this command itself
    writes there: a rerun may replace its own outputs). `marker`: a file a non-empty folder of this kind must
    hold (a model folder's config.json). Hidden files and dead writers' temporary files are ignored."""
    path = Path(path)
    shown = printable(str(path))
    _check_parents(path, option)
    if path.exists() and not path.is_dir():
        raise CommandError(f"{option} {shown}: exists and is not a folder; give a new or empty folder for {kind}")
    if path.is_dir():
        entries = [e for e in path.iterdir() if not e.name.startswith(".") and not left_by_dead_process(e)]
        other = sorted(e.name for e in entries if not accepts(e))
        if entries and marker is not None and not (path / marker).is_file():
            other = other or sorted(e.name for e in entries)
        if other:
            names = ", ".join(printable(n) for n in other[:3]) + (", ..." if len(other) > 3 else "")
            raise CommandError(f"{option} {shown}: a folder that holds other things than {kind} ({names}); give a "
                               "new or empty folder")
    return path


def check_output_file(path: str | Path, kind: str, suffixes: tuple[str, ...], *, option: str = "--out") -> Path:
    """Refuse, before any work, an output file path that is a folder, or an existing file of another kind
    (by suffix) that writing would replace."""
    path = Path(path)
    shown = printable(str(path))
    _check_parents(path, option)
    if path.is_dir():
        raise CommandError(f"{option} {shown}: is a folder; the output is one {kind} file")
    if path.exists() and path.suffix.lower() not in suffixes:
        raise CommandError(f"{option} {shown}: exists and is not a {kind} ({'/'.join(suffixes)}); writing would "
                           "replace it: give another name")
    return path


MODEL_FILES = by_suffix(".json", ".safetensors")  # what save_pretrained writes into a diffusers model folder


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
        else:  # the field's own parser (values.*) when it has one: ranges are checked as the flag is read
            group.add_argument(flag, dest=spec.name, type=spec.metadata.get("parse", kind), default=spec.default,
                               metavar=kind.__name__.upper(),
                               help=f"{text}" + (f" (default: {spec.default})" if spec.default is not None else ""))

