"""Train a KL-VAE with Accelerate.

    accelerate launch -m training.train_vae --config f16c16 --data /path/to/images
    python -m training.train_vae --config cpu_demo --data photos/ --max_steps 200
    torchrun --nproc_per_node 2 -m training.train_vae --config tiny_test --data photos/   # 2 CPU processes (gloo)

Every field of training/config.py can be given as `--field value` after (and over) the config file.
The run leaves OUTPUT_DIR/vae (a diffusers folder with the EMA weights and calibrated latent
normalisation), checkpoints, TensorBoard logs under OUTPUT_DIR/logs and validation grids under
OUTPUT_DIR/samples.
"""

from __future__ import annotations

import copy
import json
import sys
import time
import traceback
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from latent_vae import LatentCodec, calibrate, load_vae, save_vae
from latent_vae.atomic import atomic_directory
from latent_vae.errors import (  # the latent-vae commands' statuses
    EXIT_BAD_INPUT,
    EXIT_INTERNAL_ERROR,
    one_line,
)
from latent_vae.images import error_map, image_grid, image_strip, tensor_to_uint8
from latent_vae.metrics import psnr, ssim
from latent_vae.presets import downsampling_factor

from .checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig, parse_args, to_dict
from .data import CropDataset, ImageSource, hold_out, train_loader, validation_crops
from .frozen_encoder import check_frozen_encoder, freeze_encoder
from .losses import (
    AutoencoderWithLoss,
    LossWeights,
    PatchDiscriminator,
    generator_objective,
    hinge_d_loss,
)
from .lpips import LPIPS, LPIPSWeightsMissing

# -- helpers ----------------------------------------------------------------------------------------


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


def loss_weights(config: TrainConfig) -> LossWeights:
    return LossWeights(
        reconstruction=config.reconstruction_loss, kl=config.kl_weight, logvar_min=config.logvar_min,
        logvar_max=config.logvar_max, lpips=config.lpips_weight, sharpness=config.sharpness_weight,
        sharpness_kind=config.sharpness_loss,
    )


def uses_gan(config: TrainConfig) -> bool:
    # Not tied to max_steps: a run stopped early and resumed must hold the same state as one run straight.
    return config.disc_weight > 0


def all_finite(accelerator: Accelerator, loss: torch.Tensor) -> bool:
    """True when the loss is finite on every rank: all ranks must skip a step together, or DDP hangs."""
    finite = torch.isfinite(loss.detach()).float().reshape(1)
    if accelerator.num_processes > 1:
        finite = accelerator.gather(finite)
    return bool(finite.min() > 0)


def optimizer_step(accelerator: Accelerator, optimizer, parameters, max_grad_norm: float) -> torch.Tensor | None:
    """Unscale (fp16), clip and step one optimiser once gradients are synced; returns the gradient norm.

    With fp16 the scaler steps the inner optimiser and skips it when a gradient is not finite (the norm says so);
    its `update()` is left to the caller, once per iteration. Accelerate's own `step()` updates the scaler for
    each optimiser, which would halve its growth interval with two optimisers.
    """
    if not accelerator.sync_gradients:
        return None
    scaler = accelerator.scaler
    if scaler is None:
        norm = accelerator.clip_grad_norm_(parameters, max_grad_norm) if max_grad_norm > 0 else None
        optimizer.step()
        return norm
    scaler.unscale_(optimizer.optimizer)
    # With max_grad_norm 0 the norm is still computed (inf leaves gradients as they are): it tells an overflow.
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm if max_grad_norm > 0 else float("inf"))
    scaler.step(optimizer.optimizer)
    return norm


