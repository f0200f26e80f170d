"""Train a KL-VAE with Accelerate.

    accelerate launch -m training.train_vae --config f16c16 --data /path/to/images
    python -m training.train_vae --config cpu_demo --data photos/ --max_steps 200
    torchrun --nproc_per_node 2 -m training.train_vae --config tiny_test --data photos/   # 2 CPU processes (gloo)

Every field of training/config.py can be given as `--field value` after (and over) the config file.
The run leaves OUTPUT_DIR/vae (a diffusers folder with the EMA weights and calibrated latent
normalisation), checkpoints, TensorBoard logs under OUTPUT_DIR/logs and validation grids under
OUTPUT_DIR/samples.

`main(config)` reads top to bottom: setup (accelerator, data, models and optimisers, resume), a loop of
`training.step.train_step`, then the finish (last checkpoint, validation, export). The helpers above it
are its parts, in that order.
"""

from __future__ import annotations

import copy
import json
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch.optim.lr_scheduler import LRScheduler
from tqdm.auto import tqdm

from latent_vae import LatentCodec, calibrate, load_vae, save_vae
from latent_vae.images.figures import error_map, image_grid, image_strip
from latent_vae.images.metrics import ssim
from latent_vae.images.reading import tensor_to_uint8
from latent_vae.inspection.measures import equivariance_factors
from latent_vae.models.presets import downsampling_factor
from latent_vae.utils.atomic import atomic_directory
from latent_vae.utils.errors import (  # the latent-vae commands' statuses
    EXIT_BAD_INPUT,
    EXIT_INTERNAL_ERROR,
    one_line,
)

from .checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig, parse_args, to_dict, to_hparams
from .data import CropDataset, ImageSource, hold_out, train_loader, validation_crops
from .frozen_encoder import check_frozen_encoder, freeze_encoder
from .losses import AutoencoderWithLoss, LossWeights, PatchDiscriminator
from .lpips import LPIPS, LPIPSWeightsMissing
from .posterior import hold_logvar, measure_posterior
from .step import StepResult, TrainState, train_step

# -- the run's state around the step ----------------------------------------------------------------


@dataclass
class Counters:
    """Where the run is and what it skipped: saved in every checkpoint (these names), restored on resume."""

    step: int = 0  # optimiser steps done
    samples_seen: int = 0  # this rank's position in the data stream
    nonfinite_skipped: int = 0
    nonfinite_in_a_row: int = 0
    images_skipped: int = 0  # unreadable images, this rank
    overflow_skipped: int = 0  # fp16 steps the scaler skipped

    def count(self, result: StepResult) -> None:
        if result.nonfinite:
            self.nonfinite_skipped += 1
            self.nonfinite_in_a_row += 1
        else:
            self.nonfinite_in_a_row = 0
        if result.overflow:
            self.overflow_skipped += 1


@dataclass
class Run:
    """What a run holds besides the step's state: what checkpoints save, logging reads and the finish exports."""

    config: TrainConfig
    state: TrainState
    scheduler: LRScheduler
    ema: EMAModel | None
    held_out: list[str]  # validation images of --data that are never trained on
    counters: Counters = field(default_factory=Counters)
    saved_step: int = -1  # the step of the newest checkpoint this run wrote or resumed from

    @property
    def accelerator(self) -> Accelerator:
        return self.state.accelerator

    @property
    def out_dir(self) -> Path:
        return Path(self.config.output_dir)


# -- setup ------------------------------------------------------------------------------------------


def make_accelerator(config: TrainConfig) -> Accelerator:
    out_dir = Path(config.output_dir)
    use_cpu = not (torch.cuda.is_available() or torch.backends.mps.is_available())
    if config.mixed_precision == "fp16" and use_cpu:
        # Accelerate would silently train in fp32 (no CPU fp16 autocast, no scaler): say so instead.
        raise ValueError("mixed_precision fp16 needs a GPU; on CPU use --mixed_precision bf16 (or no)")
    return Accelerator(
        cpu=use_cpu,  # with torchrun on a CPU machine this gives MULTI_CPU over gloo
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(out_dir / "logs")),
        # Every VAE parameter takes part in every step: no unused-parameter search.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )


