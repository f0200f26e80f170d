"""The `latent-vae` command line: encode, decode, reconstruct, interpolate, sample-photos, calibrate, info, convert,
precompute, inspect, fp16-fix.

Exit statuses (the same for every command): 0 everything done; 1 some inputs failed (each reported in one
line naming it and the reason; every good input still written); 2 the command could not run at all (bad
arguments, an unloadable model, no inputs: one line, no traceback); 3 an unexpected internal error, a bug
(a one-line summary on stderr first, then the traceback).
"""

from __future__ import annotations

import argparse
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence

from ..utils.errors import (
    EXIT_BAD_INPUT,
    EXIT_INTERNAL_ERROR,
    NonFiniteError,
    PosteriorNoiseWarning,
    one_line,
)
from . import coding, fp16, inspect, models, precompute
from .common import OneLineParser, UsageError


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="latent-vae",
        description="KL-VAE latent compression for diffusion models: images <-> normalised latents "
        "(f16c16: 3x1024x1024 -> 16x64x64).",
        epilog="Run `latent-vae COMMAND --help` for each command's options.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    coding.add_parsers(commands)
    models.add_parsers(commands)
    precompute.add_parser(commands)
    inspect.add_parser(commands)
    fp16.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except UsageError as error:  # a bad flag or value: one line naming it, before any work or output
        print(f"{error.prog}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return run_command(args.func, args, "latent-vae")


def run_command(func: Callable[[argparse.Namespace], int], args: argparse.Namespace, prog: str) -> int:
    """Run a command with the documented exit statuses: its own 0/1, 2 with one line for an input that
    stops it, 3 with a one-line summary and then the traceback for a bug. The project's warnings (a posterior
    that is mostly noise) are one line each too."""
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning(prog, warnings.showwarning)
            return func(args)
    except (ValueError, OSError, NonFiniteError) as error:
        # ImageError, ModelLoadError and CommandError are ValueErrors: one line, no traceback
        print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 -- a bug: one line first (a log shows it), then the details
        print(f"{prog}: internal error ({type(error).__name__}: {one_line(error)}); this is a bug, "
              "please report it with the traceback below", file=sys.stderr)
        traceback.print_exc()
        return EXIT_INTERNAL_ERROR


def _one_line_warning(prog: str, show: Callable) -> Callable:
    """A `warnings.showwarning` that prints the project's warnings as "PROG: warning: ..." and hands others to
    `show`."""
    def show_warning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, PosteriorNoiseWarning):
            print(f"{prog}: warning: {one_line(message)}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)
    return show_warning
