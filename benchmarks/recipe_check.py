"""What the f16c16 recipe does in LDM's units on a real forward pass: the GAN's adaptive weight, the gradient norm
that `max_grad_norm` clips, and how small the gradients are against Adam's epsilon.

    python -m benchmarks.recipe_check [--resolutions 128,256 --batch 2 --threads 1]

Fresh `f16c16` weights and a fresh PatchGAN (as when the GAN switches on, but before the decoder has learnt),
LDM-style crops of scikit-image's sample photos, L1 + KL (+ LPIPS when its weights are in the default cache file).
The adaptive weight is given three ways: LDM's (ratio of the reconstruction loss summed over pixel values, clamped
to 1e4), this project's (the same, divided by the pixel values for our mean losses: the GAN term has LDM's
strength), and the mean loss's ratio clamped to 1e4 (`gan_weight_before`: what a clamp in mean units would give,
too strong once LDM's ratio is past its clamp).
"""

from __future__ import annotations

import argparse
import importlib.resources
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.report import write_results
from latent_vae import build_vae
from training.data import ldm_crop
from training.losses import (
    AutoencoderWithLoss,
    LossWeights,
    PatchDiscriminator,
    adaptive_weight,
    generator_loss,
)
from training.lpips import DEFAULT_WEIGHTS, LPIPS

PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg")


def measure(resolution: int, batch: int, lpips: LPIPS | None) -> dict:
    photos = Path(str(importlib.resources.files("skimage") / "data"))
    images = [Image.open(photos / PHOTOS[i % len(PHOTOS)]).convert("RGB") for i in range(batch)]
    pixels = torch.stack([ldm_crop(im, resolution, np.random.default_rng(i), 0.5, False) for i, im in enumerate(images)])
    vae = build_vae("f16c16", seed=0).train()
    model = AutoencoderWithLoss(vae, LossWeights(reconstruction="l1", kl=1e-6, lpips=1.0 if lpips else 0.0), lpips)
    torch.manual_seed(1)
    discriminator = PatchDiscriminator().requires_grad_(False)
    started = time.perf_counter()
    torch.manual_seed(0)
    out = model(pixels)
    g_loss = generator_loss(discriminator(out["reconstruction"]))
    last = vae.decoder.conv_out.weight
    pixel_values = pixels[0].numel()
    nll_grad = torch.autograd.grad(out["nll"], last, retain_graph=True)[0].norm().item()
    g_grad = torch.autograd.grad(g_loss, last, retain_graph=True)[0].norm().item()
    ldm_ratio = pixel_values * nll_grad / (g_grad + 1e-4)
    ours = 0.5 * adaptive_weight(out["nll"], g_loss, last, pixel_values=pixel_values).item()
    before = 0.5 * min(nll_grad / (g_grad + 1e-4), 1e4)
    (out["nll"] + 1e-6 * out["kl"]).backward()
    grads = torch.cat([p.grad.flatten().abs() for p in vae.parameters()])
    return {
        "resolution": resolution, "batch": batch, "lpips": lpips is not None, "pixel_values": pixel_values,
        "ldm_ratio": round(ldm_ratio, 1), "ldm_at_clamp": ldm_ratio >= 1e4,
        "gan_weight_ours": ours, "gan_weight_ldm_in_our_units": 0.5 * min(ldm_ratio, 1e4) / pixel_values,
        "gan_weight_before": before, "before_over_ldm": round(before / ours, 2),
        "grad_norm": round(grads.norm().item(), 3), "median_abs_grad": grads.median().item(),
        "share_below_1e-6": round((grads < 1e-6).float().mean().item(), 4),
        "share_below_1e-7": round((grads < 1e-7).float().mean().item(), 4),
        "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.recipe_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolutions", default="128,256")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lpips = LPIPS.from_file(DEFAULT_WEIGHTS) if DEFAULT_WEIGHTS.is_file() else None
    rows = []
    for resolution in map(int, args.resolutions.split(",")):
        rows.append(measure(resolution, args.batch, lpips))
        print(rows[-1])
    write_results("recipe_check", rows, notes=(
        "Fresh f16c16 and PatchGAN; gan_weight_* multiply the mean-reduced g_loss (x0.5 disc_weight included). "
        "grad_norm: the VAE's whole gradient of L1 (+LPIPS) + 1e-6 KL in this project's (mean) units, what "
        "max_grad_norm clips; share_below_*: gradient values under 1e-6 / 1e-7, where Adam's eps 1e-8 is 1% / 10%."))


if __name__ == "__main__":
    main()
