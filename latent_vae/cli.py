"""The `latent-vae` command line: encode, decode, reconstruct, calibrate, info, interpolate, demo, precompute, convert.

Exit statuses (the same for every command): 0 everything done; 1 some inputs failed (each reported in one
line naming it and the reason; every good input still written); 2 the command could not run at all (bad
arguments, an unloadable model, no inputs: one line, no traceback); 3 an unexpected internal error, a bug
(a one-line summary on stderr first, then the traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image
from tqdm.auto import tqdm

from .atomic import atomic_directory, atomic_path, atomic_write_text
from .images import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    centre_square,
    error_map,
    image_grid,
    image_strip,
    load_image,
    pil_to_tensor,
    scan_images,
    tensor_to_uint8,
)
from .latent_files import LatentFile, load_latent_file, save_latent_file
from .presets import DEFAULT_PRESET, PRESETS, downsampling_factor
from .stats import calibrate

# diffusers (through .codec and .model) and torchmetrics (.metrics) are imported inside the commands that
# use them: `latent-vae --help` and argument errors then answer without the ~4 s those imports take.
if TYPE_CHECKING:
    from .codec import LatentCodec

EXIT_OK = 0  # everything done
EXIT_SOME_FAILED = 1  # a batch ran, but some inputs failed (each reported); every good one was written
EXIT_BAD_INPUT = 2  # the whole command could not run (bad arguments, unloadable model, no inputs)
EXIT_INTERNAL_ERROR = 3  # an unexpected error: a bug in this program, reported with its traceback


class CommandError(ValueError):
    """A usage problem found while running a command; printed as one line."""


# -- shared pieces --------------------------------------------------------------------------------


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
    from .codec import LatentCodec

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


def failure_line(path: Path, error: BaseException) -> str:
    """One line naming the input and the reason."""
    if isinstance(error, OSError) and error.strerror:  # a full disk, a permission: say which file
        reason = error.strerror + (f" ({error.filename})" if error.filename and str(error.filename) != str(path) else "")
    else:
        reason = first_line(error)
    return reason if reason.startswith(str(path)) else f"{path}: {reason}"


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
    from .codec import NonFiniteError

    failures = []
    for path in tqdm([Path(p) for p in paths], desc=description, unit="file", disable=len(paths) < 2):
        try:
            message = work(path)
        except (ImageError, ValueError, OSError, NonFiniteError) as error:
            failures.append(failure_line(path, error))
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


def run_encode(args: argparse.Namespace) -> int:
    limit = max_pixels(args)
    codec = open_codec(args)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()

    def encode_one(path: Path) -> None:
        encoded = codec.encode(load_image(path, max_pixels=limit), sample=args.sample, return_dict=True)
        save_latent_file(
            unique_output(out_dir, path.stem, ".safetensors", taken),
            LatentFile(encoded.latents[0], codec.fingerprint, encoded.image_size,
                       codec.normalization.to_config(), source=str(path)),
        )

    return for_each_file(args.images, encode_one, "encode")


def run_decode(args: argparse.Namespace) -> int:
    codec = open_codec(args)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()

    def decode_one(path: Path) -> None:
        latent = load_latent_file(path)
        if latent.fingerprint != codec.fingerprint:
            raise ValueError(
                f"{path}: made by another model (fingerprint {latent.fingerprint}, this model {codec.fingerprint}); "
                "decode it with the model that encoded it"
            )
        if latent.latents.shape[0] != codec.latent_channels:
            raise ValueError(f"{path}: {latent.latents.shape[0]} latent channels, this model has {codec.latent_channels}")
        expected = codec.latent_shape(*latent.image_size)
        if tuple(latent.latents.shape) != expected:  # else the crop back to image_size would be silently wrong
            raise ValueError(f"{path}: a {latent.image_size[0]}x{latent.image_size[1]} image has a latent of shape "
                             f"{expected}, this one is {tuple(latent.latents.shape)}")
        image = codec.decode(latent.latents, image_size=latent.image_size, output_type="pil")[0]
        save_image(image, unique_output(out_dir, path.stem, ".png", taken))

    return for_each_file(args.latents, decode_one, "decode")


def run_reconstruct(args: argparse.Namespace) -> int:
    from .metrics import SSIM_WINDOW, psnr, ssim

    limit = max_pixels(args)
    codec = open_codec(args)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    scores: list[tuple[float, float]] = []

    def reconstruct_one(path: Path) -> str:
        image = load_image(path, max_pixels=limit)
        if min(image.size) < SSIM_WINDOW:
            raise ImageError(f"{path}: {image.width}x{image.height} is smaller than SSIM's {SSIM_WINDOW}-pixel window; "
                             f"reconstruct needs at least {SSIM_WINDOW}x{SSIM_WINDOW} (encode and decode take any size)")
        encoded = codec.encode(image, return_dict=True)
        reference = pil_to_tensor(image).unsqueeze(0)
        result = codec.decode(encoded.latents, image_size=encoded.image_size).cpu()
        quality = (psnr(reference, result).item(), ssim(reference, result).item())
        before, after = tensor_to_uint8(reference)[0], tensor_to_uint8(result)[0]
        strip = image_strip([before, after, error_map(before, after)],
                            ["original", f"reconstruction {quality[0]:.2f} dB", "error x4"])
        save_image(strip, unique_output(out_dir, path.stem, ".png", taken))
        scores.append(quality)  # only once written: the mean is over the outputs there are
        return f"{path}: PSNR {quality[0]:.2f} dB  SSIM {quality[1]:.4f}"

    status = for_each_file(args.images, reconstruct_one, "reconstruct")
    if len(scores) > 1:
        print(f"mean over {len(scores)}: PSNR {sum(s[0] for s in scores) / len(scores):.2f} dB  "
              f"SSIM {sum(s[1] for s in scores) / len(scores):.4f}")
    return status


def run_calibrate(args: argparse.Namespace) -> int:
    if not args.out and not Path(args.model).is_dir():
        raise CommandError(f"--model {args.model!r} is not a model folder: pass --out DIR to save the calibrated model")
    require_positive(args, "resolution")
    if args.limit < 0:
        raise CommandError(f"--limit must be 0 (all images) or positive, got {args.limit}")
    from .model import model_folder, save_vae

    limit = max_pixels(args)
    scan = scan_images(args.data)
    failures = list(scan.unreadable)
    for line in scan.unreadable:
        print(f"failed: {line}", file=sys.stderr)
    paths = scan.files[: args.limit or None]
    if not paths:
        raise CommandError(f"{args.data}: no images found" + (" (some folders could not be read)" if failures else ""))
    codec = open_codec(args)
    images = []
    for path in tqdm(paths, desc="load", unit="img", disable=len(paths) < 2):
        try:
            image = load_image(path, max_pixels=limit)
        except ImageError as error:
            failures.append(failure_line(path, error))
            tqdm.write(f"failed: {failures[-1]}", file=sys.stderr)
            continue
        # one size for every image, so they batch: centre crop to a square, resize to --resolution
        images.append(centre_square(image, args.resolution))
    if not images:
        raise CommandError(f"{args.data}: none of the {len(paths)} images could be read")
    normalization = calibrate(codec, images, per_channel=args.per_channel)
    if args.out:
        model_dir = Path(args.out)
        with atomic_directory(model_dir) as tmp:
            save_vae(codec.vae.to("cpu", torch.float32), tmp)
    else:
        # In place only the config changes (the weights are those on disk): replace config.json atomically.
        model_dir = model_folder(Path(args.model))
        atomic_write_text(model_dir / "config.json", codec.vae.to_json_string())
    print(json.dumps({"images": len(images), **normalization.to_config()}, indent=None))
    print(f"saved the calibrated model to {model_dir}")
    if failures:
        print(f"{len(failures)} inputs failed; calibrated on the other {len(images)} images", file=sys.stderr)
        return EXIT_SOME_FAILED
    return EXIT_OK


def run_info(args: argparse.Namespace) -> int:
    from .model import codec_flops, count_parameters, load_vae

    require_positive(args, "resolution")
    vae = load_vae(args.model, seed=args.seed)
    config = vae.config
    factor = downsampling_factor(config.block_out_channels)
    height = width = args.resolution
    latent = (config.latent_channels, -(-height // factor), -(-width // factor))
    # the codec pads a side that is not a multiple of the factor: count the pass it actually runs
    encode_flops, decode_flops = codec_flops(vae, latent[1] * factor, latent[2] * factor)
    info = {
        "model": args.model,
        "class": type(vae).__name__,
        "shortcut": config.get("shortcut"),  # ResidualAutoencoderKL's; None for a plain AutoencoderKL
        "block_out_channels": list(config.block_out_channels),
        "layers_per_block": config.layers_per_block,
        "parameters": count_parameters(vae),
        "encoder_parameters": count_parameters(vae.encoder) + count_parameters(vae.quant_conv or torch.nn.Identity()),
        "decoder_parameters": count_parameters(vae.decoder) + count_parameters(vae.post_quant_conv or torch.nn.Identity()),
        "downsampling_factor": factor,
        "image_shape": [config.in_channels, height, width],
        "latent_shape": list(latent),
        "compression_ratio": config.in_channels * height * width / (latent[0] * latent[1] * latent[2]),
        "encode_gflops": encode_flops / 1e9,
        "decode_gflops": decode_flops / 1e9,
        "scaling_factor": config.scaling_factor,
        "shift_factor": config.shift_factor,
        "per_channel_normalization": config.get("latents_mean") is not None,
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width_ = max(len(k) for k in info)
        for key, value in info.items():
            shown = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else (
                f"{value:.2f}" if isinstance(value, float) else value)
            print(f"{key:<{width_}}  {shown}")
    return EXIT_OK


def run_interpolate(args: argparse.Namespace) -> int:
    from .codec import interpolate_latents

    limit = max_pixels(args)
    require_positive(args, "resolution")
    if args.steps < 2:
        raise CommandError(f"--steps must be at least 2 (A and B), got {args.steps}")
    codec = open_codec(args)
    first, second = (centre_square(load_image(p, max_pixels=limit), args.resolution) for p in (args.image_a, args.image_b))
    latents = codec.encode([first, second])
    path = interpolate_latents(latents[0], latents[1], args.steps, mode=args.mode)
    frames = codec.decode(path, output_type="pil")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    labels = ["A"] + [f"{i / (args.steps - 1):.2f}" for i in range(1, args.steps - 1)] + ["B"]
    save_image(image_grid([image_strip([first] + [Image.new("RGB", first.size, "white")] * (args.steps - 2) + [second],
                                       ["input A"] + [""] * (args.steps - 2) + ["input B"]),
                           image_strip(frames, labels)]), out)
    print(f"wrote {out}: {args.steps} images decoded along the {args.mode} path between the two latents")
    return EXIT_OK


def sample_photos() -> list[Path]:
    """Real photographs that scikit-image ships inside its wheel (no download)."""
    try:
        from importlib.resources import files

        folder = Path(str(files("skimage") / "data"))
    except ModuleNotFoundError:
        raise CommandError("the demo's sample photos come with scikit-image: pip install 'latent-vae[demo]'") from None
    names = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"]
    return [folder / name for name in names if (folder / name).is_file()]


def run_demo(args: argparse.Namespace) -> int:
    from .metrics import psnr

    require_positive(args, "resolution")
    codec = open_codec(args)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for path in tqdm(sample_photos(), desc="demo", unit="img"):
        image = centre_square(load_image(path), args.resolution)
        encoded = codec.encode(image, return_dict=True)
        result = codec.decode(encoded.latents)
        reference = pil_to_tensor(image).unsqueeze(0)
        score = psnr(reference, result.cpu()).item()
        before, after = tensor_to_uint8(reference)[0], tensor_to_uint8(result)[0]
        rows.append(image_strip([before, after, error_map(before, after)],
                                [path.name, f"reconstruction {score:.2f} dB", "error x4"]))
        tqdm.write(f"{path.name}: {args.resolution}x{args.resolution} -> latent {tuple(encoded.latents.shape[1:])} "
                   f"-> PSNR {score:.2f} dB")
    save_image(image_grid(rows), out_dir / "reconstructions.png")
    print(f"wrote {out_dir / 'reconstructions.png'} (original | reconstruction | error)")
    return EXIT_OK


def run_convert(args: argparse.Namespace) -> int:
    from .convert import convert_checkpoint

    result = convert_checkpoint(args.source, args.out, config=args.config, single_file=args.single_file,
                                prefix=args.prefix, use_ema=args.ema)
    origin = f"from {args.config}" if args.config else "inferred from the weights"
    print(f"architecture ({origin}): {result.architecture.describe()}")
    print(f"read {args.source} with {result.reader}; converted {result.converted} autoencoder tensors"
          + (f" under the prefix {result.prefix!r}" if result.prefix else ""))
    if result.ignored:
        print(f"ignored {sum(result.ignored.values())} tensors that are not the autoencoder: "
              + ", ".join(f"{name} {count}" for name, count in result.ignored.items()))
    if result.ema != "none":
        print("converted the EMA weights (model_ema)" if result.ema == "converted" else
              "the checkpoint also holds EMA weights (model_ema): --ema converts those instead")
    if result.skipped_objects:
        print("replaced these non-tensor objects by inert placeholders (none was built, no code of the file ran): "
              + ", ".join(sorted(result.skipped_objects)))
    print(f"saved {result.folder}" + (f" and {result.single_file}" if result.single_file else ""))
    print(f"its normalisation is neutral (scale 1, shift 0): measure it with "
          f"`latent-vae calibrate --model {result.folder} --data IMAGES`")
    return EXIT_OK


# -- parser ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="latent-vae",
        description="KL-VAE latent compression for diffusion models: images <-> normalised latents "
        "(f16c16: 3x1024x1024 -> 16x64x64).",
        epilog="Run `latent-vae COMMAND --help` for each command's options.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("encode", help="images -> one .safetensors latent per image",
                            description="Encode images; writes OUT/NAME.safetensors with the latent under "
                            "'latents' and metadata (model fingerprint, normalisation, original size).")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--sample", action="store_true", help="sample the posterior instead of taking its mode")
    add_image_arguments(p)
    add_model_arguments(p)
    p.set_defaults(func=run_encode)

    p = commands.add_parser("decode", help="latent files -> PNG images at the original size",
                            description="Decode latent files written by `latent-vae encode` with the same model.")
    p.add_argument("latents", nargs="+", metavar="LATENT")
    p.add_argument("--out", required=True, help="output folder")
    add_model_arguments(p)
    p.set_defaults(func=run_decode)

    p = commands.add_parser("reconstruct", help="image -> latent -> image; prints PSNR/SSIM, writes side-by-sides",
                            description="Writes OUT/NAME.png: original | reconstruction | error map (x4).")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--out", required=True, help="output folder")
    add_image_arguments(p)
    add_model_arguments(p)
    p.set_defaults(func=run_reconstruct)

    p = commands.add_parser("calibrate", help="measure latent scale/shift on images, save into the model",
                            description="Compute the normalisation (global scale=1/std and shift=mean, or per "
                            "channel) that gives unit-variance latents on DATA, and save it into the model config.")
    p.add_argument("--data", required=True, help="folder of images (recursive)")
    p.add_argument("--per-channel", action="store_true", help="per-channel latents_mean/latents_std (SDXL-style)")
    p.add_argument("--resolution", type=int, default=256, help="centre-crop and resize images to this (default 256)")
    p.add_argument("--limit", type=int, default=0, help="use at most this many images (default: all)")
    p.add_argument("--out", help="save the calibrated model here instead of into --model")
    add_image_arguments(p)
    add_model_arguments(p, default=None)
    p.set_defaults(func=run_calibrate)

    p = commands.add_parser("info", help="parameters, latent shape, compression and FLOPs of a model",
                            description="Describe a preset or model at a resolution (FLOPs counted on the meta "
                            "device: free at any size).")
    p.add_argument("--model", default=DEFAULT_PRESET, help=f"preset, model folder or .safetensors (default {DEFAULT_PRESET})")
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--resolution", type=int, default=1024, help="image side in pixels (default 1024)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run_info)

    p = commands.add_parser("interpolate", help="a strip of images decoded between the latents of two images",
                            description="Encode A and B (centre-cropped to a square), walk between their latents "
                            "and decode each step: a smooth latent space gives a smooth strip.")
    p.add_argument("image_a", metavar="A")
    p.add_argument("image_b", metavar="B")
    p.add_argument("--out", default="interpolation.png", help="output PNG (default interpolation.png)")
    p.add_argument("--steps", type=int, default=8, help="images in the strip, A and B included (default 8)")
    p.add_argument("--mode", choices=["slerp", "lerp"], default="slerp")
    p.add_argument("--resolution", type=int, default=256, help="square side in pixels (default 256)")
    add_image_arguments(p)
    add_model_arguments(p)
    p.set_defaults(func=run_interpolate)

    p = commands.add_parser("demo", help="reconstruct built-in sample photos (no download) into a PNG",
                            description="Encode and decode real photos that scikit-image ships, write "
                            "OUT/reconstructions.png. With a preset the weights are untrained (noise).")
    p.add_argument("--out", default="demo_output", help="output folder (default demo_output)")
    p.add_argument("--resolution", type=int, default=256, help="square side in pixels (default 256)")
    add_model_arguments(p, default="f16c16-narrow")
    p.set_defaults(func=run_demo)

    p = commands.add_parser("precompute", help="encode a dataset once into a latent dataset (🤗 datasets)",
                            description="Precompute the posterior of every image of tar shards, parquet files, a "
                            "folder or a dataset into parquet shards, one per input shard; killed, the same command "
                            "resumes; several runs or nodes share the work; see README 'Latent datasets'.")
    add_precompute_arguments(p)
    p.set_defaults(func=run_precompute)

    p = commands.add_parser("convert", help="an original latent-diffusion (LDM) autoencoder checkpoint -> diffusers folder",
                            description="Convert an LDM-layout KL autoencoder (CompVis kl-f4..f32, VA-VAE) from a "
                            "Lightning .ckpt, a .pt/.pth state dict or a .safetensors file into a diffusers model "
                            "folder. Pickles are read without running any code from them.")
    p.add_argument("source", metavar="SRC", help="the checkpoint (.ckpt, .pt, .pth or .safetensors)")
    p.add_argument("--out", required=True, help="the diffusers model folder to write")
    p.add_argument("--config", help="LDM's yaml (model.params.ddconfig + embed_dim); default: inferred from the weights")
    p.add_argument("--single-file", metavar="PATH", help="also write one .safetensors file with the config inside")
    p.add_argument("--prefix", help="the autoencoder's key prefix, e.g. first_stage_model. (default: found)")
    p.add_argument("--ema", action="store_true", help="convert the EMA weights (LDM's model_ema) instead of the raw ones")
    p.set_defaults(func=run_convert)
    return parser


# -- precompute (a self-contained block: its flags are derived from PrecomputeOptions) ---------------------------

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


def add_precompute_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `latent-vae precompute`: what to encode and where, then every PrecomputeOptions field."""
    from .precompute import PrecomputeOptions

    parser.add_argument("--model", help="preset name, diffusers model folder or .safetensors file")
    parser.add_argument("--data", help="WebDataset tar shards or parquet files (path, glob or folder of them), an image "
                        "folder, a datasets folder (save_to_disk) or arrow files")
    parser.add_argument("--out", help="output folder; the same command again continues an interrupted run, and runs "
                        "on several nodes into one folder share the work")
    parser.add_argument("--verify", metavar="DST", help="check a latent dataset instead (every shard done, row counts, "
                        "checksums, every key once); exit 0 when sound, 1 when not")
    add_dataclass_arguments(parser, PrecomputeOptions)


