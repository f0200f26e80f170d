"""The README's main job: train a small f16c16 VAE for ten minutes on CPU, then look at what it does
with a photo it never saw, at 1024x1024 (a 16x64x64 latent).

    python -m training.demo                      # 10 minutes of training, then the evaluation
    python -m training.demo --minutes 2 --out runs/demo --holdout coffee.png

Training photos are the real photographs scikit-image ships in its wheel (astronaut, cat, coffee,
rocket, motorcycle, Hubble, retina, ...), one held out. The held-out photo is resized to 1024x1024,
encoded, decoded, and scored (PSNR/SSIM) next to the honest baseline that needs no network at all:
bicubic down-sampling to as many values as the latent holds (3 x 147 x 147 <= 16 x 64 x 64), then
bicubic up-sampling; and again at the photo's own size (512x512), where enlarging has not smoothed it.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import time
from pathlib import Path

import torch
from PIL import Image

from latent_vae import LatentCodec, interpolate_latents
from latent_vae.images.figures import error_map, image_strip
from latent_vae.images.metrics import bicubic_equal_values, equal_values_size, psnr, ssim
from latent_vae.images.reading import centre_square, load_image, pil_to_tensor, tensor_to_pil, tensor_to_uint8
from latent_vae.models.residual import untrained_code_model
from latent_vae.utils.atomic import atomic_write_text

from .config import load_config
from .posterior import measure_posterior
from .train_vae import main as train

# Colour photographs and textures in scikit-image's data folder (grayscale ones are made RGB).
SAMPLE_PHOTOS = (
    "astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg",
    "retina.jpg", "ihc.png", "color.png", "brick.png", "grass.png", "gravel.png", "camera.png", "moon.png",
)
EVAL_SIZE = 1024


def sample_photo_folder() -> Path:
    try:
        return Path(str(importlib.resources.files("skimage") / "data"))
    except ModuleNotFoundError:
        raise SystemExit("the demo's photos come with scikit-image: pip install 'latent-vae[demo]'") from None


def square(image: Image.Image, size: int) -> torch.Tensor:
    """Centre square, resized to size x size: float 1x3xHxW in [-1, 1]."""
    return pil_to_tensor(centre_square(image, size))[None]


def evaluate(model_dir: Path, holdout: Path, partner: Path, out: Path) -> dict:
    """Reconstruct the held-out photo at 1024x1024, compare with bicubic, write PNGs; returns the numbers."""
    codec = LatentCodec.from_pretrained(model_dir)  # whole image or exact tiles, as the memory budget allows
    photo = load_image(holdout)
    original = square(photo, EVAL_SIZE)
    started = time.perf_counter()
    encoded = codec.encode(original, return_dict=True)
    reconstruction = codec.decode(encoded.latents)
    seconds = time.perf_counter() - started
    latent_values = encoded.latents[0].numel()
    bicubic = bicubic_equal_values(original, latent_values)
    side = equal_values_size(EVAL_SIZE, EVAL_SIZE, latent_values)[0]
    # The posterior at the size of use: a latent dataset samples it on every read unless told otherwise.
    posterior = measure_posterior(codec.vae, [original.to(codec.device, codec.dtype)], device=codec.device)
    results = {
        "holdout": holdout.name, "holdout_native_size": list(photo.size), "eval_size": EVAL_SIZE,
        "latent_shape": list(encoded.latents.shape[1:]), "latent_values": latent_values,
        "vae_psnr": psnr(original, reconstruction).item(), "vae_ssim": ssim(original, reconstruction).item(),
        "bicubic_side": side, "bicubic_psnr": psnr(original, bicubic).item(), "bicubic_ssim": ssim(original, bicubic).item(),
        "encode_decode_seconds": seconds, "posterior_psnr_mean": posterior.psnr_mean,
        "posterior_psnr_sample": posterior.psnr_sample, "posterior_logvar_max": posterior.logvar_max,
        "posterior_noise_ratio": posterior.noise_ratio,
    }
    # Also at the photo's own size: enlarging it to 1024 makes it smooth, which flatters bicubic.
    native = pil_to_tensor(photo)[None]
    # A shortcut model started as its parameter-free code: score that too, to show what training added.
    code_model = untrained_code_model(codec.vae)
    if code_model is not None:
        code_codec = LatentCodec(code_model)
        for key, image in (("code", original), ("native_code", native)):
            encoded_image = code_codec.encode(image, return_dict=True)
            decoded = code_codec.decode(encoded_image.latents, image_size=encoded_image.image_size)
            results.update({f"{key}_psnr": psnr(image, decoded).item(), f"{key}_ssim": ssim(image, decoded).item()})
    native_encoded = codec.encode(native, return_dict=True)
    native_reconstruction = codec.decode(native_encoded.latents, image_size=native_encoded.image_size)
    native_bicubic = bicubic_equal_values(native, native_encoded.latents[0].numel())
    results.update(
        native_vae_psnr=psnr(native, native_reconstruction).item(), native_vae_ssim=ssim(native, native_reconstruction).item(),
        native_bicubic_psnr=psnr(native, native_bicubic).item(), native_bicubic_ssim=ssim(native, native_bicubic).item(),
    )
    o, r, b = (tensor_to_uint8(t)[0] for t in (original, reconstruction, bicubic))
    labels = ["original (held out)", f"VAE {results['vae_psnr']:.1f} dB", f"bicubic {side}x{side} {results['bicubic_psnr']:.1f} dB",
              "VAE error x4"]
    half = lambda a: Image.fromarray(a).resize((EVAL_SIZE // 2, EVAL_SIZE // 2), Image.LANCZOS)
    image_strip([half(o), half(r), half(b), half(error_map(o, r))], labels).save(out / "heldout_comparison.png")
    # A 256x256 detail from the centre at full resolution, where blur shows.
    c = slice(EVAL_SIZE // 2 - 128, EVAL_SIZE // 2 + 128)
    image_strip([o[c, c], r[c, c], b[c, c]], ["original", "VAE", "bicubic"]).save(out / "heldout_detail.png")
    tensor_to_pil(reconstruction)[0].save(out / "heldout_reconstruction_1024.png")

    # Interpolation between the held-out photo and a training photo, in the normalised latent space.
    a, b_ = codec.encode(square(photo, 512)), codec.encode(square(load_image(partner), 512))
    frames = codec.decode(interpolate_latents(a[0], b_[0], steps=6), output_type="pil")
    image_strip([f.resize((256, 256), Image.LANCZOS) for f in frames]).save(out / "interpolation.png")
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m training.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="training time budget (default 10)")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--holdout", default="astronaut.png", help=f"one of {', '.join(SAMPLE_PHOTOS)}")
    parser.add_argument("--partner", default="coffee.png", help="training photo the interpolation strip goes to")
    parser.add_argument("--config", default="cpu_demo", help="training config (any field can be overridden below)")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="training config overrides")
    args = parser.parse_args(argv)
    photos = sample_photo_folder()
    if args.holdout not in SAMPLE_PHOTOS:
        parser.error(f"--holdout must be one of {', '.join(SAMPLE_PHOTOS)}")

    # The training folder: links to every sample photo but the held-out one.
    train_dir = args.out / "photos"
    train_dir.mkdir(parents=True, exist_ok=True)
    for name in SAMPLE_PHOTOS:
        link = train_dir / name
        if name != args.holdout and not link.exists():
            link.symlink_to(photos / name)
    overrides = dict(item.split("=", 1) for item in args.set)
    config = load_config(args.config, {"data": str(train_dir), "output_dir": str(args.out / "train"),
                                       "max_minutes": args.minutes, **overrides})
    started = time.perf_counter()
    model_dir = train(config)
    train_seconds = time.perf_counter() - started
    state = json.loads((Path(config.output_dir) / f"checkpoint-{_last_step(config.output_dir):07d}" /
                        "trainer_state.json").read_text())

    results = evaluate(model_dir, photos / args.holdout, photos / args.partner, args.out)
    results.update(train_steps=state["step"], train_images=state["samples_seen"], train_seconds=train_seconds,
                   model=config.model, crop=config.resolution, batch_size=config.batch_size,
                   learning_rate=config.learning_rate, model_dir=str(model_dir))
    atomic_write_text(args.out / "demo_results.json", json.dumps(results, indent=2))
    photo_size = results["holdout_native_size"]
    code_line = code_native = ""
    if "code_psnr" in results:
        code_line = (f"  its untrained shortcut code (where training started) PSNR {results['code_psnr']:.2f} dB  "
                     f"SSIM {results['code_ssim']:.3f}\n")
        code_native = (f", untrained code PSNR {results['native_code_psnr']:.2f} dB  SSIM "
                       f"{results['native_code_ssim']:.3f}")
    print(
        f"\ntrained {config.model} for {state['step']} steps ({train_seconds / 60:.1f} min) on {len(SAMPLE_PHOTOS) - 1} "
        f"photos; held-out {args.holdout} at {EVAL_SIZE}x{EVAL_SIZE} -> latent {tuple(results['latent_shape'])}:\n"
        f"  VAE reconstruction      PSNR {results['vae_psnr']:.2f} dB  SSIM {results['vae_ssim']:.3f}\n"
        f"  bicubic {results['bicubic_side']}x{results['bicubic_side']}x3 (same number of values) "
        f"PSNR {results['bicubic_psnr']:.2f} dB  SSIM {results['bicubic_ssim']:.3f}\n"
        f"{code_line}"
        f"{posterior_line(results)}"
        f"at its own size {photo_size[0]}x{photo_size[1]}: VAE PSNR {results['native_vae_psnr']:.2f} dB  SSIM "
        f"{results['native_vae_ssim']:.3f}, bicubic PSNR {results['native_bicubic_psnr']:.2f} dB  SSIM "
        f"{results['native_bicubic_ssim']:.3f}{code_native}\n"
        f"A few CPU minutes show that training works, not a usable model: the full recipe (training/configs/"
        f"f16c16.json) needs GPU-days.\nImages in {args.out}: heldout_comparison.png, heldout_detail.png, "
        f"interpolation.png; the model in {model_dir}"
    )
    return results


def posterior_line(results: dict) -> str:
    """The posterior at 1024: what a latent dataset's default read (a sample) decodes to, beside the mean."""
    ratio = results["posterior_noise_ratio"]
    noise = f"{ratio:.2g} times the latents' spread" if ratio is not None else "(no latent channel varies)"
    return (f"  a posterior sample      PSNR {results['posterior_psnr_sample']:.2f} dB (the mean "
            f"{results['posterior_psnr_mean']:.2f} dB): it lies {noise} from the mean (precompute's noise ratio), "
            f"log-variance at most {results['posterior_logvar_max']:.1f}\n")


def _last_step(output_dir: str) -> int:
    return int((Path(output_dir) / "latest").read_text().strip().split("-")[1])


if __name__ == "__main__":
    main()
