"""One training step: the VAE's losses, the GAN with LDM's adaptive weight, the fp16 loss scaler, non-finite steps.

`train_step(state, pixels, step, config)` takes one micro-batch through the generator's forward, backward and
(once gradients are synced) both optimisers' steps, and returns a `StepResult` that logging reads. `TrainState`
holds what the step reads and changes, so that a test can build one around a tiny model and call the step alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from accelerate import Accelerator
from torch import nn

from .config import TrainConfig
from .losses import generator_objective, hinge_d_loss


@dataclass
class TrainState:
    """The models and optimisers one step changes, as `accelerator.prepare` returned them; the fp16 loss scaler is
    Accelerate's (`accelerator.scaler`, None unless fp16 on a GPU)."""

    accelerator: Accelerator
    model: nn.Module  # an AutoencoderWithLoss
    optimizer: torch.optim.Optimizer  # the VAE's
    discriminator: nn.Module | None = None  # a PatchDiscriminator; None: the run has no GAN
    disc_optimizer: torch.optim.Optimizer | None = None
    # Derived: the unwrapped modules (the same objects as the prepared ones' parameters)
    vae: nn.Module = field(init=False)
    raw_discriminator: nn.Module | None = field(init=False)
    last_layer: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.vae = self.accelerator.unwrap_model(self.model).vae
        self.last_layer = self.vae.decoder.conv_out.weight  # where LDM's adaptive weight compares gradient norms
        self.raw_discriminator = (None if self.discriminator is None
                                  else self.accelerator.unwrap_model(self.discriminator))

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Each optimiser by the name its checkpoint file has."""
        named = {"optimizer": self.optimizer}
        if self.disc_optimizer is not None:
            named["disc_optimizer"] = self.disc_optimizer
        return named


@dataclass
class StepResult:
    """What one step measured. Every float field is logged under its name; None: not measured in this step."""

    # -- the generator's loss terms (LossWeights says how they add up)
    loss: float  # the whole generator loss: vae_loss, plus the weighted GAN term when the GAN is on
    pixel_loss: float
    kl: float
    lpips: float | None = None
    sharpness: float | None = None
    scale_equivariance: float | None = None
    # -- the GAN, in a step taken with it on
    g_loss: float | None = None
    d_weight: float | None = None  # the adaptive GAN weight (disc_weight and the pixel-value division included)
    d_loss: float | None = None
    # -- the optimiser step, once gradients are synced
    grad_norm: float | None = None  # the generator's gradient norm before clipping (clipping on, or fp16)
    loss_scale: float | None = None  # fp16: the scaler's scale after this step's update
    # -- why the VAE's weights were not updated
    nonfinite: bool = False  # the loss (or, without a scaler, the adaptive weight) was NaN or inf on some rank
    overflow: bool = False  # fp16: a gradient overflowed; the scaler skipped the update and lowered its scale

    @property
    def stepped(self) -> bool:
        """The VAE's optimiser updated its weights (the learning-rate schedule counts these)."""
        return not (self.nonfinite or self.overflow)

    def logs(self) -> dict[str, float]:
        """The measured values by name (the flags and the terms not measured left out)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {name: value for name, value in values.items() if type(value) is float}


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


def generator_losses(state: TrainState, pixels: torch.Tensor, gan_on: bool,
                     config: TrainConfig) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The VAE's forward and its loss terms, under autocast: (AutoencoderWithLoss's output, generator_objective's)."""
    scaler = state.accelerator.scaler
    with state.accelerator.autocast():
        out = state.model(pixels)
        fake_logits = None
        if gan_on:
            state.raw_discriminator.requires_grad_(False)  # the generator's step leaves no gradient in the discriminator
            fake_logits = state.raw_discriminator(out["reconstruction"])
        terms = generator_objective(out, config.kl_weight, fake_logits=fake_logits, last_layer=state.last_layer,
                                    disc_weight=config.disc_weight, max_weight=config.adaptive_weight_max,
                                    grad_scale=scaler.get_scale() if scaler is not None else 1.0)
    return out, terms


