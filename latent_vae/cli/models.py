"""The model commands: calibrate a model's latent normalisation, describe a model, convert an LDM checkpoint."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..models.normalization import calibrate
from ..models.presets import DEFAULT_PRESET, downsampling_factor
from ..utils import option_values as values
from ..utils.atomic import atomic_directory, atomic_write_text
from ..utils.errors import EXIT_OK, EXIT_SOME_FAILED, CommandError
from .common import (
    MODEL_FILES,
    add_image_arguments,
    add_model_arguments,
    centre_squares,
    check_output_file,
    check_output_folder,
    list_input_images,
    max_pixels,
    open_codec,
)

MODEL_KIND = "a diffusers model (config.json + .safetensors)"


def check_model_output(path: str | Path, option: str = "--out") -> Path:
    """An output model folder: new, empty, or a diffusers model folder (which the command replaces whole)."""
    return check_output_folder(path, MODEL_KIND, MODEL_FILES, option=option, marker="config.json")


def add_parsers(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("calibrate", help="measure latent scale/shift on images, save into the model",
                            description="Compute the normalisation (global scale=1/std and shift=mean, or per "
                            "channel) that gives unit-variance latents on DATA, and save it into the model config.")
    p.add_argument("--data", required=True, help="folder of images (recursive)")
    p.add_argument("--per-channel", action="store_true", help="per-channel latents_mean/latents_std (SDXL-style)")
    p.add_argument("--resolution", type=values.image_side, default=256,
                   help="centre-crop and resize images to this (default 256)")
    p.add_argument("--limit", type=values.non_negative_int, default=0, help="use at most this many images (default: all)")
    p.add_argument("--out", help="save the calibrated model here instead of into --model")
    add_image_arguments(p)
    add_model_arguments(p, default=None)
    p.set_defaults(func=run_calibrate)

    p = commands.add_parser("info", help="parameters, latent shape, compression and FLOPs of a model",
                            description="Describe a preset or model at a resolution (FLOPs counted on the meta "
                            "device: free at any size).")
    p.add_argument("--model", default=DEFAULT_PRESET, help=f"preset, model folder or .safetensors (default {DEFAULT_PRESET})")
    p.add_argument("--seed", type=values.any_int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--resolution", type=values.image_side, default=1024, help="image side in pixels (default 1024)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run_info)

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


def run_calibrate(args: argparse.Namespace) -> int:
    from ..models.loading import model_folder, save_vae

    if not args.out and (not Path(args.model).is_dir() or model_folder(Path(args.model)) is None):
        raise CommandError(f"--model {args.model!r} is not a model folder: pass --out DIR to save the calibrated model")
    if args.out:
        check_model_output(args.out)

    limit = max_pixels(args)
    paths, failures = list_input_images(args.data, args.limit)
    codec = open_codec(args)
    # one size for every image, so they batch: centre crop to a square, resize to --resolution
    images = [square for _, square in centre_squares(paths, args.resolution, limit, failures, "load")]
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
    from ..models.loading import codec_flops, count_parameters, load_vae

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



def run_convert(args: argparse.Namespace) -> int:
    from ..models.convert import convert_checkpoint

    check_model_output(args.out)
    if args.single_file:
        check_output_file(args.single_file, ".safetensors model", (".safetensors",), option="--single-file")
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