def open_data(config: TrainConfig, accelerator: Accelerator) -> tuple[ImageSource, ImageSource, list[str]]:
    """(training images, validation images, the names of those held out of --data to validate on)."""
    source = ImageSource(config.data, config.image_column, config.split, max_pixels=config.max_pixels or None)
    for line in source.unreadable:
        accelerator.print(f"skipped folder {line}", file=sys.stderr)
    held_out: list[str] = []
    if config.validation_data:
        val_source = ImageSource(config.validation_data, config.image_column, max_pixels=config.max_pixels or None)
        for line in val_source.unreadable:
            accelerator.print(f"skipped folder {line}", file=sys.stderr)
    elif config.validation_holdout > 0:
        source, val_source = hold_out(source, config.validation_holdout)  # the run never trains on these
        held_out = [val_source.describe(i) for i in range(len(val_source))]
        accelerator.print(f"validation: {len(held_out)} images of {config.data} held out, never trained on: "
                          f"{', '.join(held_out[:8])}{', ...' if len(held_out) > 8 else ''}")
    else:
        val_source = source
        accelerator.print("validation: the first training images (validation_holdout 0): val PSNR measures fit, "
                          "not generalisation")
    return source, val_source, held_out


def crop_options(config: TrainConfig) -> dict:
    """How training crops are drawn: for the training stream and the calibration crops alike."""
    return {"resolution": config.resolution, "seed": config.seed, "min_scale": config.min_scale,
            "flip": config.random_flip, "crop_policy": config.crop_policy, "crop_min": config.crop_min}


def loss_weights(config: TrainConfig) -> LossWeights:
    return LossWeights(
        reconstruction=config.reconstruction_loss, kl=config.kl_weight, logvar_min=config.logvar_min,
        logvar_max=config.logvar_max, lpips=config.lpips_weight, sharpness=config.sharpness_weight,
        sharpness_kind=config.sharpness_loss, scale_equivariance=config.scale_equivariance_weight,
        scale_equivariance_factors=config.scale_equivariance_factors,
    )


def uses_gan(config: TrainConfig) -> bool:
    # Not tied to max_steps: a run stopped early and resumed must hold the same state as one run straight.
    return config.disc_weight > 0


def build_models(config: TrainConfig, accelerator: Accelerator) -> tuple[TrainState, LRScheduler, str | None]:
    """The VAE with its loss, the discriminator when the run has a GAN, their optimisers, all prepared; the VAE's
    learning-rate schedule; and the encoder's digest before training when it is frozen (checked again at export)."""
    lpips = None
    if config.lpips_weight > 0:
        lpips = LPIPS.from_file(config.lpips_weights or None)  # fails now, with what to do, if weights are missing
    vae = load_vae(config.model, seed=config.seed).float().train()
    factor = downsampling_factor(vae.config.block_out_channels)
    for name in ("resolution", "validation_resolution", "use_resolution"):
        if getattr(config, name) % factor:
            raise ValueError(f"{name} must be a multiple of the model's downsampling factor {factor}, "
                             f"got {getattr(config, name)}")
    if config.scale_equivariance_weight > 0:
        side = config.resolution // factor
        usable = equivariance_factors(side, side, tuple(config.scale_equivariance_factors))
        too_large = [f for f in config.scale_equivariance_factors if f not in usable]
        if too_large:
            raise ValueError(f"scale_equivariance_factors {too_large} do not fit: resolution {config.resolution} gives "
                             f"{side}x{side} latents, which must stay at least 2 pixels a side (and divide) when "
                             "downsampled; use smaller factors or a larger resolution")
    if config.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    encoder_before = freeze_encoder(vae) if config.freeze_encoder else None
    model = AutoencoderWithLoss(vae, loss_weights(config), lpips)
    optimizer = torch.optim.AdamW([p for p in vae.parameters() if p.requires_grad], lr=config.learning_rate,
                                  betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.weight_decay)
    if config.posterior_logvar == "fixed" and not config.freeze_encoder:  # (a frozen encoder keeps its posterior)
        hold_logvar(vae, config.fixed_logvar, optimizer)
    # Not prepared by Accelerate, which would step it once per process per step; stepped once per optimiser step.
    scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                              num_training_steps=config.max_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    disc = disc_optimizer = None
    if uses_gan(config):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed + 1)
            disc = PatchDiscriminator(config.disc_layers, config.disc_channels)
        disc_optimizer = torch.optim.AdamW(disc.parameters(), lr=config.disc_learning_rate,
                                           betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.weight_decay)
        disc, disc_optimizer = accelerator.prepare(disc, disc_optimizer)
    return TrainState(accelerator, model, optimizer, disc, disc_optimizer), scheduler, encoder_before


