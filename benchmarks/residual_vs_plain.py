"""Plain vs residual (shortcut) f16c16 KL-VAEs trained for equal wall time (or equal steps) on CPU.

Every arm trains in its own process with `--threads` torch threads, all arms at the same time, so that on a
shared machine they see the same contention; each is then scored on photos it never saw (Set14, 256x256
centre crops), next to the bicubic equal-values baseline: down-sample to as many values as the latent
holds, up-sample back. A model below that line is worse than resizing.

    python benchmarks/residual_vs_plain.py --minutes 10                  # benchmarks/README.md's table (2 arms)
    python benchmarks/residual_vs_plain.py --steps 100 --arms plain global stage  # equal steps, exploring

Arms are NAME or NAME:key=value,... over the defaults of `Arm` (e.g. `stage:lr=1e-3,zero_init=0`).
The training loop is deliberately small (L1 or MSE + KL, Adam): it measures the architecture, not a recipe.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import multiprocessing as mp
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.report import RESULTS_DIR, photo_folder, write_results
from latent_vae.images.metrics import bicubic_equal_values, equal_values_size, psnr, ssim
from latent_vae.images.reading import load_image, pil_to_tensor
from latent_vae.models.loading import build_vae, count_parameters
from latent_vae.models.presets import get_preset
from training.data import center_crop

EVAL_SIZE = 256


@dataclass
class Arm:
    """One trained model: its architecture and its optimisation."""

    preset: str = "f16c16-narrow"
    shortcut: str | None = None  # None: the preset's own
    zero_init: bool = True
    widths: str = ""  # e.g. "16-16-32-32-64": override the preset's block_out_channels
    layers: int = 0  # override layers_per_block when > 0
    lr: float = 1e-4
    warmup: int = 0  # steps of linear learning-rate warm-up
    decay: str = "none"  # "cosine": the rate falls to 0 over the budget (the elapsed fraction of time or steps)
    batch: int = 8
    crop: int = 128
    kl_weight: float = 1e-6
    loss: str = "l1"  # "l1" or "mse" (what PSNR measures)


ARMS = {
    "plain": Arm(),
    "global": Arm(shortcut="global"),
    "stage": Arm(shortcut="stage"),
    # the faster recipe: a 5x smaller network does about 2.7x the steps, and warm-up allows a higher rate
    "global-small": Arm(shortcut="global", widths="16-16-32-32-64", layers=1, lr=3e-4, warmup=20, crop=64),
    # + a higher rate after warm-up, and the loss PSNR measures
    "global-fast": Arm(shortcut="global", widths="16-16-32-32-64", layers=1, lr=1e-3, warmup=50, crop=64, loss="mse"),
    # the same with the thumbnail shortcut: a YCbCr thumbnail code enlarged bicubically instead of the block code
    "thumbnail-fast": Arm(shortcut="thumbnail", widths="16-16-32-32-64", layers=1, lr=1e-3, warmup=50, crop=64,
                          loss="mse"),
}


def parse_arm(spec: str) -> tuple[str, Arm]:
    name, _, overrides = spec.partition(":")
    base = ARMS.get(name.split("@")[0], Arm())
    types = {f.name: f.type for f in dataclasses.fields(Arm)}
    changes = {}
    for item in filter(None, overrides.split(",")):
        if item.partition("=")[0] == "loss" and item.partition("=")[2] not in ("l1", "mse"):
            raise ValueError(f"unknown loss {item.partition('=')[2]!r}; choose l1 or mse")
        key, _, value = item.partition("=")
        if key not in types:
            raise ValueError(f"unknown arm option {key!r}; known: {', '.join(types)}")
        kind = types[key]
        if key == "shortcut":
            changes[key] = None if value in ("", "none") else value
        elif "bool" in kind:
            changes[key] = value.lower() in ("1", "true", "yes")
        elif "int" in kind:
            changes[key] = int(value)
        elif "float" in kind:
            changes[key] = float(value)
        else:
            changes[key] = value
    return spec, dataclasses.replace(base, **changes)


def build(arm: Arm, seed: int):
    spec = get_preset(arm.preset)
    changes = {"shortcut": arm.shortcut} if arm.shortcut is not None else {}
    if arm.widths:
        changes["block_out_channels"] = tuple(int(w) for w in arm.widths.split("-"))
    if arm.layers:
        changes["layers_per_block"] = arm.layers
    spec = dataclasses.replace(spec, **changes)
    vae = build_vae(spec, seed=seed)
    if spec.shortcut is not None and not arm.zero_init:
        from latent_vae.models.residual import ResidualAutoencoderKL

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vae = ResidualAutoencoderKL(**spec.diffusers_config(), shortcut=spec.shortcut, zero_init=False)
    return vae


def eval_images(data: Path) -> torch.Tensor:
    return torch.stack([center_crop(load_image(p), EVAL_SIZE) for p in sorted((data / "cset14").glob("*.png"))])


def random_crops(photos: list[torch.Tensor], batch: int, crop: int, generator: torch.Generator) -> torch.Tensor:
    out = []
    for i in torch.randint(len(photos), (batch,), generator=generator).tolist():
        photo = photos[i]
        h, w = photo.shape[-2:]
        top = int(torch.randint(h - crop + 1, (1,), generator=generator))
        left = int(torch.randint(w - crop + 1, (1,), generator=generator))
        patch = photo[:, top: top + crop, left: left + crop]
        if torch.rand((), generator=generator) < 0.5:
            patch = patch.flip(-1)
        out.append(patch)
    return torch.stack(out)


@torch.no_grad()
def score(vae, images: torch.Tensor) -> tuple[float, float]:
    vae.eval()
    recon = torch.cat([vae.decode(vae.encode(x[None]).latent_dist.mode()).sample for x in images]).clamp(-1, 1)
    vae.train()
    return psnr(images, recon).mean().item(), ssim(images, recon).mean().item()


def train_arm(name: str, arm: Arm, seconds: float | None, steps: int | None, threads: int, seed: int,
              data: str, queue) -> None:
    """Train one arm until its time or step budget is spent, then score it; the row goes on `queue`."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    photos = [pil_to_tensor(load_image(p)) for p in sorted((Path(data) / "cbsd68").glob("*.png"))]
    vae = build(arm, seed).train()
    # what the untrained model (with zero_init: the shortcut's code alone) scores, before the clock starts
    unseen = eval_images(Path(data))
    start_psnr, start_ssim = score(vae, unseen)
    optimizer = torch.optim.Adam(vae.parameters(), lr=arm.lr)
    # Adam moves every weight by about lr from the first step: warm up so that zero-initialised
    # branches do not all jump at once and scramble the shortcut's code.
    if arm.decay not in ("none", "cosine"):
        raise ValueError(f"unknown decay {arm.decay!r}; choose none or cosine")
    generator = torch.Generator().manual_seed(seed)
    step, start = 0, time.perf_counter()
    while (steps is None or step < steps) and (seconds is None or time.perf_counter() - start < seconds):
        rate = arm.lr * min(1.0, (step + 1) / (arm.warmup + 1))
        if arm.decay == "cosine":
            spent = (time.perf_counter() - start) / seconds if seconds is not None else step / steps
            rate *= 0.5 * (1 + math.cos(math.pi * min(1.0, spent)))
        for group in optimizer.param_groups:
            group["lr"] = rate
        x = random_crops(photos, arm.batch, arm.crop, generator)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=generator)).sample
        # LDM's balance: per-image sums of L1 and KL, KL weighted 1e-6 (here both divided by the pixel values)
        error = recon - x
        loss = (error.abs().mean() if arm.loss == "l1" else error.square().mean()) + arm.kl_weight * posterior.kl().mean() / x[0].numel()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
    train_s = time.perf_counter() - start
    value_psnr, value_ssim = score(vae, unseen)
    queue.put({
        "arm": name, "shortcut": getattr(vae.config, "shortcut", None) or "none",
        "zero_init": bool(getattr(vae.config, "zero_init", False)), "params_M": count_parameters(vae) / 1e6,
        "lr": arm.lr, "decay": arm.decay, "batch": arm.batch, "crop": arm.crop, "loss": arm.loss, "steps": step,
        "train_min": train_s / 60, "s_per_step": train_s / max(step, 1), "untrained_psnr": start_psnr, "untrained_ssim": start_ssim,
        "psnr": value_psnr, "ssim": value_ssim,
    })


