"""The coding commands: encode, decode, reconstruct, interpolate, and sample-photos (the photos scikit-image ships)."""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from ..images.figures import error_map, image_grid, image_strip
from ..images.reading import centre_square, load_image, pil_to_tensor, tensor_to_uint8
from ..latents.single_file import LatentFile, load_latent_file, save_latent_file
from ..utils import option_values as values
from ..utils.errors import EXIT_OK, CommandError, ImageError
from .common import (
    add_image_arguments,
    add_model_arguments,
    by_name,
    by_suffix,
    check_output_file,
    check_output_folder,
    for_each_file,
    max_pixels,
    open_codec,
    save_image,
    unique_output,
)

# What each command writes into its --out folder: a rerun may replace these, nothing else is touched.
LATENT_OUTPUTS, IMAGE_OUTPUTS = by_suffix(".safetensors"), by_suffix(".png")
SAMPLE_PHOTOS_OUTPUT = "reconstructions.png"


def add_parsers(commands: argparse._SubParsersAction) -> None:
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

    p = commands.add_parser("interpolate", help="a strip of images decoded between the latents of two images",
                            description="Encode A and B (centre-cropped to a square), walk between their latents "
                            "and decode each step: a smooth latent space gives a smooth strip.")
    p.add_argument("image_a", metavar="A")
    p.add_argument("image_b", metavar="B")
    p.add_argument("--out", default="interpolation.png", help="output PNG (default interpolation.png)")
    p.add_argument("--steps", type=values.Integer(2, 1024, "an integer from 2 (A and B) to 1024"), default=8,
                   help="images in the strip, A and B included (default 8)")
    p.add_argument("--mode", choices=["slerp", "lerp"], default="slerp")
    p.add_argument("--resolution", type=values.image_side, default=256, help="square side in pixels (default 256)")
    add_image_arguments(p)
    add_model_arguments(p)
    p.set_defaults(func=run_interpolate)

    p = commands.add_parser("sample-photos", help="reconstruct the sample photos scikit-image ships (no download) into a PNG",
                            description="Encode and decode real photos that scikit-image ships, write "
                            "OUT/reconstructions.png. With a preset the weights are untrained (noise).")
    p.add_argument("--out", default="sample_photos", help="output folder (default sample_photos)")
    p.add_argument("--resolution", type=values.image_side, default=256, help="square side in pixels (default 256)")
    add_model_arguments(p, default="f16c16-narrow")
    p.set_defaults(func=run_sample_photos)


def run_encode(args: argparse.Namespace) -> int:
    limit = max_pixels(args)
    out_dir = check_output_folder(args.out, "latent files (.safetensors)", LATENT_OUTPUTS)
    codec = open_codec(args)
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
    out_dir = check_output_folder(args.out, "PNG images", IMAGE_OUTPUTS)
    codec = open_codec(args)
    out_dir.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()

    def decode_one(path: Path) -> None:
        latent = load_latent_file(path, model=codec)
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
    from ..images.metrics import SSIM_WINDOW, psnr, ssim

    limit = max_pixels(args)
    out_dir = check_output_folder(args.out, "PNG images", IMAGE_OUTPUTS)
    codec = open_codec(args)
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


def run_interpolate(args: argparse.Namespace) -> int:
    from ..codec.latent_codec import interpolate_latents

    limit = max_pixels(args)
    out = check_output_file(args.out, "PNG image", (".png",))
    codec = open_codec(args)
    first, second = (centre_square(load_image(p, max_pixels=limit), args.resolution) for p in (args.image_a, args.image_b))
    latents = codec.encode([first, second])
    path = interpolate_latents(latents[0], latents[1], args.steps, mode=args.mode)
    frames = codec.decode(path, image_size=first.size[::-1], output_type="pil")  # any side, cropped back
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
        raise CommandError("the sample photos come with scikit-image: pip install 'latent-vae[demo]'") from None
    names = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"]
    return [folder / name for name in names if (folder / name).is_file()]


def run_sample_photos(args: argparse.Namespace) -> int:
    from ..images.metrics import psnr

    out_dir = check_output_folder(args.out, SAMPLE_PHOTOS_OUTPUT, by_name(SAMPLE_PHOTOS_OUTPUT))
    codec = open_codec(args)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for path in tqdm(sample_photos(), desc="sample-photos", unit="img"):
        image = centre_square(load_image(path), args.resolution)
        encoded = codec.encode(image, return_dict=True)
        result = codec.decode(encoded.latents, image_size=encoded.image_size)  # a side not a multiple of the factor
        reference = pil_to_tensor(image).unsqueeze(0)
        score = psnr(reference, result.cpu()).item()
        before, after = tensor_to_uint8(reference)[0], tensor_to_uint8(result)[0]
        rows.append(image_strip([before, after, error_map(before, after)],
                                [path.name, f"reconstruction {score:.2f} dB", "error x4"]))
        tqdm.write(f"{path.name}: {args.resolution}x{args.resolution} -> latent {tuple(encoded.latents.shape[1:])} "
                   f"-> PSNR {score:.2f} dB")
    save_image(image_grid(rows), out_dir / SAMPLE_PHOTOS_OUTPUT)
    print(f"wrote {out_dir / SAMPLE_PHOTOS_OUTPUT} (original | reconstruction | error)")
    return EXIT_OK

