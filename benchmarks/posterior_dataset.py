"""What a diffusion model reads from a latent dataset: precompute held-out photos with a model, then compare
`load_latents`' default read (a fresh posterior sample) with the mean it was drawn around.

For each model: the noise ratio `precompute` recorded in latents.json, the relative distance of a sampled read
from the mean (||sample - mean|| / ||mean||, normalised latents, mean over the rows) and the PSNR between the
images the two decode to. A sound posterior gives a distance well under 0.5 and images far apart from noise.

    python -m benchmarks.posterior_dataset --model runs/demo/train/vae --resolution 512
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from benchmarks.report import markdown_table, photo_folder, write_results
from latent_vae import LatentCodec, LatentInfo, load_latents, precompute_latents
from latent_vae.images.metrics import psnr

COLUMNS = ("model", "resolution", "rows", "noise ratio (latents.json)", "sample distance", "decoded PSNR sample vs mean",
           "warned")


def measure(model: str, label: str, photos: Path, resolution: int, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = Path(tmp) / "latents"
        precompute_latents(model, str(photos), out, resolution=resolution, progress=False)
        torch.manual_seed(seed)
        sampled, means = load_latents(out), load_latents(out, sample=False)
        codec = LatentCodec.from_pretrained(model)
        distances, agreement = [], []
        for i in range(len(means)):
            sample, mean = sampled[i]["latents"], means[i]["latents"]
            distances.append(((sample - mean).norm() / mean.norm()).item())
            agreement.append(psnr(codec.decode(mean[None]), codec.decode(sample[None])).item())
        noise = LatentInfo.read(out).posterior["noise_ratio"]
    return {"model": label, "resolution": resolution, "rows": len(means), "noise ratio (latents.json)": noise,
            "sample distance": sum(distances) / len(distances),
            "decoded PSNR sample vs mean": sum(agreement) / len(agreement),
            "warned": any("posterior" in str(w.message) for w in caught)}


def main(args: argparse.Namespace) -> None:
    rows = [measure(model, model, Path(args.images), args.resolution, args.seed) for model in args.model]
    print(markdown_table(rows, COLUMNS))
    command = "python -m benchmarks.posterior_dataset " + shlex.join(sys.argv[1:])
    notes = (f"Photos: those of {Path(args.images).name} at least {args.resolution} px a side ({rows[0]['rows']}: precompute "
             f"does not upscale by default), none seen in training, precomputed at {args.resolution} (centre crops). Sample distance: ||sample - mean|| / ||mean|| of load_latents' default "
             f"read against sample=False, normalised latents, mean over rows. Command: `{command}`")
    write_results(args.name, rows, notes=notes, columns=COLUMNS, extra={"command": command})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", required=True, help="trained model folders")
    parser.add_argument("--images", default=str(photo_folder() / "cset14"),
                        help="a folder of held-out photos (default: $LATENT_VAE_PHOTOS/cset14)")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="posterior_dataset_cpu", help="results/NAME.json and .md")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
