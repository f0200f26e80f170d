"""The `latent-vae` command line: encode, decode, reconstruct, calibrate, info, interpolate, demo, precompute.

Every command reports bad input as one line on stderr and a non-zero exit, without a traceback; in a
batch the bad files are listed and every good one is still written (exit 1 when any failed).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image
from tqdm.auto import tqdm

from .images import (
    ImageError,
    centre_square,
    error_map,
    find_images,
    image_grid,
    image_strip,
    load_image,
    pil_to_tensor,
    tensor_to_uint8,
)
from .latent_files import LatentFile, load_latent_file, save_latent_file
from .precompute import add_precompute_arguments, run_precompute
from .presets import DEFAULT_PRESET, PRESETS, downsampling_factor
from .stats import calibrate

# diffusers (through .codec and .model) and torchmetrics (.metrics) are imported inside the commands that
# use them: `latent-vae --help` and argument errors then answer without the ~4 s those imports take.
if TYPE_CHECKING:
    from .codec import LatentCodec

EXIT_BAD_INPUT = 2  # the whole command could not run
EXIT_SOME_FAILED = 1  # a batch ran, but some inputs were skipped


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
    """Run `work` on every path with a progress bar; bad inputs are reported, the rest still done."""
    failures = []
    for path in tqdm([Path(p) for p in paths], desc=description, unit="file", disable=len(paths) < 2):
        try:
            message = work(path)
        except (ImageError, ValueError, OSError) as error:
            failures.append(str(error))
            tqdm.write(f"skipped: {error}", file=sys.stderr)
            continue
        if message:
            tqdm.write(message)
    if failures:
        print(f"{len(failures)} of {len(paths)} inputs failed; the other {len(paths) - len(failures)} were written",
              file=sys.stderr)
        return EXIT_SOME_FAILED
    return 0


# -- commands -------------------------------------------------------------------------------------


def run_encode(args: argparse.Namespace) -> int:
    codec = open_codec(args)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()

    def encode_one(path: Path) -> None:
        encoded = codec.encode(load_image(path), sample=args.sample, return_dict=True)
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
        image = codec.decode(latent.latents, image_size=latent.image_size, output_type="pil")[0]
        image.save(unique_output(out_dir, path.stem, ".png", taken))

    return for_each_file(args.latents, decode_one, "decode")


def run_reconstruct(args: argparse.Namespace) -> int:
    from .metrics import psnr, ssim

    codec = open_codec(args)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    scores: list[tuple[float, float]] = []

    def reconstruct_one(path: Path) -> str:
        image = load_image(path)
        encoded = codec.encode(image, return_dict=True)
        reference = pil_to_tensor(image).unsqueeze(0)
        result = codec.decode(encoded.latents, image_size=encoded.image_size).cpu()
        quality = (psnr(reference, result).item(), ssim(reference, result).item())
        scores.append(quality)
        before, after = tensor_to_uint8(reference)[0], tensor_to_uint8(result)[0]
        strip = image_strip([before, after, error_map(before, after)],
                            ["original", f"reconstruction {quality[0]:.2f} dB", "error x4"])
        strip.save(unique_output(out_dir, path.stem, ".png", taken))
        return f"{path}: PSNR {quality[0]:.2f} dB  SSIM {quality[1]:.4f}"

    status = for_each_file(args.images, reconstruct_one, "reconstruct")
    if len(scores) > 1:
        print(f"mean over {len(scores)}: PSNR {sum(s[0] for s in scores) / len(scores):.2f} dB  "
              f"SSIM {sum(s[1] for s in scores) / len(scores):.4f}")
    return status


def run_calibrate(args: argparse.Namespace) -> int:
    model_dir = Path(args.out or args.model)
    if not args.out and not Path(args.model).is_dir():
        raise CommandError(f"--model {args.model!r} is not a model folder: pass --out DIR to save the calibrated model")
    from .model import save_vae

    codec = open_codec(args)
    paths = find_images(args.data)[: args.limit or None]
    if not paths:
        raise CommandError(f"{args.data}: no images found")
    images = []
    for path in tqdm(paths, desc="load", unit="img", disable=len(paths) < 2):
        try:
            image = load_image(path)
        except ImageError as error:
            tqdm.write(f"skipped: {error}", file=sys.stderr)
            continue
        # one size for every image, so they batch: centre crop to a square, resize to --resolution
        images.append(centre_square(image, args.resolution))
    normalization = calibrate(codec, images, per_channel=args.per_channel)
    save_vae(codec.vae.to("cpu", torch.float32), model_dir)
    print(json.dumps({"images": len(images), **normalization.to_config()}, indent=None))
    print(f"saved the calibrated model to {model_dir}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from .model import codec_flops, count_parameters, load_vae

    vae = load_vae(args.model, seed=args.seed)
    config = vae.config
    factor = downsampling_factor(config.block_out_channels)
    height = width = args.resolution
    latent = (config.latent_channels, -(-height // factor), -(-width // factor))
    encode_flops, decode_flops = codec_flops(vae, height, width)
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
    return 0


def run_interpolate(args: argparse.Namespace) -> int:
    from .codec import interpolate_latents

    codec = open_codec(args)
    first, second = (centre_square(load_image(p), args.resolution) for p in (args.image_a, args.image_b))
    latents = codec.encode([first, second])
    path = interpolate_latents(latents[0], latents[1], args.steps, mode=args.mode)
    frames = codec.decode(path, output_type="pil")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    labels = ["A"] + [f"{i / (args.steps - 1):.2f}" for i in range(1, args.steps - 1)] + ["B"]
    image_grid([image_strip([first] + [Image.new("RGB", first.size, "white")] * (args.steps - 2) + [second],
                            ["input A"] + [""] * (args.steps - 2) + ["input B"]),
                image_strip(frames, labels)]).save(out)
    print(f"wrote {out}: {args.steps} images decoded along the {args.mode} path between the two latents")
    return 0


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
    image_grid(rows).save(out_dir / "reconstructions.png")
    print(f"wrote {out_dir / 'reconstructions.png'} (original | reconstruction | error)")
    return 0


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
                            description="Precompute the posterior of every image of a folder or dataset into "
                            "parquet shards; killed, the same command resumes; see README 'Latent datasets'.")
    add_precompute_arguments(p)
    p.set_defaults(func=run_precompute)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .codec import NonFiniteError

    try:
        return args.func(args)
    except (ValueError, OSError, NonFiniteError) as error:
        # ImageError, ModelLoadError and CommandError are ValueErrors: one line, no traceback
        print(f"latent-vae: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("latent-vae: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
