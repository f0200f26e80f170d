"""Training throughput: optimiser steps/s and images/s of the training step, on CPU or GPU.

    python -m benchmarks.train_speed                                   # CPU: the demo recipe and f16c16
    python -m benchmarks.train_speed --mixed-precision bf16 --batch 8 --rows demo,f16c16,f16c16-full   # a GPU

The step is the training program's: AutoencoderWithLoss forward (posterior sample, L1, KL, optional
LPIPS), the PatchGAN generator term with LDM's adaptive weight and the discriminator's own step when
the row has a GAN, backward, gradient clipping, AdamW, EMA update, all through Accelerate (autocast,
fp16 scaler). Data loading is left out (DataLoader workers overlap it). LPIPS weights are random here:
the cost is the same as with the real ones.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel

from benchmarks.measure import result_name
from benchmarks.report import device_label, synchronize, write_results
from latent_vae import build_vae
from latent_vae.models.loading import count_parameters
from training.losses import (
    AutoencoderWithLoss,
    LossWeights,
    PatchDiscriminator,
    adaptive_weight,
    generator_loss,
    hinge_d_loss,
)
from training.lpips import LPIPS


@dataclass(frozen=True)
class Row:
    name: str
    preset: str
    crop: int
    cpu_batch: int  # per-step batch on CPU (a GPU row uses --batch)
    lpips: bool = False
    gan: bool = False


ROWS = {
    "demo": Row("demo (training/configs/cpu_demo.json)", "f16c16-narrow", 64, 8),
    "f16c16": Row("f16c16, L1+KL", "f16c16", 256, 1),
    "f16c16-full": Row("f16c16, L1+KL+LPIPS+GAN (full recipe)", "f16c16", 256, 1, lpips=True, gan=True),
}


def measure(row: Row, accelerator: Accelerator, batch: int, steps: int, warmup: int, checkpointing: bool) -> dict:
    torch.manual_seed(0)
    vae = build_vae(row.preset, seed=0).train()
    if checkpointing:
        vae.enable_gradient_checkpointing()
    lpips = LPIPS() if row.lpips else None
    model = AutoencoderWithLoss(vae, LossWeights(lpips=1.0 if row.lpips else 0.0), lpips)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-4, betas=(0.5, 0.9))
    model, optimizer = accelerator.prepare(model, optimizer)
    vae = accelerator.unwrap_model(model).vae
    disc = disc_optimizer = None
    if row.gan:
        disc = PatchDiscriminator()
        disc_optimizer = torch.optim.AdamW(disc.parameters(), lr=1e-4, betas=(0.5, 0.9))
        disc, disc_optimizer = accelerator.prepare(disc, disc_optimizer)
    ema = EMAModel(vae.parameters(), decay=0.9999, use_ema_warmup=True)
    pixels = torch.rand(batch, 3, row.crop, row.crop, device=accelerator.device) * 2 - 1

    def step() -> None:
        with accelerator.autocast():
            out = model(pixels)
            loss = out["nll"] + 1e-6 * out["kl"]
            if disc is not None:
                disc.requires_grad_(False)
                g_loss = generator_loss(disc(out["reconstruction"]))
                scale = accelerator.scaler.get_scale() if accelerator.scaler is not None else 1.0
                loss = loss + 0.5 * adaptive_weight(out["nll"], g_loss, vae.decoder.conv_out.weight,
                                                    pixel_values=pixels[0].numel(), grad_scale=scale) * g_loss
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if disc is not None:
            disc.requires_grad_(True)
            with accelerator.autocast():
                d_loss = hinge_d_loss(*disc(torch.cat([pixels, out["reconstruction"].detach()])).chunk(2))
            accelerator.backward(d_loss)
            disc_optimizer.step()
            disc_optimizer.zero_grad(set_to_none=True)
        ema.step(vae.parameters())

    for _ in range(warmup):
        step()
    synchronize(accelerator.device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        synchronize(accelerator.device)
        times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]  # median: robust on a shared machine
    peak = torch.cuda.max_memory_allocated() / 2**30 if accelerator.device.type == "cuda" else float("nan")
    return {
        "row": row.name, "preset": row.preset, "params_M": count_parameters(vae) / 1e6, "crop": row.crop,
        "batch": batch, "precision": accelerator.mixed_precision, "grad_ckpt": checkpointing,
        "s_per_step": seconds, "steps_per_s": 1 / seconds, "images_per_s": batch / seconds,
        "Mpixels_per_s": batch * row.crop**2 / seconds / 1e6, "peak_GiB": peak,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="demo,f16c16", help=f"comma-separated, of {', '.join(ROWS)}")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--batch", type=int, default=0, help="images per step for every row (0: CPU batch of the row "
                        "on CPU, 8 on a GPU)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per row (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--name", default="", help="results file name (default: train_speed, or train_speed_cuda on a GPU)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    unknown = [r for r in args.rows.split(",") if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    if args.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        parser.error("fp16 needs a GPU; on CPU use --mixed-precision bf16")
    rows = []
    for key in args.rows.split(","):
        row = ROWS[key]
        batch = args.batch or (row.cpu_batch if accelerator.device.type == "cpu" else 8)
        result = measure(row, accelerator, batch, args.steps, args.warmup, args.gradient_checkpointing)
        print(result, flush=True)
        rows.append(result)
        accelerator.free_memory()
    write_results(
        args.name or result_name("train_speed", accelerator.device), rows,
        notes=f"Device: {device_label(accelerator.device)}, torch threads {torch.get_num_threads()}. Median of "
              f"{args.steps} steps after {args.warmup} warm-up; data loading excluded; LPIPS weights random (same cost).",
    )


if __name__ == "__main__":
    main()