def make_ema(config: TrainConfig, vae) -> EMAModel | None:
    if not config.use_ema:
        return None
    return EMAModel(vae.parameters(), decay=config.ema_decay, use_ema_warmup=config.ema_warmup,
                    power=config.ema_power, min_decay=0.0)


def resume(run: Run) -> None:
    """With --resume: restore the run's weights, optimisers, EMA, schedule, scaler, RNG and counters from the
    checkpoint it names ("latest": the newest intact one, if the run has one yet)."""
    config, accelerator, state = run.config, run.accelerator, run.state
    if not config.resume:
        return
    checkpoint = find_checkpoint(run.out_dir, config.resume, report=accelerator.print)  # a named one must exist
    if checkpoint is None:
        return
    loaded = load_checkpoint(checkpoint, accelerator.process_index, vae=state.vae, discriminator=state.raw_discriminator,
                             ema=run.ema, optimizers=state.optimizers)
    # (checkpoints older than a counter lack it)
    run.counters = Counters(**{name: loaded.get(name, value) for name, value in asdict(Counters()).items()})
    run.scheduler.load_state_dict(loaded["scheduler"])
    if accelerator.scaler is not None and loaded.get("scaler"):
        accelerator.scaler.load_state_dict(loaded["scaler"])
    run.saved_step = run.counters.step
    accelerator.print(f"resumed from {checkpoint} at step {run.counters.step}")


def start_outputs(config: TrainConfig, accelerator: Accelerator) -> None:
    """OUTPUT_DIR/config.json and the trackers."""
    if accelerator.is_main_process:
        out_dir = Path(config.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(to_dict(config), indent=2))
    if config.report_to != "none":
        accelerator.init_trackers("train_vae", config=to_hparams(config))


# -- during the run ---------------------------------------------------------------------------------


def stop_if_nonfinite_persists(run: Run) -> None:
    """A NaN/inf loss is a real fault: skipped and counted, fatal after max_nonfinite_steps in a row."""
    in_a_row = run.counters.nonfinite_in_a_row
    if in_a_row >= run.config.max_nonfinite_steps:
        run.accelerator.end_training()
        raise RuntimeError(
            f"stopped at step {run.counters.step}: the loss was NaN or inf {in_a_row} times in a row "
            f"(max_nonfinite_steps). Lower the learning rate, use bf16 rather than fp16, or resume from an earlier "
            f"checkpoint in {run.out_dir}")


@dataclass
class Throughput:
    """Images per second over the steps since the last log line."""

    images_per_step: int
    start: float = field(default_factory=time.monotonic)
    steps: int = 0

    def rate(self) -> float:
        """The rate since the last call (or the start), and a new window from now."""
        rate = self.steps * self.images_per_step / (time.monotonic() - self.start)
        self.start, self.steps = time.monotonic(), 0
        return rate


def log_progress(run: Run, logs: dict[str, float], throughput: Throughput, progress: tqdm, started: float) -> None:
    """Log the latest step's values with the learning rate, throughput and counters; show loss and speed on the bar."""
    accelerator, config, counters = run.accelerator, run.config, run.counters
    images_skipped = counters.images_skipped
    if accelerator.num_processes > 1:
        images_skipped = int(accelerator.reduce(torch.tensor([images_skipped], device=accelerator.device), "sum").item())
    logs.update({"lr": run.scheduler.get_last_lr()[0], "images_per_s": throughput.rate(),
                 "nonfinite_skipped": counters.nonfinite_skipped, "images_skipped": images_skipped,
                 "overflow_skipped": counters.overflow_skipped})
    accelerator.log(logs, step=counters.step)
    postfix = {"loss": f"{logs['loss']:.4f}", "img_s": f"{logs['images_per_s']:.1f}"}
    if config.max_minutes > 0:
        postfix["min_left"] = f"{max(0.0, config.max_minutes - (time.monotonic() - started) / 60):.1f}"
    progress.set_postfix(postfix)


