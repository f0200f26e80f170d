"""`latent-vae precompute`: its flags come from `PrecomputeOptions`, one per field."""

from __future__ import annotations

import argparse
import json
import sys

from ..utils.errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_SOME_FAILED, CommandError, one_line, printable
from .common import add_dataclass_arguments, by_name, check_output_folder


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("precompute", help="encode a dataset once into a latent dataset (🤗 datasets)",
                            description="Precompute the posterior of every image of tar shards, parquet files, a "
                            "folder or a dataset into parquet shards, one per input shard; killed, the same command "
                            "resumes; several runs or nodes share the work; see docs/latent-datasets.md.")
    add_precompute_arguments(p)
    p.set_defaults(func=run_precompute)


def add_precompute_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `latent-vae precompute`: what to encode and where, then every PrecomputeOptions field."""
    from ..latents.options import PrecomputeOptions

    parser.add_argument("--model", help="preset name, diffusers model folder or .safetensors file")
    parser.add_argument("--data", help="WebDataset tar shards or parquet files (path, glob or folder of them), an image "
                        "folder, a datasets folder (save_to_disk) or arrow files; s3:// and gs:// URLs stream from the store")
    parser.add_argument("--out", help="output folder or URL (s3://BUCKET/PREFIX, gs://...); the same command again "
                        "continues an interrupted run, and runs on several nodes into one folder share the work")
    parser.add_argument("--verify", metavar="DST", help="check a latent dataset instead (every shard done, row counts, "
                        "checksums, every key once); exit 0 when sound, 1 when not")
    parser.add_argument("--storage-options", metavar="JSON", type=storage_options, default=None,
                        help="options of the object store's file system (fsspec), e.g. "
                        "'{\"endpoint_url\": \"http://minio:9000\"}'; default: credentials and endpoint from the "
                        "standard places (AWS_* variables, AWS_ENDPOINT_URL, ~/.aws, GOOGLE_APPLICATION_CREDENTIALS)")
    parser.add_argument("--single-writer", action="store_true", help="allow an --out store without conditional writes "
                        "(If-None-Match / If-Match), promising that no other run writes into it at the same time")
    add_dataclass_arguments(parser, PrecomputeOptions)


def storage_options(text: str) -> dict:
    """--storage-options: a JSON object."""
    try:
        value = json.loads(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not JSON ({error})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"a JSON object is needed, got a {type(value).__name__}")
    return value


def run_precompute(args: argparse.Namespace) -> int:
    """`latent-vae precompute`: 0 when every input is in the dataset, 1 when some failed (listed), 2 when it
    could not run (one line)."""
    import dataclasses

    from ..latents.format import FAILURES_FILE, LAYOUT, read_failures
    from ..latents.locations import is_url, open_store
    from ..latents.precompute import PrecomputeOptions, precompute_latents
    from ..latents.verify import verify_latents

    try:
        if args.verify:
            report = verify_latents(args.verify, storage_options=args.storage_options)
            print(report.line())
            for problem in report.problems:
                print(f"{args.verify}: {problem}", file=sys.stderr)
            return EXIT_OK if report.ok else EXIT_SOME_FAILED
        missing = [f"--{name}" for name in ("model", "data", "out") if not getattr(args, name)]
        if missing:
            raise CommandError(f"{', '.join(missing)} required (or --verify DST)")
        if not is_url(args.out):  # an object store's prefix is checked by the store itself, before any work
            check_output_folder(args.out, "a latent dataset", by_name(*LAYOUT))
        options = PrecomputeOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PrecomputeOptions)})
        out = open_store(args.out, args.storage_options, single_writer=args.single_writer)
        summary = precompute_latents(args.model, args.data, out, options, storage_options=args.storage_options)
    except ValueError as error:  # ImageError, ModelLoadError and CommandError are ValueErrors too
        print(f"latent-vae precompute: error: {one_line(error)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return EXIT_OK if summary.failures == 0 else EXIT_SOME_FAILED
    print(summary.line())
    for problem in summary.problems:  # the closing verification: the dataset is not sound
        print(f"{args.out}: {printable(problem)}", file=sys.stderr)
    if summary.problems:
        print(f"{args.out}: not complete: the verification found {len(summary.problems)} problem(s)", file=sys.stderr)
        return EXIT_SOME_FAILED
    if summary.failures:
        failures = read_failures(out)
        for failure in failures[:20]:
            print(f"failed: {printable(failure['message'])} [{failure['reason']}]", file=sys.stderr)
        more = f" ({len(failures) - 20} more)" if len(failures) > 20 else ""
        print(f"{len(failures)} inputs failed{more}; all are listed in {out.where(FAILURES_FILE)}", file=sys.stderr)
        return EXIT_SOME_FAILED
    return EXIT_OK