def run_precompute(args: argparse.Namespace) -> int:
    """`latent-vae precompute`: 0 when every input is in the dataset, 1 when some failed (listed), 2 when it
    could not run (one line)."""
    import dataclasses

    from .latents import FAILURES_FILE, read_failures, verify_latents
    from .precompute import PrecomputeOptions, precompute_latents

    try:
        if args.verify:
            report = verify_latents(args.verify)
            print(report.line())
            for problem in report.problems:
                print(f"{args.verify}: {problem}", file=sys.stderr)
            return EXIT_OK if report.ok else EXIT_SOME_FAILED
        missing = [f"--{name}" for name in ("model", "data", "out") if not getattr(args, name)]
        if missing:
            raise CommandError(f"{', '.join(missing)} required (or --verify DST)")
        options = PrecomputeOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PrecomputeOptions)})
        summary = precompute_latents(args.model, args.data, args.out, options)
    except ValueError as error:  # ImageError, ModelLoadError and CommandError are ValueErrors too
        print(f"latent-vae precompute: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return EXIT_OK if summary.failures == 0 else EXIT_SOME_FAILED
    print(summary.line())
    if summary.failures:
        failures = read_failures(args.out)
        for failure in failures[:20]:
            print(f"failed: {failure['message']} [{failure['reason']}]", file=sys.stderr)
        more = f" ({len(failures) - 20} more)" if len(failures) > 20 else ""
        print(f"{len(failures)} inputs failed{more}; all are listed in {Path(args.out) / FAILURES_FILE}", file=sys.stderr)
        return EXIT_SOME_FAILED
    return EXIT_OK


def precompute_main(argv: Sequence[str] | None = None) -> int:
    """`python -m latent_vae.precompute ...` (the form torchrun and accelerate launch start)."""
    parser = argparse.ArgumentParser(prog="python -m latent_vae.precompute",
                                     description="Encode a dataset once into a latent dataset (latent-vae precompute).")
    add_precompute_arguments(parser)
    return run_command(run_precompute, parser.parse_args(argv), "latent-vae precompute")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # bad arguments: argparse's usage line and exit 2
    return run_command(args.func, args, "latent-vae")


def run_command(func: Callable[[argparse.Namespace], int], args: argparse.Namespace, prog: str) -> int:
    """Run a command with the documented exit statuses: its own 0/1, 2 with one line for an input that
    stops it, 3 with a one-line summary and then the traceback for a bug."""
    from .codec import NonFiniteError

    try:
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


def one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    return first_line(error)


def first_line(error: BaseException) -> str:
    """An error's message, first line only (the name of its type when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