def discriminator_step(state: TrainState, pixels: torch.Tensor, reconstruction: torch.Tensor,
                       max_grad_norm: float) -> torch.Tensor:
    """The discriminator's hinge loss on real images and (detached) reconstructions, and its optimiser step."""
    state.raw_discriminator.requires_grad_(True)
    with state.accelerator.autocast():
        # One forward for real and fake: GroupNorm is per image, so this equals two calls.
        logits = state.discriminator(torch.cat([pixels, reconstruction.detach()]))
        d_loss = hinge_d_loss(*logits.chunk(2))
    state.accelerator.backward(d_loss)
    optimizer_step(state.accelerator, state.disc_optimizer, state.discriminator.parameters(), max_grad_norm)
    state.disc_optimizer.zero_grad(set_to_none=True)
    return d_loss


def _value(out: dict[str, torch.Tensor], name: str) -> float | None:
    return out[name].item() if name in out else None


def train_step(state: TrainState, pixels: torch.Tensor, step: int, config: TrainConfig) -> StepResult:
    """One micro-batch of `pixels` (on the accelerator's device) at optimiser step `step` (counted from 0; the GAN
    is on from `config.disc_start`): forward, backward, and both optimisers' steps once gradients are synced.

    A non-finite loss skips this micro-batch on every rank (no backward). On the micro-batch that would step, neither
    optimiser steps and the gradients accumulated for the step are dropped; an earlier micro-batch's skip leaves
    the step to the others (Accelerate's zero_grad acts only where gradients sync). With
    fp16, a gradient overflow (also a non-finite adaptive weight, which makes the gradients NaN) is the scaler's
    to skip and back off from; without a scaler nothing would back off, so a non-finite adaptive weight skips the
    step as a non-finite loss does. The scaler updates once per step, after both optimisers.
    """
    accelerator, scaler = state.accelerator, state.accelerator.scaler
    gan_on = state.discriminator is not None and step >= config.disc_start
    gan: dict[str, float] = {}
    grad_norm = loss_scale = None
    overflow = False
    with accelerator.accumulate(*(m for m in (state.model, state.discriminator) if m is not None)):
        out, terms = generator_losses(state, pixels, gan_on, config)
        loss = terms["vae_loss"]
        nonfinite = not all_finite(accelerator, loss)
        if gan_on:
            if scaler is None:
                nonfinite = nonfinite or not all_finite(accelerator, terms["d_weight"])
            loss = loss + terms["gan_loss"]
        if nonfinite:
            state.optimizer.zero_grad(set_to_none=True)
        else:
            accelerator.backward(loss)
            norm = optimizer_step(accelerator, state.optimizer, state.model.parameters(), config.max_grad_norm)
            state.optimizer.zero_grad(set_to_none=True)
            if gan_on:
                d_loss = discriminator_step(state, pixels, out["reconstruction"], config.max_grad_norm)
                gan = {"d_loss": d_loss.item(), "g_loss": terms["g_loss"].item(), "d_weight": terms["d_weight"].item()}
            if accelerator.sync_gradients and scaler is not None:
                overflow = not bool(torch.isfinite(norm))  # the scaler skipped the generator's step
                scaler.update()  # once per iteration, after both optimisers: one growth interval per step
                loss_scale = scaler.get_scale()
            if norm is not None:
                grad_norm = norm.item()
    return StepResult(loss=loss.item(), pixel_loss=out["pixel_loss"].item(), kl=out["kl"].item(),
                      lpips=_value(out, "lpips"), sharpness=_value(out, "sharpness"),
                      scale_equivariance=_value(out, "scale_equivariance"), **gan,
                      grad_norm=grad_norm, loss_scale=loss_scale, nonfinite=nonfinite, overflow=overflow)