def save(run: Run) -> None:
    """A checkpoint of the run at its current step (every rank calls this)."""
    config, accelerator, state, step = run.config, run.accelerator, run.state, run.counters.step
    run.saved_step = step
    trainer_state = {**asdict(run.counters), "seed": config.seed, "world_size": accelerator.num_processes,
                     "scheduler": run.scheduler.state_dict(),
                     "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                     "validation_held_out": run.held_out, "config": to_dict(config)}
    save_checkpoint(accelerator, run.out_dir, step, vae=state.vae, discriminator=state.raw_discriminator, ema=run.ema,
                    optimizers=state.optimizers, trainer_state=trainer_state, keep=config.keep_checkpoints)


def out_of_time(run: Run, started: float) -> bool:
    """True, on every rank at the same step, once the main process has used the run's max_minutes."""
    config, accelerator = run.config, run.accelerator
    if config.max_minutes <= 0:
        return False
    if accelerator.is_main_process and time.monotonic() - started > 60 * config.max_minutes:
        accelerator.set_trigger()
    if accelerator.check_trigger():  # every rank sees the main process's decision at the same step
        accelerator.print(f"time budget of {config.max_minutes} min reached at step {run.counters.step}")
        return True
    return False


# A posterior sample decoding this many dB below the posterior mean is noise a latent dataset would train on.
SAMPLE_GAP_WARNING_DB = 1.0


@dataclass
class ValidationImages:
    """The fixed images validation scores: crops as training sees them, and a few at the size of use."""

    crops: torch.Tensor  # num_validation_images at validation_resolution
    use: torch.Tensor | None  # num_use_images at use_resolution; None: use_resolution 0


def validation_images(config: TrainConfig, source: ImageSource) -> ValidationImages:
    crops = validation_crops(source, config.num_validation_images, config.validation_resolution, config.crop_policy)
    use = None
    if config.use_resolution:
        use = validation_crops(source, config.num_use_images, config.use_resolution, config.crop_policy)
    return ValidationImages(crops, use)


def posterior_metrics(vae, images: torch.Tensor, prefix: str, accelerator: Accelerator,
                      batch_size: int) -> dict[str, float]:
    """PSNR of decode(posterior mean) and of decode(one sample, fixed noise), and the KL per latent value."""
    with accelerator.autocast():
        report = measure_posterior(vae, images.split(batch_size), device=accelerator.device)
    return {f"{prefix}/psnr": report.psnr_mean, f"{prefix}/psnr_sample": report.psnr_sample,
            f"{prefix}/kl_per_value": report.kl_per_value}


@torch.no_grad()
def validate(vae, ema: EMAModel | None, images: ValidationImages, accelerator: Accelerator, step: int, out_dir: Path,
             batch_size: int) -> dict[str, float]:
    """Score the weights that will be saved (the EMA's): reconstruction of the validation crops (PSNR, SSIM, a grid)
    and the posterior (a sample beside the mean, the KL) on those crops and at the size of use."""
    if ema is not None:
        ema.store(vae.parameters())
        ema.copy_to(vae.parameters())
    vae.eval()
    crops = images.crops
    reconstructions = []
    for chunk in crops.split(batch_size):
        with accelerator.autocast():
            posterior = vae.encode(chunk.to(accelerator.device)).latent_dist
            reconstructions.append(vae.decode(posterior.mode()).sample.float().clamp(-1, 1).cpu())
    metrics = posterior_metrics(vae, crops, "val", accelerator, batch_size)
    if images.use is not None:  # one image at a time: at the size of use a batch may not fit
        metrics.update(posterior_metrics(vae, images.use, "val_use", accelerator, 1))
    vae.train()
    if ema is not None:
        ema.restore(vae.parameters())
    reconstruction = torch.cat(reconstructions)
    metrics["val/ssim"] = ssim(crops, reconstruction).mean().item()  # (val/psnr: the posterior mean's, above)
    originals, recs = tensor_to_uint8(crops), tensor_to_uint8(reconstruction)
    rows = [image_strip([o, r, error_map(o, r)], ["original", "reconstruction", "error x4"]) for o, r in zip(originals, recs)]
    (out_dir / "samples").mkdir(parents=True, exist_ok=True)
    image_grid(rows).save(out_dir / "samples" / f"step-{step:07d}.png")
    return metrics


def validation_lines(metrics: dict[str, float], config: TrainConfig, step: int) -> list[str]:
    """The metrics in one line, and a warning line when a posterior sample decodes far below the mean."""
    sizes = {"val": config.validation_resolution, "val_use": config.use_resolution}
    parts = [f"val PSNR {metrics['val/psnr']:.2f} dB, SSIM {metrics['val/ssim']:.3f}"]
    gaps = []
    for prefix, size in sizes.items():
        if f"{prefix}/psnr_sample" not in metrics:
            continue
        mean, sample = metrics[f"{prefix}/psnr"], metrics[f"{prefix}/psnr_sample"]
        parts.append(f"at {size} px: mean {mean:.2f} dB, sample {sample:.2f} dB, KL {metrics[f'{prefix}/kl_per_value']:.3g}"
                     " per latent value")
        if mean - sample > SAMPLE_GAP_WARNING_DB:
            gaps.append(f"{mean - sample:.1f} dB at {size} px")
    lines = [f"step {step}: " + "; ".join(parts)]
    if gaps:
        lines.append(f"warning: step {step}: a posterior sample decodes {' and '.join(gaps)} below the posterior mean: latents "
                     "sampled from this model (a latent dataset's default read) would be mostly noise; train with "
                     "posterior_logvar fixed (docs/training.md)")
    return lines


def report_validation(run: Run, images: ValidationImages, write=print) -> None:
    """Validate (main process only), log the metrics and `write` them (a line, and a warning line if due)."""
    step = run.counters.step
    metrics = validate(run.state.vae, run.ema, images, run.accelerator, step, run.out_dir, run.config.batch_size)
    run.accelerator.log(metrics, step=step)
    for line in validation_lines(metrics, run.config, step):
        write(line)


# -- the finish -------------------------------------------------------------------------------------


def calibration_crops(dataset: CropDataset, count: int) -> list[torch.Tensor]:
    """`count` random crops from the run's own data stream (epochs repeat the images with new crops)."""
    size = len(dataset)
    return [dataset[(i // size, i % size)][0] for i in range(count)]


def export_model(vae, ema: EMAModel | None, crops: list[torch.Tensor], out: Path, device, batch_size: int,
                 recalibrate: bool = True) -> Path:
    """A diffusers folder with the EMA weights and the latent normalisation measured on `crops` (with
    `recalibrate=False`: the normalisation the model came with)."""
    final = copy.deepcopy(vae).float().eval()
    if ema is not None:
        ema.copy_to(final.parameters())
    codec = LatentCodec(final, device=device, max_batch_size=batch_size)  # the memory policy: whole or exact tiles
    if recalibrate:
        calibrate(codec, crops)
    with atomic_directory(out) as tmp:
        save_vae(codec.vae.to("cpu"), tmp)
    return out


def finish(run: Run, source: ImageSource, val_images: ValidationImages, encoder_before: str | None) -> Path:
    """The last checkpoint, a last validation, and the exported model (OUTPUT_DIR/vae); returns its folder."""
    config, accelerator, counters = run.config, run.accelerator, run.counters
    if run.saved_step != counters.step:  # (a run resumed at its last step has nothing new to save)
        save(run)
    out = run.out_dir / "vae"
    if accelerator.is_main_process:
        report_validation(run, val_images)
        crops = calibration_crops(CropDataset(source, **crop_options(config)), config.calibration_images)
        export_model(run.state.vae, run.ema, crops, out, accelerator.device, config.batch_size,
                     recalibrate=not config.freeze_encoder)
        if encoder_before is not None:
            record = check_frozen_encoder(config.model, out, encoder_before, run.out_dir)
            print(f"encoder unchanged (sha256 {record['encoder_sha256_after'][:16]}), normalisation kept: latents made "
                  f"by {config.model} (fingerprint {record['source_fingerprint']}) decode with this decoder")
        if counters.images_skipped:
            print(f"skipped {counters.images_skipped} unreadable image reads on the main process")
        normalization = "the source's normalisation" if config.freeze_encoder else "calibrated normalisation"
        print(f"saved {out} (EMA weights, {normalization})")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out


# -- the run ----------------------------------------------------------------------------------------


def main(config: TrainConfig) -> Path:
    """Train as `config` says; returns the exported model folder (OUTPUT_DIR/vae)."""
    # -- setup: accelerator and seeds, data, models and optimisers, resume
    config.validate()
    if config.torch_threads > 0:
        torch.set_num_threads(config.torch_threads)
    accelerator = make_accelerator(config)
    rank, world = accelerator.process_index, accelerator.num_processes
    # Per-rank seeds: ranks draw different posterior noise; model init is seeded separately.
    set_seed(config.seed + rank)
    if accelerator.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    source, val_source, held_out = open_data(config, accelerator)
    val_images = validation_images(config, val_source)
    state, scheduler, encoder_before = build_models(config, accelerator)
    run = Run(config, state, scheduler, make_ema(config, state.vae), held_out)
    resume(run)
    start_outputs(config, accelerator)
    counters = run.counters
    batches = iter(train_loader(source, batch_size=config.batch_size, rank=rank, world_size=world,
                                start=counters.samples_seen, num_workers=config.num_workers, **crop_options(config)))

    # -- train: one train_step per batch; per optimiser step, the schedule, EMA, logs, validation, checkpoints
    # Under a time budget the step count at the end is unknown: count steps and show the minutes left instead
    # of a bar towards max_steps that would never fill.
    progress = tqdm(total=None if config.max_minutes > 0 else config.max_steps, initial=counters.step,
                    disable=not accelerator.is_main_process, desc="train", dynamic_ncols=True)
    started = time.monotonic()
    throughput = Throughput(config.batch_size * config.gradient_accumulation_steps * world)
    logs: dict[str, float] = {}  # the latest value of each, logged every log_every steps
    while counters.step < config.max_steps:
        pixels, skipped = next(batches)
        pixels = pixels.to(accelerator.device)
        counters.samples_seen += pixels.shape[0]
        counters.images_skipped += skipped
        result = train_step(state, pixels, counters.step, config)
        counters.count(result)
        stop_if_nonfinite_persists(run)
        logs.update(result.logs())
        if not accelerator.sync_gradients:
            continue  # a micro-batch of gradient accumulation: no optimiser step yet

        counters.step += 1
        step = counters.step
        if result.stepped:  # the schedule counts updates; a skipped step leaves the learning rate where it was
            run.scheduler.step()
        if run.ema is not None:
            run.ema.step(state.vae.parameters())
        throughput.steps += 1
        if step % config.log_every == 0 or step == config.max_steps:
            log_progress(run, logs, throughput, progress, started)
        progress.update(1)
        if config.validate_every and step % config.validate_every == 0 and step < config.max_steps:
            if accelerator.is_main_process:
                report_validation(run, val_images, write=progress.write)
            accelerator.wait_for_everyone()
        if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.max_steps:
            save(run)
        if out_of_time(run, started):
            break
    progress.close()
    del batches  # stops the DataLoader workers

    # -- finish: the last checkpoint and validation, the exported model
    return finish(run, source, val_images, encoder_before)


def run(argv: list[str] | None = None) -> None:
    """Command line: a bad config, data, model or checkpoint, or missing LPIPS weights, is one line of error
    (exit 2), not a traceback; an unexpected error is a one-line summary, then its traceback (exit 3)."""
    try:
        config = parse_args(argv)
        config.validate()
        main(config)
    except (LPIPSWeightsMissing, ValueError, OSError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)  # bad options, data, model or checkpoint
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as error:  # noqa: BLE001 -- a bug: a summary line, then the traceback
        print(f"error: internal error, {type(error).__name__}: {one_line(error)} (traceback below)", file=sys.stderr)
        traceback.print_exc()
        sys.exit(EXIT_INTERNAL_ERROR)


if __name__ == "__main__":
    run()