def calibration_crops(dataset: CropDataset, count: int) -> list[torch.Tensor]:
    """`count` random crops from the run's own data stream (epochs repeat the images with new crops)."""
    size = len(dataset)
    return [dataset[(i // size, i % size)][0] for i in range(count)]


@torch.no_grad()
def validate(vae, ema: EMAModel | None, crops: torch.Tensor, accelerator: Accelerator, step: int, out_dir: Path,
             batch_size: int) -> dict[str, float]:
    """Reconstruct the fixed validation crops with the weights that will be saved (the EMA's): PSNR, SSIM, a grid."""
    if ema is not None:
        ema.store(vae.parameters())
        ema.copy_to(vae.parameters())
    vae.eval()
    reconstructions = []
    for chunk in crops.split(batch_size):
        with accelerator.autocast():
            posterior = vae.encode(chunk.to(accelerator.device)).latent_dist
            reconstructions.append(vae.decode(posterior.mode()).sample.float().clamp(-1, 1).cpu())
    vae.train()
    if ema is not None:
        ema.restore(vae.parameters())
    reconstruction = torch.cat(reconstructions)
    metrics = {"val/psnr": psnr(crops, reconstruction).mean().item(), "val/ssim": ssim(crops, reconstruction).mean().item()}
    originals, recs = tensor_to_uint8(crops), tensor_to_uint8(reconstruction)
    rows = [image_strip([o, r, error_map(o, r)], ["original", "reconstruction", "error x4"]) for o, r in zip(originals, recs)]
    (out_dir / "samples").mkdir(parents=True, exist_ok=True)
    image_grid(rows).save(out_dir / "samples" / f"step-{step:07d}.png")
    return metrics


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


# -- the run ----------------------------------------------------------------------------------------


def main(config: TrainConfig) -> Path:
    """Train as `config` says; returns the exported model folder (OUTPUT_DIR/vae)."""
    config.validate()
    if config.torch_threads > 0:
        torch.set_num_threads(config.torch_threads)
    out_dir = Path(config.output_dir)
    accelerator = make_accelerator(config)
    rank, world = accelerator.process_index, accelerator.num_processes
    # Per-rank seeds: ranks draw different posterior noise; model init is seeded separately below.
    set_seed(config.seed + rank)
    if accelerator.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

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
    val_crops = validation_crops(val_source, config.num_validation_images, config.validation_resolution,
                                 config.crop_policy)

    lpips = None
    if config.lpips_weight > 0:
        lpips = LPIPS.from_file(config.lpips_weights or None)  # fails now, with what to do, if weights are missing
    vae = load_vae(config.model, seed=config.seed).float().train()
    factor = downsampling_factor(vae.config.block_out_channels)
    for name in ("resolution", "validation_resolution"):
        if getattr(config, name) % factor:
            raise ValueError(f"{name} must be a multiple of the model's downsampling factor {factor}, "
                             f"got {getattr(config, name)}")
    if config.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    encoder_before = freeze_encoder(vae) if config.freeze_encoder else None
    model = AutoencoderWithLoss(vae, loss_weights(config), lpips)
    optimizer = torch.optim.AdamW([p for p in vae.parameters() if p.requires_grad], lr=config.learning_rate,
                                  betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.weight_decay)
    # Not prepared by Accelerate, which would step it once per process per step; stepped once per optimiser step.
    scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                              num_training_steps=config.max_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model: AutoencoderWithLoss = accelerator.unwrap_model(model)
    vae = raw_model.vae
    last_layer = vae.decoder.conv_out.weight  # where LDM's adaptive weight compares gradient norms

    disc = disc_optimizer = raw_disc = None
    if uses_gan(config):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed + 1)
            disc = PatchDiscriminator(config.disc_layers, config.disc_channels)
        disc_optimizer = torch.optim.AdamW(disc.parameters(), lr=config.disc_learning_rate,
                                           betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.weight_decay)
        disc, disc_optimizer = accelerator.prepare(disc, disc_optimizer)
        raw_disc = accelerator.unwrap_model(disc)

    ema = None
    if config.use_ema:
        ema = EMAModel(vae.parameters(), decay=config.ema_decay, use_ema_warmup=config.ema_warmup,
                       power=config.ema_power, min_decay=0.0)

    optimizers = {"optimizer": optimizer, **({"disc_optimizer": disc_optimizer} if disc_optimizer else {})}
    state = {"step": 0, "samples_seen": 0, "nonfinite_skipped": 0, "nonfinite_in_a_row": 0, "images_skipped": 0,
             "overflow_skipped": 0}
    checkpoint = find_checkpoint(out_dir, config.resume, report=accelerator.print) if config.resume else None
    if checkpoint is not None:
        loaded = load_checkpoint(checkpoint, rank, vae=vae, discriminator=raw_disc, ema=ema, optimizers=optimizers)
        state.update({k: loaded.get(k, v) for k, v in state.items()})  # (checkpoints older than a counter lack it)
        scheduler.load_state_dict(loaded["scheduler"])
        if accelerator.scaler is not None and loaded.get("scaler"):
            accelerator.scaler.load_state_dict(loaded["scaler"])
        accelerator.print(f"resumed from {checkpoint} at step {state['step']}")
    elif config.resume and config.resume != "latest":
        raise FileNotFoundError(f"no checkpoint at {config.resume}")

    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(to_dict(config), indent=2))
    if config.report_to != "none":
        accelerator.init_trackers("train_vae", config=to_dict(config))

    dataset_kwargs = {"resolution": config.resolution, "seed": config.seed, "min_scale": config.min_scale,
                      "flip": config.random_flip, "crop_policy": config.crop_policy, "crop_min": config.crop_min}
    loader = train_loader(source, batch_size=config.batch_size, rank=rank, world_size=world,
                          start=state["samples_seen"], num_workers=config.num_workers, **dataset_kwargs)
    batches = iter(loader)
    images_per_step = config.batch_size * config.gradient_accumulation_steps * world
    # Under a time budget the step count at the end is unknown: count steps and show the minutes left instead
    # of a bar towards max_steps that would never fill.
    progress = tqdm(total=None if config.max_minutes > 0 else config.max_steps, initial=state["step"],
                    disable=not accelerator.is_main_process, desc="train", dynamic_ncols=True)

    saved = {"step": state["step"] if checkpoint is not None else -1}

    def save(step: int) -> None:
        saved["step"] = step
        trainer_state = {**state, "seed": config.seed, "world_size": world, "scheduler": scheduler.state_dict(),
                         "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                         "validation_held_out": held_out, "config": to_dict(config)}
        save_checkpoint(accelerator, out_dir, step, vae=vae, discriminator=raw_disc, ema=ema, optimizers=optimizers,
                        trainer_state=trainer_state, keep=config.keep_checkpoints)

    started = time.monotonic()
    window_start, window_steps = time.monotonic(), 0
    logs: dict[str, float] = {}
    while state["step"] < config.max_steps:
        pixels, skipped = next(batches)
        pixels = pixels.to(accelerator.device)
        state["samples_seen"] += pixels.shape[0]
        state["images_skipped"] += skipped
        gan_on = disc is not None and state["step"] >= config.disc_start
        scaler = accelerator.scaler  # fp16 only
        with accelerator.accumulate(*(m for m in (model, disc) if m is not None)):
            with accelerator.autocast():
                out = model(pixels)
                fake_logits = None
                if gan_on:
                    raw_disc.requires_grad_(False)  # the generator's step leaves no gradient in the discriminator
                    fake_logits = raw_disc(out["reconstruction"])
                terms = generator_objective(out, config.kl_weight, fake_logits=fake_logits, last_layer=last_layer,
                                            disc_weight=config.disc_weight, max_weight=config.adaptive_weight_max,
                                            grad_scale=scaler.get_scale() if scaler is not None else 1.0)
            loss = terms["vae_loss"]
            # A NaN/inf loss is a real fault (counted, fatal when it persists). A non-finite adaptive weight is an
            # overflow of its fp16 gradients: it makes the gradients NaN below, so that the scaler skips the step and
            # backs off, as for any overflow. Without a scaler nothing would back off: skip it as a non-finite step.
            stepped = all_finite(accelerator, loss)
            if gan_on:
                if scaler is None:
                    stepped = stepped and all_finite(accelerator, terms["d_weight"])
                loss = loss + terms["gan_loss"]
            if not stepped:
                state["nonfinite_skipped"] += 1
                state["nonfinite_in_a_row"] += 1
                optimizer.zero_grad(set_to_none=True)
                if state["nonfinite_in_a_row"] >= config.max_nonfinite_steps:
                    accelerator.end_training()
                    raise RuntimeError(
                        f"stopped at step {state['step']}: the loss was NaN or inf {state['nonfinite_in_a_row']} "
                        f"times in a row (max_nonfinite_steps). Lower the learning rate, use bf16 rather than fp16, "
                        f"or resume from an earlier checkpoint in {out_dir}")
            else:
                state["nonfinite_in_a_row"] = 0
                accelerator.backward(loss)
                grad_norm = optimizer_step(accelerator, optimizer, model.parameters(), config.max_grad_norm)
                optimizer.zero_grad(set_to_none=True)
                if gan_on:
                    raw_disc.requires_grad_(True)
                    with accelerator.autocast():
                        # One forward for real and fake: GroupNorm is per image, so this equals two calls.
                        logits = disc(torch.cat([pixels, out["reconstruction"].detach()]))
                        d_loss = hinge_d_loss(*logits.chunk(2))
                    accelerator.backward(d_loss)
                    optimizer_step(accelerator, disc_optimizer, disc.parameters(), config.max_grad_norm)
                    disc_optimizer.zero_grad(set_to_none=True)
                    logs.update({"d_loss": d_loss.item(), "g_loss": terms["g_loss"].item(),
                                 "d_weight": terms["d_weight"].item()})
                if accelerator.sync_gradients and scaler is not None:
                    if not torch.isfinite(grad_norm):  # the scaler skipped the generator's step
                        state["overflow_skipped"] += 1
                        stepped = False
                    scaler.update()  # once per iteration, after both optimisers: one growth interval per step
                    logs["loss_scale"] = scaler.get_scale()
                if grad_norm is not None:
                    logs["grad_norm"] = grad_norm.item()
        if not accelerator.sync_gradients:
            continue

        # -- one optimiser step done
        state["step"] += 1
        step = state["step"]
        if stepped:  # the schedule counts updates; a skipped step leaves the learning rate where it was
            scheduler.step()
        if ema is not None:
            ema.step(vae.parameters())
        window_steps += 1
        logs.update({"loss": loss.item(), "pixel_loss": out["pixel_loss"].item(), "kl": out["kl"].item()})
        for key in ("lpips", "sharpness"):
            if key in out:
                logs[key] = out[key].item()
        if step % config.log_every == 0 or step == config.max_steps:
            elapsed = time.monotonic() - window_start
            counts = torch.tensor([state["images_skipped"]], device=accelerator.device)
            images_skipped = int(accelerator.reduce(counts, "sum").item()) if world > 1 else state["images_skipped"]
            logs.update({"lr": scheduler.get_last_lr()[0], "images_per_s": window_steps * images_per_step / elapsed,
                         "nonfinite_skipped": state["nonfinite_skipped"], "images_skipped": images_skipped,
                         "overflow_skipped": state["overflow_skipped"]})
            accelerator.log(logs, step=step)
            postfix = {"loss": f"{logs['loss']:.4f}", "img_s": f"{logs['images_per_s']:.1f}"}
            if config.max_minutes > 0:
                postfix["min_left"] = f"{max(0.0, config.max_minutes - (time.monotonic() - started) / 60):.1f}"
            progress.set_postfix(postfix)
            window_start, window_steps = time.monotonic(), 0
        progress.update(1)

        if config.validate_every and step % config.validate_every == 0 and step < config.max_steps:
            if accelerator.is_main_process:
                metrics = validate(vae, ema, val_crops, accelerator, step, out_dir, config.batch_size)
                accelerator.log(metrics, step=step)
                progress.write(f"step {step}: val PSNR {metrics['val/psnr']:.2f} dB, SSIM {metrics['val/ssim']:.3f}")
            accelerator.wait_for_everyone()
        if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.max_steps:
            save(step)
        if config.max_minutes > 0:
            if accelerator.is_main_process and time.monotonic() - started > 60 * config.max_minutes:
                accelerator.set_trigger()
            if accelerator.check_trigger():  # every rank sees the main process's decision at the same step
                accelerator.print(f"time budget of {config.max_minutes} min reached at step {step}")
                break
    progress.close()
    del batches  # stops the DataLoader workers

    step = state["step"]
    if saved["step"] != step:  # (a run resumed at its last step has nothing new to save)
        save(step)
    out = out_dir / "vae"
    if accelerator.is_main_process:
        metrics = validate(vae, ema, val_crops, accelerator, step, out_dir, config.batch_size)
        accelerator.log(metrics, step=step)
        print(f"step {step}: val PSNR {metrics['val/psnr']:.2f} dB, SSIM {metrics['val/ssim']:.3f}")
        crops = calibration_crops(CropDataset(source, **dataset_kwargs), config.calibration_images)
        export_model(vae, ema, crops, out, accelerator.device, config.batch_size, recalibrate=not config.freeze_encoder)
        if encoder_before is not None:
            record = check_frozen_encoder(config.model, out, encoder_before, out_dir)
            print(f"encoder unchanged (sha256 {record['encoder_sha256_after'][:16]}), normalisation kept: latents made "
                  f"by {config.model} (fingerprint {record['source_fingerprint']}) decode with this decoder")
        if state["images_skipped"]:
            print(f"skipped {state['images_skipped']} unreadable image reads on the main process")
        normalization = "the source's normalisation" if config.freeze_encoder else "calibrated normalisation"
        print(f"saved {out} (EMA weights, {normalization})")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out


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
