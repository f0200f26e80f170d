"""Loss recipes compared at equal steps on CPU: L1+KL, +PatchGAN, +frequency or +SSIM sharpness term.

    python -m benchmarks.train_recipes --steps 80          # a few minutes per recipe on a 2-core CPU

Each recipe trains the model of training/configs/cpu_demo.json (`--set model=...` for another) with the
training program (that config, same seed, same crops in the same order) on the CBSD68 photos
($LATENT_VAE_PHOTOS/cbsd68) and is scored on Set14 (never seen), centre crops at 256x256: PSNR, SSIM, and
sharpness = the Laplacian energy of the reconstruction over the original's (1.0: as sharp as the original;
below 1: blurred). Such short runs rank recipes by how fast they start, not by where they end.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.state import AcceleratorState

from benchmarks.report import photo_folder, write_results
from latent_vae import LatentCodec
from latent_vae.images.metrics import psnr, ssim
from latent_vae.images.reading import find_images, load_image
from training.config import load_config
from training.data import center_crop
from training.train_vae import main as train

EVAL_SIZE = 256

RECIPES = {
    "L1+KL": {},
    "L1+KL+GAN": {"disc_weight": 0.5, "disc_start": 0},
    "L1+KL+FFT": {"sharpness_loss": "fft", "sharpness_weight": 0.5},
    "L1+KL+SSIM": {"sharpness_loss": "ssim", "sharpness_weight": 0.5},
}


def laplacian_energy(images: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared response of a 3x3 Laplacian (per channel): high-frequency content."""
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).expand(3, 1, 3, 3)
    return F.conv2d(images.float(), kernel, groups=3).pow(2).mean(dim=(1, 2, 3))


def score(model_dir: Path, images: torch.Tensor) -> dict[str, float]:
    codec = LatentCodec.from_pretrained(model_dir, max_batch_size=4)
    reconstruction = codec.reconstruct(images)
    return {
        "psnr": psnr(images, reconstruction).mean().item(),
        "ssim": ssim(images, reconstruction).mean().item(),
        "sharpness": (laplacian_energy(reconstruction) / laplacian_energy(images)).mean().item(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_recipes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--data", type=Path, default=photo_folder(), help="folder holding cbsd68/ and cset14/ (default: $LATENT_VAE_PHOTOS or photos/)")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--out", type=Path, default=Path("runs/recipes"))
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="overrides for every recipe")
    args = parser.parse_args(argv)
    train_dir, eval_dir = args.data / "cbsd68", args.data / "cset14"
    if not train_dir.is_dir() or not eval_dir.is_dir():
        parser.error(f"needs {train_dir} and {eval_dir} (the CBSD68 and Set14 test photos; set $LATENT_VAE_PHOTOS)")
    eval_images = torch.stack([center_crop(load_image(p), EVAL_SIZE) for p in find_images(eval_dir)])
    common = {"data": str(train_dir), "max_steps": args.steps, "max_minutes": 0, "report_to": "none",
              **dict(item.split("=", 1) for item in args.set)}
    rows = []
    for name in args.recipes.split(","):
        AcceleratorState._reset_state(True)  # each recipe is a fresh run in this process
        config = load_config("cpu_demo", {**common, **RECIPES[name], "output_dir": str(args.out / name)})
        started = time.perf_counter()
        model_dir = train(config)
        seconds = time.perf_counter() - started
        rows.append({"recipe": name, "steps": args.steps, "train_s": seconds, **score(model_dir, eval_images)})
        print(rows[-1], flush=True)
    write_results(
        "train_recipes", rows, columns=["recipe", "steps", "psnr", "ssim", "sharpness", "train_s"],
        notes=(f"{config.model}, cpu_demo recipe (crop {config.resolution}, batch {config.batch_size}, lr "
               f"{config.learning_rate}), {args.steps} steps on CBSD68 ({len(find_images(train_dir))} photos); scored "
               f"on Set14 ({len(eval_images)} photos, centre {EVAL_SIZE}x{EVAL_SIZE}, EMA weights). sharpness = "
               "Laplacian energy of reconstruction / original (1 = as sharp). train_s includes start-up and export, "
               "on a shared 2-core CPU: compare within this table only."),
    )


if __name__ == "__main__":
    main()