def main(args: argparse.Namespace) -> None:
    arms = [parse_arm(spec) for spec in args.arms]
    seconds = args.minutes * 60 if args.minutes else None
    if seconds is None and args.steps is None:
        raise ValueError("give --minutes (equal wall time) or --steps (equal steps)")
    context = mp.get_context("spawn")
    queue = context.Queue()
    procs = [context.Process(target=train_arm, args=(name, arm, seconds, args.steps, args.threads, args.seed,
                                                     str(args.data), queue)) for name, arm in arms]
    for proc in procs:  # all at once: the arms share whatever contention the machine has
        proc.start()
    rows = [queue.get() for _ in procs]
    for proc in procs:
        proc.join()
    order = {name: i for i, (name, _) in enumerate(arms)}
    rows.sort(key=lambda row: order[row["arm"]])

    images = eval_images(args.data)
    spec = get_preset("f16c16")
    latent_values = math.prod(spec.latent_shape(EVAL_SIZE, EVAL_SIZE))
    baseline = bicubic_equal_values(images, latent_values)
    side = equal_values_size(EVAL_SIZE, EVAL_SIZE, latent_values)[0]
    rows.append({"arm": f"bicubic {side}x{side}x3 (<= {latent_values} values)", "shortcut": "-", "steps": 0,
                 "psnr": psnr(images, baseline).mean().item(), "ssim": ssim(images, baseline).mean().item()})
    budget = f"{args.minutes} min of wall time" if seconds else f"{args.steps} steps"
    notes = (
        f"Each arm trained for {budget} in its own process with {args.threads} torch thread(s), all "
        f"{len(arms)} arms at the same time (same contention), seed {args.seed}, on random crops with flips of "
        f"the 68 CBSD68 photos; scored (posterior mode) before training (untrained_*) and after it on the 13 Set14 images never "
        f"seen in training, {EVAL_SIZE}x{EVAL_SIZE} centre crops (the one smaller image enlarged first). Loss L1 or MSE + KL "
        f"(LDM's 1e-6 balance), Adam, sampled posterior. Bicubic: antialiased down-sampling to as many values as the "
        f"16-channel f16 latent holds, bicubic up-sampling."
    )
    columns = ["arm", "shortcut", "zero_init", "params_M", "lr", "decay", "batch", "crop", "loss", "steps", "train_min",
               "s_per_step", "untrained_psnr", "untrained_ssim", "psnr", "ssim"]
    write_results(args.name, rows, notes=notes, columns=columns, out_dir=args.out,
                  extra={"arms": {name: dataclasses.asdict(arm) for name, arm in arms}})


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", nargs="+", default=["global-fast", "thumbnail-fast"],
                        help="NAME[:key=value,...] (see Arm; the levers table of benchmarks/README.md: plain global global-small "
                        "global-fast)")
    parser.add_argument("--minutes", type=float, default=None, help="equal wall time per arm")
    parser.add_argument("--steps", type=int, default=None, help="equal steps per arm (when exploring)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per arm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=photo_folder(), help="folder holding cbsd68/ and cset14/ (default: $LATENT_VAE_PHOTOS or photos/)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the results")
    parser.add_argument("--name", default="residual_vs_plain", help="results/NAME.json and .md")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
